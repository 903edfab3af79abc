"""What diablo will and will not touch: foreign folders under --overwrite (train, merge, quantize), files a user
added to a diablo folder, a folder another run holds, blocked paths, full disks, damaged checkpoints, the
leftovers of killed runs, and a failed run's folder."""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from diablo_cli import run_folder
from diablo_cli.run_folder import (
    LOCK_FILE,
    MARKER_FILE,
    MERGE,
    OPTIMIZER_FILE,
    FolderLock,
    Marker,
    checkpoint_damage,
    list_checkpoints,
    read_marker,
    safetensors_damage,
)
from diablo_cli.tracking import read_metrics
from tests.user_files import Case, check_case, run_diablo, setup, snapshot

RECIPE = """\
base_model: tiny-random-llama
model: {dtype: fp32}
adapter: {blocks: 8, target_modules: QV}
data:
  datasets:
    - {path: bundled://quickstart/train.jsonl, format: prompt_completion, template: chat, limit: 16}
  max_length: 64
training: {max_steps: 2, micro_batch_size: 4, learning_rate: 1.0e-3, logging_steps: 1, save_steps: 1}
logging: {progress: false}
"""
TRAIN = ["train", "r.yaml", "-o", "out"]


@functools.cache
def diablo_run() -> Path:
    """A finished tiny run (3 steps, checkpoints at steps 1 and 2), trained once and copied by the cases."""
    root = Path(tempfile.mkdtemp(prefix="diablo-owner-tests-"))
    (root / "r.yaml").write_text(RECIPE)
    outcome = run_diablo([*TRAIN, "--set", "training.max_steps=3", "--set", "training.save_total_limit=null"], root)
    assert outcome.code == 0, outcome.stderr + (outcome.raised or "")
    return root / "out"


def with_recipe(root: Path) -> None:
    (root / "r.yaml").write_text(RECIPE)


def with_broken_data(root: Path) -> None:
    """Data whose rows lack the format's columns: the run fails after it took its folder, before a checkpoint."""
    with_recipe(root)
    (root / "bad.jsonl").write_text('{"question": "no prompt here"}\n' * 8)


BROKEN_DATA = ["--set", "data.datasets.0.path=bad.jsonl"]


def copy_run(root: Path, name: str = "out") -> Path:
    shutil.copytree(diablo_run(), root / name)
    return root / name


def peft_adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("# my LoRA adapter\n")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}\n')
    (folder / "adapter_model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")


def lightning_run(folder: Path) -> None:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "epoch=1-step=100.ckpt").write_bytes(b"weights")
    (folder / "lightning_logs" / "version_0").mkdir(parents=True)
    (folder / "lightning_logs" / "version_0" / "hparams.yaml").write_text("lr: 0.001\n")


def app_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"port": 8080}\n')
    (folder / "app.py").write_text("print('hello')\n")


HELD: list[int] = []  # lock files the cases hold, as a concurrent run would; released after each case


def hold_lock(path: Path) -> None:
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(handle, f"{os.getpid()}\n".encode())
    HELD.append(handle)


def damage(relative: str, keep: int | None = 100) -> Callable[[Path], None]:
    """Cut a file in the copied run to ``keep`` bytes (None: delete it)."""

    def cut(root: Path) -> None:
        path = root / relative
        if keep is None:
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[:keep])

    return cut


def without_marker(root: Path) -> None:
    (root / "out" / MARKER_FILE).unlink()


def merged_marker(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}\n")
    Marker(MERGE, entries=["config.json"]).write(folder)


def raise_enospc(when: Callable[[str], bool]):
    """A safetensors writer that fails with a full disk for the paths ``when`` picks."""
    from safetensors.torch import save_file

    def writer(tensors, filename, *args, **kwargs):
        if when(str(filename)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return save_file(tensors, filename, *args, **kwargs)

    return writer


FAULTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "train-enospc-at-second-checkpoint": lambda mp: mp.setattr(
        "diablo_cli.checkpoint.save_file", raise_enospc(lambda name: "step-0000002" in name)
    ),
    "train-enospc-at-first-checkpoint": lambda mp: mp.setattr(
        "diablo_cli.checkpoint.save_file", raise_enospc(lambda name: True)
    ),
    "train-enospc-at-final-save": lambda mp: mp.setattr(
        "diablo_cli.adapter.files.save_file", raise_enospc(lambda name: "checkpoints" not in name)
    ),
    "train-read-only-output": lambda mp: mp.setattr(
        run_folder, "write_text_atomic", _raise(OSError(errno.EROFS, os.strerror(errno.EROFS)))
    ),
}


