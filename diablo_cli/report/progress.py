"""Live progress on the terminal: the training bar, spinners, and phase bars fed through ``records.Progress``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from rich.text import Text

from ..records import Progress as PhaseCallback  # rich has a Progress of its own


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
        disable=not console.is_terminal,  # transient bars leave nothing in a file or pipe but a stray blank line
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
