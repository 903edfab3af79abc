"""Tables and summaries of what a command did: parameters, merges, quantizations, eval scores, and the
loss plot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from ..atomic import atomic_path
from ..records import (
    MergeReport,
    ParameterReport,
    QuantizeReport,
    SupervisedRun,
    TrainableGroup,
)


def parameter_table(report: ParameterReport, title: str = "DiaBlo parameters") -> Table:
    """Per-module adapter parameters, then the totals against the base model."""
    table = Table(title=title, title_justify="left")
    table.add_column("module")
    table.add_column("layers", justify="right")
    table.add_column("blocks", justify="right")
    table.add_column("block (in×out)", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("dead (padding)", justify="right")
    for entry in report.by_module:
        table.add_row(
            entry.module,
            str(entry.layers),
            ", ".join(str(b) for b in sorted(entry.blocks)),
            ", ".join(f"{d1}×{d2}" for _, d1, d2 in sorted(entry.shapes)),
            f"{entry.parameters:,}",
            f"{entry.dead_parameters:,}",
        )
    table.add_section()
    table.add_row("trainable", "", "", "", f"{report.trainable:,}", f"{report.dead:,}", style="bold")
    table.caption = (
        f"{report.trainable:,} trainable of {report.base:,} base parameters ({report.percent_of_base:.3f}%)"
        + (f"; {report.dead_blocks} whole blocks see only padding" if report.dead_blocks else "")
    )
    return table


def method_table(report: ParameterReport, groups: list[TrainableGroup] | None, title: str) -> Table:
    """A training method's parameter table: DiaBlo's per module (``groups`` None), a baseline's by tensor kind."""
    if groups is None:
        return parameter_table(report, title=title)
    table = Table(title=title, title_justify="left")
    table.add_column("parameter")
    table.add_column("tensors", justify="right")
    table.add_column("shape", justify="right")
    table.add_column("parameters", justify="right")
    for group in groups:
        shown = ", ".join(group.shapes[:2]) + (", …" if len(group.shapes) > 2 else "")
        table.add_row(group.kind, str(group.tensors), shown, f"{group.parameters:,}")
    table.add_section()
    table.add_row("trainable", "", "", f"{report.trainable:,}", style="bold")
    table.caption = f"{report.trainable:,} trainable of {report.base:,} base parameters ({report.percent_of_base:.3f}%)"
    return table


def plot_loss_curve(metrics: list[dict], png_path: Path, title: str) -> Path | None:
    """Training (and validation) loss against optimizer step, as a PNG; None when nothing was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    validation = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    curves = {"train loss": (train, {}), "validation loss": (validation, {"marker": "o"})}
    return plot_curves({label: curve for label, curve in curves.items() if curve[0]}, png_path, title)


def plot_curves(curves: dict[str, tuple[list[tuple[int, float]], dict]], png_path: Path, title: str) -> Path | None:
    """Loss curves (label → ((step, loss) points, matplotlib line options)) on one set of axes, as a PNG."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for label, (points, style) in curves.items():
        axes.plot(*zip(*points, strict=True), label=label, **{"linewidth": 1.5, **style})
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (per supervised token)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return png_path


def merge_summary(report: MergeReport) -> list[str]:
    """The lines ``diablo merge`` ends with: what changed, how it was verified, where it went, what it cost."""
    lines = [cleaned_line("merges", report.output_dir, report.cleaned)] if report.cleaned else []
    if report.dequantized:
        lines.append(
            f"[yellow]note:[/] the base is quantized ({report.dequantized}); the result is a full-precision model"
        )
        if report.dequantization_gap is not None:
            lines.append(
                f"dequantizing alone moves the logits by up to {report.dequantization_gap:.3g} (the quantized kernels "
                "also round activations); the merge below is checked against the dequantized base + adapter"
            )
    if report.untied:
        lines.append(
            f"[yellow]note:[/] {', '.join(report.untied)} was tied to the input embeddings; the merged model unties it"
        )
    changed = (
        f"{report.changed_weights} of {report.adapted_weights} adapted weight matrices changed "
        f"({report.changed_values:,} values in {report.dtype}; the blocks cover {report.adapted_values:,})"
    )
    if report.changed_weights == 0:
        lines.append(
            f"[bold red]warning:[/] {changed}: the adapter is a no-op (all zeros, or too small for {report.dtype})"
        )
    elif report.changed_weights < report.adapted_weights:
        lines.append(f"[yellow]warning:[/] only {changed}; the rest are zero or below {report.dtype}'s rounding")
    else:
        lines.append(changed)
    check = report.verification
    if check is None:
        lines.append("[yellow]not verified[/] (--no-verify)")
    else:
        effect = f"; the adapter moves them by up to {check.adapter_effect:.3g}"
        if check.rounding_floor:
            effect += f"; rounding the base alone to {report.dtype} moves them by {check.rounding_floor:.1e} (relative)"
        lines.append(
            f"[green]verified[/]: merged vs base+adapter logits on {check.tokens} probe tokens differ by at most "
            f"{check.max_abs:.3g} (relative {check.max_relative:.1e}, tolerance {check.tolerance:.0e}){effect}"
        )
    lines.append(
        f"wrote {report.output_dir}: {report.tensors} tensors in {report.shards} shard{'s' * (report.shards != 1)}, "
        f"{report.bytes_written / 1e6:,.1f} MB, {report.dtype}; {report.seconds:.1f}s, "
        f"peak memory {report.peak_rss_bytes / 2**20:,.0f} MiB"
    )
    return lines


