"""diablo convert: official DiaBlo checkpoints (ziyangjoy/DiaBlo's adapter.chkpt) in and out.

The official layer is re-implemented here from the paper's published math (§3.1) and the block-count rule its
code follows, not imported: for N blocks a layer gets d1 = ⌈in/N⌉, d2 = ⌈out/N⌉ and N_eff = max(⌈in/d1⌉,
⌈out/d2⌉) blocks; y = W x + blockdiag(A_1..A_Neff) applied to x zero-padded to N_eff·d1, truncated to out.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch import nn

from diablo_cli import DiaBloError, load_adapter
from diablo_cli import cli as cli_module
from diablo_cli.adapter import read_adapter_config
from diablo_cli.convert import (
    OFFICIAL_CHECKPOINT,
    convert_from_official,
    convert_to_official,
    official_block_count,
    read_official_checkpoint,
)
from diablo_cli.recipe import load_recipe

QKVUD = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


class OfficialBlockLinear(nn.Module):
    """The official layer as the paper states it: a frozen linear plus blockdiag(A) on the padded input."""

    def __init__(self, linear: nn.Linear, blocks: int) -> None:
        super().__init__()
        self.linear = linear
        self.block_in = math.ceil(linear.in_features / blocks)
        self.block_out = math.ceil(linear.out_features / blocks)
        count = max(math.ceil(linear.in_features / self.block_in), math.ceil(linear.out_features / self.block_out))
        self.block_A = nn.Parameter(torch.zeros(count, self.block_in, self.block_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = self.block_A.shape[0]
        padded = F.pad(x, (0, count * self.block_in - x.shape[-1]))
        chunks = padded.reshape(*x.shape[:-1], count, self.block_in)
        update = torch.einsum("...nd,nde->...ne", chunks, self.block_A).flatten(-2)
        return self.linear(x) + update[..., : self.linear.out_features]


def official_model(blocks: int, *, kinds=QKVUD, layer_max: int = 31, dtype=torch.float32, seed: int = 3):
    """tiny_llama with official layers in layers 0..layer_max and random blocks, as a trained run would have."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(model.model.layers):
        if index > layer_max:
            continue
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in kinds:
                    official = OfficialBlockLinear(child, blocks)
                    with torch.no_grad():
                        official.block_A.copy_(torch.randn(official.block_A.shape, generator=generator) * 0.05)
                    official.block_A.data = official.block_A.data.to(dtype)
                    setattr(parent, name, official)
    return model.eval()


def save_official(model: nn.Module, path) -> dict[str, torch.Tensor]:
    """What the official trainer saves with --save_adapter_only: the state dict's block tensors."""
    state = {key: value for key, value in model.state_dict().items() if "block" in key}
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(folder, safe_serialization=True)
    return folder


def test_block_count_rule_matches_the_issue():
    """hidden 64, intermediate 176 with N=9: q/k/v/o 8 blocks, up/down 9; Llama-2-7B QKVOGUD N=320: 316 everywhere."""
    assert official_block_count(64, 64, 9) == 8 and official_block_count(64, 32, 9) == 8
    assert official_block_count(64, 176, 9) == 9 and official_block_count(176, 64, 9) == 9
    layer = 316 * (13 * 13 * 4 + 13 * 35 * 3)  # q, k, v, o: 4096×4096; gate, up, down: 4096×11008 and back
    assert {official_block_count(4096, 4096, 320), official_block_count(4096, 11008, 320)} == {316}
    assert 32 * layer == 20_638_592


def test_official_layout_is_ours_with_n_eff_blocks():
    """Why conversion is exact: with N_eff blocks our layout has the official block shape, for every shape."""
    from diablo_cli.adapter import BlockLayout
    from diablo_cli.convert import official_shape

    for in_features in range(1, 70):
        for out_features in (*range(1, 40), 176, 11008):
            for blocks in range(1, min(in_features, out_features) + 1):
                shape = official_shape(in_features, out_features, blocks)
                assert shape[0] <= blocks
                assert BlockLayout(in_features, out_features, shape[0]).shape == shape


