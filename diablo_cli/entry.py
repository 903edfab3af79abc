"""The ``diablo`` console script's first code: Ctrl-C is handled from the first instant, before the CLI's
imports (Typer, Rich: a tenth of a second) run, so an early interrupt is one line and exit 130, not a traceback."""

from __future__ import annotations

from .interrupts import exit_quietly_on_signals


def main() -> None:
    exit_quietly_on_signals()
    from .cli import main as run_cli

    run_cli()
