"""Shared fixtures: tiny models built locally from a config, and the real offline model for slow tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = json.loads(
    (Path(__file__).parents[1] / "diablo_cli" / "resources" / "models" / "tiny-llama.json").read_text()
)
TINY_LLAMA.pop("architectures", None)
TINY_LLAMA.pop("model_type", None)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """diablo_cli/resources/models/tiny-llama.json with random weights: the same seed always gives the same model."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return model.to(dtype).eval()


def tiny_t5(seed: int = 0):
    """A two-block T5 encoder-decoder with random weights (for T5 letter rules and seq2seq merges)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(d_model=32, d_ff=48, num_layers=2, num_heads=2, d_kv=16, vocab_size=64, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give every adapter non-zero blocks, so that tests see a real effect."""
    from diablo_cli import adapted_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            blocks = layer.diablo_blocks
            blocks.copy_(torch.randn(blocks.shape, generator=generator, dtype=torch.float32) * scale)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` skip, each with one reason, where torch sees no CUDA device (CI, this CPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check runs these where one is)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled SmolLM2-135M-Instruct as an ordinary HF folder (converted once, then cached)."""
    from diablo_cli.models import bundled_model_dir

    try:
        return bundled_model_dir()
    except Exception as err:  # the demo extra is missing: the slow tests cannot run
        if os.environ.get("CI"):
            raise
        pytest.skip(f"offline demo model unavailable: {err}")


def diagonal_blocks(full: torch.Tensor, layout) -> torch.Tensor:
    """The diagonal blocks of a dense (in, out) matrix, zero-padded to the block grid: (N, d1, d2).

    Written with plain slicing, independently of the library's einsum path, to serve as the reference.
    """
    padded = full.new_zeros(layout.blocks * layout.block_in, layout.blocks * layout.block_out)
    padded[: layout.in_features, : layout.out_features] = full
    return torch.stack(
        [
            padded[
                j * layout.block_in : (j + 1) * layout.block_in,
                j * layout.block_out : (j + 1) * layout.block_out,
            ]
            for j in range(layout.blocks)
        ]
    )


def requires(*modules: str) -> None:
    """Skip a test whose optional packages are missing (they are dev dependencies, so CI must have them)."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        if os.environ.get("CI"):
            raise ImportError(f"{', '.join(missing)} must be installed in CI")
        pytest.skip(f"needs {', '.join(missing)}", allow_module_level=True)


@pytest.fixture(scope="session")
def quantizable_llama_dir(tmp_path_factory) -> Path:
    """A tiny fp32 Llama folder with the real tokenizer and dimensions every 4-bit kernel accepts (hidden 64,
    intermediate 192: multiples of 32 and of the 64-wide quantization blocks)."""
    from transformers import AutoTokenizer

    from diablo_cli.models import tiny_model_dir

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = tiny_llama(
        intermediate_size=192,
        max_position_embeddings=2048,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("quantizable-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_gptq_checkpoint(source: Path, out: Path, bits: int) -> Path:
    """Quantize ``source`` with `diablo quantize`'s function (GPTQModel in a child process, group size 32,
    calibration from the Python docs, perplexity before/after): a GPTQ folder with its report."""
    requires("gptqmodel", "optimum")
    from diablo_cli.quantize import quantize_model

    quantize_model(str(source), out, method="gptq", bits=bits, group_size=32, samples=8, seq_len=64, evaluate=True)
    return out


@pytest.fixture(scope="session")
def gptq_4bit_dir(quantizable_llama_dir, tmp_path_factory) -> Path:
    return build_gptq_checkpoint(quantizable_llama_dir, tmp_path_factory.mktemp("gptq-4bit") / "model", bits=4)


@pytest.fixture(scope="session")
def gptq_2bit_dir(quantizable_llama_dir, tmp_path_factory) -> Path:
    return build_gptq_checkpoint(quantizable_llama_dir, tmp_path_factory.mktemp("gptq-2bit") / "model", bits=2)
