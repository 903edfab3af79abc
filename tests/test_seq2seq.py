"""Encoder-decoder (T5) bases: trained on the sequence-to-sequence layout, never the causal one."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from diablo_cli import DiaBloError
from diablo_cli.recipe import load_recipe
from diablo_cli.tracking import read_metrics
from diablo_cli.train import train

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A tiny random T5 (d_model 32, two blocks each side) in safetensors, with the tiny model's tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from diablo_cli.models import tiny_model_dir

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_heads=2,
        num_layers=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        dropout_rate=0.0,  # so that batch shapes do not change the draws (adapter dropout tests the RNG's resume)
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


SHORT = ("data.datasets.0.limit=32", "training.max_steps=6", "training.save_steps=3", "training.eval_steps=3")


def run(t5_dir: Path, out: Path, *overrides: str, resume: str | None = None):
    """configs/tiny.yaml on the tiny T5: an ordinary recipe, no seq2seq key; the base's config decides."""
    settings = [f"base_model={t5_dir}", "adapter.target_modules=all-linear", "adapter.blocks=4"]
    settings += ["data.datasets.0.template=plain", f"output.dir={out}", "logging.progress=false", *SHORT]
    console = Console(file=io.StringIO(), width=200)
    result = train(load_recipe(TINY, [*settings, *overrides]), resume=resume, console=console)
    return result, console.file.getvalue()


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m}


def test_seq2seq_rows_hold_the_prompt_for_the_encoder_and_only_the_answer_for_the_decoder(t5_dir, tmp_path):
    from transformers import AutoTokenizer

    from diablo_cli.data import DataConfig, prepare_data

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "sst2 sentence: a fine film", "completion": "positive"}\n')
    config = DataConfig.model_validate(
        {"datasets": [{"path": str(path), "format": "prompt_completion", "template": "plain"}], "shuffle": False}
    )
    row = prepare_data(config, tokenizer, seed=0, seq2seq=True).train[0]
    assert tokenizer.decode(row["input_ids"]) == "sst2 sentence: a fine film"
    answer = tokenizer("positive", add_special_tokens=False)["input_ids"]
    assert row["labels"] == [*answer, tokenizer.eos_token_id]  # every label supervised, none of the prompt
    causal = prepare_data(config, tokenizer, seed=0).train[0]
    assert len(causal["input_ids"]) == len(causal["labels"]) > len(row["input_ids"])  # the layout it replaces
    chat = config.model_copy(update={"datasets": [config.datasets[0].model_copy(update={"template": "chat"})]})
    row = prepare_data(chat, tokenizer, seed=0, seq2seq=True).train[0]  # the tokenizer's chat template
    assert tokenizer.decode(row["input_ids"]).endswith("a fine film<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(row["labels"]) == "positive<|im_end|>\n"


def test_the_collator_shifts_labels_as_the_model_does_and_the_loss_is_normalised_by_tokens(t5_dir):
    import torch
    from transformers import T5ForConditionalGeneration

    from diablo_cli.data import DataCollator
    from diablo_cli.loss import choose_loss

    model = T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    collate = DataCollator(pad_token_id=2, decoder_start_token_id=model.config.decoder_start_token_id)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [8, 9, 2]}, {"input_ids": [10], "labels": [11, 2]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [10, 2, 2]] and batch["attention_mask"][1].tolist() == [1, 0, 0]
    assert batch["labels"][1].tolist() == [11, 2, -100]
    assert torch.equal(batch["decoder_input_ids"], model._shift_right(batch["labels"]))
    assert collate.supervised_tokens(batch) == 5  # no causal shift: every label is predicted
    path = choose_loss(model)
    assert path.kind == "dense"
    with torch.no_grad():
        ours = path.loss(model, batch, collate.supervised_tokens(batch))
        theirs = model(**{k: v for k, v in batch.items() if k != "decoder_input_ids"}).loss
    torch.testing.assert_close(ours, theirs)  # one micro-batch: the sum over its tokens / its tokens


