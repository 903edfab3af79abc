"""Ctrl-C and SIGTERM as one exception that unwinds every command through its ``finally`` blocks.

Python turns only SIGINT into an exception (KeyboardInterrupt), and Typer turns that into a silent exit 130; a
SIGTERM kills the process without running a single ``finally``. :class:`Interrupted` covers both, and is not a
KeyboardInterrupt so that it reaches ``cli.main``, which prints what was kept and what was removed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
"""The shell's convention (128 + the signal's number), so scripts can tell an interrupt from a failure."""

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_quietly_on_signals() -> None:
    """Until ``interrupts_raised`` takes over, a SIGINT or SIGTERM ends the process with its exit code and one
    line: at start-up (Typer, Rich and the command's modules importing) nothing has been written yet, and
    Python's own KeyboardInterrupt would print a traceback of whatever import it cut."""

    def stop(signum: int, _frame) -> None:
        os.write(2, b"interrupted: diablo stopped before writing anything\n")
        os._exit(EXIT_CODES[signal.Signals(signum).name])

    for sig in _SIGNALS:
        signal.signal(sig, stop)


class Interrupted(BaseException):
    """A SIGINT or SIGTERM arrived. A BaseException like KeyboardInterrupt, so ``except Exception`` lets it pass.

    ``outcome``: what the interrupted command kept and removed, filled in as it unwinds (see ``cli.py``)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES[signal_name]
        self.outcome: str | None = None


@contextmanager
def interrupts_raised() -> Iterator[None]:
    """While the body runs, the first SIGINT or SIGTERM raises :class:`Interrupted`; later ones are ignored, so
    that the clean-up the first one started (removing a staging folder, stopping a child process) is not cut
    short. The previous handlers come back afterwards, unless a signal arrived: then the process is ending and
    a second Ctrl-C must not print a traceback while it does."""
    fired: list[str] = []

    def interrupt(signum: int, _frame) -> None:
        if fired:
            return
        fired.append(signal.Signals(signum).name)
        raise Interrupted(fired[0])

    try:
        previous = {sig: signal.signal(sig, interrupt) for sig in _SIGNALS}
    except ValueError:  # not the main thread: signals are not ours to take
        previous = {}
    try:
        yield
    finally:
        if not fired:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the body runs (a pair of renames that must not stop halfway), then deliver
    the first one that arrived to whatever handler was there before. Outside the main thread: a no-op."""
    arrived: list[int] = []
    try:
        previous = {sig: signal.signal(sig, lambda signum, _frame: arrived.append(signum)) for sig in _SIGNALS}
    except ValueError:  # not the main thread: signals are not ours to hold
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            signal.raise_signal(arrived[0])
