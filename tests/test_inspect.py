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
from diablo_cli.report.inspection import model_inspection_view

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
        "llama2-70b",
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
    assert "DiaBlo N=8 QKVOGUD on tiny-random-llama" in recipe.stdout and "memory at micro batch" in recipe.stdout


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
    with pytest.raises(DiaBloError, match="--dtype 'fp8': choose one of auto, fp32, bf16, fp16"):
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


# Scaling: resources/models/tiny-llama.json by hand. Per layer: q, o 64×64; k, v 64×32 (2 KV heads of 16);
# gate, up, down 64×176; two norms of 64. Untied embedding and head 128×64, a final norm; estimated in bf16.
TINY_LAYER_LINEAR = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176  # 46,080
TINY_LAYER = TINY_LAYER_LINEAR + 2 * 64  # 46,208: the largest block ZeRO-3 gathers
TINY_BASE = 3 * TINY_LAYER + 2 * 128 * 64 + 64  # 155,072
TINY_LINEAR = 3 * TINY_LAYER_LINEAR + 128 * 64  # every matmul a token passes, the head included
TINY_QKVUD_N4 = 3 * (64 * 64 + 2 * 64 * 32 + 2 * 64 * 176) // 4  # 23,040: N·(in/N)·(out/N) = in·out/N


@pytest.fixture
def tiny_config_dir(tmp_path):
    from importlib.resources import files

    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text((files("diablo_cli") / "resources/models/tiny-llama.json").read_text())
    return str(folder)


def tiny_scaling(folder, **settings):
    return inspect_model(folder, blocks=[4], batch=2, seq_len=16, **{"dtype": "bf16", **settings})


def test_scaling_memory_by_sharding_against_hand_counts(tiny_config_dir):
    single = tiny_scaling(tiny_config_dir)
    assert single.base_parameters == TINY_BASE and candidate(single, 4).trainable == TINY_QKVUD_N4
    weights, trainable = TINY_BASE * 2, TINY_QKVUD_N4
    one = single.scaling["memory"]
    assert single.scaling["sharding"] == "none" and one["weights"] == weights and one["gathered_weights"] == 0
    assert one["adapter_and_optimizer"] == trainable * (4 + 4 + 8)  # fp32 blocks and grads, AdamW's two moments
    assert one["total"] == single.memory[0]["total"]  # one GPU: the same sum as the memory table's DiaBlo column
    ddp = tiny_scaling(tiny_config_dir, gpus=4, sharding="ddp").scaling
    assert ddp["memory"] == one  # replicated: nothing shrinks
    assert tiny_scaling(tiny_config_dir, gpus=4).scaling["sharding"] == "ddp"  # the default on several GPUs
    zero2 = tiny_scaling(tiny_config_dir, gpus=4, sharding="zero2").scaling["memory"]
    assert zero2["weights"] == weights and zero2["adapter_parameters"] == trainable * 4
    assert zero2["adapter_gradients"] == trainable * 4 / 4 and zero2["optimizer_states"] == trainable * 8 / 4
    for name in ("zero3", "fsdp"):
        zero3 = tiny_scaling(tiny_config_dir, gpus=4, sharding=name).scaling["memory"]
        assert zero3["weights"] == weights / 4 and zero3["adapter_and_optimizer"] == trainable * 16 / 4
        assert zero3["gathered_weights"] == TINY_LAYER * 2 * 3 / 4  # the other GPUs' 3/4 of one decoder layer
        assert zero3["activations"] == one["activations"] and zero3["logits"] == one["logits"]  # per micro batch


