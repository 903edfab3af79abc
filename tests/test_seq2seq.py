"""Encoder-decoder (T5) bases: trained on the sequence-to-sequence layout, never the causal one."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from diablo_cli import DiaBloError
from diablo_cli.recipe import load_recipe
from diablo_cli.train import train

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A tiny random T5 (d_model 32, two blocks each side) in safetensors, with the tiny model's tokenizer."""
    import torch
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
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def t5_recipe(t5_dir: Path, out: Path, *overrides: str):
    return load_recipe(
        TINY,
        [
            f"base_model={t5_dir}",
            "adapter.target_modules=all-linear",
            "adapter.blocks=4",
            "data.datasets.0.template=plain",
            f"output.dir={out}",
            "logging.progress=false",
            *overrides,
        ],
    )


def test_an_encoder_decoder_base_is_never_trained_on_the_causal_layout(t5_dir, tmp_path):
    recipe = t5_recipe(t5_dir, tmp_path / "run")
    with pytest.raises(DiaBloError, match="encoder-decoder"):
        train(recipe, console=Console(file=io.StringIO()))
    assert not (tmp_path / "run").exists()


def test_dry_run_refuses_an_encoder_decoder_base_in_one_line(t5_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "diablo_cli", "train", str(TINY), "--dry-run", "-o", str(tmp_path / "dry"),
            "--set", f"base_model={t5_dir}", "--set", "adapter.target_modules=all-linear",
            "--set", "adapter.blocks=4",
        ],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "encoder-decoder" in result.stderr and "Traceback" not in result.stderr
    assert "example 1" not in result.stdout  # refused before any data was tokenised