def eval_table(scores: dict[str, dict[str, dict[str, float]]], templates: dict[str, str] | None = None) -> Table:
    """Tasks × metrics down, models across: the base and each adapter side by side, with the change from the
    first column (the base when it was evaluated) for every other model."""
    labels = list(scores)
    table = Table(title="diablo eval", title_justify="left")
    table.add_column("task")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("n", justify="right", style="dim")
    for task, metric in iter_metric_cells(scores):
        percent = metric.startswith(PERCENT_METRICS)
        cells = []
        first = scores[labels[0]].get(task, {}).get(metric)
        for index, label in enumerate(labels):
            value = scores[label].get(task, {}).get(metric)
            if value is None:
                cells.append("-")
                continue
            text = format_metric(metric, value)
            if index and first is not None and len(labels) > 1:
                delta = value - first
                sign = "+" if delta >= 0 else ""
                shown = f"{sign}{delta * 100:.1f}" if percent else f"{sign}{delta:.3g}"
                colour = "green" if delta > 0 else "red" if delta < 0 else "dim"
                text += f" [{colour}]({shown})[/]"
            cells.append(text)
        counts = {scores[label].get(task, {}).get("n") for label in labels} - {None}
        table.add_row(task, metric, *cells, "/".join(str(int(c)) for c in sorted(counts)))
    if templates:
        table.caption = "prompt templates: " + ", ".join(f"{label}: {name}" for label, name in templates.items())
    return table


def quantize_summary(report: QuantizeReport) -> list[Any]:
    """What ``diablo quantize`` ends with: sizes, per-layer reconstruction error, perplexities, time."""
    grid = "per channel" if report.group_size in (None, -1) else f"group {report.group_size}"
    method = {"gptq": "GPTQ", "rtn": "round-to-nearest", "bnb-4bit": "bitsandbytes 4-bit"}[report.method]
    title = f"{method}, {report.bits}-bit, {grid}" + (", desc_act" if report.desc_act else "")
    if report.magr:
        magr_grid = "per channel" if report.magr["group_size"] is None else f"per group of {report.magr['group_size']}"
        title += f", after MagR (α={report.magr['alpha']:g} {magr_grid}, {report.magr['iterations']} iterations)"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    ratio = report.size_before_bytes / report.size_after_bytes if report.size_after_bytes else 0.0
    table.add_row(
        "weights on disk",
        f"{report.size_before_bytes / 1e6:,.1f} MB → {report.size_after_bytes / 1e6:,.1f} MB ({ratio:.2f}× smaller)",
    )
    summary = report.error_summary()
    worst = report.worst_layer()
    if summary and worst is not None:
        table.add_row(
            "layer error ‖XW − XŴ‖/‖XW‖",
            f"{len(report.layers)} layers: mean {summary['mean']:.4f}, median {summary['median']:.4f}, "
            f"max {summary['max']:.4f} ({worst.name})",
        )
    magr_layers = [layer for layer in report.layers if layer.magr_error is not None]
    if magr_layers:
        shrink = sum(layer.max_after / layer.max_before for layer in magr_layers) / len(magr_layers)
        drift = max(layer.magr_error for layer in magr_layers)
        table.add_row(
            "MagR",
            f"channel max |W| {100 * (1 - shrink):.1f}% smaller on average; outputs move ≤ {drift:.4f} (relative)",
        )
    calibration = report.calibration
    table.add_row(
        "calibration",
        f"{calibration['samples']} × {calibration['seq_len']} tokens from {calibration['source']} "
        f"({calibration['stream_tokens']:,} tokens of text)"
        + (f", run in {calibration['dtype']}" if calibration.get("dtype") else ""),
    )
    if report.perplexity_before is not None:
        line = f"{report.perplexity_before:.3f} → {report.perplexity_after:.3f}"
        if report.perplexity_magr is not None:
            line = f"{report.perplexity_before:.3f} → {report.perplexity_magr:.3f} after MagR → "
            line += f"{report.perplexity_after:.3f} quantized"
        table.add_row(f"perplexity ({calibration['held_out_tokens']:,} held-out tokens)", line)
    table.add_row("time", ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in report.seconds.items()))
    cleaned = [cleaned_line("quantizations", report.output, report.cleaned)] if report.cleaned else []
    return [*cleaned, table, f"wrote {report.output}" + (f" (GPTQModel's log: {report.log})" if report.log else "")]


def cleaned_line(runs: str, output: Path | str, names: list[str]) -> str:
    """The lasting line for the leftovers of killed runs that a merge or quantization removed beside its output."""
    return f"removed what interrupted {runs} left beside {output}: {', '.join(names)}"


def iter_metric_cells(scores: dict[str, dict[str, dict[str, float]]]) -> Iterator[tuple[str, str]]:
    """(task, metric) pairs in first-seen order across all models, "n" excluded."""
    seen: dict[tuple[str, str], None] = {}
    for row in scores.values():
        for task, metrics in row.items():
            for metric in metrics:
                if metric not in ("n", "samples_per_problem", "tokens"):
                    seen.setdefault((task, metric), None)
    yield from seen


PERCENT_METRICS = ("accuracy", "acc", "acc_norm", "exact_match", "refusal_rate", "f1", "pass@")


def format_metric(metric: str, value: float) -> str:
    """A score as people read it: shares as percentages, correlations and losses as plain numbers."""
    return f"{value:.1%}" if metric.startswith(PERCENT_METRICS) else f"{value:.4g}"


SUPERVISED_STYLE = "bold green"
MASKED_STYLE = "dim"


def describe_supervision(runs: list[SupervisedRun]) -> Text:
    """A training row as the dry run shows it: supervised tokens bold green, masked ones dim, packed examples on
    separate lines."""
    text = Text()
    previous_example = 0
    for run in runs:
        if run.example != previous_example:
            text.append("\n── next example ──\n", style="italic cyan")
            previous_example = run.example
        text.append(run.text, style=SUPERVISED_STYLE if run.supervised else MASKED_STYLE)
    return text