def _raise(err: BaseException):
    def fail(*args, **kwargs):
        raise err

    return fail


CASES = [
    # --- train --overwrite on folders diablo did not write -----------------------------------------------------
    Case(
        "train-overwrite-peft-adapter",
        setup(with_recipe, lambda r: peft_adapter(r / "out"), argv=[*TRAIN, "--overwrite"]),
        ("out", "not written by diablo", "README.md"),
    ),
    Case(
        "train-overwrite-lightning-run",
        setup(with_recipe, lambda r: lightning_run(r / "out"), argv=[*TRAIN, "--overwrite"]),
        ("out", MARKER_FILE),
    ),
    Case(
        "train-overwrite-app-with-config-json",
        setup(with_recipe, lambda r: app_folder(r / "out"), argv=[*TRAIN, "--overwrite"]),
        ("out", "not written by diablo"),
    ),
    Case(
        "train-overwrite-older-diablo-run-without-marker",
        setup(with_recipe, copy_run, without_marker, argv=[*TRAIN, "--overwrite"]),
        ("out", MARKER_FILE, "delete it yourself"),
    ),
    Case(
        "train-overwrite-merged-model",
        setup(with_recipe, lambda r: merged_marker(r / "out"), argv=[*TRAIN, "--overwrite"]),
        ("out", "diablo merge"),
    ),
    Case(
        "train-overwrite-run-with-a-user-file",
        setup(
            with_recipe, copy_run, lambda r: (r / "out" / "notes.txt").write_text("mine"), argv=[*TRAIN, "--overwrite"]
        ),
        ("out", "notes.txt", "did not write"),
    ),
    Case(
        "train-overwrite-run-with-a-user-folder",
        setup(
            with_recipe,
            copy_run,
            lambda r: (r / "out" / "eval").mkdir(),
            lambda r: (r / "out" / "eval" / "scores.json").write_text("{}"),
            argv=[*TRAIN, "--overwrite"],
        ),
        ("out", "eval", "did not write"),
    ),
    Case(
        "train-into-a-run-without-overwrite",
        setup(with_recipe, copy_run, argv=TRAIN),
        ("out", "not empty", "--overwrite"),
    ),
    # --- a folder another run holds ----------------------------------------------------------------------------
    Case(
        "train-overwrite-a-run-in-progress",
        setup(with_recipe, copy_run, lambda r: hold_lock(r / "out" / LOCK_FILE), argv=[*TRAIN, "--overwrite"]),
        ("out", f"pid {os.getpid()}", "in use"),
    ),
    Case(
        "train-resume-a-run-in-progress",
        setup(with_recipe, copy_run, lambda r: hold_lock(r / "out" / LOCK_FILE), argv=[*TRAIN, "--resume"]),
        ("out", f"pid {os.getpid()}", "in use"),
    ),
    # --- blocked paths and faults on disk --------------------------------------------------------------------------
    Case(
        "train-output-under-a-file",
        setup(
            with_recipe, lambda r: (r / "notes.txt").write_text("x"), argv=["train", "r.yaml", "-o", "notes.txt/run"]
        ),
        ("notes.txt", "is a file"),
    ),
    Case(
        "train-output-is-a-file",
        setup(with_recipe, lambda r: (r / "notes.txt").write_text("x"), argv=["train", "r.yaml", "-o", "notes.txt"]),
        ("notes.txt", "not a folder"),
    ),
    Case(
        "train-read-only-output",
        setup(with_recipe, argv=[*TRAIN, "--set", "training.max_steps=1"]),
        ("out", "Read-only file system"),
    ),
    Case(
        "train-enospc-at-second-checkpoint",
        setup(with_recipe, argv=[*TRAIN, "--set", "training.max_steps=3"]),
        ("step-0000002", "No space left on device", "step-0000001 is intact", "--resume"),
        created=("out",),
    ),
    Case(
        "train-enospc-at-first-checkpoint",
        setup(with_recipe, argv=[*TRAIN, "--set", "training.max_steps=3"]),
        ("step-0000001", "No space left on device"),
    ),
    Case(
        "train-enospc-at-final-save",
        setup(with_recipe, argv=TRAIN),
        ("No space left on device", "step-0000001", "is intact", "--resume"),
        created=("out",),
    ),
    # --- resume: foreign folders and damaged checkpoints ------------------------------------------------------------
    Case(
        "train-resume-in-a-lightning-run",
        setup(with_recipe, lambda r: lightning_run(r / "out"), argv=[*TRAIN, "--resume"]),
        ("out", "not a diablo run"),
    ),
    Case(
        "train-resume-a-named-truncated-checkpoint",
        setup(
            with_recipe,
            copy_run,
            damage(f"out/checkpoints/step-0000002/{OPTIMIZER_FILE}"),
            argv=[*TRAIN, "--resume", "out/checkpoints/step-0000002"],
        ),
        ("step-0000002", OPTIMIZER_FILE, "damaged"),
    ),
    Case(
        "train-resume-every-checkpoint-damaged",
        setup(
            with_recipe,
            copy_run,
            damage(f"out/checkpoints/step-0000002/{OPTIMIZER_FILE}"),
            damage("out/checkpoints/step-0000001/trainer_state.json", keep=None),
            argv=[*TRAIN, "--resume"],
        ),
        ("no intact checkpoint", OPTIMIZER_FILE, "trainer_state.json"),
    ),
    # --- a failed run leaves nothing ------------------------------------------------------------------------------
    Case("train-failed-run-leaves-no-folder", setup(with_broken_data, argv=[*TRAIN, *BROKEN_DATA]), "bad.jsonl"),
    Case(
        "train-failed-run-leaves-an-empty-folder-empty",
        setup(with_broken_data, lambda r: (r / "out").mkdir(), argv=[*TRAIN, *BROKEN_DATA]),
        "bad.jsonl",
    ),
    Case(
        "train-failed-run-removes-the-folders-it-made",
        setup(with_broken_data, argv=["train", "r.yaml", "-o", "runs/a/b", *BROKEN_DATA]),
        "bad.jsonl",
    ),
    # --- merge -------------------------------------------------------------------------------------------------
    Case(
        "merge-overwrite-peft-adapter",
        setup(
            lambda r: copy_run(r, "run"),
            lambda r: peft_adapter(r / "m"),
            argv=["merge", "-a", "run", "-o", "m", "--overwrite"],
        ),
        ("m", "not written by diablo"),
    ),
    Case(
        "merge-overwrite-app-with-config-json",
        setup(
            lambda r: copy_run(r, "run"),
            lambda r: app_folder(r / "m"),
            argv=["merge", "-a", "run", "-o", "m", "--overwrite"],
        ),
        ("m", "not written by diablo", "config.json"),
    ),
    Case(
        "merge-overwrite-lightning-run",
        setup(
            lambda r: copy_run(r, "run"),
            lambda r: lightning_run(r / "m"),
            argv=["merge", "-a", "run", "-o", "m", "--overwrite"],
        ),
        ("m", MARKER_FILE),
    ),
    Case(
        "merge-overwrite-a-train-run",
        setup(
            lambda r: copy_run(r, "run"),
            lambda r: copy_run(r, "m"),
            argv=["merge", "-a", "run", "-o", "m", "--overwrite"],
        ),
        ("m", "diablo train"),
    ),
    Case(
        "merge-overwrite-merged-model-with-a-user-file",
        setup(
            lambda r: copy_run(r, "run"),
            lambda r: merged_marker(r / "m"),
            lambda r: (r / "m" / "notes.txt").write_text("mine"),
            argv=["merge", "-a", "run", "-o", "m", "--overwrite"],
        ),
        ("m", "notes.txt"),
    ),
    Case(
        "merge-into-an-output-in-progress",
        setup(
            lambda r: copy_run(r, "run"),
            lambda r: hold_lock(r / f".m{LOCK_FILE}"),
            argv=["merge", "-a", "run", "-o", "m"],
        ),
        ("m", f"pid {os.getpid()}", "in use"),
    ),
    Case(
        "merge-output-under-a-file",
        setup(
            lambda r: copy_run(r, "run"),
            lambda r: (r / "notes.txt").write_text("x"),
            argv=["merge", "-a", "run", "-o", "notes.txt/m"],
        ),
        ("notes.txt", "is a file"),
    ),
    # --- quantize -------------------------------------------------------------------------------------------------
    Case(
        "quantize-overwrite-peft-adapter",
        setup(
            lambda r: peft_adapter(r / "q"),
            argv=["quantize", "--base", "tiny-random-llama", "-o", "q", "-m", "rtn", "--overwrite"],
        ),
        ("q", "not written by diablo"),
    ),
    Case(
        "quantize-overwrite-lightning-run",
        setup(
            lambda r: lightning_run(r / "q"),
            argv=["quantize", "--base", "tiny-random-llama", "-o", "q", "-m", "rtn", "--overwrite"],
        ),
        ("q", MARKER_FILE),
    ),
    Case(
        "quantize-overwrite-app-with-config-json",
        setup(
            lambda r: app_folder(r / "q"),
            argv=["quantize", "--base", "tiny-random-llama", "-o", "q", "-m", "rtn", "--overwrite"],
        ),
        ("q", "not written by diablo"),
    ),
    Case(
        "quantize-overwrite-a-merged-model",
        setup(
            lambda r: merged_marker(r / "q"),
            argv=["quantize", "--base", "tiny-random-llama", "-o", "q", "-m", "rtn", "--overwrite"],
        ),
        ("q", "diablo merge", "not of diablo quantize"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.id in FAULTS:
        FAULTS[case.id](monkeypatch)
    try:
        check_case(case, tmp_path)
    finally:
        while HELD:
            os.close(HELD.pop())


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    FAULTS["train-enospc-at-second-checkpoint"](monkeypatch)
    with_recipe(tmp_path)
    outcome = run_diablo([*TRAIN, "--set", "training.max_steps=3"], tmp_path)
    assert outcome.code == 2
    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out)] == ["step-0000001"]
    assert checkpoint_damage(out / "checkpoints" / "step-0000001") is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]  # no staging left
    monkeypatch.undo()
    resumed = run_diablo([*TRAIN, "--set", "training.max_steps=3", "--resume"], tmp_path)
    assert resumed.code == 0, resumed.stderr
    assert sorted(m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m) == [1, 2, 3]