def test_a_tiny_t5_trains_on_the_seq2seq_layout_and_its_loss_falls(t5_dir, tmp_path):
    result, output = run(t5_dir, tmp_path / "run", "training.learning_rate=1e-2")
    assert result.steps == 6 and "done:" in output and "loss: dense" in output
    steps = losses(result.output_dir)
    assert sorted(steps) == list(range(1, 7)) and steps[6] < steps[1] - 0.5
    evals = [m for m in read_metrics(result.output_dir / "metrics.jsonl") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    assert any("EncDecAttention.q" in key for key in saved) and any("DenseReluDense.wo" in key for key in saved)
    assert not any("lm_head" in key or "shared" in key for key in saved)


def test_a_seq2seq_run_resumes_bit_for_bit(t5_dir, tmp_path):
    settings = ("adapter.dropout=0.1", "training.lr_scheduler=cosine")  # dropout: the RNG state must resume too
    straight, _ = run(t5_dir, tmp_path / "straight", *settings)
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    step = "step-0000003"
    shutil.copytree(straight.output_dir / "checkpoints" / step, interrupted / "checkpoints" / step)
    resumed, output = run(t5_dir, interrupted, *settings, resume="latest")
    assert "at step 3" in output
    expected, got = losses(straight.output_dir), losses(resumed.output_dir)
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    a = load_file(straight.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("override", "key"), [("data.packing=true", "data.packing"), ("data.train_on_inputs=true", "train_on_inputs")]
)
def test_what_the_seq2seq_layout_cannot_honour_is_refused_in_one_line(t5_dir, tmp_path, override, key):
    with pytest.raises(DiaBloError, match=key):
        run(t5_dir, tmp_path / "run", override)
    assert not (tmp_path / "run").exists()


def test_an_encoder_decoder_that_is_not_a_text_to_text_model_is_refused():
    from transformers import WhisperConfig

    from diablo_cli.training.setup import training_layout

    with pytest.raises(DiaBloError, match="'whisper' is an encoder-decoder model that is not a text-to-text"):
        training_layout(WhisperConfig())


def test_letters_reach_t5_v1_1_gated_feed_forward():
    from transformers import T5Config, T5ForConditionalGeneration

    from diablo_cli import DiaBloConfig, attach_diablo
    from diablo_cli.adapter import adapted_layers

    config = T5Config(
        d_model=32, d_ff=48, num_layers=1, num_heads=2, d_kv=16, vocab_size=64, feed_forward_proj="gated-gelu"
    )
    gated = attach_diablo(T5ForConditionalGeneration(config), DiaBloConfig(blocks=4, target_modules="GUD"))
    names = sorted(name.split(".")[0] + ":" + name.split("DenseReluDense.")[1] for name in adapted_layers(gated))
    assert names == ["decoder:wi_0", "decoder:wi_1", "decoder:wo", "encoder:wi_0", "encoder:wi_1", "encoder:wo"]
    gate_only = attach_diablo(T5ForConditionalGeneration(config), DiaBloConfig(blocks=4, target_modules="G"))
    assert all(name.endswith("wi_0") for name in adapted_layers(gate_only))
    every = attach_diablo(T5ForConditionalGeneration(config), DiaBloConfig(blocks=4, target_modules="all-linear"))
    assert len(adapted_layers(every)) == 4 + 8 + 3 * 2  # self q/k/v/o; decoder self + cross; wi_0/wi_1/wo twice


def test_an_encoder_decoder_base_dry_run_shows_the_seq2seq_rows(t5_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "diablo_cli", "train", str(TINY), "--dry-run", "-o", str(tmp_path / "dry"),
            "--set", f"base_model={t5_dir}", "--set", "adapter.target_modules=all-linear",
            "--set", "adapter.blocks=4", "--set", "data.datasets.0.template=plain",
        ],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "example 1" in result.stdout and "loss: dense" in result.stdout
    assert not (tmp_path / "dry").exists()


# ---- GLUE: the presets, merge and eval ---------------------------------------------------------------------------


def mrpc_file(path: Path, rows: int = 24) -> Path:
    """A local file in GLUE's MRPC format (nyu-mll/glue's columns): sentence1, sentence2, label, idx."""
    words = ("the", "film", "was", "a", "fine", "and", "dull", "story", "with", "great", "acting", "but", "weak")
    lines = []
    for idx in range(rows):
        first = " ".join(words[(idx + k) % len(words)] for k in range(6))
        second = first if idx % 2 else " ".join(reversed(first.split()))
        lines.append(json.dumps({"sentence1": first, "sentence2": second, "label": idx % 2, "idx": idx}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_glue_presets_train_on_the_prompt_eval_scores(t5_dir, tmp_path):
    from transformers import AutoTokenizer

    from diablo_cli.data import DataConfig, prepare_data
    from diablo_cli.evaluate.tasks import TASKS

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    path = mrpc_file(tmp_path / "mrpc.jsonl", rows=2)
    config = DataConfig.model_validate({"datasets": [{"preset": "glue-mrpc", "path": str(path)}], "shuffle": False})
    rows = prepare_data(config, tokenizer, seed=0, seq2seq=True).train
    for raw, row in zip([json.loads(line) for line in path.read_text().splitlines()], rows, strict=True):
        item = TASKS["glue-mrpc"].read(raw)
        assert item.instruction.startswith("mrpc sentence1: ") and " sentence2: " in item.instruction
        assert tokenizer.decode(row["input_ids"]) == item.instruction
        assert row["labels"] == [*tokenizer(item.reference, add_special_tokens=False)["input_ids"], 2]
    unlabelled = tmp_path / "test.jsonl"
    unlabelled.write_text('{"sentence1": "a", "sentence2": "b", "label": -1, "idx": 7}\n')
    config = DataConfig.model_validate({"datasets": [{"preset": "glue-mrpc", "path": str(unlabelled)}]})
    with pytest.raises(DiaBloError, match="GLUE mrpc row 7 has no label"):
        prepare_data(config, tokenizer, seed=0, seq2seq=True)


def test_a_glue_run_merges_to_a_plain_seq2seq_folder_and_eval_scores_all_three(t5_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM
    from typer.testing import CliRunner

    from diablo_cli import load_adapter
    from diablo_cli.cli import app
    from diablo_cli.merge import merge_adapter

    data = mrpc_file(tmp_path / "mrpc.jsonl")
    dataset = f"data.datasets=[{{preset: glue-mrpc, path: {data}}}]"
    result, _ = run(t5_dir, tmp_path / "run", dataset, "training.learning_rate=1e-2", "data.validation_ratio=0")
    assert losses(result.output_dir)[6] < losses(result.output_dir)[1]
    report = merge_adapter(result.output_dir, tmp_path / "merged")
    assert report.verification is not None and report.verification.passed

    torch.manual_seed(0)
    ids = torch.randint(3, 49152, (2, 9))
    decoder_ids = torch.randint(3, 49152, (2, 5))
    adapted = load_adapter(AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval(), result.output_dir)
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval()
    with torch.no_grad():
        expected = adapted(input_ids=ids, decoder_input_ids=decoder_ids).logits
        got = merged(input_ids=ids, decoder_input_ids=decoder_ids).logits
        before = base(input_ids=ids, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - before).abs().max() > 1e-3  # the adapter moved the logits the merge reproduces
    assert merged.config.tie_word_embeddings and merged.lm_head.weight.data_ptr() == merged.shared.weight.data_ptr()

    scores = tmp_path / "scores.json"
    cli = CliRunner().invoke(
        app,
        ["eval", "--adapter", str(result.output_dir), "--model", str(tmp_path / "merged"), "--task", "glue-mrpc",
         "--data", str(data), "--scoring", "loglik", "--dtype", "fp32", "--json", str(scores)],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "glue-mrpc" in cli.output and "f1" in cli.output
    table = json.loads(scores.read_text())
    assert set(table) == {"base", "run", "merged"}
    assert table["run"]["glue-mrpc"] == table["merged"]["glue-mrpc"]  # the merged folder scores as base+adapter
    assert table["run"]["glue-mrpc"]["n"] == 24 and 0 <= table["run"]["glue-mrpc"]["f1"] <= 1


def test_seq2seq_accumulation_matches_a_bigger_batch(t5_dir, tmp_path):
    """The loss is normalised by the window's supervised tokens, not each micro-batch's (HF T5's own mean)."""
    common = ("data.shuffle=false", "training.max_steps=3", "training.max_grad_norm=null", "adapter.dropout=0.0")
    big, _ = run(t5_dir, tmp_path / "big", *common, "training.micro_batch_size=4")
    accumulated, _ = run(
        t5_dir, tmp_path / "acc", *common, "training.micro_batch_size=2", "training.gradient_accumulation_steps=2"
    )
    big_losses, acc_losses = losses(big.output_dir), losses(accumulated.output_dir)
    for step in (1, 2, 3):
        assert acc_losses[step] == pytest.approx(big_losses[step], rel=1e-5)


def test_the_eval_loss_task_lays_an_encoder_decoder_out_as_training_does(t5_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from diablo_cli.data import DataCollator, DatasetSource
    from diablo_cli.evaluate.runner import EvalSettings, TaskSpec, _loss_task

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "sst2 sentence: a fine film", "completion": "positive"}\n')
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    source = DatasetSource(path=str(path), format="prompt_completion", template="plain")
    scores, _ = _loss_task(model, tokenizer, TaskSpec("loss", dataset=source, loss=True), EvalSettings(), None)
    prompt, answer = (
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("sst2 sentence: a fine film", "positive")
    )
    batch = DataCollator(2, decoder_start_token_id=2)([{"input_ids": prompt, "labels": [*answer, 2]}])
    with torch.no_grad():
        expected = model(**{k: v for k, v in batch.items() if k != "decoder_input_ids"}).loss
    assert scores["tokens"] == batch["labels"].numel()
    assert scores["loss"] == pytest.approx(float(expected), rel=1e-5)
