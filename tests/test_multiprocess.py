"""Data-parallel training in 2 CPU processes (gloo) under accelerate: the same adapter on every rank, the same
losses as one process with the same global batch, one writer, and checkpoints that resume across processes."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from diablo_cli.launch import accelerate_launcher
from diablo_cli.recipe import load_recipe
from diablo_cli.tracking import read_metrics
from diablo_cli.train import train

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
WORKER = ROOT / "tests" / "data" / "train_ranks.py"


def losses(output_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(output_dir / "metrics.jsonl") if "loss" in m}


def launch(arguments: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COLUMNS": "200"}  # Rich would wrap report lines at 80 columns
    done = subprocess.run(arguments, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=environment)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(tmp_path):
    common = ["logging.progress=false", "training.max_grad_norm=null"]
    two = tmp_path / "two"
    done = launch([*accelerate_launcher(2, None), str(WORKER), str(TINY), str(tmp_path), f"output.dir={two}",
                   "training.micro_batch_size=2", *common])  # fmt: skip
    assert "global batch 2 × 1 accumulation × 2 process(es) = 4 examples" in done.stdout
    assert done.stdout.count("done:") == 1 and done.stdout.count("trainable of") == 1  # rank 0 reports
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = load_file(two / "adapter_model.safetensors")
    assert all(torch.equal(saved[k.removesuffix(".diablo_blocks") + ".diablo_blocks"], rank0[k]) for k in rank0)
    assert sorted(losses(two)) == list(range(1, 13))  # one metrics writer: no step logged twice

    one = train(
        load_recipe(TINY, [f"output.dir={tmp_path / 'one'}", "training.micro_batch_size=4", *common]),
        console=Console(file=io.StringIO()),
    )
    expected, got = losses(one.output_dir), losses(two)
    for step in range(1, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
    single = load_file(one.output_dir / "adapter_model.safetensors")
    for key, blocks in saved.items():
        torch.testing.assert_close(blocks, single[key], rtol=1e-4, atol=1e-7)


def test_cli_launcher_checkpoints_and_resumes_across_two_processes(tmp_path):
    """With dropout, every rank draws its own masks: resuming must give each rank its own RNG state back."""
    settings = ["--set", "adapter.dropout=0.1", "--set", "logging.progress=false"]
    diablo = [sys.executable, "-m", "diablo_cli", "train", str(TINY), *settings]
    parallel = ["--launcher", "accelerate", "--num-processes", "2"]
    straight = tmp_path / "straight"
    done = launch([*diablo, "-o", str(straight), *parallel])
    assert "× 2 process(es)" in done.stdout
    rng = load_file(straight / "checkpoints" / "step-0000006" / "rng_state.safetensors")
    assert {"cpu", "rank1.cpu"} <= set(rng) and not torch.equal(rng["cpu"], rng["rank1.cpu"])

    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-0000006", interrupted / "checkpoints" / "step-0000006")
    done = launch([*diablo, "-o", str(interrupted), *parallel, "--resume"])
    assert "at step 6" in done.stdout
    assert [losses(interrupted)[s] for s in range(7, 13)] == [losses(straight)[s] for s in range(7, 13)]
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(interrupted / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_launcher_options_are_checked_before_any_process_starts(tmp_path, capsys):
    from diablo_cli.cli import main

    def error_of(*arguments: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(TINY), *arguments])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "--num-processes and --accelerate-config need --launcher accelerate" in error_of("--num-processes", "2")
    assert "--launcher 'mpi': one of none, accelerate" in error_of("--launcher", "mpi")
    assert "adapter.blcks: unknown key" in error_of("--launcher", "accelerate", "--set", "adapter.blcks=3")
    missing = str(tmp_path / "nope.yaml")
    assert "no such file" in error_of("--launcher", "accelerate", "--accelerate-config", missing)
    assert "one of ddp, deepspeed-zero2, deepspeed-zero3, fsdp, fsdp2, zero2, zero3" in error_of(
        "--launcher", "accelerate", "--accelerate-config", "zero4"
    )


def test_accelerate_config_short_names_reach_the_launcher(monkeypatch):
    from diablo_cli import launch
    from diablo_cli.cli import main

    started = {}
    monkeypatch.setattr(launch, "launch_with_accelerate", lambda arguments, **options: started.update(options) or 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(TINY), "--launcher", "accelerate", "--num-processes", "4", "--accelerate-config", "zero3"])
    assert exit_info.value.code == 0
    assert started == {"num_processes": 4, "config_file": ROOT / "configs" / "accelerate" / "deepspeed-zero3.yaml"}


@pytest.mark.parametrize("stage", [2, 3])
def test_diablo_train_under_deepspeed_zero_on_two_cpu_processes_checkpoints_and_resumes(tmp_path, stage, monkeypatch):
    """The whole train.py path under a sharding engine: `diablo train --accelerate-config deepspeed-zeroN` on 2 CPU
    processes (DeepSpeed's CPU accelerator over gloo) trains what one process trains with the same global batch,
    saves the gathered adapter, and its step-6 checkpoint (gathered weights and optimizer state: the one-process
    format) resumes both under DeepSpeed and in one plain process to the same losses."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (it is optional)")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # inherited by the launched processes
    settings = ["--set", "logging.progress=false", "--set", "training.micro_batch_size=2"]
    diablo = [sys.executable, "-m", "diablo_cli", "train", str(TINY), *settings]
    config = ROOT / "configs" / "accelerate" / f"deepspeed-zero{stage}.yaml"
    parallel = ["--launcher", "accelerate", "--num-processes", "2", "--accelerate-config", str(config)]
    sharded = tmp_path / "sharded"
    done = launch([*diablo, "-o", str(sharded), *parallel], timeout=600)
    assert f"deepspeed: ZeRO-{stage}, 1 micro-batch per step, clips at 1.0" in done.stdout
    assert "global batch 2 × 1 accumulation × 2 process(es) = 4 examples" in done.stdout
    assert done.stdout.count("done:") == 1

    one = train(
        load_recipe(TINY, [f"output.dir={tmp_path / 'one'}", "logging.progress=false", "adapter.kernel=blocks"]),
        console=Console(file=io.StringIO()),
    )
    expected, got = losses(one.output_dir), losses(sharded)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-6)
    saved, single = (
        load_file(sharded / "adapter_model.safetensors"),
        load_file(one.output_dir / "adapter_model.safetensors"),
    )
    assert saved.keys() == single.keys()
    for key, blocks in saved.items():
        torch.testing.assert_close(blocks, single[key], rtol=1e-3, atol=1e-6)

    checkpoint = sharded / "checkpoints" / "step-0000006"
    alone = ["--set", "training.micro_batch_size=4", "--set", "adapter.kernel=blocks"]  # the same global batch
    for name, launcher in {"deepspeed": parallel, "one process": alone}.items():
        resumed = tmp_path / name.replace(" ", "-")
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
        done = launch([*diablo, "-o", str(resumed), *launcher, "--resume"], timeout=600)
        assert "at step 6" in done.stdout
        for step in range(7, 13):
            assert losses(resumed)[step] == pytest.approx(got[step], rel=1e-5, abs=1e-6), (name, step)
