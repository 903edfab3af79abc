"""Parameter counts match the formula and the paper's numbers; quantized-style layers count logically."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from diablo_cli import DiaBloConfig, attach_diablo, parameter_report
from diablo_cli.adapter import base_parameter_count
from diablo_cli.inspection import load_model_config
from diablo_cli.models import skeleton_model


def llama2_7b_on_meta():
    """The public Llama-2-7B architecture from the config the package ships, no weights: shapes and counts only."""
    return skeleton_model(load_model_config("llama2-7b"))


def test_counts_match_the_formula_on_a_tiny_model():
    model = tiny_llama()
    base_total = sum(p.numel() for p in model.parameters())
    attach_diablo(model, DiaBloConfig(blocks=8, target_modules="QKVUD"))
    report = parameter_report(model)
    hidden, kv, inter, layers = 64, 32, 176, 3  # k/v project to kv_heads × head_dim = 2 × 16
    per_layer = (hidden * hidden + 2 * hidden * kv + 2 * hidden * inter) // 8  # in*out/N when N divides both
    assert report.trainable == report.adapter == layers * per_layer
    assert report.base == base_total
    assert report.dead == 0 and report.dead_blocks == 0
    by_name = {m.module: m for m in report.by_module}
    assert by_name["up_proj"].parameters == layers * hidden * inter // 8
    assert by_name["up_proj"].shapes == {(8, 8, 22)} and by_name["q_proj"].layers == layers


def test_llama2_7b_qkvud_n64_matches_the_paper():
    model = attach_diablo(llama2_7b_on_meta(), DiaBloConfig(blocks=64, target_modules="QKVUD"))
    report = parameter_report(model)
    assert report.base == 6_738_415_616
    assert report.trainable == 70_254_592  # paper: 70M, 1.04%
    assert round(report.percent_of_base, 2) == 1.04
    assert report.dead == 0


def test_llama2_7b_qkvogud_n320_counts_padding():
    model = attach_diablo(llama2_7b_on_meta(), DiaBloConfig(blocks=320, target_modules="QKVOGUD"))
    report = parameter_report(model)
    assert report.trainable == 20_899_840  # paper table 7: 0.3%
    assert round(report.percent_of_base, 1) == 0.3
    # 4096 = 315*13 + 1: blocks 316-319 see only padding; 11008 = 314*35 + 18: blocks 315-319 do.
    # Q, K, V, O touch only 4096-sides (4 dead each); G, U, D touch an 11008-side (5 dead each).
    assert report.dead_blocks == 32 * (4 * 4 + 3 * 5)
    assert 0 < report.dead < report.trainable // 10


def test_logical_count_for_packed_layers():
    """A layer whose weights are packed (4-bit, GPTQ) still counts in × out logical parameters."""

    class PackedLinear(torch.nn.Module):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
            self.bias = torch.nn.Parameter(torch.zeros(out_features))

    model = torch.nn.Sequential(PackedLinear(64, 32), torch.nn.LayerNorm(32))
    assert base_parameter_count(model) == 64 * 32 + 32 + 2 * 32


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings_count_once(tie):
    model = tiny_llama(tie_word_embeddings=tie)
    assert base_parameter_count(model) == sum(p.numel() for p in model.parameters())
