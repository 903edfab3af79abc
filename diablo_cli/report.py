"""Rich renderings of the library's reports, shared by the CLI and the examples."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from .atomic import atomic_path
from .records import (
    AdapterInspection,
    MergeReport,
    ModelInspection,
    ParameterReport,
    ProbedModule,
    QuantizeReport,
    TrainableGroup,
)
from .records import Progress as PhaseCallback  # rich has a Progress of its own


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


def training_progress(console: Console, total_steps: int, start: int = 0) -> tuple[Progress, TaskID]:
    """Rich progress for the loop: step, loss, lr, tokens/s, memory and ETA, as many as the terminal's width
    holds whole (see :class:`_FittingProgress`)."""
    progress = _FittingProgress(console)
    task = progress.add_task("train", total=total_steps, completed=start, loss="—", lr="—", speed="—", memory="")
    return progress, task


def step_display(progress: Progress, task: TaskID) -> Callable[[int, dict[str, Any] | None], None]:
    """``show(step, record)`` for the loop: moves the bar to ``step`` and, given a metrics record (the loop's
    log line), shows its loss, learning rate, speed and memory."""

    def show(step: int, record: dict[str, Any] | None) -> None:
        if record is None:
            progress.update(task, completed=step)
            return
        memory = f"{record['rss_gib']:.1f} GiB" + (
            f", GPU {record['gpu_peak_gib']:.1f}" if "gpu_peak_gib" in record else ""
        )
        progress.update(
            task,
            completed=step,
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            speed=f"{record['tokens_per_s']:,.0f}",
            memory=memory,
        )

    return show


class _FittingProgress(Progress):
    """The training bar at any width: the richest set of fields that fits whole, dropping the lowest-value ones
    first (memory, elapsed time, lr, speed, the bar itself), so that the step count, loss and ETA are never cut
    the way a squeezed Rich column is ("160/1…")."""

    TIERS: tuple[tuple[str, ...], ...] = (
        ("label", "bar", "steps", "loss", "lr", "speed", "memory", "elapsed", "eta"),
        ("label", "bar", "steps", "loss", "lr", "speed", "eta"),
        ("label", "bar", "steps", "loss", "speed", "eta"),
        ("label", "bar", "steps", "loss", "eta"),
        ("label", "steps", "loss", "eta"),
        ("steps", "loss", "eta"),
    )
    SHORTEST_BAR = 10
    LONGEST_BAR = 40

    def __init__(self, console: Console) -> None:
        self.terminal = console  # Progress asks for renderables before it has a console of its own
        self.bar = BarColumn()
        self.fields: dict[str, ProgressColumn] = {
            "label": TextColumn("[bold]train"),
            "bar": self.bar,
            "steps": MofNCompleteColumn(),
            "loss": TextColumn("loss [cyan]{task.fields[loss]}"),
            "lr": TextColumn("lr {task.fields[lr]}"),
            "speed": TextColumn("{task.fields[speed]} tok/s"),
            "memory": TextColumn("{task.fields[memory]}"),
            "elapsed": TimeElapsedColumn(),
            "eta": _EtaColumn(),
        }
        # No stdout/stderr redirection: third-party output goes to diablo's log (quiet.py), not around the bar.
        super().__init__(console=console, transient=False, redirect_stdout=False, redirect_stderr=False)

    def get_renderables(self):
        width = self.terminal.width
        for shown in self.TIERS:
            text = [name for name in shown if name != "bar"]
            room = width - self._cells(text) - (len(shown) - 1)  # one space between columns
            if room >= (self.SHORTEST_BAR if "bar" in shown else 0):
                break  # else the last tier, cut as it must be
        self.bar.bar_width = min(room, self.LONGEST_BAR)
        self.columns = tuple(self.fields[name] for name in shown)
        yield self.make_tasks_table(self.tasks)

    def _cells(self, names: list[str]) -> int:
        """The widest any task renders these fields, in terminal cells."""
        options = self.terminal.options
        return max(
            (
                sum(Measurement.get(self.terminal, options, self.fields[name](task)).maximum for name in names)
                for task in self.tasks
            ),
            default=0,
        )


class _EtaColumn(TimeRemainingColumn):
    def render(self, task) -> Text:
        return Text.assemble("ETA ", super().render(task))


@contextmanager
def spinner(console: Console, text: str) -> Iterator[None]:
    """``console.status`` without its stdout/stderr redirection (third-party output belongs in the log)."""
    with Live(Spinner("dots", text), console=console, transient=True, redirect_stdout=False, redirect_stderr=False):
        yield


def _phase_bars(console: Console, label: str) -> Progress:
    """The bars `advance(phase, done, total)` callbacks drive: label, phase, bar, count, elapsed time."""
    return Progress(
        TextColumn(label),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )


def _phase_callback(progress: Progress, task: TaskID) -> PhaseCallback:
    def advance(phase: str, done: int, total: int | None) -> None:
        progress.update(task, description=phase, completed=done, total=total)

    return advance


@contextmanager
def task_progress(console: Console, label: str) -> Iterator[PhaseCallback]:
    """A Rich progress bar driven by ``advance(phase, done, total)`` callbacks; a phase with no total
    shows as a spinner-like bar. Yields the callback."""
    progress = _phase_bars(console, f"[bold]{label}")
    with progress:
        yield _phase_callback(progress, progress.add_task("", total=None))


@contextmanager
def row_progress(console: Console) -> Iterator[Callable[[str], PhaseCallback]]:
    """One bar per labelled row (``diablo eval``'s models): yields ``for_row(label)``, which adds a bar and
    returns its ``advance(phase, done, total)`` callback."""
    progress = _phase_bars(console, "[bold]{task.fields[label]}")

    def for_row(label: str) -> PhaseCallback:
        return _phase_callback(progress, progress.add_task("", total=None, label=label))

    with progress:
        yield for_row


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


def model_inspection_view(inspection: ModelInspection) -> list:
    """``diablo inspect MODEL``: the linear layers, the candidate block counts, and the chosen one."""
    modules = Table(
        title=f"{inspection.model}: {inspection.architecture}, {inspection.base_parameters:,} parameters",
        title_justify="left",
    )
    for column in ("linear layer", "letters", "in × out", "layers", "targeted"):
        modules.add_column(column, justify="right" if column in ("layers",) else "left")
    targeted = {(m.module, m.in_features, m.out_features) for m in inspection.targeted}
    for m in inspection.linear_modules:
        hit = (m.module, m.in_features, m.out_features) in targeted
        modules.add_row(
            m.module, m.letters or "", f"{m.in_features}×{m.out_features}", str(m.layers), "✓" if hit else ""
        )
    candidates = Table(
        title=f"block counts for {inspection.targets}" + (f", layers {inspection.layers}" if inspection.layers else ""),
        title_justify="left",
    )
    for column in ("N", "trainable", "% of model", "blocks (in×out)", "dead (padding)", "LoRA r, same budget"):
        candidates.add_column(column, justify="left" if column.startswith("blocks") else "right")
    for c in inspection.candidates:
        label = str(c.blocks) if isinstance(c.blocks, int) else ", ".join(f"{k}={v}" for k, v in c.blocks.items())
        shapes = ", ".join(dict.fromkeys(f"{d1}×{d2}" for d1, d2 in c.block_shapes.values()))
        candidates.add_row(
            label + ("" if c.divides else " *"),
            f"{c.trainable:,}",
            f"{c.percent_of_base:.3f}%",
            shapes,
            f"{c.dead:,}",
            f"{c.lora_rank:.1f}",
            style="bold green" if c.chosen else None,
        )
    candidates.caption = "* N does not divide every targeted dimension: padding, dead entries counted"
    view: list = [modules, candidates]
    if inspection.budget is not None:
        view.append(f"budget: {inspection.budget:,} parameters ({inspection.budget_source}); closest from below:")
        view.append(inspection.recipe_snippet)
    if inspection.lora_snippet is not None:
        view.append(f"the LoRA baseline at this budget (rank {inspection.lora_rank}, closest to N's count):")
        view.append(inspection.lora_snippet)
    if inspection.memory:
        view.append(memory_table(inspection.memory, inspection.memory_settings))
    if inspection.scaling:
        view.append(scaling_table(inspection.scaling, inspection.memory_settings["blocks"]))
    return view


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def scaling_table(scaling: dict, blocks: Any) -> Table:
    """``diablo inspect --gpus K --sharding S``: one GPU's memory, FLOPs, step and run time (scaling.py)."""
    gib = 2**30
    memory, flops, traffic = scaling["memory"], scaling["flops"], scaling["traffic"]
    gpus = scaling["gpus"]
    table = Table(
        title=(
            f"training on {gpus} GPU{'s' if gpus > 1 else ''} "
            f"({'no sharding' if scaling['sharding'] == 'none' else scaling['sharding']}), first-order estimate: "
            f"DiaBlo N={blocks}, micro batch {scaling['batch']} × {scaling['seq_len']} per GPU, gradient "
            f"checkpointing {'on' if scaling['gradient_checkpointing'] else 'off'}"
        ),
        title_justify="left",
    )
    table.add_column("per GPU")
    table.add_column("", justify="right")
    sharded = scaling["sharding"] in ("zero3", "fsdp")
    rows = [
        ("base weights" + (f" (1/{gpus} shard)" if sharded else ""), f"{memory['weights'] / gib:.2f} GiB"),
    ]
    if sharded:
        rows.append(("one block gathered (working)", f"{memory['gathered_weights'] / gib:.2f} GiB"))
    rows += [
        ("adapter + gradients + AdamW", f"{memory['adapter_and_optimizer'] / gib:.2f} GiB"),
        ("activations (micro batch)", f"{memory['activations'] / gib:.2f} GiB"),
        ("logits", f"{memory['logits'] / gib:.2f} GiB"),
        (
            "total",
            f"{memory['total'] / gib:.2f} GiB "
            + ("✓ fits" if scaling["fits"] else "✗ does not fit")
            + f" in {scaling['gpu_memory_gib']:g} GiB",
        ),
        ("training FLOPs per token", f"{flops['total'] / 1e9:.1f} GFLOP"),
        ("tokens per step (all GPUs)", f"{scaling['tokens_per_step']:,}"),
        (
            f"compute per step ({scaling['gpu_tflops']:g} TFLOP/s × MFU {scaling['mfu']:g})",
            _duration(scaling["compute_seconds"]),
        ),
    ]
    if scaling["sharding"] != "none":
        rows += [
            ("collective traffic per step", f"{traffic['total'] / gib:.2f} GiB"),
            (f"communication at {scaling['interconnect_gbps']:g} GB/s", _duration(scaling["communication_seconds"])),
        ]
    rows += [
        ("step (compute + communication)", _duration(scaling["step_seconds"])),
        (f"{scaling['tokens']:,} tokens ({scaling['steps']:,} steps)", _duration(scaling["run_seconds"])),
    ]
    for label, value in rows:
        table.add_row(label, value, style="bold" if label in ("total", "step (compute + communication)") else None)
    table.caption = (
        "first-order estimate: MFU is an assumption; no overlap of communication with compute; CUDA context, "
        "fragmentation and NCCL buffers not counted (see diablo_cli/scaling.py)"
    )
    return table


def memory_table(rows: list[dict], settings: dict) -> Table:
    """Training memory by part for DiaBlo and LoRA at the same budget, without and with checkpointing."""
    gib = 2**30
    table = Table(
        title=(
            f"training memory, first-order estimate: N={settings['blocks']} vs LoRA r={settings['lora_rank']}, "
            f"batch {settings['batch']} × {settings['seq_len']} tokens, base {settings['dtype']}"
            + (f" ({settings['dtype_reason']})" if settings.get("dtype_reason", "").startswith("auto") else "")
            + (f" ({settings['quantization']})" if settings["quantization"] != "none" else "")
            + ", fp32 adapters, AdamW"
        ),
        title_justify="left",
    )
    table.add_column("GiB")
    for row in rows:
        table.add_column(row["method"], justify="right")
    parts = [
        ("trainable parameters", "trainable", lambda v: f"{v:,}"),
        ("base weights", "weights", None),
        ("adapter + gradients + AdamW", "adapter_and_optimizer", None),
        ("activations", "activations", None),
        ("adapter's saved inputs", "adapter_inputs", None),
        ("logits", "logits", None),
        ("total", "total", None),
        ("activations, checkpointed", "checkpointed_activations", None),
        ("total, checkpointed", "checkpointed_total", None),
    ]
    for label, key, fmt in parts:
        table.add_row(
            label,
            *[(fmt or (lambda v: f"{v / gib:.2f}"))(row[key]) for row in rows],
            style="bold" if key.endswith("total") else None,
        )
    return table


def adapter_inspection_view(inspection: AdapterInspection, top: int = 10) -> list:
    """``diablo inspect ADAPTER_DIR``: settings, size, and the layers that moved most."""
    config = inspection.config or {}
    header = (
        f"{inspection.path}: DiaBlo adapter for {inspection.base_model}; N={config.get('blocks')}, "
        f"targets {config.get('target_modules')}, {inspection.parameters:,} parameters "
        f"({inspection.adapter_dtype}), {inspection.bytes_on_disk / 1e6:.1f} MB on disk"
    )
    kinds = Table(title="by module: block norms (Frobenius; rms = per entry)", title_justify="left")
    for column in ("module", "layers", "parameters", "mean norm", "max norm"):
        kinds.add_column(column, justify="left" if column == "module" else "right")
    for kind, stats in inspection.by_module.items():
        kinds.add_row(
            kind,
            str(int(stats["layers"])),
            f"{int(stats['parameters']):,}",
            f"{stats['mean_norm']:.3f}",
            f"{stats['max_norm']:.3f}",
        )
    moved = Table(title=f"the {top} layers that moved most (by rms)", title_justify="left")
    for column in ("layer", "N", "norm", "rms"):
        moved.add_column(column, justify="left" if column == "layer" else "right")
    for layer in sorted(inspection.layers, key=lambda item: -item.rms)[:top]:
        moved.add_row(layer.module, str(layer.blocks), f"{layer.norm:.3f}", f"{layer.rms:.2e}")
    return [header, kinds, moved]


def probe_table(rows: list[ProbedModule], data: str) -> Table:
    """``--probe``: effective ranks (95% energy) per module kind and the largest N Theorem 2 allows."""
    table = Table(
        title=f"Theorem 2 on {data}: 95%-energy ranks of inputs (r1) and output gradients (r2), per batch of "
        f"{rows[0].rows if rows else 0} tokens",
        title_justify="left",
    )
    for column in ("module", "m1×m2", "layers", "r1 mean / max", "r2 mean / max", "largest N", "m1·m2/(r1·r2)"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for row in rows:
        table.add_row(
            row.module,
            f"{row.in_features}×{row.out_features}",
            str(row.layers),
            f"{row.r1_mean:.0f} / {row.r1_max}",
            f"{row.r2_mean:.0f} / {row.r2_max}",
            str(row.largest_n) if row.largest_n else "none",
            f"{row.approximate_bound:.0f}",
        )
    table.caption = "largest N: a common factor of m1, m2 with N ≥ ⌈r1·N/m1⌉·⌈r2·N/m2⌉ for the largest ranks seen"
    return table


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
