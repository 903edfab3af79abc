"""`diablo train` on the tiny recipe: outputs, exact resume, signals, NaN stop, output-dir safety."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from diablo_cli import DiaBloError
from diablo_cli.errors import TrainingStopped
from diablo_cli.recipe import load_recipe
from diablo_cli.tracking import read_metrics
from diablo_cli.train import train
from diablo_cli.training.setup import TORCH_ADAMW, optimizer_class

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def run(tmp_path: Path, *overrides: str, resume: str | None = None, name: str = "run"):
    recipe = load_recipe(TINY, [f"output.dir={tmp_path / name}", "logging.progress=false", *overrides])
    console = Console(file=io.StringIO(), width=200)
    result = train(recipe, resume=resume, console=console)
    return result, console.file.getvalue()


def train_losses(output_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(output_dir / "metrics.jsonl") if "loss" in m}


def test_tiny_run_writes_everything_a_user_expects(tmp_path):
    result, output = run(tmp_path)
    out = result.output_dir
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.jsonl", "loss.png"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "train_summary.json"} <= names
    assert result.steps == 12
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1]
    evals = [m for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [6, 12] and all(m["eval_perplexity"] > 1 for m in evals)
    record = read_metrics(out / "metrics.jsonl")[0]
    assert {"lr", "grad_norm", "tokens_per_s", "rss_gib", "epoch"} <= set(record)
    # save_steps=6 with save_total_limit=2: only the step-6 checkpoint (the end saves the final adapter)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000006"]
    assert load_recipe(out / "recipe.yaml").adapter.blocks == 8
    assert "trainable of" in output and "done:" in output
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_replays_the_uninterrupted_run_exactly(tmp_path):
    """Stop after the step-6 checkpoint, resume: steps 7-12 and the final adapter equal the straight run."""
    settings = ("adapter.dropout=0.1", "training.lr_scheduler=cosine")  # dropout: the RNG state must resume too
    straight, _ = run(tmp_path, *settings, name="straight")
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight.output_dir / "checkpoints" / "step-0000006", interrupted / "checkpoints" / "step-0000006")
    resumed, output = run(tmp_path, *settings, resume="latest", name="interrupted")
    assert "resuming from" in output and "at step 6" in output
    expected, got = train_losses(straight.output_dir), train_losses(resumed.output_dir)
    assert [got[s] for s in range(7, 13)] == [expected[s] for s in range(7, 13)]
    a = load_file(straight.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    """Loss normalised by the window's supervised tokens: 2 × 2 accumulated equals one batch of 4."""
    common = ("data.shuffle=false", "training.max_steps=3", "training.max_grad_norm=null")
    big, _ = run(tmp_path, *common, "training.micro_batch_size=4", name="big")
    accumulated, _ = run(
        tmp_path, *common, "training.micro_batch_size=2", "training.gradient_accumulation_steps=2", name="acc"
    )
    big_losses, acc_losses = train_losses(big.output_dir), train_losses(accumulated.output_dir)
    for step in (1, 2, 3):
        assert acc_losses[step] == pytest.approx(big_losses[step], rel=1e-5)


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "diablo_cli", "train", str(TINY), "-o", str(out),
        "--set", "training.max_steps=400", "--set", "training.save_steps=1000", "--set", "logging.progress=false",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM at step" in stderr and "Traceback" not in stderr
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["state"]["global_step"]
    assert stopped_at >= 3
    resumed, _ = run(tmp_path, f"training.max_steps={stopped_at + 2}", resume="latest", name="run")
    assert resumed.steps == stopped_at + 2
    assert sorted(train_losses(out))[-1] == stopped_at + 2


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from test_divergence import poison_losses

    poison_losses(monkeypatch, lambda n: float("nan") if n > 8 else 1.0)  # training steps 1-8 are fine
    with pytest.raises(TrainingStopped) as stopped:
        run(tmp_path, "training.eval_steps=null", "training.save_steps=4")
    assert stopped.value.exit_code == 3
    message = str(stopped.value)
    assert "loss became nan at step 9" in message and "step-0000008" in message
    assert not (tmp_path / "run" / "adapter_config.json").exists()  # no final adapter from a broken run


