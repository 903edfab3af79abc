"""Issue 20, items 4 and 5: Ctrl-C and SIGTERM in every command, and quiet output.

Signals: each case runs the real ``python -m diablo_cli`` in a child process, sends SIGINT or SIGTERM once the
command has reached a given point (torch being imported, a staging folder on disk, the weights being read),
and checks the bad-input contract (tests/user_files.py) plus exit 130 / 143, no staging folder and no child
process left. Quiet: a normal tiny train, merge, eval and inspect leave stderr to diablo's own lines, and the
third-party lines they used to print are in the log. The training bar fits 80 columns.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from diablo_cli.interrupts import EXIT_CODES, Interrupted, interrupts_raised, signals_held
from diablo_cli.models import tiny_model_dir
from diablo_cli.quiet import LOG_FILE
from diablo_cli.report import training_progress
from tests.user_files import TRACEBACK, Case, Outcome, check_case, run_diablo

TINY_RECIPE = Path(__file__).parents[1] / "configs" / "tiny.yaml"
DATA = Path(__file__).parents[1] / "diablo_cli" / "resources" / "quickstart" / "train.jsonl"
FP32 = ["--set", "model.dtype=fp32"]
DIABLO_PREFIXES = ("error:", "warning:", "stopped:", "interrupted:")
NOISE = ("Warning", "WARNING", "it/s", "torchao", "Setting accelerator", "Loading weights", "%|", "gemm_4bit")

Ready = Callable[[Path, str, int], bool]
"""When to send the signal: (working folder, stdout so far, the child's pid) → now."""


# ---- the moments a signal is sent at --------------------------------------------------------------------------


def _mapped(pid: int, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def importing_torch(_cwd: Path, _stdout: str, pid: int) -> bool:
    """Start-up: torch's library is being loaded (``diablo`` imports it inside the command)."""
    return _mapped(pid, "libtorch")


def reading_weights(_cwd: Path, _stdout: str, pid: int) -> bool:
    """``inspect --probe`` is loading the weights to probe: the model's safetensors are mapped after the probe's
    data pipeline (pyarrow) was imported. The safetensors alone would also match the header check inspect makes
    before it probes, a moment a busy machine can catch."""
    return _mapped(pid, "libarrow") and _mapped(pid, "model.safetensors")


def folder_exists(name: str) -> Ready:
    return lambda cwd, _stdout, _pid: (cwd / name).is_dir()


def staging(prefix: str) -> Ready:
    """A hidden staging folder beside the output: the command is writing its model."""

    def ready(cwd: Path, _stdout: str, _pid: int) -> bool:
        return any(p.name.startswith(prefix) and p.is_dir() for p in cwd.iterdir())

    return ready


def quantizing_in_a_child(cwd: Path, stdout: str, pid: int) -> bool:
    """quantize's staging folder exists and GPTQModel's child process runs."""
    return staging(".q-quantizing-")(cwd, stdout, pid) and bool(_descendants(pid))


def printed(text: str) -> Ready:
    return lambda _cwd, stdout, _pid: text in stdout


def logged_a_step(run: str) -> Ready:
    def ready(cwd: Path, _stdout: str, _pid: int) -> bool:
        metrics = cwd / run / "metrics.jsonl"
        return metrics.is_file() and '"loss"' in metrics.read_text()

    return ready


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def interrupt_when(ready: Ready, sig: signal.Signals) -> Callable[[list[str], Path], Outcome]:
    """A ``Case.run``: start ``diablo ARGV`` in a child, send ``sig`` once ``ready``, and check that no process it
    started outlives it."""

    def run(argv: list[str], cwd: Path) -> Outcome:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
        child = subprocess.Popen(
            [sys.executable, "-m", "diablo_cli", *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out: list[str] = []
        err: list[str] = []
        readers = [
            threading.Thread(target=lambda s=stream, into=into: into.extend(s), daemon=True)
            for stream, into in ((child.stdout, out), (child.stderr, err))
        ]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 300
        while not ready(cwd, "".join(out), child.pid):
            assert child.poll() is None, f"diablo ended before the signal:\n{''.join(err)}\n{''.join(out)}"
            assert time.monotonic() < deadline, "the moment to interrupt never came"
            time.sleep(0.01)
        started = _descendants(child.pid)
        child.send_signal(sig)
        code = child.wait(timeout=180)
        left = sorted(pid for pid in started if _alive(pid))  # at once: an orphan may end by itself later
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running after {sig.name}: {left}"
        for reader in readers:
            reader.join(timeout=10)
        return Outcome(code, "".join(out), "".join(err))

    return run


# ---- the user's files -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A two-step tiny run (an adapter folder) that merge and eval cases copy."""
    root = tmp_path_factory.mktemp("trained")
    argv = ["train", str(TINY_RECIPE), *FP32, "--set", "training.max_steps=2", "-o", str(root / "run")]
    outcome = run_diablo(argv, root)
    assert outcome.code == 0, outcome.stderr
    return root / "run"


def with_run(*argv: str) -> Callable[[Path], list[str]]:
    """The user's files: a trained adapter folder ``run`` and the scores of an earlier evaluation."""

    def setup(root: Path) -> list[str]:
        shutil.copytree(_trained_run[0], root / "run", ignore=shutil.ignore_patterns("checkpoints", LOG_FILE))
        (root / "scores.json").write_text('{"earlier": "results the user keeps"}\n')
        return list(argv)

    return setup


def no_files(*argv: str) -> Callable[[Path], list[str]]:
    return lambda root: list(argv)


TRAIN = ("train", str(TINY_RECIPE), *FP32, "-o", "run")
LONG_TRAIN = (*TRAIN, "--set", "training.max_steps=500", "--set", "training.save_steps=1000")
QUANTIZE = (
    "quantize",
    "--base",
    "tiny-random-llama",
    "-o",
    "q",
    "--method",
    "rtn",
    "--samples",
    "4",
    "--seq-len",
    "64",
)
PROBE = ("inspect", "tiny-random-llama", "--probe", str(DATA), "--probe-batches", "1")
MERGE = ("merge", "-a", "run", "-o", "merged")
EVAL = ("eval", "-a", "run", "--task", "loss", "--data", str(DATA), "--limit", "8", "--dtype", "fp32")
EVAL = (*EVAL, "--json", "scores.json")
_trained_run: list[Path] = []  # set by test_signal from the module's trained_run fixture
INT, TERM = signal.SIGINT, signal.SIGTERM

SIGNAL_CASES = [
    Case(
        "train-start-up-sigint",
        no_files(*TRAIN),
        ("interrupted:", "before writing anything"),
        code=130,
        run=interrupt_when(importing_torch, INT),
    ),
    Case(
        "train-start-up-sigterm",
        no_files(*TRAIN),
        ("interrupted:", "before writing anything"),
        code=143,
        run=interrupt_when(importing_torch, TERM),
    ),
    Case(
        "train-before-its-loop-sigint",
        no_files(*TRAIN),
        ("interrupted:", "before its first checkpoint", "nothing was left in run"),
        code=130,
        run=interrupt_when(folder_exists("run"), INT),
    ),
    Case(
        "train-loop-sigterm-checkpoints",
        no_files(*LONG_TRAIN),
        ("stopped:", "SIGTERM", "checkpoint saved", "--resume"),
        code=143,
        created=("run",),
        run=interrupt_when(logged_a_step("run"), TERM),
    ),
    Case(
        "merge-start-up-sigint",
        with_run(*MERGE),
        ("interrupted:", "before writing anything"),
        code=130,
        run=interrupt_when(importing_torch, INT),
    ),
    Case(
        "merge-staging-sigint",
        with_run(*MERGE),
        ("interrupted:", "merge stopped", "nothing written to merged", "no staging folder left"),
        code=130,
        run=interrupt_when(staging(".merged-merging-"), INT),
    ),
    Case(
        "merge-staging-sigterm",
        with_run(*MERGE),
        ("interrupted:", "merge stopped", "nothing written to merged", "no staging folder left"),
        code=143,
        run=interrupt_when(staging(".merged-merging-"), TERM),
    ),
    Case(
        "quantize-start-up-sigterm",
        no_files(*QUANTIZE),
        ("interrupted:", "quantize stopped", "nothing written to q"),
        code=143,
        run=interrupt_when(importing_torch, TERM),
    ),
    Case(
        "quantize-child-running-sigint",
        no_files(*QUANTIZE),
        ("interrupted:", "quantize stopped", "nothing written to q", "no staging folder left"),
        code=130,
        run=interrupt_when(quantizing_in_a_child, INT),
    ),
    Case(
        "quantize-child-running-sigterm",
        no_files(*QUANTIZE),
        ("interrupted:", "quantize stopped", "nothing written to q", "no staging folder left"),
        code=143,
        run=interrupt_when(quantizing_in_a_child, TERM),
    ),
    Case(
        "eval-loading-sigint-keeps-old-scores",
        with_run(*EVAL),
        ("interrupted:", "eval stopped", "no scores were written", "scores.json"),
        code=130,
        run=interrupt_when(printed("loading"), INT),
    ),
    Case(
        "eval-loading-sigterm-keeps-old-scores",
        with_run(*EVAL),
        ("interrupted:", "eval stopped", "no scores were written", "scores.json"),
        code=143,
        run=interrupt_when(printed("loading"), TERM),
    ),
    Case(
        "inspect-probe-sigint",
        no_files(*PROBE),
        ("interrupted:", "inspect stopped while probing tiny-random-llama"),
        code=130,
        run=interrupt_when(reading_weights, INT),
    ),
    Case(
        "inspect-probe-sigterm",
        no_files(*PROBE),
        ("interrupted:", "inspect stopped while probing tiny-random-llama"),
        code=143,
        run=interrupt_when(reading_weights, TERM),
    ),
]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="the moments to interrupt are read from /proc")
@pytest.mark.parametrize("case", SIGNAL_CASES, ids=lambda case: case.id)
def test_signal(case: Case, tmp_path: Path, trained_run: Path) -> None:
    _trained_run[:] = [trained_run]
    outcome = check_case(case, tmp_path)
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"one line, not:\n{outcome.stderr}"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a staging folder was left"


# ---- the mechanism, in this process ---------------------------------------------------------------------------


def test_sigterm_becomes_interrupted_with_exit_143() -> None:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(Interrupted) as raised, interrupts_raised():
            signal.raise_signal(signal.SIGTERM)
        assert (raised.value.signal_name, raised.value.exit_code) == ("SIGTERM", 143)
        assert EXIT_CODES == {"SIGINT": 130, "SIGTERM": 143}
        signal.raise_signal(signal.SIGINT)  # a second signal while the process ends: ignored, no traceback
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_signals_held_deliver_after_the_body() -> None:
    seen: list[str] = []
    previous = signal.signal(signal.SIGINT, lambda *_: seen.append("handled"))
    try:
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            seen.append("body finished")
        assert seen == ["body finished", "handled"]
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- quiet by default -----------------------------------------------------------------------------------------


def _run_child(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """``diablo ARGV`` in a child; returns what it printed and its pid (which names its log in the cache)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "diablo_cli", *argv],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = child.communicate(timeout=600)
    return subprocess.CompletedProcess(argv, child.returncode, stdout, stderr), child.pid


@pytest.fixture(scope="module")
def quiet_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """A normal tiny train, merge, eval and inspect --probe, each with the log it wrote."""
    from diablo_cli.cache import cache_dir

    root = tmp_path_factory.mktemp("quiet")
    logs = cache_dir() / "logs"
    commands = {
        "train": ([*TRAIN, "--set", "training.max_steps=2"], lambda pid: root / "run" / LOG_FILE),
        "merge": (list(MERGE), lambda pid: root / "merged" / LOG_FILE),
        "eval": (list(EVAL), lambda pid: next(logs.glob(f"*-eval-{pid}.log"))),
        "inspect": (list(PROBE), lambda pid: next(logs.glob(f"*-inspect-{pid}.log"))),
    }
    runs = {}
    for name, (argv, log_of) in commands.items():
        done, pid = _run_child(argv, root)
        assert done.returncode == 0, f"{name}:\n{done.stderr}"
        runs[name] = (done, log_of(pid))
    return runs


@pytest.mark.parametrize("command", ["train", "merge", "eval", "inspect"])
def test_stderr_holds_only_diablos_lines(command: str, quiet_runs) -> None:
    done, _log = quiet_runs[command]
    for line in done.stderr.splitlines():
        assert line.startswith(DIABLO_PREFIXES), f"{command} stderr has a line that is not diablo's: {line!r}"
    for text in (done.stderr, done.stdout):
        assert not [noise for noise in NOISE if noise in text], f"{command} printed third-party output:\n{text}"
    assert TRACEBACK not in done.stderr


@pytest.mark.parametrize("command", ["train", "merge", "eval", "inspect"])
def test_third_party_lines_are_in_the_log(command: str, quiet_runs) -> None:
    _done, log = quiet_runs[command]
    text = log.read_text()
    assert text.startswith(f"== diablo {command} (diablo-cli ")
    if importlib.util.find_spec("torchao") is not None:  # its CUDA-only libraries fail to load on every CPU
        assert "torchao" in text and "Failed to load" in text
    if command == "train" and importlib.util.find_spec("deepspeed") is not None:
        assert "Setting accelerator to CPU" in text


def test_verbose_shows_third_party_lines(tmp_path: Path) -> None:
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("needs a library that warns at import (torchao)")
    done, _pid = _run_child(["--verbose", "inspect", "tiny-random-llama"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" in done.stderr


def test_a_log_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache would be\n")
    outcome = run_diablo(["inspect", str(tiny_model_dir())], tmp_path, env={"DIABLO_CACHE": str(blocked)})
    assert outcome.code == 2 and outcome.raised is None
    assert re.fullmatch(r"error: cannot write diablo's log under .*not-a-folder/logs: .*--verbose\n", outcome.stderr)


# ---- the training bar at 80 columns ---------------------------------------------------------------------------


def _rendered_bar(width: int, completed: int, total: int) -> str:
    """The training bar after ``completed`` steps in 10 s, as a ``width``-column terminal shows it."""
    console = Console(file=io.StringIO(), width=width, force_terminal=False)
    clock = iter([0.0, 0.0, 10.0, 10.0, 10.0, 10.0])
    progress, task = training_progress(console, total)
    progress.get_time = lambda: next(clock, 10.0)
    progress.reset(task, total=total)
    for step in (completed // 2, completed):
        progress.update(task, completed=step, loss="2.3456", lr="1.00e-04", speed="12,345", memory="0.6 GiB")
    console.print(*progress.get_renderables())
    return console.file.getvalue()


@pytest.mark.parametrize("total", [1000, 100000])
def test_training_bar_fits_80_columns(total: int) -> None:
    completed = total * 16 // 100
    text = _rendered_bar(80, completed, total)
    lines = text.splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 80, text
    assert f"{completed}/{total}" in text
    assert "loss 2.3456" in text
    assert re.search(r"ETA \d+:\d\d:\d\d", text), text
    assert "…" not in text


def test_wider_terminals_show_more_fields() -> None:
    narrow, wide = _rendered_bar(80, 160, 1000), _rendered_bar(140, 160, 1000)
    assert "0.6 GiB" not in narrow and "0.6 GiB" in wide
    assert "12,345 tok/s" in wide and "lr 1.00e-04" in wide
    tight = _rendered_bar(50, 160, 1000)
    assert "160/1000" in tight and "loss 2.3456" in tight and "ETA" in tight and "…" not in tight


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "--adapter", "no-such-adapter", "--base", "tiny"],
        ["eval", "--adapter", "no-such-adapter", "--base", "tiny", "--task", "quickstart"],
    ],
    ids=["merge", "eval"],
)
def test_an_error_leaves_stdout_empty(argv: list[str], tmp_path: Path) -> None:
    """Progress bars are for terminals: on a pipe or file a refused command writes its one line to stderr and
    nothing to stdout (Rich's transient bars used to leave a blank line there)."""
    outcome = run_diablo(argv, tmp_path)
    assert outcome.code == 2, outcome
    assert outcome.stdout == ""
    assert outcome.stderr.startswith("error:") and "no-such-adapter" in outcome.stderr


def test_ctrl_c_while_the_cli_imports_is_one_line() -> None:
    """The console script catches Ctrl-C before it imports the CLI (Typer, Rich, a tenth of a second): a
    signal then is one line and exit 130, not a KeyboardInterrupt traceback from inside some import."""
    script = (
        "import os, signal, sys, time, types\n"
        "from diablo_cli import entry\n"
        "fake = types.ModuleType('diablo_cli.cli')\n"
        "def main():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(10)\n"
        "fake.main = main\n"
        "sys.modules['diablo_cli.cli'] = fake\n"
        "entry.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_CODES["SIGINT"]
    assert done.stderr == "interrupted: diablo stopped before writing anything\n"
    assert TRACEBACK not in done.stderr
