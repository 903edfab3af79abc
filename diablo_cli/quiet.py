"""Quiet by default: while a command runs, the terminal gets diablo's own lines and a log file gets the rest.

The libraries under diablo talk: torchao and the kernels hub warn about CUDA kernels a CPU never needs,
transformers about deprecations, DeepSpeed announces its accelerator, and loading bars fill the screen. Each
has its own switch, and new ones appear with every release, so the net is cast wide instead:

- file descriptors 1 and 2 (and ``sys.stdout``/``sys.stderr``) point at the log file, which catches C code,
  prints at import time and loggers that hold their own stream; diablo writes through copies of the
  terminal's descriptors taken first;
- Python warnings and every logger's records go to the same file, with time and source;
- tqdm, transformers', datasets' and huggingface_hub's bars are switched off (a bar in a file is noise).

The log lands in the command's output folder as ``diablo.log`` when the command leaves one of its own (a
train run, a merged or quantized model), else it stays under ``<cache>/logs/``. ``--verbose`` turns all of
this off.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ._version import __version__
from .cache import cache_dir
from .errors import DiaBloError
from .interrupts import signals_held
from .run_folder import LOG_FILE

KEPT_LOGS = 20
"""Logs kept under ``<cache>/logs/``, newest first; older ones are deleted as new ones start."""
QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
"""Read when each library is imported, which in ``diablo`` happens inside the command, after this is set."""
DIABLO_LOGGER = "diablo_cli"


@dataclass
class CommandOutput:
    """Where a command writes: ``out`` and ``err`` reach the terminal; ``log`` is the third-party log (None
    with ``--verbose``). ``keep_log_in(folder)`` names the output folder the log should end in."""

    out: TextIO
    err: TextIO
    log: Path | None
    folder: Path | None = None

    def keep_log_in(self, folder: Path) -> None:
        self.folder = folder


@contextmanager
def command_output(command: str, *, verbose: bool) -> Iterator[CommandOutput]:
    """Run a command's body quietly (see the module docstring), or as is with ``verbose``."""
    diablo_lines = logging.StreamHandler(sys.stderr)
    diablo_lines.setFormatter(_DiabloFormatter())
    diablo_lines.setLevel(logging.WARNING)
    diablo_logger = logging.getLogger(DIABLO_LOGGER)
    if verbose:
        diablo_logger.addHandler(diablo_lines)
        try:
            yield CommandOutput(sys.stdout, sys.stderr, None)
        finally:
            diablo_logger.removeHandler(diablo_lines)
        return
    redirect = None
    try:
        with signals_held():  # a Ctrl-C now would leave the terminal half redirected
            log_path = _new_log_path(command)
            redirect = _Redirect(log_path, f"diablo {command} (diablo-cli {__version__}), pid {os.getpid()}")
            output = CommandOutput(redirect.terminal_out, redirect.terminal_err, log_path)
            diablo_lines.setStream(redirect.terminal_err)
            diablo_logger.addHandler(diablo_lines)
        yield output
    finally:
        with signals_held():
            diablo_logger.removeHandler(diablo_lines)
            if redirect is not None:
                redirect.undo()
                if output.folder is not None and output.folder.is_dir() and os.environ.get("RANK", "0") == "0":
                    _append_and_remove(log_path, output.folder / LOG_FILE)


class _DiabloFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class _Redirect:
    """Descriptors 1 and 2, ``sys.stdout``/``sys.stderr``, warnings, logging and environment switches pointed at
    the log; :meth:`undo` puts every one back."""

    def __init__(self, log_path: Path, header: str) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.saved_streams = (sys.stdout, sys.stderr)
        self.saved_environment = {key: os.environ.get(key) for key in QUIET_ENVIRONMENT}
        self.terminal_out = _terminal_copy(sys.stdout, 1)
        self.terminal_err = _terminal_copy(sys.stderr, 2)
        self.saved_descriptors = (os.dup(1), os.dup(2))
        self.log = open(log_path, "w", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115 (undo closes it)
        self.log.write(f"== {header}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.log.flush()
        os.dup2(self.log.fileno(), 1)
        os.dup2(self.log.fileno(), 2)
        sys.stdout = sys.stderr = self.log
        os.environ.update(QUIET_ENVIRONMENT)
        root = logging.getLogger()
        self.saved_level = root.level
        self.handler = logging.StreamHandler(self.log)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(self.handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)

    def undo(self) -> None:
        logging.captureWarnings(False)
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self.saved_level)
        for key, value in self.saved_environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.log.flush()
        sys.stdout, sys.stderr = self.saved_streams
        for descriptor, saved in zip((1, 2), self.saved_descriptors, strict=True):
            os.dup2(saved, descriptor)
            os.close(saved)
        self.log.close()
        for copy, original in ((self.terminal_out, sys.stdout), (self.terminal_err, sys.stderr)):
            if copy is not original:
                copy.close()


def _terminal_copy(stream: TextIO, descriptor: int) -> TextIO:
    """A stream to the terminal that survives ``descriptor`` being pointed elsewhere: a copy of the descriptor
    when ``stream`` writes to it, else ``stream`` itself (a StringIO under test)."""
    try:
        writes_to_descriptor = stream.fileno() == descriptor
    except (AttributeError, OSError, io.UnsupportedOperation):
        writes_to_descriptor = False
    if not writes_to_descriptor:
        return stream
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return open(os.dup(descriptor), "w", encoding=encoding, errors="replace", buffering=1)


def _new_log_path(command: str) -> Path:
    """A fresh log file under ``<cache>/logs/``, pruning the oldest beyond :data:`KEPT_LOGS`."""
    folder = cache_dir() / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in sorted(folder.glob("*.log"))[: -(KEPT_LOGS - 1)]:
            old.unlink(missing_ok=True)
    except OSError as err:
        raise DiaBloError(
            f"cannot write diablo's log under {folder}: {err.strerror}; set DIABLO_CACHE to a writable folder "
            "or pass --verbose"
        ) from None
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"


def _append_and_remove(log_path: Path, target: Path) -> None:
    """Move the log into an output folder, after what earlier runs there logged (a resumed train run)."""
    try:
        with open(log_path, "rb") as source, open(target, "ab") as destination:
            shutil.copyfileobj(source, destination)
    except OSError:
        return  # the log stays in the cache; the command's own work is done
    log_path.unlink(missing_ok=True)