def test_scaling_flops_time_and_traffic_against_hand_counts(tiny_config_dir):
    tokens, layers, width, seq = 2 * 16, 3, 64, 16
    attention = 4 * layers * width * seq  # Q·Kᵀ and scores·V, forward
    plain = 4 * TINY_LINEAR + 6 * TINY_QKVUD_N4 + 3 * attention
    checkpointed = plain + 2 * (TINY_LINEAR - 128 * 64) + 2 * TINY_QKVUD_N4 + attention  # head not recomputed
    scaling = tiny_scaling(tiny_config_dir, gpus=8, sharding="zero3", tokens=1_000_000).scaling
    assert scaling["flops"]["total"] == plain
    assert scaling["gpu"] == "a100-80gb" and scaling["gpu_memory_gib"] == 80  # the design card's GPU by default
    assert scaling["compute_seconds"] == pytest.approx(tokens * plain / (312e12 * 0.4))  # A100 bf16 dense
    share, weights, adapter = 7 / 8, TINY_BASE * 2, TINY_QKVUD_N4 * 4
    assert scaling["traffic"]["weight_all_gather"] == pytest.approx(2 * share * weights)  # forward and backward
    assert scaling["traffic"]["gradient_reduction"] == pytest.approx(share * adapter)  # trainable grads only
    assert scaling["interconnect_gbps"] == 300  # A100 NVLink 3 within one node, each way
    assert scaling["communication_seconds"] == pytest.approx(scaling["traffic"]["total"] / 300e9)
    assert scaling["steps"] == math.ceil(1_000_000 / (8 * tokens))
    assert scaling["run_seconds"] == pytest.approx(scaling["steps"] * scaling["step_seconds"])
    slow = tiny_scaling(
        tiny_config_dir, gpus=64, sharding="ddp", gradient_checkpointing=True, mfu=0.25, gpu="h100", gpu_tflops=500
    ).scaling
    assert slow["flops"]["total"] == checkpointed and slow["interconnect_gbps"] == 50  # 64 H100s span nodes
    assert slow["compute_seconds"] == pytest.approx(tokens * checkpointed / (500e12 * 0.25))  # the override wins
    assert slow["traffic"]["total"] == pytest.approx(2 * 63 / 64 * adapter)  # ring all-reduce of the gradients
    one = tiny_scaling(tiny_config_dir).scaling
    assert one["traffic"]["total"] == 0 and one["communication_seconds"] == 0


def test_scaling_errors_name_the_option(tiny_config_dir):
    with pytest.raises(DiaBloError, match="--sharding 'zero4': choose one of none, ddp, zero2, zero3, fsdp"):
        tiny_scaling(tiny_config_dir, sharding="zero4")
    with pytest.raises(DiaBloError, match="--sharding none trains on one GPU"):
        tiny_scaling(tiny_config_dir, gpus=8, sharding="none")
    with pytest.raises(DiaBloError, match=r"--mfu 1\.5"):
        tiny_scaling(tiny_config_dir, mfu=1.5)
    from diablo_cli.scaling import parse_tokens

    assert parse_tokens("100M") == 100_000_000 and parse_tokens("1.5B") == 1_500_000_000
    with pytest.raises(DiaBloError, match="--tokens 'many'"):
        parse_tokens("many")


def test_llama2_70b_ships_its_published_config():
    inspection = inspect_model("llama2-70b", budget="1%", dtype="bfloat16")
    assert inspection.base_parameters == 68_976_648_192
    assert {(m.module, m.in_features, m.out_features) for m in inspection.targeted} >= {
        ("k_proj", 8192, 1024),  # 8 KV heads of 128
        ("up_proj", 8192, 28672),
    }
    assert inspection.scaling["memory"]["weights"] / 2**30 == pytest.approx(128.48, abs=0.01)
    assert not inspection.scaling["fits"]  # 129 GiB of bf16 weights on one 80 GiB GPU


def test_lora_baseline_rank_and_snippet():
    from diablo_cli.inspection import closest_lora_rank

    # a budget is r·Σ(in+out): the nearest whole rank, the smaller on a tie, never below 1
    assert [closest_lora_rank(x) for x in (38.4, 38.5, 38.51, 0.2)] == [38, 38, 39, 1]
    paper = inspect_model("llama2-7b", blocks=[64])  # 70,254,592 / 1,753,088 = r 40.08
    assert paper.lora_rank == 40
    assert paper.lora_snippet == (
        "adapter:\n  type: lora\n  r: 40\n  alpha: 80\n  dropout: 0.05\n  target_modules: QKVUD"
    )
    assert 40 * LLAMA2_7B_QKVUD_WIDTH <= candidate(paper, 64).trainable < 41 * LLAMA2_7B_QKVUD_WIDTH
    budget = inspect_model("llama2-7b", budget="1%")  # N=68: r 38.39
    assert budget.lora_rank == 38 == budget.memory_settings["lora_rank"]
    assert inspect_model("llama2-7b", match_lora=32).lora_rank == 32
    assert inspect_model("llama2-7b", blocks=[48, 96]).lora_snippet is None  # no single N chosen
    named = inspect_model("llama2-7b", targets=["q_proj", "v_proj"], layers=(0, 15), blocks=[64])
    assert named.lora_snippet.endswith("target_modules: [q_proj, v_proj]\n  layers: [0, 15]")


