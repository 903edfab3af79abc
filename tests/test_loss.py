"""The chunked loss (loss.py) against Hugging Face's dense loss: same loss, same gradients, no full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, tiny_llama, tiny_t5
from transformers import Gemma2Config, Gemma2ForCausalLM, PhiConfig, PhiForCausalLM

from diablo_cli import DiaBloConfig, attach_diablo
from diablo_cli import loss as loss_module
from diablo_cli.errors import DiaBloError
from diablo_cli.evaluate.likelihood import continuation_logprobs
from diablo_cli.loss import choose_loss, planned_loss, sequence_logprobs, slice_rows

VOCAB = 4096  # the tiny model with a vocabulary wide enough that logits dominate, as in real models


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of 16 rows, so that every test batch spans several."""
    monkeypatch.setattr(loss_module, "SLICE_BYTES", 16 * 4 * VOCAB)
    assert slice_rows(VOCAB) == 16


def batch_of(vocab: int, *, rows: int = 3, width: int = 24, prompt: int = 7, seed: int = 3) -> dict[str, torch.Tensor]:
    """Right-padded rows whose first ``prompt`` tokens are masked, as the collator makes them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, width - 5 :] = 0  # one shorter row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def supervised(batch) -> int:
    return int((batch["labels"][..., 1:] != -100).sum())


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def dense(model, batch, count):
    return model(**batch, num_items_in_batch=count, use_cache=False).loss


def assert_same_training(model, batch, *, atol: float = 1e-6, rtol: float = 0.0, kind: str = "chunked") -> None:
    count = supervised(batch)
    path = choose_loss(model, kind)
    assert path.kind == kind
    expected, expected_grads = loss_and_grads(model, lambda: dense(model, batch, count))
    actual, actual_grads = loss_and_grads(model, lambda: path.loss(model, batch, count))
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)
    assert expected_grads.keys() == actual_grads.keys() and expected_grads
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(actual_grads[name], grad, atol=atol, rtol=0), name


def diablo_model(seed: int = 0, **overrides):
    model = attach_diablo(
        tiny_llama(seed, vocab_size=VOCAB, **overrides), DiaBloConfig(blocks=4, target_modules="QKVOGUD")
    )
    randomize_adapters(model)
    return model.train()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_every_block_gradient_equal_the_dense_path(small_slices, tied, checkpointing):
    model = diablo_model(tie_word_embeddings=tied)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_training(model, batch_of(VOCAB))


def test_a_trainable_head_and_its_bias_get_the_dense_gradients(small_slices):
    """Full fine-tuning trains the output layer itself; Phi's has a bias."""
    torch.manual_seed(0)
    config = PhiConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = PhiForCausalLM(config).train()
    assert model.lm_head.bias is not None
    assert_same_training(model, batch_of(320, width=40), atol=1e-5)


def test_the_whole_sequence_supervised_and_a_single_token(small_slices):
    model = diablo_model()
    every = batch_of(VOCAB, prompt=0)
    every["attention_mask"][:] = 1
    every["labels"] = every["input_ids"].clone()
    assert_same_training(model, every)
    one = batch_of(VOCAB)
    one["labels"][:] = -100
    one["labels"][1, 10] = one["input_ids"][1, 10]
    assert supervised(one) == 1
    assert_same_training(model, one)


def test_bf16_base_matches_the_dense_path_to_bf16_rounding():
    model = attach_diablo(
        tiny_llama(0, dtype=torch.bfloat16, vocab_size=VOCAB), DiaBloConfig(blocks=4, target_modules="QKVOGUD")
    )
    randomize_adapters(model)
    model.train()
    batch = batch_of(VOCAB)
    count = supervised(batch)
    path = choose_loss(model)
    expected, expected_grads = loss_and_grads(model, lambda: dense(model, batch, count))
    actual, actual_grads = loss_and_grads(model, lambda: path.loss(model, batch, count))
    assert abs(actual.item() - expected.item()) < 1e-2 * expected.item()
    for name, grad in expected_grads.items():
        scale = grad.float().abs().max().item()
        assert (actual_grads[name].float() - grad.float()).abs().max().item() <= 0.05 * scale, name


def test_no_full_logits_exist_forward_or_backward(small_slices):
    """Nothing autograd keeps, and no product the head computes, has more than one slice of logits."""
    model = diablo_model()
    batch = batch_of(VOCAB, rows=4, width=64, prompt=0)
    tokens = batch["input_ids"].numel()
    path = choose_loss(model)
    largest_saved = []
    rows_through_head = []
    head = model.get_output_embeddings()
    original = loss_module.F.linear

    def counting_linear(x, weight, bias=None):
        if weight is head.weight:
            rows_through_head.append(x.shape[0])
        return original(x, weight, bias)

    def pack(tensor):
        largest_saved.append(tensor.numel())
        return tensor

    loss_module.F.linear = counting_linear
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            path.loss(model, batch, supervised(batch)).backward()
    finally:
        loss_module.F.linear = original
    assert rows_through_head and max(rows_through_head) <= 16
    assert sum(rows_through_head) == supervised(batch) < tokens
    assert max(largest_saved) < tokens * VOCAB / 8


