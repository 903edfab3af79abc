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


def assert_same_training(model, batch, *, atol: float = 1e-6, kind: str = "chunked") -> None:
    count = supervised(batch)
    path = choose_loss(model, kind)
    assert path.kind == kind
    expected, expected_grads = loss_and_grads(model, lambda: dense(model, batch, count))
    actual, actual_grads = loss_and_grads(model, lambda: path.loss(model, batch, count))
    assert torch.allclose(actual, expected, atol=atol, rtol=0), (actual, expected)
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
    model = Gemma2ForCausalLM(config)
    path = choose_loss(model, "auto")
    assert path.kind == "dense" and "changes its logits" in path.choice.reason
    with pytest.raises(DiaBloError, match=r"training.loss: chunked cannot run on this model: .*soft-capping"):
        choose_loss(model, "chunked")
    batch = batch_of(256)
    assert torch.equal(path.loss(model, batch, 7), dense(model, batch, 7))
    model.config.final_logit_softcapping = None
    model.get_output_embeddings()._diablo_probe = None  # a new question: probe again
    assert choose_loss(model).kind == "chunked"


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
