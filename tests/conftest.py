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
