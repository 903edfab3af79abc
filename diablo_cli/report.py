"""Rich renderings of the library's reports, shared by the CLI and the examples."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .adapter import ParameterReport
from .atomic import atomic_path

if TYPE_CHECKING:
    from .merge import MergeReport


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


def plot_loss_curve(metrics: list[dict], png_path: Path, title: str) -> Path | None:
    """Training (and validation) loss against optimizer step, as a PNG; None when nothing was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    validation = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not train and not validation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1.5)
    if validation:
        axes.plot(*zip(*validation, strict=True), "o-", label="validation loss", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (per supervised token)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return png_path


def training_progress(console: Console, total_steps: int, start: int = 0) -> tuple[Progress, TaskID]:
    """Rich progress for the loop: step, loss, lr, tokens/s, memory and ETA."""
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss [cyan]{task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TextColumn("{task.fields[memory]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("train", total=total_steps, completed=start, loss="—", lr="—", speed="—", memory="")
    return progress, task


@contextmanager
def task_progress(console: Console, label: str) -> Iterator[Callable[[str, int, int | None], None]]:
    """A Rich progress bar driven by ``advance(phase, done, total)`` callbacks; a phase with no total
    shows as a spinner-like bar. Yields the callback."""
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("", total=None)

    def advance(phase: str, done: int, total: int | None) -> None:
        progress.update(task, description=phase, completed=done, total=total)

    with progress:
        yield advance


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars while ours runs (two bars fighting over a line help no one)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def merge_summary(report: MergeReport) -> list[str]:
    """The lines ``diablo merge`` ends with: what changed, how it was verified, where it went, what it cost."""
    lines = []
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
