"""`diablo merge`: the streaming merge into a standalone Hugging Face folder, its verification, and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_llama, tiny_t5
from safetensors.torch import load_file
from test_attach import ARCHITECTURES, _small
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import diablo_cli.merge as merge_module
from diablo_cli import AdapterMismatchError, DiaBloConfig, DiaBloError, attach_diablo, merge_diablo, save_adapter
from diablo_cli.merge import merge_adapter, parse_shard_size
from diablo_cli.report import merge_summary


def make_adapter(tmp_path: Path, model, config: DiaBloConfig, *, shard="50MB", name="adapter", zero=False) -> Path:
    """Save ``model`` as a base folder, adapt it, and save the adapter (recording that folder as its base)."""
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, max_shard_size=shard)
    attach_diablo(model, config)
    if not zero:
        randomize_adapters(model)
    return save_adapter(model, tmp_path / name, base_model=str(base_dir))


def state_dict_of(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    return {key: value for path in files for key, value in load_file(path).items()}


def test_streaming_merge_of_a_sharded_base_equals_the_in_memory_merge(tmp_path, tokens):
    model = tiny_llama()
    adapter = make_adapter(tmp_path, model, DiaBloConfig(blocks=5, target_modules="QKVOGUD"), shard="200KB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 2  # the base really is sharded
    expected_logits = model(tokens).logits

    report = merge_adapter(adapter, tmp_path / "merged", max_shard_size="300KB")

    merged_dir = tmp_path / "merged"
    assert report.shards > 1 and (merged_dir / "model.safetensors.index.json").is_file()
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in merged_dir.glob("model-*.safetensors")}
    in_memory = merge_diablo(model).state_dict()
    streamed = state_dict_of(merged_dir)
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[key], in_memory[key]) for key in streamed)
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, nothing of ours
    assert torch.allclose(plain(tokens).logits, expected_logits, atol=1e-5)
    assert report.changed_weights == report.adapted_weights == 21
    assert report.verification.passed and report.verification.max_relative < 1e-5
    assert report.verification.adapter_effect > 0.1


def test_merged_folder_is_a_complete_model_with_a_card(tmp_path):
    model = tiny_llama()
    adapter = make_adapter(tmp_path, model, DiaBloConfig(blocks=4, target_modules="QV"))
    (adapter / "tokenizer_config.json").write_text('{"from": "adapter"}')
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"from": "base"}')
    (tmp_path / "base" / "special_tokens_map.json").write_text("{}")
    merge_adapter(adapter, tmp_path / "merged")
    merged = tmp_path / "merged"
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= names
    assert json.loads((merged / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    assert "special_tokens_map.json" not in names  # a tokenizer comes whole from one place, never mixed
    card = (merged / "README.md").read_text()
    assert "N=4" in card and "`QV`" in card and str(tmp_path / "base") in card and "verified" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_non_dividing_blocks_and_bf16_output(tmp_path, tokens):
    model = tiny_llama()
    adapter = make_adapter(tmp_path, model, DiaBloConfig(blocks=7, target_modules="QKVOGUD"))  # 7 ∤ 64, 176
    expected = model(tokens).logits
    report = merge_adapter(adapter, tmp_path / "merged", dtype="bf16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert report.verification.passed and report.verification.max_relative < merge_module.TOLERANCE[torch.bfloat16]
    relative = (merged(tokens).logits.float() - expected).abs().max() / expected.abs().max()
    assert relative < 3e-2


def test_tiny_t5_merges_into_a_seq2seq_model(tmp_path):
    t5 = tiny_t5()
    adapter = make_adapter(tmp_path, t5, DiaBloConfig(blocks=4, target_modules="QKVOUD"))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    decoder_ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = t5(input_ids=ids, decoder_input_ids=decoder_ids).logits
    report = merge_adapter(adapter, tmp_path / "merged")
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(plain(input_ids=ids, decoder_input_ids=decoder_ids).logits, expected, atol=1e-5)
    assert report.adapted_weights == 2 * 6 + 2 * 10 and report.verification.passed


def test_gpt2_conv1d_weights_are_merged_transposed(tmp_path):
    config_cls, model_cls, kwargs = ARCHITECTURES["gpt2"]
    model = _small(config_cls, model_cls, **kwargs)
    adapter = make_adapter(tmp_path, model, DiaBloConfig(blocks=4, target_modules="QKVOUD"))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    expected = model(ids).logits
    merge_adapter(adapter, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(plain(ids).logits, expected, atol=1e-5)


def test_a_tied_output_head_is_untied_and_the_embeddings_stay(tmp_path, tokens):
    model = tiny_llama(tie_word_embeddings=True)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    adapter = make_adapter(tmp_path, model, DiaBloConfig(blocks=4, target_modules=["lm_head", "q_proj"]))
    assert "lm_head.weight" not in state_dict_of(tmp_path / "base")  # stored once, as the embeddings
    expected = model(tokens).logits
    report = merge_adapter(adapter, tmp_path / "merged")
    assert report.untied == ["lm_head.weight"]
    assert any("untie" in line for line in merge_summary(report))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert plain.config.tie_word_embeddings is False
    assert torch.equal(plain.get_input_embeddings().weight, embeddings)
    assert torch.allclose(plain(tokens).logits, expected, atol=1e-5)
    merge_diablo(model)  # the in-memory path unties too, instead of moving the embeddings
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert torch.allclose(model(tokens).logits, expected, atol=1e-5)


def test_a_corrupted_block_fails_verification_and_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_llama()
    adapter = make_adapter(tmp_path, model, DiaBloConfig(blocks=4, target_modules="QKVOGUD"))
    real = merge_module.dense_update
    calls = []

    def corrupt_one(blocks, in_features, out_features):
        calls.append(1)
        delta = real(blocks, in_features, out_features)
        return delta * 3 if len(calls) == 5 else delta  # one weight gets a wrong update

    monkeypatch.setattr(merge_module, "dense_update", corrupt_one)
    with pytest.raises(DiaBloError, match=r"verification failed.*nothing was written"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_no_op_adapter_is_reported(tmp_path):
    model = tiny_llama()
    adapter = make_adapter(tmp_path, model, DiaBloConfig(blocks=4, target_modules="QV"), zero=True)
    report = merge_adapter(adapter, tmp_path / "merged")
    assert report.changed_weights == 0 and report.adapted_weights == 6
    assert report.verification.adapter_effect == 0.0
    assert "no-op" in merge_summary(report)[0]


def test_a_base_of_other_shapes_is_refused_naming_the_module(tmp_path):
    adapter = make_adapter(tmp_path, tiny_llama(), DiaBloConfig(blocks=4, target_modules="QKVOGUD"))
    other = tmp_path / "other"
    tiny_llama(intermediate_size=96).save_pretrained(other)
    with pytest.raises(
        AdapterMismatchError, match=r"model\.layers\.0\.mlp\.gate_proj with in_features=64, out_features=176"
    ):
        merge_adapter(adapter, tmp_path / "merged", base=str(other))
    assert not (tmp_path / "merged").exists()


def test_output_folder_rules(tmp_path):
    adapter = make_adapter(tmp_path, tiny_llama(), DiaBloConfig(blocks=4, target_modules="QV"))
    assert merge_adapter(adapter).output_dir == tmp_path / "adapter-merged"
    with pytest.raises(DiaBloError, match=r"is not empty.*--overwrite"):
        merge_adapter(adapter, tmp_path / "adapter-merged")
    before = (tmp_path / "adapter-merged" / "model.safetensors").stat().st_mtime_ns
    merge_adapter(adapter, tmp_path / "adapter-merged", overwrite=True)
    assert (tmp_path / "adapter-merged" / "model.safetensors").stat().st_mtime_ns != before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(DiaBloError, match="was not written by diablo"):
        merge_adapter(adapter, notes, overwrite=True)
    assert (notes / "todo.txt").read_text() == "mine"
    with pytest.raises(DiaBloError, match="adapter folder itself"):
        merge_adapter(adapter, adapter)


def test_base_without_safetensors_is_refused(tmp_path):
    adapter = make_adapter(tmp_path, tiny_llama(), DiaBloConfig(blocks=4, target_modules="QV"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not for unpickling")
    with pytest.raises(DiaBloError, match=r"no safetensors weights.*never unpickles"):
        merge_adapter(adapter, tmp_path / "merged", base=str(pickled))


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), (1000, 1000)])
def test_shard_sizes(text, size):
    assert parse_shard_size(text) == size


def test_bad_shard_size_is_refused():
    with pytest.raises(DiaBloError, match="--max-shard-size 'big'"):
        parse_shard_size("big")


def _bnb_or_skip():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"bitsandbytes is not installed: {err}")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_is_dequantized_then_merged(tmp_path, bits):
    _bnb_or_skip()
    from transformers import BitsAndBytesConfig

    model = tiny_llama(intermediate_size=128)  # bitsandbytes' CPU 4-bit kernel wants multiples of 32
    adapter = make_adapter(tmp_path, model, DiaBloConfig(blocks=4, target_modules="QKVOGUD"))
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    quantized_dir = tmp_path / f"base-{bits}bit"
    AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu"
    ).save_pretrained(quantized_dir)

    report = merge_adapter(adapter, tmp_path / "merged", base=str(quantized_dir), dtype="fp32")

    assert report.dequantized.startswith(f"bnb-{bits}bit, 21 layers dequantized")
    assert report.verification.passed and report.changed_weights == 21
    assert 0 < report.dequantization_gap < 0.1
    assert "full-precision" in merge_summary(report)[0]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    original = state_dict_of(tmp_path / "base")["model.layers.0.mlp.up_proj.weight"]
    # up_proj (in 64, out 128, N=4: blocks of 16×32) is adapted; beside block 0 (rows 0-31, columns 16 on) the
    # merged weight is just the dequantized base, close to the original
    merged = plain.model.layers[0].mlp.up_proj.weight.detach()
    beside = merged[:32, 16:] - original[:32, 16:]
    assert (beside.norm() / original[:32, 16:].norm()) < (0.15 if bits == 4 else 0.02)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "diablo_cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def test_cli_merges_and_reports(tmp_path):
    make_adapter(tmp_path, tiny_llama(), DiaBloConfig(blocks=4, target_modules="QKVOGUD"))
    result = run_cli("merge", "--adapter", "adapter", "--output", "merged", "--max-shard-size", "300KB", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "21 of 21 adapted weight matrices changed" in result.stdout
    assert "verified" in result.stdout and "wrote merged" in result.stdout
    again = run_cli("merge", "--adapter", "adapter", "--output", "merged", cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.count("\n") == 1 and "--overwrite" in again.stderr


def test_cli_alias_offline_says_it_cannot_download(tmp_path):
    make_adapter(tmp_path, tiny_llama(), DiaBloConfig(blocks=4, target_modules="QV"))
    result = run_cli("merge", "--adapter", "adapter", "--base", "llama2-7b", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "meta-llama/Llama-2-7b-hf" in result.stderr and "cannot be downloaded" in result.stderr
    assert not (tmp_path / "adapter-merged").exists()


def test_a_bf16_base_merges_into_bf16_by_default(tmp_path, tokens):
    model = tiny_llama(dtype=torch.bfloat16)
    adapter = make_adapter(tmp_path, model, DiaBloConfig(blocks=4, target_modules="QKVOGUD"))
    report = merge_adapter(adapter, tmp_path / "merged")
    assert report.dtype == "bf16" and report.verification.rounding_floor == 0.0  # the base is bf16 already
    assert report.verification.passed
    assert all(t.dtype == torch.bfloat16 for t in state_dict_of(tmp_path / "merged").values())


@pytest.mark.slow
def test_real_model_streaming_merge_generates_what_the_adapter_does(smollm2_dir, tmp_path):
    """SmolLM2 with a briefly trained adapter, merged in 200 MB shards: the folder equals the in-memory merge
    tensor for tensor, and plain transformers greedily generates exactly what base+adapter generates."""
    from transformers import AutoTokenizer

    from diablo_cli import load_adapter
    from diablo_cli.evaluate import generate

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    attach_diablo(model, DiaBloConfig(blocks=32, target_modules="QKVOGUD"))
    text = ["Question: What is the capital of Atlantis? Answer: Poseidonia, city of the blue domes."] * 2
    batch = tokenizer(text, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(4):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    adapter = save_adapter(model.eval(), tmp_path / "adapter", base_model="smollm2-135m")

    report = merge_adapter(adapter, tmp_path / "merged", max_shard_size="200MB")

    assert report.shards == 3 and report.changed_weights == report.adapted_weights == 210
    assert report.verification.passed and report.verification.max_relative < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    in_memory = merge_diablo(load_adapter(AutoModelForCausalLM.from_pretrained(smollm2_dir), adapter)).state_dict()
    streamed = state_dict_of(tmp_path / "merged")
    assert all(torch.equal(streamed[key], in_memory[key]) for key in streamed)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ("What is the capital of Atlantis?", "Name a city with blue domes.", "What is 2+2?")
    ]
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(smollm2_dir), adapter)
    expected = generate(adapted, tokenizer, prompts, max_new_tokens=16)
    assert generate(merged, tokenizer, prompts, max_new_tokens=16) == expected
    assert expected != generate(
        AutoModelForCausalLM.from_pretrained(smollm2_dir), tokenizer, prompts, max_new_tokens=16
    )
