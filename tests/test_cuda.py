"""The CUDA paths: evaluation's placement of inputs, bitsandbytes' 4-bit CUDA kernels, GPTQ on GPTQModel's GPU
kernels, and one-process DDP/FSDP under `diablo train --launcher accelerate`.

Marked ``cuda``: they skip where torch sees no GPU (conftest.py). ``make gpu-check`` (benchmarks/gpu_check.py)
runs them with the other GPU measurements; ``pytest -m cuda`` runs them alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, requires

from diablo_cli import DiaBloConfig, adapted_layers, attach_diablo
from diablo_cli.evaluate.generation import generate
from diablo_cli.evaluate.likelihood import continuation_logprobs
from diablo_cli.models import load_base_model, tiny_model_dir
from diablo_cli.quantize import dequantized_layers, replace_layers
from diablo_cli.quantize.trainable import prepare_quantized_training, quantized_layers
from diablo_cli.recipe import QuantizationSection
from diablo_cli.tracking import read_metrics

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TOKENS = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(3))
PROMPTS = ["Write 3 May 2021 as YYYY-MM-DD:", "The capital of France is", "1, 2, 3,"]


def adapter_gradients(model) -> dict[str, torch.Tensor]:
    tokens = TOKENS.to(model.device)
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=tokens, labels=tokens).loss.backward()
    return {name: layer.diablo_blocks.grad.detach().clone() for name, layer in adapted_layers(model).items()}


def gradient_error_against_dense(model) -> float:
    """The largest relative error of an adapter's gradient on the quantized model against the same model with its
    quantized layers swapped for dequantized dense twins, after a no-grad eval forward (the kernels' trap)."""
    dense = dequantized_layers(model, model.dtype)
    model.eval()
    with torch.no_grad():
        model(input_ids=TOKENS.to(model.device))
    quantized = adapter_gradients(model)
    for layer in adapted_layers(model).values():
        layer.kernel = "blocks"  # the quantized layers' math: a separate fp32 block product
    replace_layers(model, dense)
    reference = adapter_gradients(model)
    return max(((quantized[k] - reference[k]).norm() / reference[k].norm()).item() for k in quantized)


def on_gpu(model) -> bool:
    return {p.device.type for p in model.parameters()} == {"cuda"}


def test_generation_and_log_likelihood_place_their_inputs_on_the_gpu():
    model, tokenizer = load_base_model(str(tiny_model_dir()), dtype="fp32")
    attach_diablo(model, DiaBloConfig(blocks=8, target_modules="QKVOGUD"))
    randomize_adapters(model)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    choices = [[" 2021-05-03", " 03/05/2021"], [" Paris", " Rome"], [" 4", " five"]]
    on_cpu = (
        generate(model, tokenizer, PROMPTS, max_new_tokens=6),
        continuation_logprobs(model, tokenizer, prompt_ids, choices),
    )
    model.cuda()
    assert on_gpu(model)
    texts, scores = (
        generate(model, tokenizer, PROMPTS, max_new_tokens=6),
        continuation_logprobs(model, tokenizer, prompt_ids, choices),
    )
    assert texts == on_cpu[0]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(on_cpu[1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_bnb_4bit_cuda_kernels_pass_the_adapters_their_gradients(quantizable_llama_dir, compute_dtype):
    requires("bitsandbytes")
    settings = QuantizationSection(method="bnb-4bit", compute_dtype=compute_dtype)
    model, _ = load_base_model(str(quantizable_llama_dir), dtype="fp32", quantization=settings, device="cuda")
    prepare_quantized_training(model)
    attach_diablo(model, DiaBloConfig(blocks=8, target_modules="QKVOGUD"))
    model.cuda()  # the adapters (made on the CPU) join the quantized weights
    randomize_adapters(model)
    assert on_gpu(model) and {type(layer).__name__ for layer in quantized_layers(model).values()} == {"Linear4bit"}
    assert gradient_error_against_dense(model) < (1e-3 if compute_dtype == "fp32" else 0.05)


def test_gptq_trains_on_the_gpu_and_gptqmodels_own_gpu_kernel_agrees(gptq_4bit_dir):
    """diablo loads GPTQ with GPTQModel's torch kernel (its backward is plain autograd), on the GPU here; the kernel
    GPTQModel picks by itself on CUDA (Marlin, ExLlama or Triton) must give the same logits for evaluation."""
    requires("gptqmodel", "optimum")
    from transformers import AutoModelForCausalLM

    model, _ = load_base_model(str(gptq_4bit_dir), dtype="fp16", quantization=QuantizationSection(method="gptq"))
    model.cuda()
    prepare_quantized_training(model)
    attach_diablo(model, DiaBloConfig(blocks=8, target_modules="QKVOGUD"))
    model.cuda()
    randomize_adapters(model)
    assert on_gpu(model)
    assert gradient_error_against_dense(model) < 0.02  # fp16 activations against the fp16 dense twins

    reference, _ = load_base_model(str(gptq_4bit_dir), dtype="fp16", quantization=QuantizationSection(method="gptq"))
    reference.cuda().eval()
    native = AutoModelForCausalLM.from_pretrained(gptq_4bit_dir, dtype=torch.float16, device_map="cuda").eval()
    kernels = {type(layer).__name__ for layer in quantized_layers(native).values()}
    assert kernels and kernels != {"TorchLinear"}, kernels  # a GPU kernel, not the torch one
    tokens = TOKENS.cuda()
    with torch.no_grad():
        expected, found = reference(input_ids=tokens).logits.float(), native(input_ids=tokens).logits.float()
    assert ((found - expected).norm() / expected.norm()).item() < 0.02


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "fsdp2"])
def test_one_process_data_parallel_training_matches_plain_training(tmp_path, engine):
    settings = ["--set", "logging.progress=false", "--set", "training.max_steps=4", "--set", "training.save_steps=2"]
    diablo = [sys.executable, "-m", "diablo_cli", "train", str(TINY), *settings]
    environment = {**os.environ, "COLUMNS": "200"}
    plain = tmp_path / "plain"
    parallel = tmp_path / engine
    for out, extra in ((plain, []), (parallel, ["--launcher", "accelerate", "--num-processes", "1"])):
        extra = [*extra, "--accelerate-config", engine] if extra else extra
        done = subprocess.run(
            [*diablo, "-o", str(out), *extra], capture_output=True, text=True, timeout=600, cwd=ROOT, env=environment
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [
        {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m} for out in (plain, parallel)
    ]
    assert sorted(losses[1]) == [1, 2, 3, 4]
    for step, loss in losses[0].items():
        assert losses[1][step] == pytest.approx(loss, rel=1e-3)
    assert (parallel / "adapter_model.safetensors").is_file() and (parallel / "checkpoints").is_dir()