def test_output_dir_is_never_clobbered(tmp_path):
    foreign = tmp_path / "run"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DiaBloError, match=r"output dir .*run is not empty \(thesis.tex\); pass --overwrite"):
        run(tmp_path, "training.max_steps=1")
    with pytest.raises(DiaBloError, match="was not written by diablo"):
        run(tmp_path, "training.max_steps=1", "output.overwrite=true")
    assert (foreign / "thesis.tex").read_text() == "precious"
    run(tmp_path, "training.max_steps=2", name="previous")
    with pytest.raises(DiaBloError, match="is not empty"):
        run(tmp_path, "training.max_steps=2", name="previous")
    again, _ = run(tmp_path, "training.max_steps=3", "output.overwrite=true", name="previous")
    assert again.steps == 3 and sorted(train_losses(again.output_dir)) == [1, 2, 3]


def test_prompts_longer_than_max_length_are_refused_with_a_reason(tmp_path):
    with pytest.raises(DiaBloError, match="max_length"):
        run(tmp_path, "data.max_length=8")


def test_cli_dry_run_shows_recipe_budget_and_masked_examples(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "diablo_cli", "train", str(TINY), "--dry-run", "-o", str(tmp_path / "dry")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "base_model: tiny-random-llama" in out and "trainable of" in out
    assert "memory at micro batch 4 × 128 tokens" in out and "example 1" in out and "example 2" in out
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing


def test_cli_reports_recipe_errors_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("learning_rate:", "learnig_rate:"))
    result = subprocess.run(
        [sys.executable, "-m", "diablo_cli", "train", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "training.learnig_rate: unknown key; did you mean 'learning_rate'?" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_real_model_training_loss_goes_down(tmp_path, smollm2_dir):
    result, output = run(
        tmp_path,
        "base_model=smollm2-135m",
        "adapter.blocks=64",
        "training.max_steps=10",
        "training.learning_rate=2e-3",
        "training.eval_steps=null",
        "training.save_steps=null",
        "training.logging_steps=2",
    )
    losses = train_losses(result.output_dir)
    assert losses[10] < 0.5 * losses[2], losses
    assert "1,658,880 trainable of 134,515,008" in output.replace("\n", " ") or "1,658,880" in output


def test_training_folds_by_default_and_learns_what_the_block_kernel_learns(tmp_path, monkeypatch):
    """The default path is the fold kernel (every adapted layer's forward goes through it), and on the fp32
    tiny recipe its losses and trained blocks equal the separate-product kernel's."""
    from diablo_cli.adapter import kernels

    calls = {"fold": 0}
    original = kernels.FoldedLinear.apply

    def counting(*args):
        calls["fold"] += 1
        return original(*args)

    monkeypatch.setattr(kernels.FoldedLinear, "apply", counting)
    folded, output = run(tmp_path, "training.max_steps=4", name="fold")
    assert "kernel: fold on all 21 layers" in output and calls["fold"] > 0
    monkeypatch.setattr(kernels.FoldedLinear, "apply", original)
    separate, output = run(tmp_path, "training.max_steps=4", "adapter.kernel=blocks", name="blocks")
    assert "kernel: blocks on all 21 layers" in output
    losses = train_losses(folded.output_dir)
    assert losses == pytest.approx(train_losses(separate.output_dir), rel=1e-4)
    a = load_file(folded.output_dir / "adapter_model.safetensors")
    b = load_file(separate.output_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "weights"),
    [("diablo", "adapter_model.safetensors"), ("lora", "adapter_model.safetensors"), ("full", "model.safetensors")],
)
def test_run_files_get_the_permissions_the_umask_gives_not_private_ones(tmp_path, method, weights):
    """Atomic writes go through mkstemp/mkdtemp, and safetensors' own writer, which make files 0600 and folders
    0700: a teammate on a shared machine could not read the adapter. Everything a run writes, whatever the method,
    must have what an ordinary write gives."""
    import stat

    previous = os.umask(0o022)
    try:
        result = train(
            load_recipe(TINY, [f"output.dir={tmp_path / 'run'}", "logging.progress=false", f"adapter.type={method}"]),
            console=Console(file=io.StringIO()),
        )
    finally:
        os.umask(previous)
    written = [result.output_dir, *result.output_dir.rglob("*")]
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in written}
    assert {name: mode for name, mode in modes.items() if mode not in (0o644, 0o755)} == {}
    assert modes[f"run/{weights}"] == 0o644 and modes["run/checkpoints/step-0000006"] == 0o755


