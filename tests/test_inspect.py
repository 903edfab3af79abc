"""`diablo inspect`: budgets on the paper's models from shipped configs (nothing downloaded), choosing N for a
budget, adapter folders and recipes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_adapters, tiny_llama

from diablo_cli import DiaBloConfig, DiaBloError, attach_diablo, save_adapter
from diablo_cli.inspection import (
    count_blocks,
    inspect_adapter,
    inspect_model,
    known_models,
    parse_budget,
    parse_layers,
    parse_targets,
)

LLAMA2_7B_QKVUD_WIDTH = 32 * (3 * (4096 + 4096) + 2 * (4096 + 11008))  # Σ (in + out) over the targeted layers


def candidate(inspection, blocks):
    return next(c for c in inspection.candidates if c.blocks == blocks)


def test_paper_counts_from_the_shipped_llama2_7b_config():
    qkvud = inspect_model("llama2-7b", targets="QKVUD", blocks=[64])
    assert qkvud.base_parameters == 6_738_415_616
    n64 = candidate(qkvud, 64)
    assert n64.trainable == 70_254_592 and round(n64.percent_of_base, 2) == 1.04 and n64.dead == 0
    assert n64.lora_rank == pytest.approx(70_254_592 / LLAMA2_7B_QKVUD_WIDTH)  # N·d1·d2 = r·(in+out), summed
    assert n64.block_shapes["up_proj"] == (64, 172) and n64.divides
    qkvogud = inspect_model("llama2-7b", targets="QKVOGUD", blocks=[320])
    n320 = candidate(qkvogud, 320)
    assert n320.trainable == 20_899_840 and round(n320.percent_of_base, 2) == 0.31  # paper table 7: 0.3%
    assert n320.dead == 347_648 and n320.dead_blocks == 992 and not n320.divides


def test_candidates_are_the_common_divisors_plus_the_users():
    inspection = inspect_model("llama2-7b", targets="QKVUD", blocks=[100])
    assert [c.blocks for c in inspection.candidates] == [1, 2, 4, 8, 16, 32, 64, 100, 128, 256]  # gcd(4096, 11008)
    assert {m.module for m in inspection.targeted} == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert any(m.module == "lm_head" for m in inspection.linear_modules)


def test_match_lora_picks_the_closest_n_from_below():
    inspection = inspect_model("llama2-7b", match_lora=32)
    assert inspection.budget == 32 * LLAMA2_7B_QKVUD_WIDTH == 56_098_816
    chosen = next(c for c in inspection.candidates if c.chosen)
    assert chosen.blocks == 83 and chosen.trainable <= inspection.budget
    selection_over = [c for c in inspection.candidates if c.trainable > inspection.budget]
    assert selection_over  # the table still shows the neighbours
    assert inspection.recipe_snippet == "adapter:\n  blocks: 83\n  target_modules: QKVUD"


def test_per_module_budget_gives_each_kind_its_lora_share():
    inspection = inspect_model("llama2-7b", match_lora=32, per_module=True)
    chosen = next(c for c in inspection.candidates if c.chosen)
    assert chosen.blocks == {"q_proj": 64, "k_proj": 64, "v_proj": 64, "up_proj": 97, "down_proj": 97}
    assert chosen.trainable <= inspection.budget
    assert "blocks_by_module: {up_proj: 97, down_proj: 97}" in inspection.recipe_snippet


def test_percentage_and_count_budgets():
    assert parse_budget("1%", 6_738_415_616) == (67_384_156, "1% of 6,738,415,616")
    assert parse_budget("70M", 1)[0] == 70_000_000 and parse_budget("500k", 1)[0] == 500_000
    inspection = inspect_model("llama2-7b", budget="1%")  # 70.2M at N=64 is above 1%
    chosen = next(c for c in inspection.candidates if c.chosen)
    assert chosen.blocks == 68 and chosen.trainable == 67_297_152 <= inspection.budget
    # no other N lands closer from below (padding makes the count wobble, so search them all)
    from diablo_cli.adapter import select_targets
    from diablo_cli.inspection import load_model_config, skeleton_model

    targets = select_targets(skeleton_model(load_model_config("llama2-7b")), DiaBloConfig(blocks=1))
    counts = [count_blocks(targets, n, inspection.base_parameters).trainable for n in range(1, 400)]
    assert max(c for c in counts if c <= inspection.budget) == chosen.trainable
    with pytest.raises(DiaBloError, match="--budget 'lots'"):
        parse_budget("lots", 1)
    with pytest.raises(DiaBloError, match="either --budget or --match-lora"):
        inspect_model("llama2-7b", budget="1%", match_lora=8)


def test_every_paper_alias_inspects_offline():
    assert set(known_models()) == {
        "llama2-7b",
        "llama2-13b",
        "llama-13b",
        "llama3-8b",
        "llama3.2-3b",
        "mistral-7b",
        "t5-base",
    }
    assert inspect_model("llama3-8b").base_parameters == 8_030_261_248
    assert inspect_model("mistral-7b").base_parameters == 7_241_732_096
    t5 = inspect_model("t5-base", targets="QKVOUD", blocks=[32])
    assert t5.architecture == "T5ForConditionalGeneration" and candidate(t5, 32).trainable > 0


def test_layer_ranges_and_name_lists():
    assert parse_layers("0-15") == (0, 15)
    assert parse_targets("q_proj,v_proj") == ["q_proj", "v_proj"] and parse_targets("QKV") == "QKV"
    half = inspect_model("llama2-7b", targets="QKVUD", layers=(0, 15), blocks=[64])
    assert candidate(half, 64).trainable == 70_254_592 // 2
    with pytest.raises(DiaBloError, match="--layers '9-3'"):
        parse_layers("9-3")


def test_count_matches_an_attached_model():
    """The arithmetic agrees with attaching real adapters (padding included)."""
    from diablo_cli import parameter_report
    from diablo_cli.adapter import select_targets

    model = tiny_llama()
    targets = select_targets(model, DiaBloConfig(blocks=7, target_modules="QKVOGUD"))
    attach_diablo(model, DiaBloConfig(blocks=7, target_modules="QKVOGUD"))
    report = parameter_report(model)
    counted = count_blocks(targets, 7, report.base)
    assert (counted.trainable, counted.dead, counted.dead_blocks) == (report.trainable, report.dead, report.dead_blocks)


def test_adapter_folder_shows_settings_and_norms(tmp_path):
    model = tiny_llama()
    attach_diablo(model, DiaBloConfig(blocks=4, target_modules="QV"))
    randomize_adapters(model)
    layer = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.diablo_blocks.mul_(10)  # the layer that "moved most"
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    inspection = inspect_adapter(tmp_path / "adapter")
    assert inspection.base_model == "tiny" and inspection.config["blocks"] == 4
    assert inspection.parameters == sum(layer.parameters for layer in inspection.layers)
    top = max(inspection.layers, key=lambda item: item.rms)
    assert top.module == "model.layers.1.self_attn.v_proj"
    assert top.norm == pytest.approx(float(layer.diablo_blocks.detach().norm()))
    assert set(inspection.by_module) == {"q_proj", "v_proj"} and inspection.by_module["q_proj"]["layers"] == 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "diablo_cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_match_lora_offline_and_json():
    result = run_cli("inspect", "llama2-7b", "--match-lora", "32")
    assert result.returncode == 0, result.stderr
    assert "70,254,592" in result.stdout and "blocks: 83" in result.stdout and "LoRA r=32" in result.stdout
    data = json.loads(run_cli("inspect", "llama2-7b", "--targets", "QKVOGUD", "--blocks", "320", "--json").stdout)
    row = next(c for c in data["candidates"] if c["blocks"] == 320)
    assert row["trainable"] == 20_899_840 and data["base_parameters"] == 6_738_415_616


def test_cli_adapter_and_recipe(tmp_path):
    model = tiny_llama()
    attach_diablo(model, DiaBloConfig(blocks=4, target_modules="QV"))
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    adapter = run_cli("inspect", str(tmp_path / "adapter"))
    assert adapter.returncode == 0 and "DiaBlo adapter for tiny" in adapter.stdout
    recipe = run_cli("inspect", "configs/tiny.yaml")
    assert recipe.returncode == 0, recipe.stderr
    assert "DiaBlo on tiny-random-llama" in recipe.stdout and "memory at micro batch" in recipe.stdout


def test_cli_errors_are_one_line():
    unknown = run_cli("inspect", "nobody/no-such-model")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr and "cannot be downloaded" in unknown.stderr
    bad = run_cli("inspect", "llama2-7b", "--budget", "lots")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_memory_estimate_against_lora_at_the_same_budget():
    inspection = inspect_model("llama2-7b", match_lora=32, seq_len=1024, batch=4, dtype="bfloat16")
    diablo, lora = inspection.memory
    assert inspection.memory_settings["blocks"] == 83 and lora["method"] == "LoRA r=32"
    assert diablo["trainable"] == 55_244_800 and lora["trainable"] == 56_098_816
    assert diablo["adapter_and_optimizer"] == 55_244_800 * (4 + 4 + 8)  # fp32 blocks, their grads, AdamW moments
    assert diablo["weights"] == 6_738_415_616 * 2
    tokens, targeted_layers = 4 * 1024, 5 * 32
    assert lora["adapter_inputs"] - diablo["adapter_inputs"] == tokens * 32 * targeted_layers * 4  # LoRA keeps x·A
    assert diablo["checkpointed_total"] < diablo["total"]


def test_memory_estimate_of_a_4bit_base():
    plain = inspect_model("llama2-7b", dtype="bfloat16").memory[0]
    quantized = inspect_model("llama2-7b", dtype="bfloat16", quantization="bnb-4bit").memory[0]
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # every linear layer but the output head
    assert quantized["weights"] == pytest.approx((6_738_415_616 - linear) * 2 + linear * 4.127 / 8)
    assert quantized["weights"] < plain["weights"] / 3
    with pytest.raises(DiaBloError, match="--quantization 'int3'"):
        inspect_model("llama2-7b", quantization="int3")
    with pytest.raises(DiaBloError, match="--dtype 'fp8': choose one of fp32, bf16, fp16"):
        inspect_model("llama2-7b", dtype="fp8")


def test_effective_rank_of_a_known_low_rank_matrix():
    from diablo_cli.inspection import effective_rank

    generator = torch.Generator().manual_seed(0)
    low = torch.randn(200, 7, generator=generator) @ torch.randn(7, 64, generator=generator)
    assert effective_rank(low, 0.999999) == 7
    assert effective_rank(torch.zeros(5, 5)) == 0
    spectrum = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.1]))  # energies 9, 4, 1, 0.01 of 14.01
    assert effective_rank(spectrum, 0.9) == 2 and effective_rank(spectrum, 0.95) == 3


def test_theorem2_condition_by_hand():
    from diablo_cli.inspection import theorem2_blocks

    # m1 = m2 = 576, r1 = 61, r2 = 67: N=72 gives ⌈61·72/576⌉·⌈67·72/576⌉ = 8·9 = 72 ≤ 72; N=96 needs 11·12 = 132 > 96
    assert theorem2_blocks(576, 576, 61, 67) == 72
    assert theorem2_blocks(4096, 4096, 4096, 4096) == 1  # full rank: only N=1 (full fine-tuning) qualifies
    assert theorem2_blocks(4096, 11008, 64, 64) == 256  # low rank: every common factor up to gcd 256 fits


def test_probe_measures_ranks_on_the_tiny_model():
    from diablo_cli.inspection import probe_theorem2

    rows = probe_theorem2(
        "tiny-random-llama", "bundled://quickstart/train.jsonl", targets="QV", batches=2, batch=2, seq_len=64
    )
    assert {row.module for row in rows} == {"q_proj", "v_proj"}
    for row in rows:
        assert row.layers == 3 and row.rows > 0
        assert 0 < row.r1_mean <= row.r1_max <= min(row.rows, row.in_features)
        assert 0 < row.r2_max <= min(row.rows, row.out_features)
        assert row.largest_n is None or row.largest_n >= math.ceil(row.r1_max * row.largest_n / row.in_features) * (
            math.ceil(row.r2_max * row.largest_n / row.out_features)
        )
