"""Disk faults and leftovers in merge and quantize: a full disk or a blocked write while the output is written
ends in one line naming the output, with the staging folders, the parent folders the command made and nothing
else removed, and any previous output kept as it was; leftovers of killed runs cleaned beside the output get a
lasting line in the command's summary."""

from __future__ import annotations

import errno
import functools
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from diablo_cli import DiaBloConfig, DiaBloError, attach_diablo, save_adapter
from diablo_cli.merge import Verification
from diablo_cli.models import load_model_folder, tiny_model_dir
from diablo_cli.quantize.pipeline import QuantizeReport, read_quantize_report
from diablo_cli.report import quantize_summary
from diablo_cli.run_folder import MERGE, QUANTIZE, Marker, ModelOutput, read_marker
from tests.user_files import Case, check_case, run_diablo, setup, snapshot

MERGE_ARGS = ["merge", "-a", "run", "-o", "m"]
QUANTIZE_ARGS = ["quantize", "--base", "tiny-random-llama", "-m", "bnb-4bit", "--bnb-compute-dtype", "fp32"]
QUANTIZE_ARGS += ["--samples", "4", "--seq-len", "64"]
NO_SPACE = os.strerror(errno.ENOSPC)
READ_ONLY = os.strerror(errno.EROFS)


@functools.cache
def tiny_adapter() -> Path:
    """A DiaBlo adapter on the tiny model with non-zero blocks, made once with the library and copied by the cases."""
    model = load_model_folder(tiny_model_dir(), torch.float32)
    attach_diablo(model, DiaBloConfig(blocks=4, target_modules="QV"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    root = Path(tempfile.mkdtemp(prefix="diablo-owner2-tests-"))
    return save_adapter(model, root / "adapter", base_model="tiny-random-llama")


def with_adapter(root: Path) -> None:
    shutil.copytree(tiny_adapter(), root / "run")


def previous_output(name: str, command: str) -> Callable[[Path], None]:
    """A model folder an earlier diablo ``command`` wrote (marked, listing its files), for --overwrite to replace."""

    def build(root: Path) -> None:
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}\n')
        save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))
        Marker(command, entries=["config.json", "model.safetensors"]).write(folder)

    return build


def user_folder(root: Path) -> None:
    (root / "models").mkdir()
    (root / "models" / "notes.txt").write_text("mine\n")


def failing(error: Callable[[str], BaseException], *, path_at: int = 1):
    """A writer that fails with ``error(path)`` instead of writing (what a full or read-only disk does); the path
    is its argument number ``path_at``."""

    def writer(*args, **kwargs):
        raise error(str(args[path_at]))

    return writer


def os_error(code: int) -> Callable[[str], OSError]:
    return lambda path: OSError(code, os.strerror(code), path)


def safetensors_no_space(_path: str) -> SafetensorError:
    return SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error {errno.ENOSPC})")


def failed_verification(*args, **kwargs) -> Verification:
    return Verification(max_abs=1.0, max_relative=0.5, adapter_effect=1.0, tolerance=1e-4, tokens=64)


