"""Divergence handled honestly: the watchdog's rule, checkpoint health, "the last good checkpoint", and rollback.

Runs use the tiny recipe in fp32. Divergence is made deterministic by scaling the training loss of chosen forward
passes (one micro-batch per step here), so the tests need no learning rate above 1.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from diablo_cli.checkpoint import TrainerState, last_good_checkpoint, saved_state
from diablo_cli.divergence import CheckpointHealth, Watchdog, WatchState
from diablo_cli.errors import DiaBloError, TrainingStopped
from diablo_cli.launch import accelerate_launcher
from diablo_cli.recipe import DivergenceSection, load_recipe
from diablo_cli.tracking import read_metrics
from diablo_cli.train import build_scheduler, checkpoint_health, scale_learning_rate, train, trainable_norm

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
RULE = DivergenceSection().rule()  # the defaults a recipe gets


def poison_losses(monkeypatch: pytest.MonkeyPatch, factor: Callable[[int], float]) -> None:
    """Multiply the loss of the n-th training forward pass (counted from 1; validation passes do not count) by
    ``factor(n)``: a loss that explodes, or turns NaN, exactly when a test says."""
    from diablo_cli.loss import LossPath

    real_loss = LossPath.loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        if not torch.is_grad_enabled():
            return loss
        calls["n"] += 1
        return loss * factor(calls["n"])

    monkeypatch.setattr(LossPath, "loss", poisoned)


def run(tmp_path: Path, *overrides: str, resume: str | None = None, name: str = "run", console: Console | None = None):
    """The tiny recipe in fp32 into ``tmp_path/name``; returns the result and what the console printed."""
    settings = [
        f"output.dir={tmp_path / name}",
        "logging.progress=false",
        "model.dtype=fp32",
        "training.eval_steps=null",
    ]
    console = console or Console(file=io.StringIO(), width=300)
    result = train(load_recipe(TINY, [*settings, *overrides]), resume=resume, console=console)
    return result, console.file.getvalue()


def records(output_dir: Path) -> list[dict]:
    return read_metrics(output_dir / "metrics.jsonl")


def losses(output_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in records(output_dir) if "loss" in m}


def health_of(checkpoint: Path) -> CheckpointHealth:
    state = saved_state(checkpoint)
    assert state is not None and state.health is not None
    return state.health


# -- the rule, on made-up numbers ---------------------------------------------------------------------------------


def observe_all(watchdog: Watchdog, loss_values: list[float], norms: list[float] | None = None, numel: int = 100):
    strikes = []
    for step, loss in enumerate(loss_values, start=1):
        norm = norms[step - 1] if norms is not None else 1.0
        strike = watchdog.observe(step, loss, norm, numel)
        if strike is not None:
            strikes.append(strike)
    return strikes


def quickstart_shaped_losses() -> list[float]:
    """Per-step losses shaped like the README's quickstart curve (docs/quickstart-loss.png): 2.5 falling to 0.8
    by step 5 and 0.15 by step 10, noisy batches between 0.5× and 3× the trend, and a spike after warm-up that
    averages 0.25 over steps 46-50 with one batch at 0.9."""
    generator = torch.Generator().manual_seed(0)
    values = []
    for step in range(1, 161):
        trend = 2.5 * math.exp(-step / 4) + 0.12 * math.exp(-step / 80) + 0.02
        values.append(trend * float(0.5 + 2.5 * torch.rand((), generator=generator)))
    values[47:50] = [0.9, 0.4, 0.3]
    return values


def test_quickstart_shaped_run_never_trips_the_default_rule():
    watchdog = Watchdog(RULE, WatchState())
    assert observe_all(watchdog, quickstart_shaped_losses()) == []


def test_an_exploding_loss_warns_once_then_diverges_after_patience():
    watchdog = Watchdog(RULE, WatchState())
    strikes = observe_all(watchdog, [10.8, 10.7, 10.6, 10.6, 400.0, 500.0, 900.0])
    assert [(s.step, s.count, s.fatal) for s in strikes] == [(5, 1, False), (6, 2, False), (7, 3, True)]
    assert "loss 400 is 37.2× its running average 10.75" in strikes[0].reason
    assert watchdog.state.loss_average == pytest.approx(10.75, abs=0.01)  # strikes stay out of the average


def test_strikes_reset_when_the_loss_comes_back():
    watchdog = Watchdog(RULE, WatchState())
    strikes = observe_all(watchdog, [10.0, 10.0, 200.0, 200.0, 10.0, 200.0, 200.0, 10.0])
    assert [s.count for s in strikes] == [1, 2, 1, 2] and not any(s.fatal for s in strikes)


def test_small_losses_never_count_as_an_explosion():
    """A 20× jump from 0.02 to 0.4 is noise near a memorised loss, not divergence: min_loss keeps it out."""
    assert observe_all(Watchdog(RULE, WatchState()), [0.02] * 5 + [0.4] * 5) == []
    strict = DivergenceSection(min_loss=0.0).rule()
    assert observe_all(Watchdog(strict, WatchState()), [0.02] * 5 + [0.4] * 5)[-1].fatal


def test_non_finite_losses_and_weights_diverge_at_once():
    watchdog = Watchdog(RULE, WatchState())
    assert watchdog.observe(1, float("nan"), 1.0, 10).fatal
    assert watchdog.observe(2, 10.0, float("inf"), 10).fatal
    assert "no longer finite" in watchdog.observe(3, 10.0, float("nan"), 10).reason


def test_weights_above_the_rms_ceiling_strike():
    strikes = observe_all(Watchdog(RULE, WatchState()), [10.0] * 4, norms=[1.0, 500.0, 1e12, 3e12], numel=100)
    assert [s.step for s in strikes] == [3, 4]  # RMS 50 is fine; 1e11 and 3e11 are not
    assert "RMS is 1e+11 (max_weight_rms 100)" in strikes[0].reason


def test_norm_growth_counts_only_once_the_window_has_a_grown_reference():
    """Zero-initialised blocks grow from nothing (and fast under warm-up): the first 2 × norm_window steps are
    not judged; after that, ten-fold growth within a window is."""
    rule = DivergenceSection(norm_window=5).rule()
    warming_up = [0.0, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]  # 5000× growth, inside 2 × window
    assert observe_all(Watchdog(rule, WatchState()), [10.0] * 10, norms=warming_up) == []
    runaway = [*warming_up, 0.6, 0.7, 1.0, 2.0, 6.0, 12.0, 24.0]
    strikes = observe_all(Watchdog(rule, WatchState()), [10.0] * len(runaway), norms=runaway)
    assert [s.step for s in strikes] == [15, 16, 17] and strikes[-1].fatal
    assert "norm grew 12× in 5 steps" in strikes[0].reason


def test_huge_weights_are_measured_as_huge_and_only_non_finite_ones_as_not_finite():
    """Blocks of 5e19 (as in issue 20) overflow an fp32 sum of squares; they are huge, not infinite."""
    norm, numel = trainable_norm([torch.full((4,), 5e19), torch.ones(5)])
    assert norm == pytest.approx(1e20) and numel == 9
    huge = checkpoint_health([torch.full((4,), 5e19)], losses_finite=True, diverging=False)
    assert huge.weights_finite and huge.weights_norm == pytest.approx(1e20)
    for bad in (float("inf"), float("nan")):
        health = checkpoint_health([torch.tensor([1.0, bad])], losses_finite=True, diverging=False)
        assert not health.weights_finite and health.weights_norm is None and not health.good
        assert health.describe() == "its weights are not finite"


def test_trainer_state_round_trips_health_and_reads_old_checkpoints():
    state = TrainerState(
        global_step=4, watch=WatchState(10.0, 0, [1.0]), health=CheckpointHealth(True, 1.0, True, False)
    )
    again = TrainerState(
        **json.loads(json.dumps({**vars(state), "watch": vars(state.watch), "health": vars(state.health)}))
    )
    assert again.health.good and again.watch.norms == [1.0] and again.lr_scale == 1.0
    old = TrainerState(global_step=4)  # a checkpoint from before health was recorded: never called good
    assert old.health is None


def test_scaling_the_learning_rate_keeps_the_schedule_shape():
    def rates(scale_at: int | None) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_scheduler(optimizer, "linear", 2, 10)
        seen = []
        for step in range(10):
            if step == scale_at:
                scale_learning_rate(optimizer, scheduler, 0.5)
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    plain, scaled = rates(None), rates(4)
    assert scaled[:4] == plain[:4]
    assert scaled[4:] == pytest.approx([rate / 2 for rate in plain[4:]])


# -- real runs on the tiny model -----------------------------------------------------------------------------------


def test_normal_runs_do_not_trip_the_watchdog_and_their_checkpoints_are_good(tmp_path):
    """The tiny recipe as shipped, and an aggressive learning rate of 1.0, both finish without a warning."""
    for name, overrides in (("plain", ()), ("aggressive", ("training.learning_rate=1.0",))):
        result, output = run(tmp_path, "training.save_steps=4", *overrides, name=name)
        assert result.steps == 12 and "warning:" not in output
        assert not [m for m in records(result.output_dir) if "event" in m]
        checkpoint = result.output_dir / "checkpoints" / "step-0000008"
        health = health_of(checkpoint)
        assert health.good and 0 < health.weights_norm < 1e3
        assert last_good_checkpoint(result.output_dir)[0] == checkpoint


def test_nan_after_an_explosion_names_the_last_finite_checkpoint_not_the_newest(tmp_path, monkeypatch):
    """The false promise of issue 20: steps 5-6 explode (under patience), step 7 turns NaN. The step-6 checkpoint
    was written while diverging, so the message names step-4, which save_total_limit 1 did not rotate out."""
    poison_losses(monkeypatch, lambda n: 100.0 if n in (5, 6) else (float("nan") if n == 7 else 1.0))
    console = Console(file=io.StringIO(), width=300)
    with pytest.raises(TrainingStopped) as stopped:
        run(tmp_path, "training.save_steps=2", "training.save_total_limit=1", console=console)
    message = str(stopped.value)
    assert stopped.value.exit_code == 3
    assert "loss became nan at step 7" in message and "stopped without updating the adapter" in message
    assert "the last good checkpoint is" in message and "step-0000004" in message and "step-0000006" not in message
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    assert health_of(out / "checkpoints" / "step-0000006").diverging
    assert "warning: step 5: loss" in console.file.getvalue()
    assert [m["step"] for m in records(out) if m.get("event") == "divergence_warning"] == [5]


def test_an_explosion_without_nan_stops_under_the_rule(tmp_path, monkeypatch):
    poison_losses(monkeypatch, lambda n: 100.0 if n >= 5 else 1.0)
    with pytest.raises(TrainingStopped) as stopped:
        run(tmp_path, "training.save_steps=4")
    message = str(stopped.value)
    assert stopped.value.exit_code == 3
    assert "training diverged at step 7: loss" in message and "3 steps in a row" in message
    assert "step-0000004" in message and "training.divergence.action: rollback" in message
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()  # no deliverable from a diverged run


def test_weights_past_the_ceiling_stop_the_run(tmp_path):
    """Adam at lr 1.0 moves every block value by about 1 a step: an RMS ceiling of 0.5 is passed at once."""
    with pytest.raises(TrainingStopped) as stopped:
        run(tmp_path, "training.learning_rate=1.0", "training.divergence.max_weight_rms=0.5")
    assert "max_weight_rms 0.5" in str(stopped.value) and "no good checkpoint was saved" in str(stopped.value)


def test_rollback_recovers_and_a_resume_keeps_the_lower_learning_rate(tmp_path, monkeypatch):
    """Steps 5-7 explode; the run goes back to step 4 at half the learning rate, replays the same batches and
    finishes. Resuming from a later checkpoint of that run gives the very same end."""
    poison_losses(monkeypatch, lambda n: 100.0 if n in (5, 6, 7) else 1.0)
    result, output = run(tmp_path, "training.save_steps=2", "training.divergence.action=rollback")
    out = result.output_dir
    assert result.steps == 12
    assert "rolled back to step 4" in output and "0.5× the learning rate (rollback 1 of 2)" in output
    rollbacks = [m for m in records(out) if m.get("event") == "rollback"]
    assert len(rollbacks) == 1
    assert {k: rollbacks[0][k] for k in ("step", "from_step", "to_step", "lr_factor", "lr_scale")} == {
        "step": 4, "from_step": 7, "to_step": 4, "lr_factor": 0.5, "lr_scale": 0.5,
    }  # fmt: skip
    steps = [m["step"] for m in records(out) if "loss" in m]
    assert steps == list(range(1, 13))  # the abandoned steps 5-7 are replaced, not repeated
    assert max(losses(out).values()) < 11  # no exploded loss left in the curve
    lrs = {m["step"]: m["lr"] for m in records(out) if "lr" in m}
    assert lrs[5] == pytest.approx(0.5 * 0.0007)  # linear decay from 1e-3 at step 2 to 0 at step 12, halved
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    state = saved_state(out / "checkpoints" / "step-0000008")
    assert (state.lr_scale, state.rollbacks) == (0.5, 1) and state.health.good
    assert saved_state(out / "checkpoints" / "step-0000010").lr_scale == 0.5

    monkeypatch.undo()  # a resumed run sees no poison: its steps 9-12 must equal the first run's
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-0000008", interrupted / "checkpoints" / "step-0000008")
    resumed, _ = run(
        tmp_path, "training.save_steps=2", "training.divergence.action=rollback", resume="latest", name="interrupted"
    )
    again = {m["step"]: m["lr"] for m in records(resumed.output_dir) if "lr" in m}
    assert [again[s] for s in range(9, 13)] == [lrs[s] for s in range(9, 13)]
    final = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert all(torch.equal(final[k], adapter[k]) for k in adapter)


def test_rollback_budget_exhausted_stops(tmp_path, monkeypatch):
    poison_losses(monkeypatch, lambda n: 100.0 if n >= 5 else 1.0)
    with pytest.raises(TrainingStopped) as stopped:
        run(
            tmp_path,
            "training.save_steps=2",
            "training.divergence.action=rollback",
            "training.divergence.max_rollbacks=2",
        )
    message = str(stopped.value)
    assert stopped.value.exit_code == 3
    assert "rolled back 2 of 2 times (training.divergence.max_rollbacks)" in message and "step-0000004" in message
    out = tmp_path / "run"
    assert [m["lr_scale"] for m in records(out) if m.get("event") == "rollback"] == [0.5, 0.25]
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] != "step-0000008"  # abandoned ones removed


def test_rollback_with_no_good_checkpoint_stops_honestly(tmp_path, monkeypatch):
    poison_losses(monkeypatch, lambda n: float("nan") if n == 3 else 1.0)
    with pytest.raises(TrainingStopped) as stopped:
        run(tmp_path, "training.save_steps=10", "training.divergence.action=rollback")
    message = str(stopped.value)
    assert "loss became nan at step 3" in message
    assert "no good checkpoint was saved before it; nothing to roll back to" in message


def test_resuming_from_a_diverging_checkpoint_warns_and_names_the_good_one(tmp_path, monkeypatch):
    poison_losses(monkeypatch, lambda n: 100.0 if n >= 5 else 1.0)
    with pytest.raises(TrainingStopped):
        run(tmp_path, "training.save_steps=2", "training.save_total_limit=1")
    monkeypatch.undo()
    diverged = tmp_path / "run" / "checkpoints" / "step-0000006"
    _, output = run(tmp_path, "training.max_steps=7", resume=str(diverged))
    assert "step-0000006 is not a good checkpoint: it was written while the run was diverging" in output
    assert "the last good one is" in output and "step-0000004" in output


def test_rollback_under_ddp_leaves_every_rank_where_one_process_would_be(tmp_path, monkeypatch):
    """Two gloo processes, micro batch 2 each, against one process with micro batch 4: the same rollback, the same
    losses after it, and the same adapter on both ranks."""
    root = Path(__file__).parents[1]
    common = ["logging.progress=false", "model.dtype=fp32", "training.eval_steps=null", "training.save_steps=2"]
    common += ["training.divergence.action=rollback", "training.max_grad_norm=null"]
    two = tmp_path / "two"
    worker = root / "tests" / "data" / "diverge_ranks.py"
    done = subprocess.run(
        [*accelerate_launcher(2, None), str(worker), "5", "7", str(TINY), str(tmp_path), f"output.dir={two}",
         "training.micro_batch_size=2", *common],
        capture_output=True, text=True, timeout=600, cwd=root, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("rolled back to step 4") == 1  # one process reports
    assert [m["to_step"] for m in records(two) if m.get("event") == "rollback"] == [4]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    poison_losses(monkeypatch, lambda n: 100.0 if n in (5, 6, 7) else 1.0)
    one, _ = run(tmp_path, *common[3:], "training.micro_batch_size=4", name="one")
    expected, got = losses(one.output_dir), losses(two)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed-zero3"])
def test_sharded_engines_refuse_rollback_in_one_line_before_loading(tmp_path, monkeypatch, engine):
    """Restoring weights in place is not safe while an engine holds them in shards: refused before any weight loads."""
    monkeypatch.setattr("diablo_cli.training.setup.sharding_engine", lambda accelerator: engine)
    monkeypatch.setattr("diablo_cli.training.setup.load_base_model", pytest.fail)  # the refusal comes first
    with pytest.raises(DiaBloError, match=rf"^training.divergence.action: rollback .* while {engine} shards them; use"):
        run(tmp_path, "training.divergence.action=rollback")
    assert not (tmp_path / "run").exists()


def test_checkpoints_without_a_health_record_are_not_called_good(tmp_path, monkeypatch):
    """A checkpoint written before diablo measured health may hold anything: a stop says so rather than vouch."""
    run(tmp_path, "training.max_steps=4", "training.save_steps=2")
    state_file = tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer_state.json"
    document = json.loads(state_file.read_text())
    for key in ("health", "watch", "lr_scale", "rollbacks"):
        del document["state"][key]
    state_file.write_text(json.dumps(document))
    poison_losses(monkeypatch, lambda n: float("nan"))
    with pytest.raises(TrainingStopped) as stopped:
        run(tmp_path, "training.max_steps=4", "training.save_steps=2", resume="latest")
    assert "loss became nan at step 3" in str(stopped.value)
    assert "no checkpoint is known to be good (1 saved without a health record)" in str(stopped.value)
