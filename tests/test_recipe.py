"""Recipes: strict validation with clear messages, extends, --set overrides, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diablo_cli import DiaBloError
from diablo_cli.recipe import Recipe, load_recipe

CONFIGS = Path(__file__).parents[1] / "configs"
MINIMAL = {
    "base_model": "tiny-random-llama",
    "data": {"datasets": [{"path": "bundled://quickstart/train.jsonl", "format": "prompt_completion"}]},
}


def write(tmp_path: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def load_error(tmp_path: Path, data: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(DiaBloError) as err:
        load_recipe(write(tmp_path, data), overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.adapter.blocks == 64 and recipe.adapter.target_modules == "QKVUD"
    assert recipe.training.optimizer == "adamw_torch_fused" and recipe.model.trust_remote_code is False
    assert Path(recipe.data.datasets[0].path).is_file()  # bundled:// resolved into the package


def test_unknown_key_suggests_the_closest(tmp_path):
    message = load_error(tmp_path, {**MINIMAL, "training": {"learnig_rate": 1e-4}})
    assert message.startswith(str(tmp_path / "recipe.yaml"))
    assert "training.learnig_rate: unknown key; did you mean 'learning_rate'?" in message
    top = load_error(tmp_path, {**MINIMAL, "trainig": {}})
    assert "trainig: unknown key; did you mean 'training'?" in top
    nested = load_error(tmp_path, {**MINIMAL, "data": {"datasets": [{"path": "x.jsonl", "fomat": "chat"}]}})
    assert "data.datasets.0.fomat: unknown key; did you mean 'format'?" in nested


def test_wrong_types_and_impossible_values(tmp_path):
    assert "training.learning_rate: Input should be a valid number" in load_error(
        tmp_path, {**MINIMAL, "training": {"learning_rate": "fast"}}
    )
    assert "training.micro_batch_size: 0 is out of range; valid: at least 1" in load_error(
        tmp_path, {**MINIMAL, "training": {"micro_batch_size": 0}}
    )
    assert "training.lr_scheduler: Input should be 'linear', 'cosine' or 'constant'" in load_error(
        tmp_path, {**MINIMAL, "training": {"lr_scheduler": "cosin"}}
    )
    assert "unknown optimizer 'adamw_torh'; did you mean 'adamw_torch'?" in load_error(
        tmp_path, {**MINIMAL, "training": {"optimizer": "adamw_torh"}}
    )
    assert "model.attn_implementation: unknown attention 'sdap'; did you mean 'sdpa'?" in load_error(
        tmp_path, {**MINIMAL, "model": {"attn_implementation": "sdap"}}
    )
    for accepted in ("auto", "eager", "sdpa", "paged|sdpa", "kernels-community/flash-attn"):
        path = tmp_path / "ok.yaml"
        path.write_text(yaml.safe_dump({**MINIMAL, "model": {"attn_implementation": accepted}}))
        assert load_recipe(path).model.attn_implementation == accepted
    assert "base_model: required but missing" in load_error(tmp_path, {"data": MINIMAL["data"]})
    assert "give warmup_steps or warmup_ratio, not both" in load_error(
        tmp_path, {**MINIMAL, "training": {"warmup_steps": 10, "warmup_ratio": 0.1}}
    )


def test_adapter_errors_come_from_diablo_config(tmp_path):
    message = load_error(tmp_path, {**MINIMAL, "adapter": {"target_modules": "QQ("}})
    assert "adapter" in message and "is neither module letters" in message
    assert "adapter.blocks: 0 is out of range; valid: at least 1" in load_error(
        tmp_path, {**MINIMAL, "adapter": {"blocks": 0}}
    )


def test_extends_merges_sections_and_detects_cycles(tmp_path):
    write(tmp_path, {**MINIMAL, "training": {"learning_rate": 1e-4, "epochs": 2}}, "base.yaml")
    child = write(tmp_path, {"extends": "base.yaml", "training": {"learning_rate": 5e-4}}, "child.yaml")
    recipe = load_recipe(child)
    assert recipe.training.learning_rate == 5e-4 and recipe.training.epochs == 2
    write(tmp_path, {"extends": "b.yaml"}, "a.yaml")
    write(tmp_path, {"extends": "a.yaml"}, "b.yaml")
    with pytest.raises(DiaBloError, match="extends itself in a cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(DiaBloError, match=r"extends: nowhere.yaml does not exist"):
        load_recipe(write(tmp_path, {"extends": "nowhere.yaml"}, "c.yaml"))


def test_set_overrides_any_key_as_yaml_scalars(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(
        path,
        [
            "training.learning_rate=1e-4",
            "adapter.blocks=16",
            "model.gradient_checkpointing=true",
            "adapter.layers=[0, 1]",
            "data.datasets.0.limit=10",
            "output.dir=somewhere/else",
        ],
    )
    assert recipe.training.learning_rate == 1e-4 and recipe.adapter.blocks == 16
    assert recipe.model.gradient_checkpointing is True and recipe.adapter.layers == (0, 1)
    assert recipe.data.datasets[0].limit == 10 and recipe.output.dir == "somewhere/else"
    with pytest.raises(DiaBloError, match=r"--set 'training.learning_rate': expected KEY=VALUE"):
        load_recipe(path, ["training.learning_rate"])
    with pytest.raises(DiaBloError, match=r"data.datasets.3 needs an index 0-0"):
        load_recipe(path, ["data.datasets.3.limit=1"])
    with pytest.raises(DiaBloError, match=r"training.epoch: unknown key; did you mean 'epochs'"):
        load_recipe(path, ["training.epoch=2"])


def test_yaml_and_file_errors(tmp_path):
    with pytest.raises(DiaBloError, match=r"recipe .*missing.yaml does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: [1\n")
    with pytest.raises(DiaBloError, match=r"bad.yaml: not valid YAML \(line"):
        load_recipe(bad)
    with pytest.raises(DiaBloError, match="no such bundled resource"):
        load_recipe(write(tmp_path, {**MINIMAL, "data": {"datasets": [{"path": "bundled://nope.jsonl"}]}}))


def test_relative_data_paths_resolve_beside_the_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    data = {"datasets": [{"path": "../data/train.jsonl", "format": "prompt_completion"}]}
    recipe = load_recipe(write(recipe_dir, {**MINIMAL, "data": data}))
    assert recipe.data.datasets[0].path == str((tmp_path / "data" / "train.jsonl").resolve())
    hub = load_recipe(write(recipe_dir, {**MINIMAL, "data": {"datasets": [{"path": "meta-math/MetaMathQA"}]}}))
    assert hub.data.datasets[0].path == "meta-math/MetaMathQA"


SHIPPED_RECIPES = sorted(  # configs/accelerate/ holds accelerate's own config files, not recipes
    p
    for p in CONFIGS.rglob("*.yaml")
    if not p.name.startswith("_") and "accelerate" not in p.relative_to(CONFIGS).parts
)


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=str)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    if recipe.adapter.type == "diablo":
        assert recipe.adapter.to_config().blocks == recipe.adapter.blocks


def test_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(CONFIGS / "tiny.yaml")
    again = load_recipe(write(tmp_path, yaml.safe_load(recipe.to_yaml())))
    assert again == recipe


def test_unreachable_base_models_are_one_clear_line(monkeypatch):
    from diablo_cli.models import load_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiaBloError, match=r"'llama2-7b' \(alias of meta-llama/Llama-2-7b-hf\) comes from the hub"):
        load_base_model("llama2-7b")
    with pytest.raises(DiaBloError, match=r"'no-such-org/no-model' is not a local folder .* tiny-random-llama"):
        load_base_model("no-such-org/no-model")
