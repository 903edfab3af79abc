"""Baselines in the same recipes: `adapter.type` diablo | lora | dora | full, on the same loop, files and resume."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from diablo_cli import DiaBloError
from diablo_cli.adapter.targets import select_targets
from diablo_cli.methods import training_method
from diablo_cli.models import load_base_model
from diablo_cli.recipe import DiaBloAdapter, FullAdapter, LoraAdapter, load_recipe
from diablo_cli.tracking import read_metrics
from diablo_cli.train import train
from tests.conftest import tiny_llama

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))


def run(tmp_path: Path, *overrides: str, resume: str | None = None, name: str = "run"):
    recipe = load_recipe(TINY, [f"output.dir={tmp_path / name}", "logging.progress=false", *overrides])
    console = Console(file=io.StringIO(), width=200)
    return train(recipe, resume=resume, console=console), console.file.getvalue()


def losses(output_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(output_dir / "metrics.jsonl") if "loss" in m}


def test_recipe_adapter_type_picks_the_section_and_names_wrong_keys(tmp_path):
    assert isinstance(load_recipe(TINY).adapter, DiaBloAdapter)
    lora = load_recipe(TINY, ["adapter.type=lora", "adapter.r=4"]).adapter
    assert isinstance(lora, LoraAdapter) and lora.r == 4 and lora.lora_alpha == 8.0 and lora.target_modules == "QKVUD"
    assert load_recipe(TINY, ["adapter.type=dora"]).adapter.describe() == "DoRA r=16 QKVUD"
    assert isinstance(load_recipe(TINY, ["adapter.type=full"]).adapter, FullAdapter)
    with pytest.raises(DiaBloError, match=r"adapter.type: unknown adapter type 'lorra'; did you mean 'lora'\?"):
        load_recipe(TINY, ["adapter.type=lorra"])
    with pytest.raises(
        DiaBloError, match=r"adapter.blocks: unknown key for adapter type lora; valid keys here: type, r"
    ):
        load_recipe(TINY, ["adapter.type=lora", "adapter.blocks=8"])
    with pytest.raises(DiaBloError, match=r"adapter.r: 0 is out of range; valid: at least 1"):
        load_recipe(TINY, ["adapter.type=lora", "adapter.r=0"])
    # extends: a child that changes the type replaces the parent's section instead of merging DiaBlo keys into it
    child = tmp_path / "lora.yaml"
    child.write_text(f"extends: {TINY}\nadapter:\n  type: lora\n  r: 2\n  target_modules: QKVOGUD\n")
    section = load_recipe(child).adapter
    assert isinstance(section, LoraAdapter) and section.r == 2 and section.target_modules == "QKVOGUD"
    assert load_recipe(child).training.max_steps == 12  # everything else is inherited


@pytest.mark.parametrize(("targets", "layers"), [("QKVOGUD", None), ("QV", (1, 2)), ("all-linear", None)])
def test_lora_adapts_exactly_the_layers_diablo_adapts(targets, layers):
    section = LoraAdapter(type="lora", r=2, target_modules=targets, layers=layers)
    expected = {t.name for t in select_targets(tiny_llama(), section.target_config())}
    model = training_method(section).attach(tiny_llama())
    adapted = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_baseline_trains_saves_peft_files_and_resumes_exactly(tmp_path, kind):
    from peft import PeftModel

    settings = (f"adapter.type={kind}", "adapter.r=4", "adapter.target_modules=QKVOGUD", "training.learning_rate=1e-2")
    straight, output = run(tmp_path, *settings, name="straight")
    out = straight.output_dir
    assert f"{'LoRA' if kind == 'lora' else 'DoRA'} r=4 QKVOGUD on tiny-random-llama" in output
    assert "through PEFT on 21 layers" in output and "adapter in" in output
    assert losses(out)[12] < losses(out)[1]
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    # the deliverable is PEFT's own format: PeftModel loads it and computes what the trained model computes
    loaded = PeftModel.from_pretrained(load_base_model("tiny-random-llama", dtype="fp32")[0], out).eval()
    with torch.no_grad():
        expected = straight.model.eval()(input_ids=TOKENS).logits
        torch.testing.assert_close(loaded(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    # a checkpoint resumes to the straight run's losses and weights
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-0000006", interrupted / "checkpoints" / "step-0000006")
    resumed, output = run(tmp_path, *settings, resume="latest", name="interrupted")
    assert "at step 6" in output
    assert [losses(resumed.output_dir)[s] for s in range(7, 13)] == [losses(out)[s] for s in range(7, 13)]
    a, b = load_file(out / "adapter_model.safetensors"), load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_writes_a_standalone_model_and_resumes_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    straight, output = run(tmp_path, "adapter.type=full", name="straight")
    out = straight.output_dir
    assert "3,284,416 trainable of 3,284,416 base parameters (100.000%)" in output and "model in" in output
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=TOKENS).logits, straight.model.eval()(input_ids=TOKENS).logits)
    with pytest.raises(DiaBloError, match=r"is a model folder \(a `type: full` run\?\), not an adapter"):
        from diablo_cli.merge import merge_adapter

        merge_adapter(out, tmp_path / "merged")
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-0000006", interrupted / "checkpoints" / "step-0000006")
    resumed, _ = run(tmp_path, "adapter.type=full", resume="latest", name="interrupted")
    assert [losses(resumed.output_dir)[s] for s in range(7, 13)] == [losses(out)[s] for s in range(7, 13)]


def test_a_checkpoint_of_one_method_does_not_resume_another(tmp_path):
    run(tmp_path, "adapter.type=lora", name="run")
    with pytest.raises(DiaBloError, match=r"step-0000006/adapter_config.json is not a DiaBlo adapter config"):
        run(tmp_path, resume="latest", name="run")  # the tiny recipe is DiaBlo
    with pytest.raises(DiaBloError, match=r"has no model\*\.safetensors \(is it from a full fine-tune\?\)"):
        run(tmp_path, "adapter.type=full", resume="latest", name="run")


def test_diablo_eval_and_merge_take_a_lora_run_like_a_diablo_run(tmp_path):
    """The same `diablo eval` rows and `diablo merge` for a PEFT run folder: the merged model computes what
    base + LoRA computes, and scores example for example what the adapter scores."""
    from transformers import AutoModelForCausalLM

    from diablo_cli.evaluate.compare import build_plan, run_evaluation
    from diablo_cli.evaluate.runner import EvalSettings, spec_from_name
    from diablo_cli.merge import merge_adapter

    trained, _ = run(tmp_path, "adapter.type=dora", "adapter.r=4", "training.learning_rate=1e-2", name="dora")
    report = merge_adapter(trained.output_dir, tmp_path / "merged")
    assert report.verification is not None and report.verification.passed
    assert report.verification.adapter_effect > 10 * report.verification.max_abs
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected = trained.model.eval()(input_ids=TOKENS).logits
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, expected, rtol=1e-4, atol=1e-4)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "with a DoRA adapter merged" in card and "PEFT DoRA, r=4" in card

    settings = EvalSettings(batch_size=4, limit=4, dtype="fp32")
    plan = build_plan(
        adapters=[trained.output_dir],
        models=[str(tmp_path / "merged")],
        specs=[spec_from_name("quickstart", max_new_tokens=6)],
        settings=settings,
    )
    assert plan.base == "tiny-random-llama"  # the run's recipe names its base
    result = run_evaluation(plan)
    assert list(result.scores) == ["base", "dora", "merged"]
    adapter_rows = [r for r in result.predictions if r["model"] == "dora"]
    merged_rows = [r for r in result.predictions if r["model"] == "merged"]
    assert [r["generation"] for r in adapter_rows] == [r["generation"] for r in merged_rows]


@pytest.mark.parametrize("kind", ["diablo", "lora"])
def test_letters_no_layer_holds_are_noted_in_the_plan(kind):
    """QKVOGUD on Mixtral: its experts are fused 3-D parameters, not linear layers, so G, U and D stay frozen;
    the plan says so instead of leaving it to rows missing from the table."""
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4,
    )  # fmt: skip
    section = (
        DiaBloAdapter(blocks=4, target_modules="QKVOGUD")
        if kind == "diablo"
        else LoraAdapter(type="lora", r=2, target_modules="QKVOGUD")
    )
    method = training_method(section)
    model = method.attach(transformers.MixtralForCausalLM(config))
    notes = method.notes(model)
    assert notes[0] == (
        f"note: target_modules {section.target_modules}: MixtralForCausalLM has no linear layer for G, U, D; "
        "those parts stay frozen"
    )
    llama = training_method(section)
    assert not any(line.startswith("note:") for line in llama.notes(llama.attach(tiny_llama())))