@pytest.mark.parametrize("blocks", [8, 9])
def test_official_checkpoint_converts_and_matches_logits(tmp_path, tiny_base, tokens, blocks):
    official = official_model(blocks)
    checkpoint = tmp_path / "run" / f"Llama2-7B_block{blocks}_lr0.0005_bs16_ep3_metamath" / "checkpoint-30"
    checkpoint.mkdir(parents=True)
    saved = save_official(official, checkpoint / OFFICIAL_CHECKPOINT)
    report = convert_from_official(checkpoint.parent, tmp_path / "adapter", base=str(tiny_base))
    assert report.blocks == blocks and report.modules == len(saved) == 15

    document = read_adapter_config(tmp_path / "adapter")
    for key, tensor in saved.items():
        assert document["modules"][key.removesuffix(".block_A")]["blocks"] == tensor.shape[0]
    config = document["config"]
    assert config["blocks"] == blocks and config["target_modules"] == "QKVUD" and config["layers"] is None
    assert config["blocks_by_module"] == ({"q_proj": 8, "k_proj": 8, "v_proj": 8} if blocks == 9 else {})
    assert document["dropout"] == 0.05 and config["dropout"] == 0.05

    with torch.no_grad():
        expected = official(tokens).logits
        for kernel in ("auto", "blocks"):
            converted = load_adapter(tiny_llama(), tmp_path / "adapter", kernel=kernel).eval()
            difference = (converted(tokens).logits - expected).abs().max().item()
            assert difference < 1e-6, (kernel, difference)
        bare = tiny_llama()(tokens).logits
    assert (bare - expected).abs().max().item() > 1e-2  # the blocks matter: the comparison is not vacuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_to_ours_to_official_is_bit_for_bit(tmp_path, tiny_base, dtype):
    official = official_model(9, kinds=(*QKVUD, "o_proj", "gate_proj"), layer_max=1, dtype=dtype)
    saved = save_official(official, tmp_path / OFFICIAL_CHECKPOINT)
    report = convert_from_official(
        tmp_path / OFFICIAL_CHECKPOINT, tmp_path / "adapter", base=str(tiny_base), dropout=0.1
    )
    assert report.layers == (0, 1) and report.targets == "QKVOGUD"
    back = convert_to_official(tmp_path / "adapter", tmp_path / "back")
    assert back.output == tmp_path / "back"
    again = torch.load(back.output, weights_only=True, map_location="cpu")
    assert list(again) == list(saved)
    for key, tensor in saved.items():
        assert again[key].dtype == tensor.dtype == dtype and again[key].shape == tensor.shape
        assert torch.equal(again[key], tensor)
    assert "--num_blocks 9 --target_modules qkvogud --layer_min 0 --layer_max 1" in back.official_arguments


def test_our_adapter_drops_padding_only_blocks_for_the_official_layout(tmp_path, tokens):
    """An adapter trained here with N=9 on a 64×64 layer has a 9th block wholly in the padding; the official
    layout has 8. The conversion drops it, and the official model computes what ours does."""
    from conftest import randomize_adapters

    from diablo_cli import DiaBloConfig, attach_diablo, save_adapter

    model = attach_diablo(tiny_llama(), DiaBloConfig(blocks=9, target_modules="qkvud", kernel="blocks"))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ours")
    report = convert_to_official(tmp_path / "ours", tmp_path / "official.chkpt")
    assert report.trimmed == 9  # q, k, v in 3 layers
    official = official_model(9, seed=5)
    official.load_state_dict(torch.load(tmp_path / "official.chkpt", weights_only=True), strict=False)
    with torch.no_grad():
        assert (official(tokens).logits - model(tokens).logits).abs().max().item() < 1e-5


def test_official_lowercase_letters_work_as_targets():
    from diablo_cli.adapter import DiaBloConfig, select_targets

    assert DiaBloConfig(target_modules="qkvud").target_modules == "QKVUD"
    names = {
        t.name.rsplit(".", 1)[-1] for t in select_targets(tiny_llama(), DiaBloConfig(blocks=8, target_modules="qkvud"))
    }
    assert names == set(QKVUD)