def test_dense_logits_would_be_held_by_huggingfaces_loss():
    """The counter-check of the test above: the same hook sees the full logits on the dense path."""
    model = diablo_model()
    batch = batch_of(VOCAB, rows=4, width=64, prompt=0)
    largest_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: largest_saved.append(t.numel()) or t, lambda t: t):
        dense(model, batch, supervised(batch)).backward()
    assert max(largest_saved) >= batch["input_ids"].numel() * VOCAB


def test_validation_under_no_grad_gives_the_dense_value(small_slices):
    model = diablo_model().eval()
    batch = batch_of(VOCAB)
    path = choose_loss(model)
    with torch.no_grad():
        assert torch.allclose(path.loss(model, batch, 5), dense(model, batch, 5), atol=1e-6, rtol=0)


def test_scoring_continuations_equals_the_dense_log_softmax(small_slices):
    model = diablo_model().eval()
    batch = batch_of(VOCAB)
    logprobs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    expected = [
        sum(logprobs[r, t - 1, batch["input_ids"][r, t]].item() for t in range(1, 24) if batch["labels"][r, t] != -100)
        for r in range(3)
    ]
    with torch.no_grad():
        actual = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert actual.tolist() == pytest.approx(expected, abs=1e-4)


def test_multiple_choice_scoring_goes_through_the_shortcut(monkeypatch):
    model = diablo_model().eval()
    seen = []
    real = loss_module._token_nll
    monkeypatch.setattr(loss_module, "_token_nll", lambda *a: seen.append(a[0].shape[0]) or real(*a))

    class Tokenizer:
        pad_token_id = 2
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 300 + 3 for c in text]}

    scores = continuation_logprobs(model, Tokenizer(), [[5, 6, 7], [8, 9]], [["ab", "cde"], ["x", "yz"]])
    assert seen == [sum(len(c) for c in ("ab", "cde", "x", "yz"))]  # only the choices' tokens reach the head
    assert all(s < 0 for row in scores for s in row)


def test_a_model_that_changes_its_logits_keeps_the_dense_loss():
    model = softcapped_model()
    path = choose_loss(model, "auto")
    assert path.kind == "dense" and "changes its logits" in path.choice.reason
    with pytest.raises(DiaBloError, match=r"training.loss: chunked cannot run on this model: .*soft-capping"):
        choose_loss(model, "chunked")
    batch = batch_of(256)
    assert torch.equal(path.loss(model, batch, 7), dense(model, batch, 7))
    model.config.final_logit_softcapping = None
    model.get_output_embeddings()._diablo_probe = None  # a new question: probe again
    assert choose_loss(model).kind == "chunked"


MIXTURES = {  # family: (config, model, its own keys); each with output_router_logits on, as a recipe may ask
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "router_aux_loss_coef": 0.5}),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
            "router_aux_loss_coef": 0.5,
        },
    ),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", {"num_local_experts": 4, "kv_channels": 8, "aux_loss_coef": 0.5}),
}


def mixture_of_experts(family: str):
    import transformers

    config_name, model_name, own = MIXTURES[family]
    shape = {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2} if family != "jetmoe" else {}
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_experts_per_tok=2, output_router_logits=True,
        **shape, **own,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    targets = ["kv_proj"] if family == "jetmoe" else "QKVO"
    attach_diablo(model, DiaBloConfig(blocks=4, target_modules=targets))
    randomize_adapters(model)
    return model.train()


@pytest.mark.parametrize("family", list(MIXTURES))
def test_a_routers_load_balancing_loss_is_added_as_the_dense_path_adds_it(small_slices, family):
    """Hugging Face adds coefficient × the router's load-balancing loss to the token loss when the config asks
    for router logits; the shortcut must too, or a mixture-of-experts run trains on another loss unawares."""
    model = mixture_of_experts(family)
    batch = batch_of(VOCAB)
    assert model(**batch).aux_loss > 0  # the term is there to be kept
    said = "plus 0.5 × the router's load-balancing loss"
    assert said in choose_loss(model).choice.describe() and said in planned_loss(model.config).describe()
    assert_same_training(model, batch, rtol=1e-6)  # a loss near 9.3 (the router's 0.5 × 2.0 in it): 1e-6 is an ulp


def test_a_router_weight_diablo_cannot_find_keeps_the_dense_loss(monkeypatch):
    monkeypatch.setattr(loss_module, "ROUTER_COEFFICIENTS", ("balance_weight",))
    model = mixture_of_experts("mixtral")
    path = choose_loss(model, "auto")
    assert path.kind == "dense" and "router load-balancing loss" in path.choice.reason
    with pytest.raises(DiaBloError, match=r"training.loss: chunked cannot run on this model: .*load-balancing"):
        choose_loss(model, "chunked")