def test_resume_skips_a_damaged_newest_checkpoint_and_replays_exactly(tmp_path):
    """The step-2 checkpoint is cut short: --resume says so, starts from step 1, and steps 2-3 log the losses an
    uninterrupted run logs."""
    with_recipe(tmp_path)
    straight = run_diablo(["train", "r.yaml", "-o", "straight", "--set", "training.max_steps=3"], tmp_path)
    assert straight.code == 0, straight.stderr
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    for step in ("step-0000001", "step-0000002"):
        shutil.copytree(tmp_path / "straight" / "checkpoints" / step, out / "checkpoints" / step)
    damage(f"out/checkpoints/step-0000002/{OPTIMIZER_FILE}")(tmp_path)
    resumed = run_diablo([*TRAIN, "--set", "training.max_steps=3", "--resume"], tmp_path)
    assert resumed.code == 0, resumed.stderr
    said = " ".join(resumed.stdout.split())
    assert f"checkpoints/step-0000002 is damaged ({OPTIMIZER_FILE} truncated); resuming from step-0000001" in said
    assert "at step 1" in said

    def losses(folder: str) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in read_metrics(tmp_path / folder / "metrics.jsonl") if "loss" in m}

    assert [losses("out")[s] for s in (2, 3)] == [losses("straight")[s] for s in (2, 3)]