def blocked_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving the finished staging folder onto the output is refused (the previous output was moved aside)."""
    rename = pathlib.Path.rename

    def refusing(self: Path, target):
        if self.name.startswith(".m-merging-") and Path(target).name == "m":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", refusing)


FAULTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "merge-enospc-at-shard-write": lambda mp: mp.setattr("diablo_cli.merge.save_file", failing(os_error(errno.ENOSPC))),
    "merge-safetensors-error-no-space-at-shard-write": lambda mp: mp.setattr(
        "diablo_cli.merge.save_file", failing(safetensors_no_space)
    ),
    "merge-read-only-output": lambda mp: mp.setattr("diablo_cli.merge.save_file", failing(os_error(errno.EROFS))),
    "merge-quota-keeps-the-previous-output": lambda mp: mp.setattr(
        "diablo_cli.merge.save_file", failing(os_error(errno.EDQUOT))
    ),
    "merge-enospc-removes-the-parent-folders-it-made": lambda mp: mp.setattr(
        "diablo_cli.merge.save_file", failing(os_error(errno.ENOSPC))
    ),
    "merge-enospc-keeps-a-user-folder-above-the-ones-it-made": lambda mp: mp.setattr(
        "diablo_cli.merge.save_file", failing(os_error(errno.ENOSPC))
    ),
    "merge-failed-verification-removes-the-parent-folders-it-made": lambda mp: mp.setattr(
        "diablo_cli.merge.verify_merge", failed_verification
    ),
    "merge-blocked-publish-puts-the-previous-output-back": blocked_publish,
    "quantize-enospc-at-report-save": lambda mp: mp.setattr(
        "diablo_cli.quantize.pipeline.write_text_atomic", failing(os_error(errno.ENOSPC), path_at=0)
    ),
    "quantize-safetensors-error-no-space": lambda mp: mp.setattr(
        "diablo_cli.quantize.pipeline.save_file", failing(safetensors_no_space)
    ),
    "quantize-read-only-nested-output": lambda mp: mp.setattr(
        "diablo_cli.quantize.pipeline._save_bnb_4bit", failing(os_error(errno.EROFS))
    ),
    "quantize-enospc-keeps-the-previous-output": lambda mp: mp.setattr(
        "diablo_cli.quantize.pipeline.write_text_atomic", failing(os_error(errno.ENOSPC), path_at=0)
    ),
}

CASES = [
    # --- merge: the shard writer meets a full or read-only disk -------------------------------------------------
    Case(
        "merge-enospc-at-shard-write",
        setup(with_adapter, argv=MERGE_ARGS),
        ("cannot write m:", NO_SPACE, "nothing was written to m", "free some space"),
    ),
    Case(
        "merge-safetensors-error-no-space-at-shard-write",
        setup(with_adapter, argv=MERGE_ARGS),
        ("cannot write m:", NO_SPACE, "nothing was written to m", "free some space"),
    ),
    Case(
        "merge-read-only-output",
        setup(with_adapter, argv=MERGE_ARGS),
        ("cannot write m:", READ_ONLY, "not writable", "choose another output folder"),
    ),
    Case(
        "merge-quota-keeps-the-previous-output",
        setup(with_adapter, previous_output("m", MERGE), argv=[*MERGE_ARGS, "--overwrite"]),
        ("cannot write m:", os.strerror(errno.EDQUOT), "the previous m is kept as it was"),
    ),
    Case(
        "merge-blocked-publish-puts-the-previous-output-back",
        setup(with_adapter, previous_output("m", MERGE), argv=[*MERGE_ARGS, "--overwrite"]),
        ("cannot write m:", os.strerror(errno.EACCES), "the previous m is kept as it was"),
    ),
    # --- merge: parent folders it made are removed after any failure; others are kept ---------------------------
    Case(
        "merge-enospc-removes-the-parent-folders-it-made",
        setup(with_adapter, argv=["merge", "-a", "run", "-o", "a/b/merged"]),
        ("cannot write a/b/merged:", NO_SPACE),
    ),
    Case(
        "merge-enospc-keeps-a-user-folder-above-the-ones-it-made",
        setup(with_adapter, user_folder, argv=["merge", "-a", "run", "-o", "models/new/merged"]),
        ("cannot write models/new/merged:", NO_SPACE),
    ),
    Case(
        "merge-failed-verification-removes-the-parent-folders-it-made",
        setup(with_adapter, argv=["merge", "-a", "run", "-o", "a/b/merged"]),
        ("verification failed", "nothing was written to a/b/merged"),
    ),
    # --- quantize -------------------------------------------------------------------------------------------------
    Case(
        "quantize-enospc-at-report-save",
        setup(argv=[*QUANTIZE_ARGS, "-o", "q"]),
        ("cannot write q:", NO_SPACE, "nothing was written to q", "free some space"),
    ),
    Case(
        "quantize-safetensors-error-no-space",
        setup(argv=[*QUANTIZE_ARGS, "-o", "q"]),
        ("cannot write q:", NO_SPACE, "nothing was written to q"),
    ),
    Case(
        "quantize-read-only-nested-output",
        setup(argv=[*QUANTIZE_ARGS, "-o", "out/x/q"]),
        ("cannot write out/x/q:", READ_ONLY, "not writable"),
    ),
    Case(
        "quantize-enospc-keeps-the-previous-output",
        setup(previous_output("q", QUANTIZE), argv=[*QUANTIZE_ARGS, "-o", "q", "--overwrite"]),
        ("cannot write q:", NO_SPACE, "the previous q is kept as it was"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_adapter()  # built before any fault is in place
    FAULTS[case.id](monkeypatch)
    check_case(case, tmp_path)


def test_merge_says_in_its_summary_what_it_cleaned_beside_the_output(tmp_path):
    with_adapter(tmp_path)
    killed = tmp_path / ".m-merging-killed1"  # a merge killed while writing: marked as diablo's
    killed.mkdir()
    Marker(MERGE).write(killed)
    (tmp_path / ".m-replaced-4242").mkdir()  # a swap cut short: empty
    users = tmp_path / ".m-merging-notes"  # the user's own folder of that name: not diablo's, kept
    users.mkdir()
    (users / "notes.txt").write_text("mine\n")
    outcome = run_diablo(MERGE_ARGS, tmp_path)
    assert outcome.code == 0, outcome.stderr
    said = " ".join(outcome.stdout.split())  # the terminal wraps long lines
    assert said.startswith("removed what interrupted merges left beside m: "), outcome.stdout
    cleaned = said.split(": ", 1)[1].split(" 6 of 6 adapted")[0]
    assert sorted(cleaned.split(", ")) == [".m-merging-killed1", ".m-replaced-4242"], outcome.stdout
    assert (users / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m-merging-notes", "m", "run"]
    assert read_marker(tmp_path / "m").command == MERGE


def test_a_clean_merge_says_nothing_about_leftovers(tmp_path):
    with_adapter(tmp_path)
    outcome = run_diablo(MERGE_ARGS, tmp_path)
    assert outcome.code == 0, outcome.stderr
    assert "removed what" not in outcome.stdout


def test_quantize_summary_shows_the_cleaned_leftovers_as_a_lasting_line():
    report = QuantizeReport(base="tiny", output="q", method="rtn", bits=4, group_size=32, cleaned=[".q-quantizing-x1"])
    report.calibration = {"source": "python-docs", "samples": 4, "seq_len": 64, "stream_tokens": 1}
    assert quantize_summary(report)[0] == "removed what interrupted quantizations left beside q: .q-quantizing-x1"
    report.cleaned = []
    assert not any(isinstance(item, str) and "removed" in item for item in quantize_summary(report))


def test_quantize_says_in_its_summary_what_it_cleaned_beside_the_output(tmp_path):
    killed = tmp_path / ".q-quantizing-killed1"  # a quantization killed while writing: marked as diablo's
    killed.mkdir()
    Marker(QUANTIZE).write(killed)
    outcome = run_diablo([*QUANTIZE_ARGS, "-o", "q"], tmp_path)
    assert outcome.code == 0, outcome.stderr
    said = " ".join(outcome.stdout.split())  # the terminal wraps long lines
    assert said.startswith("removed what interrupted quantizations left beside q: .q-quantizing-killed1 "), said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert read_quantize_report(tmp_path / "q").cleaned == [".q-quantizing-killed1"]


def test_a_disk_fault_outside_the_output_names_that_file(tmp_path):
    output = ModelOutput(tmp_path / "m", command=MERGE, overwrite=False)
    try:
        elsewhere = OSError(errno.ENOSPC, NO_SPACE, "/tmp/diablo-gptq-x/calibration.safetensors")
        with pytest.raises(DiaBloError) as raised:
            output.raise_disk_fault(elsewhere)
        assert str(raised.value).startswith(f"/tmp/diablo-gptq-x/calibration.safetensors: {NO_SPACE};")
        assert "cannot write" not in str(raised.value)
        output.raise_disk_fault(ValueError("not a disk fault"))  # returns: the caller re-raises it
        output.raise_disk_fault(OSError(errno.ENOENT, "gone"))
    finally:
        output.close()
    assert list(tmp_path.iterdir()) == []


def test_a_swap_killed_between_its_renames_gets_the_previous_model_back(tmp_path):
    """Killed after the old output was renamed aside and before the new one took its place: no output, the
    previous model under .m-replaced-PID. The next merge puts it back first, so --overwrite still decides."""
    with_adapter(tmp_path)
    previous_output("m", MERGE)(tmp_path)
    before = snapshot(tmp_path / "m")
    (tmp_path / "m").rename(tmp_path / ".m-replaced-4242")
    refused = run_diablo(MERGE_ARGS, tmp_path)
    assert refused.code == 2 and "--overwrite" in refused.stderr, refused.stderr
    assert snapshot(tmp_path / "m") == before and not (tmp_path / ".m-replaced-4242").exists()
    (tmp_path / "m").rename(tmp_path / ".m-replaced-4243")
    replaced = run_diablo([*MERGE_ARGS, "--overwrite"], tmp_path)
    assert replaced.code == 0, replaced.stderr
    assert ".m-replaced-4243 (the previous m, put back)" in " ".join(replaced.stdout.split())
    assert read_marker(tmp_path / "m").command == MERGE and snapshot(tmp_path / "m") != before
