"""diablo extract: the diagonal blocks of a full fine-tune's update as an adapter, checked against dense math."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from diablo_cli import DiaBloError, load_adapter, merge_diablo
from diablo_cli import cli as cli_module
from diablo_cli.adapter import read_adapter_config
from diablo_cli.extract import extract_adapter

QKVUD = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny base and a "fine-tuned" copy: every weight perturbed, saved sharded so extract walks shards."""
    root = tmp_path_factory.mktemp("pair")
    base = tiny_llama()
    base.save_pretrained(root / "pre", safe_serialization=True)
    tuned = tiny_llama()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    tuned.save_pretrained(root / "ft", safe_serialization=True, max_shard_size="40KB")
    assert (root / "ft" / "model.safetensors.index.json").is_file()
    return root / "pre", root / "ft"


def dense_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def block_mask(out_features: int, in_features: int, blocks: int) -> torch.Tensor:
    """Which entries of an (out, in) weight the diagonal blocks cover, built entry by entry from the definition."""
    block_in, block_out = -(-in_features // blocks), -(-out_features // blocks)
    rows = torch.arange(out_features)[:, None] // block_out
    cols = torch.arange(in_features)[None, :] // block_in
    return rows == cols


@pytest.mark.parametrize(("blocks", "scale"), [(8, 1.0), (9, 0.75)])
def test_merged_extract_is_base_plus_scaled_diagonal_of_the_update(tmp_path, pair, blocks, scale):
    pre_dir, ft_dir = pair
    report = extract_adapter(str(pre_dir), str(ft_dir), tmp_path / "adapter", blocks=blocks, scale=scale)
    pre, ft = dense_weights(pre_dir), dense_weights(ft_dir)

    merged = merge_diablo(load_adapter(tiny_llama(), tmp_path / "adapter"))
    state = merged.state_dict()
    targeted = [key for key in pre if key.rsplit(".", 2)[-2] in QKVUD]
    assert len(targeted) == 15 and len(report.modules) == 15
    for key in targeted:
        update = ft[key] - pre[key]
        mask = block_mask(*update.shape, blocks)
        expected = pre[key] + torch.where(mask, update * scale, torch.zeros_like(update))
        assert torch.equal(state[key], expected), key  # bit for bit
        kept = float(update[mask].double().square().sum() / update.double().square().sum())
        module = next(m for m in report.modules if f"{m.name}.weight" == key)
        assert module.share == pytest.approx(kept, rel=1e-6)
    for key in pre:
        if key not in targeted:
            assert torch.equal(state[key], pre[key]), key  # nothing else moves

    everything = sum(float((ft[k] - pre[k]).double().square().sum()) for k in pre)
    assert report.targeted_energy + report.other_energy == pytest.approx(everything, rel=1e-5)
    total = sum(m.kept_energy for m in report.modules) / report.targeted_energy
    assert report.share_of(report.modules) == pytest.approx(total)
    assert 0 < total < 1


def test_diablo_merge_of_the_extract_is_the_dense_formula(tmp_path, pair):
    """The merge command (streaming, verified) on the extracted adapter writes W_pre + s·blockdiag(W_ft − W_pre)."""
    from diablo_cli.merge import merge_adapter

    pre_dir, ft_dir = pair
    extract_adapter(str(pre_dir), str(ft_dir), tmp_path / "adapter", blocks=9, scale=0.7)
    report = merge_adapter(tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
    assert report.verification.passed and report.changed_weights == 15
    pre, ft, merged = dense_weights(pre_dir), dense_weights(ft_dir), dense_weights(tmp_path / "merged")
    for key in pre:
        expected = pre[key]
        if key.rsplit(".", 2)[-2] in QKVUD:
            update = ft[key] - pre[key]
            expected = pre[key] + torch.where(block_mask(*update.shape, 9), update * 0.7, torch.zeros_like(update))
        assert torch.equal(merged[key], expected), key


def test_adapter_folder_records_config_and_source(tmp_path, pair):
    pre_dir, ft_dir = pair
    extract_adapter(str(pre_dir), str(ft_dir), tmp_path / "a", blocks=8, targets="qkvud", layers=(1, 2), scale=0.5)
    document = read_adapter_config(tmp_path / "a")
    assert document["config"]["blocks"] == 8 and document["config"]["target_modules"] == "QKVUD"
    assert document["config"]["layers"] == [1, 2] and len(document["modules"]) == 10
    assert document["source"] == {"extracted_from": str(ft_dir), "base": str(pre_dir), "scale": 0.5}


def test_budget_picks_n_like_inspect(tmp_path, pair):
    from diablo_cli.inspection import inspect_model

    pre_dir, ft_dir = pair
    report = extract_adapter(str(pre_dir), str(ft_dir), tmp_path / "a", budget="10%")
    assert report.blocks == inspect_model(str(pre_dir), budget="10%").memory_settings["blocks"]
    assert report.budget_source.startswith("10% of")


def test_cli_prints_the_energy_table(tmp_path, pair, capsys):
    pre_dir, ft_dir = pair
    out = tmp_path / "adapter"
    with pytest.raises(SystemExit) as done:
        cli_module.main(
            ["extract", "--base", str(pre_dir), "--finetuned", str(ft_dir), "--blocks", "8", "-o", str(out)]
        )
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "energy kept" in text and "down_proj" in text and "all targeted" in text
    assert f"wrote {out}" in text.replace("\n", "")
    assert json.loads((out / "adapter_config.json").read_text())["config"]["blocks"] == 8


def test_mistakes_are_one_line(tmp_path, pair, capsys):
    pre_dir, ft_dir = pair
    with pytest.raises(DiaBloError, match="either --blocks or --budget"):
        extract_adapter(str(pre_dir), str(ft_dir), tmp_path / "a", blocks=8, budget="10%")
    with pytest.raises(DiaBloError, match="is the base itself"):
        extract_adapter(str(pre_dir), str(pre_dir), tmp_path / "a", blocks=8)
    other = tmp_path / "other"
    tiny_llama(intermediate_size=88).save_pretrained(other, safe_serialization=True)
    with pytest.raises(DiaBloError, match=r"up_proj\.weight: the fine-tune's is \(88, 64\), the base's \(176, 64\)"):
        extract_adapter(str(pre_dir), str(other), tmp_path / "a", blocks=8)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(DiaBloError, match=r"^fine-tuned model folder .*not-a-model has no config\.json"):
        extract_adapter(str(pre_dir), str(not_a_model), tmp_path / "a", blocks=8)  # not "base model": it is not
    with pytest.raises(DiaBloError, match=r"^fine-tuned model '.*missing' is not a local folder"):
        extract_adapter(str(pre_dir), str(tmp_path / "missing"), tmp_path / "a", blocks=8)
    assert not (tmp_path / "a").exists()
    capsys.readouterr()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    argv = ["extract", "--base", str(pre_dir), "--finetuned", str(ft_dir), "--blocks", "8"]
    with pytest.raises(SystemExit) as stop:
        cli_module.main([*argv, "-o", str(tmp_path / "mine"), "--overwrite"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "was not written by diablo" in err and "\n" not in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
