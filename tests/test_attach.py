"""attach_diablo on tiny models: exact no-op at init, freezing, and target selection across architectures."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import randomize_adapters, tiny_llama, tiny_t5
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from diablo_cli import AdapterSettingError, DiaBloConfig, DiaBloError, adapted_layers, attach_diablo
from diablo_cli.adapter import module_letters, select_targets


def test_logits_unchanged_at_init_exactly(tokens):
    model = tiny_llama()
    before = model(tokens).logits
    attach_diablo(model, DiaBloConfig(blocks=8, target_modules="QKVOGUD"))
    assert torch.equal(model(tokens).logits, before)


def test_logits_unchanged_at_init_exactly_bf16(tokens):
    model = tiny_llama(dtype=torch.bfloat16)
    before = model(tokens).logits
    attach_diablo(model, DiaBloConfig(blocks=6, target_modules="QKVOGUD"))
    layer = next(iter(adapted_layers(model).values()))
    assert layer.diablo_blocks.dtype == torch.float32
    assert torch.equal(model(tokens).logits, before)


def test_only_adapter_blocks_require_grad(tokens):
    model = tiny_llama()
    attach_diablo(model, DiaBloConfig(blocks=4, target_modules="QKVUD"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(".diablo_blocks") for name in trainable)
    assert len(trainable) == 3 * 5
    randomize_adapters(model)
    model(tokens).logits.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)


def test_letters_choose_the_papers_modules():
    model = tiny_llama()
    attach_diablo(model, DiaBloConfig(blocks=4, target_modules="QKVUD"))
    names = {name.rsplit(".", 1)[-1] for name in adapted_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}


def test_names_regex_and_layer_range():
    by_name = attach_diablo(tiny_llama(), DiaBloConfig(blocks=4, target_modules=["q_proj", "mlp.down_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in adapted_layers(by_name)} == {"q_proj", "down_proj"}

    by_regex = attach_diablo(
        tiny_llama(), DiaBloConfig(blocks=4, target_modules=r"model\.layers\.[01]\.self_attn\.[qv]_proj")
    )
    assert sorted(adapted_layers(by_regex)) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]

    ranged = attach_diablo(tiny_llama(), DiaBloConfig(blocks=4, target_modules="QKVOGUD", layers=(1, 2)))
    assert {int(n.split(".")[2]) for n in adapted_layers(ranged)} == {1, 2}
    assert len(adapted_layers(ranged)) == 2 * 7


def test_all_linear_skips_the_output_head():
    model = attach_diablo(tiny_llama(), DiaBloConfig(blocks=4, target_modules="all-linear"))
    assert len(adapted_layers(model)) == 3 * 7
    assert "lm_head" not in adapted_layers(model)


def test_per_module_block_counts():
    model = attach_diablo(
        tiny_llama(), DiaBloConfig(blocks=8, target_modules="QUD", blocks_by_module={"D": 16, "up_proj": 2})
    )
    layers = adapted_layers(model)
    assert layers["model.layers.0.self_attn.q_proj"].layout.blocks == 8
    assert layers["model.layers.0.mlp.up_proj"].layout.blocks == 2
    assert layers["model.layers.0.mlp.down_proj"].layout.shape == (16, 11, 4)


def test_target_matching_nothing_lists_the_linear_layers():
    with pytest.raises(DiaBloError) as err:
        attach_diablo(tiny_llama(), DiaBloConfig(blocks=4, target_modules=["query_key_value"]))
    message = str(err.value)
    assert "matched no linear layer" in message
    assert "model.layers.*.self_attn.q_proj (3)" in message and "lm_head" in message


@pytest.mark.parametrize("typo", ["vproj", "self_attn.v_projj", "c_attn"])
def test_a_listed_layer_the_model_lacks_is_refused_not_left_out(typo):
    """One good name beside a typo (or another architecture's name) used to train the good one alone."""
    with pytest.raises(AdapterSettingError) as err:
        attach_diablo(tiny_llama(), DiaBloConfig(blocks=4, target_modules=["q_proj", typo]))
    message = str(err.value)
    assert message.startswith(f"target_modules: {typo!r} names no linear layer of LlamaForCausalLM")
    assert "model.layers.*.self_attn.v_proj (3)" in message
    assert ("did you mean 'v_proj'?" in message) == (typo != "c_attn")
    assert "\n" not in message


def test_bad_layer_range_and_unused_override_are_errors():
    with pytest.raises(DiaBloError, match=r"layers: \[5, 9\] starts past the last block; this model has blocks 0-2"):
        attach_diablo(tiny_llama(), DiaBloConfig(blocks=4, layers=(5, 9)))
    with pytest.raises(DiaBloError, match=r"blocks_by_module: 'G' matches none of the adapted layers"):
        attach_diablo(tiny_llama(), DiaBloConfig(blocks=4, target_modules="QKV", blocks_by_module={"G": 8}))


def test_attaching_twice_is_refused():
    model = attach_diablo(tiny_llama(), DiaBloConfig(blocks=4))
    with pytest.raises(DiaBloError, match=r"already has DiaBlo adapters"):
        attach_diablo(model, DiaBloConfig(blocks=4))


def test_config_validation_messages():
    with pytest.raises(DiaBloError, match=r"blocks: 0 must be a positive whole number"):
        DiaBloConfig(blocks=0)
    with pytest.raises(DiaBloError, match=r"target_modules: 'QQ\(' is neither module letters"):
        DiaBloConfig(target_modules="QQ(")
    with pytest.raises(DiaBloError, match=r"layers: \[3, 1\] must be \[first, last\]"):
        DiaBloConfig(layers=[3, 1])
    with pytest.raises(DiaBloError, match=r"dropout: 1.5 must be a number in"):
        DiaBloConfig(dropout=1.5)
    with pytest.raises(DiaBloError, match=r"dtype: 'int8' is not an adapter dtype"):
        DiaBloConfig(dtype="int8")
    with pytest.raises(DiaBloError, match=r"unknown DiaBlo setting"):
        DiaBloConfig.from_dict({"blocks": 4, "rank": 8})
    assert DiaBloConfig(dtype="bf16").torch_dtype == torch.bfloat16


def test_dead_blocks_are_announced(caplog):
    with caplog.at_level(logging.WARNING, logger="diablo_cli"):
        attach_diablo(tiny_llama(), DiaBloConfig(blocks=40, target_modules="Q"))
    assert "lie wholly in the zero padding" in caplog.text


# Other architectures: the letters map onto each one's own names, fused layers included.


def _small(config_cls, model_cls, **kwargs):
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs)).eval()