@pytest.mark.parametrize("name", sorted(TORCH_ADAMW))
def test_torchs_adamw_is_built_as_transformers_builds_it(tmp_path, name):
    """The default optimizers skip transformers' Trainer (seconds of start-up): same class, same arguments."""
    from transformers import Trainer, TrainingArguments

    settings = {"learning_rate": 3e-4, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6}
    recipe = load_recipe(TINY, [f"training.optimizer={name}", *(f"training.{k}={v}" for k, v in settings.items())])
    arguments = TrainingArguments(output_dir=str(tmp_path), optim=name, report_to=[], use_cpu=True, **settings)
    assert optimizer_class(recipe) == Trainer.get_optimizer_cls_and_kwargs(arguments)


def test_other_optimizers_come_from_transformers():
    recipe = load_recipe(TINY, ["training.optimizer=adafactor"])
    cls, arguments = optimizer_class(recipe)
    assert cls.__name__ == "Adafactor" and arguments["relative_step"] is False


def _tiny(dtype: str, attention: str | None = None):
    from diablo_cli.models import load_base_model

    return load_base_model("tiny-random-llama", dtype=dtype, attn_implementation=attention)[0]


@pytest.mark.parametrize(
    ("dtype", "requested", "max_length", "expected", "reason"),
    [
        ("bf16", None, 96, "eager", "auto: faster than sdpa for bf16 on CPU, rows ≤ 96 tokens"),
        ("bf16", "auto", 128, "eager", "auto: faster than sdpa for bf16 on CPU, rows ≤ 128 tokens"),
        ("bf16", None, 129, "sdpa", "auto: rows up to 129 tokens, where the fused kernel is fastest"),
        ("fp32", None, 96, "sdpa", "auto: transformers' choice"),
        ("bf16", "sdpa", 96, "sdpa", "the recipe's"),
    ],
)
def test_auto_attention_is_eager_only_where_it_trains_faster(dtype, requested, max_length, expected, reason):
    """benchmarks/attention_cpu.py: eager trains 0.82-0.99x sdpa's step in bf16 on CPU up to 128 tokens (SmolLM2
    to 7B-shaped layers), no faster in fp32; a named implementation is the recipe's to keep."""
    from diablo_cli.training.setup import choose_attention

    model = _tiny(dtype, None if requested == "auto" else requested)
    line = choose_attention(model, requested, max_length, "cpu")
    assert line == f"attention: {expected} ({reason})"
    assert model.config._attn_implementation == expected


def test_auto_attention_stays_fused_for_a_base_that_will_train_on_a_gpu():
    """A full-precision base loads on the CPU and moves later: the device it trains on decides, not where it is."""
    from diablo_cli.training.setup import choose_attention

    model = _tiny("bf16")
    assert choose_attention(model, None, 96, "cuda:0") == "attention: sdpa (auto: transformers' choice)"
    assert model.config._attn_implementation == "sdpa"


def test_eager_and_sdpa_attention_give_the_same_loss_and_gradients_on_padded_rows():
    """The auto choice changes how attention is computed, not what: right-padded rows of unequal length (the
    mask each implementation builds its own way), fp32, loss and every input gradient alike."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for attention in ("sdpa", "eager"):
        model = _tiny("fp32", attention)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), embeds.grad))
    (loss_sdpa, grad_sdpa), (loss_eager, grad_eager) = results
    torch.testing.assert_close(loss_eager, loss_sdpa, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_eager, grad_sdpa, rtol=1e-5, atol=1e-7)


def test_eager_and_sdpa_attention_keep_packed_sequences_apart():
    """Packed rows carry position_ids and no attention mask (data/collator.py): with either implementation each
    packed sequence attends only to itself, so a packed row's logits equal its sequences' logits run alone."""
    torch.manual_seed(0)
    first, second = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 7))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    for attention in ("sdpa", "eager"):
        model = _tiny("fp32", attention)
        with torch.no_grad():
            together = model(input_ids=packed, position_ids=positions, use_cache=False).logits  # as training calls it
            alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
