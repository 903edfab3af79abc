"""`diablo quantize`: calibration windows, GPTQ / round-to-nearest / bitsandbytes outputs that transformers
loads, the report's numbers against an independent computation, MagR's effect on outlier weights, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires
from transformers import AutoModelForCausalLM, AutoTokenizer

from diablo_cli.errors import DiaBloError
from diablo_cli.models import load_base_model
from diablo_cli.quantize.calibration import PYTHON_DOCS, build_calibration, calibration_texts, perplexity
from diablo_cli.quantize.dequantize import dequantize_model, dequantized_weights
from diablo_cli.quantize.pipeline import (
    REPORT_FILE,
    QuantizeReport,
    quantize_model,
    quantized_layer_names,
    read_quantize_report,
)

requires("gptqmodel", "optimum")

SMALL = {"samples": 8, "seq_len": 64}


@pytest.fixture(scope="session")
def tiny_fp(quantizable_llama_dir) -> Path:
    return quantizable_llama_dir


@pytest.fixture(scope="session")
def tiny_outliers(quantizable_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with about 1% of every quantized weight blown up 12×: the case MagR is for."""
    model = AutoModelForCausalLM.from_pretrained(quantizable_llama_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in quantized_layer_names(model):
            weight = model.get_submodule(name).weight
            weight[torch.rand(weight.shape, generator=generator) < 0.01] *= 12.0
    out = tmp_path_factory.mktemp("tiny-outliers")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(quantizable_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gptq_4bit(gptq_4bit_dir) -> tuple[Path, QuantizeReport]:
    return gptq_4bit_dir, read_quantize_report(gptq_4bit_dir)


# --- calibration -------------------------------------------------------------------------------------------


def test_python_docs_calibration_is_seeded_and_keeps_a_disjoint_held_out_tail(tiny_fp):
    tokenizer = AutoTokenizer.from_pretrained(tiny_fp)
    first = build_calibration(PYTHON_DOCS, tokenizer, samples=6, seq_len=48, seed=3)
    again = build_calibration(PYTHON_DOCS, tokenizer, samples=6, seq_len=48, seed=3)
    other = build_calibration(PYTHON_DOCS, tokenizer, samples=6, seq_len=48, seed=4)
    assert [w.shape for w in first.windows] == [torch.Size([48])] * 6
    assert all(torch.equal(a, b) for a, b in zip(first.windows, again.windows, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.windows, other.windows, strict=True))
    assert first.stream_tokens > 50_000  # ~465 kB of documentation text in every CPython
    # The held-out windows are the stream's tail, which no calibration window reaches.
    stream = tokenizer(tokenizer.eos_token.join(calibration_texts(PYTHON_DOCS, tokenizer)), add_special_tokens=False)
    ids = torch.tensor(stream["input_ids"])
    cut = len(ids) - int(len(ids) * 0.1)
    assert torch.equal(first.held_out[0], ids[cut : cut + 48])
    calibration_part = ids[:cut]
    for window in first.windows:
        starts = (calibration_part.unfold(0, 48, 1) == window).all(dim=1).nonzero()
        assert len(starts) >= 1


def test_calibration_from_a_text_file_and_from_a_training_file(tmp_path, tiny_fp):
    tokenizer = AutoTokenizer.from_pretrained(tiny_fp)
    text = tmp_path / "notes.txt"
    text.write_text("First paragraph here.\n\nSecond one, a little longer.\n\n\n", encoding="utf-8")
    assert calibration_texts(str(text), tokenizer) == ["First paragraph here.", "Second one, a little longer."]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(json.dumps({"instruction": f"Add {i} and 2.", "output": f"{i + 2}"}) for i in range(3)),
        encoding="utf-8",
    )
    texts = calibration_texts(str(rows), tokenizer)
    assert len(texts) == 3 and "### Instruction:\nAdd 0 and 2." in texts[0] and texts[0].rstrip().endswith("2")


def test_calibration_errors_are_one_line(tmp_path, tiny_fp):
    tokenizer = AutoTokenizer.from_pretrained(tiny_fp)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(DiaBloError, match="fewer than --seq-len 64"):
        build_calibration(str(short), tokenizer, samples=2, seq_len=64)
    with pytest.raises(DiaBloError, match="no such file"):
        calibration_texts(str(tmp_path / "missing.txt"), tokenizer)


# --- GPTQ, RTN, bitsandbytes -----------------------------------------------------------------------------


def _captured_inputs(model, windows) -> dict[str, torch.Tensor]:
    """Every linear layer's calibration inputs, captured by hooks: the independent reference for the report."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: captured.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in quantized_layer_names(model)
    ]
    with torch.no_grad():
        model(input_ids=torch.stack(windows))
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(parts).double() for name, parts in captured.items()}


def test_gptq_output_loads_in_transformers_and_its_report_matches_a_direct_computation(gptq_4bit, tiny_fp):
    out, report = gptq_4bit
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["method"] == "gptq" and saved["bits"] == 4 and saved["group_size"] == 32
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 32
    assert (out / "tokenizer.json").is_file() and (out / "quantize.log").is_file()
    assert report.size_after_bytes < report.size_before_bytes

    # Recompute ‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖ from explicit inputs X and the dequantized layers of the written folder.
    original = AutoModelForCausalLM.from_pretrained(tiny_fp, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_fp)
    data = build_calibration(PYTHON_DOCS, tokenizer, **SMALL)
    inputs = _captured_inputs(original, data.windows)
    dense = dequantized_weights(out)
    assert set(dense) == set(quantized_layer_names(original)) == {layer.name for layer in report.layers}
    for layer in report.layers:
        x = inputs[layer.name]
        weight = original.get_submodule(layer.name).weight.double()
        expected = (x @ (weight - dense[layer.name].double()).T).norm() / (x @ weight.T).norm()
        assert layer.error == pytest.approx(expected.item(), rel=1e-3)
        assert 0.0 < layer.error < 0.2
    # Perplexity after is the dequantized weights' (a full-precision model with Ŵ in place of W).
    with torch.no_grad():
        for name, weight in dense.items():
            original.get_submodule(name).weight.copy_(weight)
    assert report.perplexity_after == pytest.approx(perplexity(original, data.held_out), rel=1e-4)
    assert report.perplexity_before is not None and report.perplexity_before > 1


def test_gptq_beats_round_to_nearest_on_the_same_calibration(gptq_4bit, tiny_fp, tmp_path):
    _, gptq = gptq_4bit
    rtn = quantize_model(str(tiny_fp), tmp_path / "rtn", method="rtn", bits=4, group_size=32, **SMALL)
    assert rtn.method == "rtn" and json.loads((tmp_path / "rtn" / "config.json").read_text())["quantization_config"]
    assert gptq.error_summary()["mean"] < rtn.error_summary()["mean"]


def test_two_bit_gptq_runs_and_costs_more_error_than_four(gptq_4bit, tiny_fp, tmp_path):
    _, four = gptq_4bit
    two = quantize_model(str(tiny_fp), tmp_path / "gptq2", method="gptq", bits=2, group_size=32, **SMALL)
    assert json.loads((tmp_path / "gptq2" / "config.json").read_text())["quantization_config"]["bits"] == 2
    assert two.error_summary()["mean"] > 2 * four.error_summary()["mean"]


def test_magr_shrinks_outlier_weights_and_lowers_gptq_error(tiny_outliers, tmp_path):
    plain = quantize_model(str(tiny_outliers), tmp_path / "plain", method="gptq", bits=4, group_size=-1, **SMALL)
    magr = quantize_model(
        str(tiny_outliers), tmp_path / "magr", method="gptq", bits=4, group_size=-1, magr=True, **SMALL
    )
    assert magr.magr == {"alpha": 1e-3, "iterations": 200, "group_size": None}
    for layer in magr.layers:
        assert layer.max_after < layer.max_before  # each layer's channel maxima came down
        assert layer.magr_error < 0.1  # while its outputs moved far less than quantizing moves them
    assert magr.error_summary()["mean"] < plain.error_summary()["mean"]
    assert magr.error_summary()["max"] < plain.error_summary()["max"]


def test_bnb_4bit_output_is_a_serialised_nf4_model(tiny_fp, tmp_path):
    pytest.importorskip("bitsandbytes")
    report = quantize_model(str(tiny_fp), tmp_path / "nf4", method="bnb-4bit", **SMALL)
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"
    assert report.group_size == 64 and report.bits == 4
    assert 0.0 < report.error_summary()["max"] < 0.2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--method", "awq"], "--method 'awq': choose one of gptq, rtn, bnb-4bit"),
        (["--bits", "5"], "--bits 5: gptq takes 2, 3, 4, 8"),
        (["--group-size", "100"], "--group-size 100: a power of two"),
        (["--method", "bnb-4bit", "--bits", "8"], "bnb-4bit is 4-bit"),
        (["--method", "bnb-4bit", "--bnb-quant-type", "int4"], "nf4 or fp4"),
        (["--calibration", "missing.txt"], "--calibration missing.txt: no such file"),
    ],
)
def test_bad_options_are_one_line_errors(arguments, message, tiny_fp, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "diablo_cli",
            "quantize",
            "--base",
            str(tiny_fp),
            "--output",
            str(tmp_path / "q"),
            *arguments,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "q").exists()


def test_refuses_a_non_empty_output_and_an_already_quantized_base(gptq_4bit, tiny_fp, tmp_path):
    out, _ = gptq_4bit
    with pytest.raises(DiaBloError, match="is not empty"):
        quantize_model(str(tiny_fp), out, **SMALL)
    with pytest.raises(DiaBloError, match="already quantized"):
        quantize_model(str(out), tmp_path / "again", **SMALL)
    assert not (tmp_path / "again").exists()
    assert not list(tmp_path.glob(".again-*"))  # no staging folder left behind


# --- quantize → train → merge ---------------------------------------------------------------------------


def test_quantize_train_merge_round_trip(gptq_4bit, tmp_path):
    """`diablo quantize`'s folder trains with `diablo train` (GPTQ recipe), and `diablo merge` dequantizes it
    into a full-precision model whose logits equal the dequantized base plus the adapter."""
    from diablo_cli.adapter import load_adapter

    base, _ = gptq_4bit
    recipe = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    settings = [
        f"base_model={base}",
        f"output.dir={tmp_path / 'adapter'}",
        "model.quantization.method=gptq",
        "model.quantization.bits=4",
        "training.max_steps=4",
        "training.eval_steps=2",
        "training.save_steps=100",
        "logging.progress=false",
    ]
    commands = [
        ["train", str(recipe), *[part for setting in settings for part in ("--set", setting)]],
        ["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged"), "--dtype", "fp32"],
    ]
    outputs = []
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "diablo_cli", *command], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(result.stdout)
    assert "base: GPTQ 4-bit, group 32, kernel TorchLinear (trainable)" in outputs[0]
    assert "dequantized" in outputs[1] and "verified" in outputs[1]
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config

    # Independently of merge's arithmetic: the GPTQ folder loaded as training loads it, in fp32, each quantized
    # layer swapped for its dequantized twin (the folder's own embeddings and norms kept), plus the adapter.
    reference = load_base_model(str(base), dtype="fp32")[0]
    dequantize_model(reference, torch.float32)
    load_adapter(reference, tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference.eval()(input_ids=ids).logits, merged.eval()(input_ids=ids).logits
    assert (expected - got).abs().max().item() < 1e-4


@pytest.mark.slow
def test_real_model_gptq_4bit_then_training_on_it(smollm2_dir, tmp_path):
    """The done-when path on the real small model, cut short: GPTQ 4-bit with MagR on SmolLM2-135M, then a few
    `diablo train` steps of the quickstart recipe on the packed base."""
    out = tmp_path / "smollm2-gptq4"
    report = quantize_model(
        str(smollm2_dir), out, method="gptq", bits=4, group_size=128, magr=True, magr_iterations=20,
        samples=4, seq_len=256, evaluate=True,
    )  # fmt: skip
    # What is not quantized (the 28M-parameter tied embedding, the norms) stays in the calibration dtype: bf16 where
    # the CPU computes it natively (under 1/4 of the fp32 source), fp32 where it does not (measured 0.315).
    shrink = 4 if report.calibration["dtype"] == "bf16" else 3
    assert len(report.layers) == 210 and report.size_after_bytes < report.size_before_bytes / shrink
    assert report.error_summary()["mean"] < 0.1
    assert report.perplexity_before < report.perplexity_after < 2 * report.perplexity_before
    recipe = Path(__file__).parents[1] / "configs" / "quickstart-gptq.yaml"
    settings = [f"base_model={out}", f"output.dir={tmp_path / 'run'}", "training.max_steps=3", "eval.tasks=[]"]
    command = ["train", str(recipe), *[part for setting in settings for part in ("--set", setting)]]
    wide = {**os.environ, "COLUMNS": "200"}  # Rich wraps at 80 columns without a terminal
    result = subprocess.run([sys.executable, "-m", "diablo_cli", *command], capture_output=True, text=True, env=wide)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "base: GPTQ 4-bit, group 128, kernel TorchLinear (trainable), 210 quantized layers" in result.stdout
    assert "GPT-QModel" not in result.stdout + result.stderr  # its banner is captured, not printed
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