LLAMA_LIKE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
)
ARCHITECTURES = {
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        LLAMA_LIKE,
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        LLAMA_LIKE,
    ),
    "gpt2": (
        GPT2Config,
        GPT2LMHeadModel,
        dict(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0),
    ),
    "gpt-neox": (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=64),
    ),
    "phi3": (
        Phi3Config,
        Phi3ForCausalLM,
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=64,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
}
EXPECTED_QKVOGUD = {
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "gpt-neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_letters_map_onto_each_architecture(arch):
    config_cls, model_cls, kwargs = ARCHITECTURES[arch]
    model = _small(config_cls, model_cls, **kwargs)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    before = model(ids).logits
    attach_diablo(model, DiaBloConfig(blocks=4, target_modules="QKVOGUD"))
    suffixes = {".".join(n.split(".")[-2:]) if "." in n else n for n in adapted_layers(model)}
    expected = EXPECTED_QKVOGUD[arch]
    assert {s if s in expected else s.split(".")[-1] for s in suffixes} == expected
    assert len(adapted_layers(model)) == 2 * len(expected)
    assert torch.equal(model(ids).logits, before)
    randomize_adapters(model)
    model(ids).logits.sum().backward()
    assert all(layer.diablo_blocks.grad is not None for layer in adapted_layers(model).values())


def test_fused_layer_needs_all_its_letters():
    config_cls, model_cls, kwargs = ARCHITECTURES["gpt2"]
    with pytest.raises(DiaBloError, match=r"transformer\.h\.0\.attn\.c_attn fuses Q/K/V into one layer"):
        attach_diablo(_small(config_cls, model_cls, **kwargs), DiaBloConfig(blocks=4, target_modules="QV"))


def test_t5_letters_cover_encoder_decoder_and_cross_attention():
    model = tiny_t5()
    targets = select_targets(model, DiaBloConfig(blocks=4, target_modules="QKVOUD"))
    names = [t.name for t in targets]
    assert "decoder.block.1.layer.1.EncDecAttention.q" in names
    assert "encoder.block.0.layer.1.DenseReluDense.wi" in names
    assert "decoder.block.0.layer.2.DenseReluDense.wo" in names
    # 2 encoder blocks × (4 attention + 2 FFN) + 2 decoder blocks × (8 attention + 2 FFN)
    assert len(names) == 2 * 6 + 2 * 10


@pytest.mark.parametrize(
    ("name", "letters"),
    [
        ("model.layers.3.self_attn.q_proj", "Q"),
        ("transformer.h.0.attn.c_proj", "O"),
        ("transformer.h.0.mlp.c_proj", "D"),
        ("bert.encoder.layer.2.attention.output.dense", "O"),
        ("bert.encoder.layer.2.intermediate.dense", "U"),
        ("bert.encoder.layer.2.output.dense", "D"),
        ("model.layers.0.block_sparse_moe.experts.1.w1", "G"),
        ("decoder.block.0.layer.2.DenseReluDense.wi_1", "U"),
        ("lm_head", ""),
    ],
)
def test_module_letter_rules(name, letters):
    assert module_letters(name) == letters