def test_a_loss_with_an_extra_term_keeps_the_dense_loss():
    """A model whose own loss is not the plain token cross-entropy (here a z-loss-like term) is probed, not trusted."""
    model = diablo_model()
    plain = model.loss_function

    def with_z_loss(logits, labels, vocab_size, **kwargs):
        return plain(logits, labels, vocab_size, **kwargs) + 1e-3 * logits.float().logsumexp(-1).pow(2).mean()

    model.loss_function = with_z_loss
    path = choose_loss(model, "auto")
    assert path.kind == "dense" and "adds a term" in path.choice.reason
    batch = batch_of(VOCAB)
    assert torch.equal(path.loss(model, batch, 9), dense(model, batch, 9))


def test_a_forward_without_labels_is_probed_on_its_logits_alone():
    class NoLabels(torch.nn.Module):  # a custom wrapper that computes no loss of its own
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    model = NoLabels(diablo_model())
    path = choose_loss(model, "auto")
    assert path.kind == "chunked"
    batch = batch_of(VOCAB)
    assert torch.allclose(path.loss(model, batch, 9), dense(model.inner, batch, 9), atol=1e-6)


def softcapped_model():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=5.0,
    )
    return Gemma2ForCausalLM(config)


def test_partitioned_weights_are_probed_at_the_first_step():
    """Under ZeRO-3 the bare model cannot run a forward; the probe then runs at the first loss, through the
    engine, and an auto choice that fails it turns dense and says so."""
    model = softcapped_model_partitioned()
    heard = []
    path = choose_loss(model, announce=heard.append)
    assert path.kind == "chunked" and not heard
    batch = batch_of(256)
    assert torch.equal(path.loss(model, batch, 7), dense(model, batch, 7))
    assert path.kind == "dense" and heard == ["loss: dense (auto: it changes its logits after the output layer "
                                              "(soft-capping or scaling))"]  # fmt: skip
    other = softcapped_model_partitioned()
    explicit = choose_loss(other, "chunked")
    with pytest.raises(DiaBloError, match=r"training.loss: chunked cannot run on this model: .*soft-capping"):
        explicit.loss(other, batch, 7)
    fine = diablo_model()
    for parameter in fine.parameters():
        parameter.ds_id = 0
    path = choose_loss(fine, announce=heard.append)
    batch = batch_of(VOCAB)
    assert torch.allclose(path.loss(fine, batch, 9), dense(fine, batch, 9), atol=1e-6)
    assert path.kind == "chunked" and len(heard) == 1


def softcapped_model_partitioned():
    model = softcapped_model()
    for parameter in model.parameters():
        parameter.ds_id = 0  # what DeepSpeed's partitioning leaves on every parameter
    return model


def test_encoder_decoder_models_keep_the_dense_loss():
    model = tiny_t5()
    path = choose_loss(model)
    assert path.kind == "dense" and "encoder-decoder" in path.choice.reason
    assert planned_loss(model.config).kind == "dense"


def test_the_plan_names_the_choice():
    model = tiny_llama()
    assert planned_loss(model.config).describe().startswith("loss: chunked (auto: supervised positions only")
    assert planned_loss(model.config, "dense").kind == "dense"
    assert planned_loss(model.config, "cce").kind == "cce"


def test_liger_off_cuda_is_one_clear_line():
    with pytest.raises(DiaBloError, match=r"^training.loss: liger runs Triton kernels on CUDA GPUs .* on cpu; chunked"):
        choose_loss(tiny_llama(), "liger")


def test_an_unknown_loss_is_one_clear_line():
    with pytest.raises(DiaBloError, match=r"training.loss: 'fused' is not one of auto, dense, chunked, cce, liger"):
        choose_loss(tiny_llama(), "fused")


def test_cut_cross_entropy_matches_the_dense_loss():
    pytest.importorskip("cut_cross_entropy")
    model = diablo_model()
    batch = batch_of(VOCAB)
    count = supervised(batch)
    path = choose_loss(model, "cce")
    expected = dense(model, batch, count)
    actual = path.loss(model, batch, count)
    actual.backward()
    assert torch.allclose(actual, expected, atol=1e-4, rtol=0)


def test_a_copied_model_computes_with_its_own_head():
    import copy

    model = diablo_model()
    path = choose_loss(model)
    assert path.kind == "chunked"
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(2.0)  # tied: the embedding changes too
    batch = batch_of(VOCAB)
    with torch.no_grad():
        hidden = twin.model(batch["input_ids"])[0]
        expected = torch.nn.functional.linear(hidden, twin.get_output_embeddings().weight)
        assert torch.equal(twin(input_ids=batch["input_ids"]).logits, expected)
        assert not torch.equal(model(input_ids=batch["input_ids"]).logits, expected)