class WritesAFile:
    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling this would create the file


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path, tiny_base, capsys):
    marker = tmp_path / "ran"
    torch.save(
        {"model.layers.0.self_attn.q_proj.block_A": torch.zeros(8, 8, 8), "x": WritesAFile(marker)},
        tmp_path / "a.chkpt",
    )
    with pytest.raises(DiaBloError, match=r"refused, not loaded: it would call io\.open"):
        read_official_checkpoint(tmp_path / "a.chkpt")
    assert not marker.exists()
    with pytest.raises(SystemExit) as stop:
        cli_module.main(["convert", str(tmp_path / "a.chkpt"), "--base", str(tiny_base), "-o", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "io.open" in err and "\n" not in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(tmp_path / "a.chkpt", weights_only=False)  # the pickle is live: an ordinary load runs it
    assert marker.exists()


def test_not_a_checkpoint_and_foreign_keys_are_one_line(tmp_path, tiny_base):
    (tmp_path / "text.chkpt").write_text("hello")
    with pytest.raises(DiaBloError, match="is not a PyTorch checkpoint") as err:
        read_official_checkpoint(tmp_path / "text.chkpt")
    assert "\n" not in str(err.value)
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, tmp_path / "model.chkpt")
    with pytest.raises(DiaBloError, match=r"model\.embed_tokens\.weight.*keys end in \.block_A"):
        read_official_checkpoint(tmp_path / "model.chkpt")
    run = tmp_path / "run" / "checkpoint-10"
    run.mkdir(parents=True)
    save_official(official_model(8), run / OFFICIAL_CHECKPOINT)
    with pytest.raises(DiaBloError, match=r"is a run of the official DiaBlo code .*convert it first: diablo convert"):
        load_adapter(tiny_llama(), tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiaBloError, match=r"holds no adapter\.chkpt"):
        convert_from_official(tmp_path / "empty", tmp_path / "out", base=str(tiny_base))


def test_a_base_whose_shapes_disagree_is_named(tmp_path, tiny_base):
    save_official(official_model(8), tmp_path / OFFICIAL_CHECKPOINT)
    narrow = tmp_path / "narrow"
    tiny_llama(hidden_size=32, intermediate_size=88).save_pretrained(narrow, safe_serialization=True)
    with pytest.raises(DiaBloError, match=r"self_attn\.q_proj\.block_A has shape \(8, 8, 8\).*32×32") as err:
        convert_from_official(tmp_path / OFFICIAL_CHECKPOINT, tmp_path / "out", base=str(narrow))
    assert "\n" not in str(err.value)
    shallow = tmp_path / "shallow"
    tiny_llama(num_hidden_layers=2).save_pretrained(shallow, safe_serialization=True)
    with pytest.raises(DiaBloError, match=r"adapts model\.layers\.2\.self_attn\.q_proj, but base .* has no module"):
        convert_from_official(tmp_path / OFFICIAL_CHECKPOINT, tmp_path / "out", base=str(shallow))
    with pytest.raises(DiaBloError, match=r"--blocks 16: .* the official code with --num_blocks 16 stores"):
        convert_from_official(tmp_path / OFFICIAL_CHECKPOINT, tmp_path / "out", base=str(tiny_base), blocks=16)
    assert not (tmp_path / "out").exists()


def test_outputs_are_never_replaced_unless_diablo_wrote_them(tmp_path, tiny_base):
    save_official(official_model(8), tmp_path / OFFICIAL_CHECKPOINT)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DiaBloError, match="not empty"):
        convert_from_official(tmp_path / OFFICIAL_CHECKPOINT, mine, base=str(tiny_base))
    with pytest.raises(DiaBloError, match="was not written by diablo"):
        convert_from_official(tmp_path / OFFICIAL_CHECKPOINT, mine, base=str(tiny_base), overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    convert_from_official(tmp_path / OFFICIAL_CHECKPOINT, tmp_path / "adapter", base=str(tiny_base))
    convert_from_official(
        tmp_path / OFFICIAL_CHECKPOINT, tmp_path / "adapter", base=str(tiny_base), overwrite=True, dropout=0.0
    )
    assert read_adapter_config(tmp_path / "adapter")["dropout"] == 0.0
    (tmp_path / "theirs.chkpt").write_bytes(b"someone else's")
    with pytest.raises(DiaBloError, match="exists; diablo does not replace"):
        convert_to_official(tmp_path / "adapter", tmp_path / "theirs.chkpt")
    assert (tmp_path / "theirs.chkpt").read_bytes() == b"someone else's"


# ---- the design card's lines, as written ---------------------------------------------------------------------------

REPO = Path(__file__).parents[1]


def test_card_recipe_path_resolves_to_the_paper_recipe():
    alias, paper = (
        load_recipe(REPO / "configs" / "metamath.yaml"),
        load_recipe(REPO / "configs" / "paper" / "metamath.yaml"),
    )
    assert alias.output.dir == "out" and alias.base_model == paper.base_model == "llama2-7b"
    assert alias.model_dump(exclude={"output"}) == paper.model_dump(exclude={"output"})
    with pytest.raises(
        DiaBloError, match=r"configs/metamth\.yaml does not exist; did you mean .*configs/metamath\.yaml\?$"
    ):
        load_recipe(REPO / "configs" / "metamth.yaml")
    with pytest.raises(DiaBloError, match=r"did you mean .*configs/paper/commonsense-fp16\.yaml\?$"):
        load_recipe(REPO / "configs" / "commonsense.yaml")


def test_card_merge_against_an_alias_not_downloaded_is_one_line(tmp_path, capsys):
    """convert reads a paper alias's shipped config offline; merge then needs its weights and says so in one line."""
    torch.save({"model.layers.0.self_attn.q_proj.block_A": torch.ones(316, 13, 13)}, tmp_path / OFFICIAL_CHECKPOINT)
    report = convert_from_official(tmp_path / OFFICIAL_CHECKPOINT, tmp_path / "out", base="llama2-7b", blocks=320)
    assert report.shrunk == {"q_proj": 316} and report.targets == "Q" and report.layers == (0, 0)
    with pytest.raises(SystemExit) as stop:
        cli_module.main(["merge", "--adapter", str(tmp_path / "out"), "--base", "llama2-7b"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: base model 'llama2-7b'") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out-merged").exists()


def test_card_inspect_budget_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_module.main(["inspect", "llama2-7b", "--budget", "1%"])
    assert stop.value.code == 0
    assert "blocks: 68" in capsys.readouterr().out