def test_cli_scaling_table_lora_snippet_and_json():
    shown = run_cli("inspect", "llama2-7b", "--blocks", "64", "--gpus", "8", "--sharding", "zero3", "--batch", "4")
    assert shown.returncode == 0, shown.stderr
    for text in ("training on 8 GPUs (zero3)", "first-order estimate", "1/8 shard", "100,000,000 tokens"):
        assert text in shown.stdout
    assert "type: lora" in shown.stdout and "r: 40" in shown.stdout and "alpha: 80" in shown.stdout
    data = json.loads(run_cli("inspect", "llama2-70b", "--budget", "1%", "--gpus", "64", "--json").stdout)
    assert data["scaling"]["gpus"] == 64 and data["scaling"]["sharding"] == "ddp"
    assert data["scaling"]["interconnect_gbps"] == 25 and not data["scaling"]["fits"]  # A100 nodes: 200 Gb/s
    assert data["lora_rank"] == 79 and "r: 79" in data["lora_snippet"]


@pytest.mark.parametrize(
    ("gpu", "tflops", "memory", "link"),
    [("a100-40gb", 312, 40, 300), ("h100", 989, 80, 450), ("H200", 989, 141, 450), ("l40s", 362, 48, 32)],
)
def test_scaling_takes_the_gpu_by_name(tiny_config_dir, gpu, tflops, memory, link):
    scaling = tiny_scaling(tiny_config_dir, gpus=2, gpu=gpu).scaling
    assert (scaling["gpu_tflops"], scaling["gpu_memory_gib"], scaling["interconnect_gbps"]) == (tflops, memory, link)
    assert scaling["compute_seconds"] == pytest.approx(2 * 16 * scaling["flops"]["total"] / (tflops * 1e12 * 0.4))
    assert tiny_scaling(tiny_config_dir, gpu=gpu, gpu_memory_gib=12).scaling["gpu_memory_gib"] == 12


def test_cli_gpu_option_and_unknown_gpu_is_one_line():
    shown = run_cli("inspect", "llama2-7b", "--blocks", "64", "--gpu", "h100", "--json")
    assert shown.returncode == 0, shown.stderr
    scaling = json.loads(shown.stdout)["scaling"]
    assert (scaling["gpu"], scaling["gpu_tflops"]) == ("h100", 989)
    bad = run_cli("inspect", "llama2-7b", "--gpu", "v100")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert "--gpu 'v100': choose one of a100-40gb, a100-80gb, h100, h100-pcie, h200, l40s, l4, a10" in bad.stderr


def test_cli_bad_sharding_is_one_line():
    bad = run_cli("inspect", "llama2-7b", "--sharding", "zero4")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert "--sharding 'zero4'" in bad.stderr and "none, ddp, zero2, zero3, fsdp" in bad.stderr


def test_target_letters_no_layer_holds_are_noted(tmp_path):
    """Mixtral's experts are fused 3-D parameters, not linear layers: a budget for QKVOGUD there counts
    attention alone, and the inspection says so (the view and --json)."""
    from transformers import MixtralConfig

    MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4,
    ).save_pretrained(tmp_path)  # fmt: skip
    inspection = inspect_model(str(tmp_path), targets="qkvogud")
    expected = (
        "note: target_modules QKVOGUD: MixtralForCausalLM has no linear layer for G, U, D; those parts stay frozen"
    )
    assert inspection.notes == [expected] and inspection.to_dict()["notes"] == [expected]
    assert expected in model_inspection_view(inspection)
    assert inspect_model("llama2-7b", targets="QKVOGUD", blocks=[64]).notes == []