def test_a_later_run_cleans_what_killed_runs_left_and_says_so(tmp_path):
    with_recipe(tmp_path)
    out = copy_run(tmp_path)
    staging = out / "checkpoints" / ".step-0000003.x1y2z3"  # a checkpoint being written when the run was killed
    staging.mkdir()
    (staging / OPTIMIZER_FILE).write_bytes(b"partial")
    trash = out / "checkpoints" / ".trash-step-0000000-123-456"  # a rotation cut short
    trash.mkdir()
    (out / ".adapter_model.safetensors.abc12345.tmp").write_bytes(b"partial")
    (out / ".tokenizer-k9").mkdir()
    (out / "notes.txt").write_text("mine")
    outcome = run_diablo([*TRAIN, "--set", "training.max_steps=3", "--resume"], tmp_path)
    assert outcome.code == 0, outcome.stderr
    said = " ".join(outcome.stdout.split())
    assert "removed what interrupted runs left in out:" in said
    for name in ("checkpoints/.step-0000003.x1y2z3", "checkpoints/.trash-step-0000000-123-456", ".tokenizer-k9"):
        assert name in said and not (out / name).exists()
    assert not (out / ".adapter_model.safetensors.abc12345.tmp").exists()
    assert (out / "notes.txt").read_text() == "mine"  # a user's file is never a leftover


def test_rotation_moves_a_checkpoint_out_of_sight_before_deleting_it(tmp_path, monkeypatch):
    """A deletion cut short (here: never done) leaves a hidden trash folder, never a half checkpoint."""
    monkeypatch.setattr(run_folder.shutil, "rmtree", lambda *args, **kwargs: None)
    with_recipe(tmp_path)
    outcome = run_diablo([*TRAIN, "--set", "training.max_steps=3", "--set", "training.save_total_limit=1"], tmp_path)
    assert outcome.code == 0, outcome.stderr
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["step-0000002"]
    assert len(names) == 2 and names[0].startswith(".trash-step-0000001-")


