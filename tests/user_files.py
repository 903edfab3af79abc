"""The bad-input contract, as one harness every table of cases shares.

A case builds the user's files in a fresh folder, runs one `diablo` command on them and checks what a user
sees and keeps: the exit code, no traceback, one stderr line naming the culprit, and every file and folder the
user had byte-identical afterwards (hashed before and after). Cases run in-process through ``cli.main`` (fast);
those about signals or start-up run the real ``python -m diablo_cli`` in a child process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    raised: str | None = None  # an exception that escaped main(): the traceback a user would have seen


@dataclass
class Case:
    """One bad input. ``setup(root)`` writes the user's files under ``root`` and returns the command's arguments
    (paths relative to ``root``, which is the working directory). ``culprit``: text the error line must hold
    (the key, file or module at fault). ``created``: paths (relative to root) diablo may leave behind. ``run``:
    how to run the command when ``run_diablo`` does not fit (a signal sent at the right moment)."""

    id: str
    setup: Callable[[Path], list[str]]
    culprit: str | tuple[str, ...]
    code: int = 2
    created: tuple[str, ...] = ()
    subprocess: bool = False
    env: dict[str, str] = field(default_factory=dict)
    run: Callable[[list[str], Path], Outcome] | None = None


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: a relative path → sha256 of its bytes (``<dir>`` for a folder)."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = f"<link {os.readlink(path)}>"
        elif path.is_dir():
            found[key] = "<dir>"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run_diablo(argv: list[str], cwd: Path, *, in_child: bool = False, env: dict[str, str] | None = None) -> Outcome:
    """``diablo ARGV`` in ``cwd``: in this process (an escaped exception is recorded, not raised) or in a child."""
    if in_child:
        done = subprocess.run(
            [sys.executable, "-m", "diablo_cli", *argv],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80", **(env or {})},
        )
        return Outcome(done.returncode, done.stdout, done.stderr)
    import contextlib
    import io

    from diablo_cli import cli

    out, err = io.StringIO(), io.StringIO()
    previous_cwd = Path.cwd()
    previous_env = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    code: int | None = 0
    raised = None
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(argv)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:  # exactly what the contract forbids: record it
                raised = traceback.format_exc()
                code = None
    finally:
        os.chdir(previous_cwd)
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return Outcome(code, out.getvalue(), err.getvalue(), raised)


def check_case(case: Case, root: Path) -> Outcome:
    """Run ``case`` in ``root`` and assert the whole contract; returns the outcome for extra checks."""
    root.mkdir(parents=True, exist_ok=True)
    argv = case.setup(root)
    before = snapshot(root)
    if case.run is not None:
        outcome = case.run(argv, root)
    else:
        outcome = run_diablo(argv, root, in_child=case.subprocess, env=case.env)
    shown = f"diablo {' '.join(argv)}\nexit {outcome.code}\nstderr:\n{outcome.stderr}\nstdout:\n{outcome.stdout}"
    assert outcome.raised is None, f"an exception escaped:\n{outcome.raised}\n{shown}"
    assert TRACEBACK not in outcome.stderr and TRACEBACK not in outcome.stdout, shown
    assert outcome.code == case.code, shown
    culprits = (case.culprit,) if isinstance(case.culprit, str) else case.culprit
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    naming = [line for line in lines if all(c in line for c in culprits)]
    assert naming, f"no stderr line names {culprits}:\n{shown}"
    after = snapshot(root)
    changed = sorted(key for key, digest in before.items() if after.get(key) != digest)
    assert not changed, f"user files changed or lost: {changed}\n{shown}"
    leftovers = sorted(key for key in after if key not in before and not _allowed(key, case.created))
    assert not leftovers, f"left behind: {leftovers}\n{shown}"
    return outcome


def _allowed(key: str, created: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix.rstrip("/") + "/") for prefix in created)


def setup(*steps: Callable[[Path], object], argv: list[str]) -> Callable[[Path], list[str]]:
    """A ``Case.setup``: run ``steps`` (each writes some of the user's files under the root), then give ``argv``."""

    def build(root: Path) -> list[str]:
        for step in steps:
            step(root)
        return argv

    return build