def test_overwrite_replaces_a_diablo_run_and_the_marker_lists_what_it_wrote(tmp_path):
    with_recipe(tmp_path)
    out = copy_run(tmp_path)
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    outcome = run_diablo([*TRAIN, "--overwrite", "--set", "training.max_steps=1"], tmp_path)
    assert outcome.code == 0, outcome.stderr
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1]
    assert not (out / "checkpoints" / "step-0000002").exists()
    marker = read_marker(out)
    assert marker is not None and marker.command == "train"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(marker.entries)
    assert not (out / LOCK_FILE).exists()  # released and removed at the end


def test_a_second_run_into_a_folder_stops_while_the_first_runs(tmp_path):
    """Two real runs: the second stops with one line naming the folder and the first run's pid."""
    with_recipe(tmp_path)
    command = [sys.executable, "-m", "diablo_cli", *TRAIN, "--set", "training.max_steps=400", "--set",
               "training.save_steps=1000"]  # fmt: skip
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = run_diablo([*TRAIN, "--resume"], tmp_path)
        assert second.code == 2
        assert f"out is in use by another diablo run (pid {first.pid})" in " ".join(second.stderr.split())
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # killed with -9: the kernel dropped its lock, and nothing of the second run got into the folder
    assert list_checkpoints(tmp_path / "out") == []
    FolderLock.acquire(tmp_path / "out" / LOCK_FILE, folder=tmp_path / "out", option="--output-dir").release()


def test_a_killed_holder_never_leaves_the_lock_stuck(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from diablo_cli.run_folder import FolderLock; "
        "FolderLock.acquire(Path(sys.argv[1]), folder=Path('.'), option='-o'); print('held', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=rf"in use by another diablo run \(pid {holder.pid}\)"):
        FolderLock.acquire(tmp_path / LOCK_FILE, folder=tmp_path, option="-o")
    holder.kill()
    holder.wait(timeout=30)
    FolderLock.acquire(tmp_path / LOCK_FILE, folder=tmp_path, option="-o").release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_merge_marks_its_output_and_transformers_still_loads_it(tmp_path):
    from transformers import AutoModelForCausalLM

    copy_run(tmp_path, "run")
    first = run_diablo(["merge", "-a", "run", "-o", "m"], tmp_path)
    assert first.code == 0, first.stderr
    marker = read_marker(tmp_path / "m")
    assert marker is not None and marker.command == "merge"
    assert {"config.json", "model.safetensors"} <= set(marker.entries)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "llama"
    leftover = tmp_path / ".m-merging-killed1"  # a merge killed while writing: marked, beside the output
    leftover.mkdir()
    Marker(MERGE).write(leftover)
    again = run_diablo(["merge", "-a", "run", "-o", "m", "--overwrite"], tmp_path)
    assert again.code == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "run"]  # no staging, lock or replaced folder left


def test_safetensors_damage_reads_only_the_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    whole = tmp_path / "whole.safetensors"
    save_file({"a": torch.zeros(64)}, str(whole))
    data = whole.read_bytes()
    cases = {"whole": data, "cut": data[:-10], "empty": b"", "tail": data + b"\x00", "header": b"\x10" + b"\x00" * 7}
    found = {}
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        found[name] = safetensors_damage(path)
    assert found == {
        "whole": None,
        "cut": "truncated",
        "empty": "empty",
        "tail": "longer than its header says",
        "header": "truncated",
    }


def test_user_files_survive_a_refused_overwrite_byte_for_byte(tmp_path):
    """The harness's hash check, spelled out once on the issue's worst case: a PEFT adapter folder."""
    with_recipe(tmp_path)
    peft_adapter(tmp_path / "out")
    before = snapshot(tmp_path)
    outcome = run_diablo([*TRAIN, "--overwrite"], tmp_path)
    assert outcome.code == 2 and snapshot(tmp_path) == before
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_failure_after_the_adapter_is_saved_keeps_the_run(tmp_path, monkeypatch):
    """Only a run that failed before its first checkpoint is removed: one whose adapter is saved stays."""
    from diablo_cli import DiaBloError

    monkeypatch.setattr("diablo_cli.training.run.plot_loss_curve", _raise(DiaBloError("the plot failed")))
    with_recipe(tmp_path)
    outcome = run_diablo([*TRAIN, "--set", "training.save_steps=1000"], tmp_path)
    assert outcome.code == 2 and "the plot failed" in outcome.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "adapter_model.safetensors" in read_marker(tmp_path / "out").entries
