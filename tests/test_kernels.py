"""The fold path (blocks added into a dense frozen weight) against independent dense math and against the
reference block path: values and gradients, dividing and non-dividing shapes, and W0 always restorable."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from diablo_cli import DiaBloConfig, DiaBloLinear, adapted_layers, attach_diablo, merge_diablo
from diablo_cli.adapter import kernels
from diablo_cli.adapter.model import adapters_disabled, detach_diablo
from diablo_cli.errors import DiaBloError


def dense_blockdiag(blocks: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The paper's D (in × out) with torch.block_diag, cut to the layer: the independent reference."""
    return torch.block_diag(*blocks.unbind(0))[:in_features, :out_features]


def frozen_layer(in_f, out_f, blocks, *, dtype=torch.float32, bias=True, kernel="auto", conv1d=False, seed=0):
    torch.manual_seed(seed)
    base = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f, bias=bias)
    if conv1d:
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    base = base.to(dtype).requires_grad_(False)
    layer = DiaBloLinear(base, blocks, kernel=kernel)
    with torch.no_grad():
        layer.diablo_blocks.normal_(0, 0.1)
    return layer


def original_weight(layer: DiaBloLinear) -> torch.Tensor:
    """W0 in (out, in) layout, read from a state_dict (which always shows the unfolded weight)."""
    weight = layer.state_dict()["base.weight"]
    return weight.T if isinstance(layer.base, Conv1D) else weight


def dense_reference(layer: DiaBloLinear, x: torch.Tensor, grad: torch.Tensor):
    """Output, input gradient and block gradient of x·(W0ᵀ + D) + b in fp32, without any DiaBlo code."""
    w0 = original_weight(layer).float()
    blocks = layer.diablo_blocks.detach().clone().requires_grad_(True)
    x = x.detach().float().requires_grad_(True)
    bias = layer.base.bias.detach().float() if layer.base.bias is not None else 0
    out = x @ w0.T + x @ dense_blockdiag(blocks, layer.in_features, layer.out_features) + bias
    out.backward(grad.float())
    return out.detach(), x.grad, blocks.grad


def run(layer: DiaBloLinear, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    layer.diablo_blocks.grad = None
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad, layer.diablo_blocks.grad


SHAPES = [
    pytest.param(48, 80, 8, id="dividing"),
    pytest.param(50, 77, 6, id="non-dividing"),
    pytest.param(64, 24, 5, id="wide-to-narrow-non-dividing"),
    pytest.param(64, 16, 16, id="one-column-blocks"),
]


@pytest.mark.parametrize("kernel", ["auto", "blocks"])
@pytest.mark.parametrize(("in_f", "out_f", "blocks"), SHAPES)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_fp32_values_and_gradients_match_dense_math(kernel, in_f, out_f, blocks, conv1d):
    layer = frozen_layer(in_f, out_f, blocks, kernel=kernel, conv1d=conv1d)
    x, grad = torch.randn(3, 5, in_f), torch.randn(3, 5, out_f)
    out, grad_x, grad_blocks = run(layer, x, grad)
    divides = in_f % blocks == 0 and out_f % blocks == 0
    assert layer.folded == (kernel == "auto" and divides)
    expected = dense_reference(layer, x, grad)
    torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, expected[1], rtol=1e-5, atol=1e-5)
    # the block gradient is the diagonal blocks of the full weight gradient, padding entries zero
    torch.testing.assert_close(grad_blocks, expected[2], rtol=1e-5, atol=1e-5)


def test_fold_and_blocks_agree_in_fp32_to_rounding():
    folded, separate = frozen_layer(96, 160, 16), frozen_layer(96, 160, 16, kernel="blocks")
    x, grad = torch.randn(2, 7, 96), torch.randn(2, 7, 160)
    for a, b in zip(run(folded, x, grad), run(separate, x, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert folded.folded and not separate.folded


def test_a_bf16_base_folds_exactly_what_the_merged_model_computes():
    """W = bf16(W0 + D) is a merge's arithmetic: the training forward equals the merged bf16 model bit for bit,
    the input gradient too, and the block gradient stays the exact fp32 one."""
    layer = frozen_layer(64, 96, 8, dtype=torch.bfloat16)
    x, grad = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 96, dtype=torch.bfloat16)
    out, grad_x, grad_blocks = run(layer, x, grad)
    assert layer.folded and out.dtype == torch.bfloat16 and grad_blocks.dtype == torch.float32

    merged = copy.deepcopy(layer)
    merged.merge()
    xm = x.clone().requires_grad_(True)
    reference = merged.base(xm)
    reference.backward(grad)
    assert torch.equal(out, reference) and torch.equal(grad_x, xm.grad)
    expected = dense_reference(layer, x, grad)[2]
    torch.testing.assert_close(grad_blocks, expected, rtol=1e-5, atol=1e-5)


def test_fold_forward_is_close_to_the_reference_on_a_bf16_base():
    """How far the mixed-precision fold is from the fp32 adapter product: within the base's own rounding."""
    folded, separate = (
        frozen_layer(64, 96, 8, dtype=torch.bfloat16),
        frozen_layer(64, 96, 8, dtype=torch.bfloat16, kernel="blocks"),
    )
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).float(), separate(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("optimizer_class", "options"),
    [
        (torch.optim.AdamW, {"foreach": False}),
        (torch.optim.AdamW, {"foreach": True}),
        (torch.optim.AdamW, {"fused": True}),  # updates in place without bumping the version counter
        (torch.optim.Adam, {"fused": True}),
        (torch.optim.SGD, {"fused": True}),
    ],
    ids=["adamw-loop", "adamw-foreach", "adamw-fused", "adam-fused", "sgd-fused"],
)
def test_the_optimizer_step_reaches_the_next_forward(optimizer_class, options):
    layer = frozen_layer(32, 32, 4)
    optimizer = optimizer_class([layer.diablo_blocks], lr=0.05, **options)
    x = torch.randn(6, 32)
    for _ in range(3):
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            out = layer(x)  # before the reference: reading the state_dict unfolds, which would hide a stale fold
        torch.testing.assert_close(out, dense_reference(layer, x, torch.zeros(6, 32))[0], rtol=1e-5, atol=1e-5)


def test_blocks_replaced_through_data_are_refolded():
    """Writes that bypass the version counter (``.data =``) still reach the forward: the storage changed."""
    layer = frozen_layer(32, 32, 4)
    x = torch.randn(5, 32)
    with torch.no_grad():
        layer(x)
        layer.diablo_blocks.data = torch.randn_like(layer.diablo_blocks)
        out = layer(x)
    torch.testing.assert_close(out, dense_reference(layer, x, torch.zeros(5, 32))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w0_is_restored_bit_for_bit(dtype):
    layer = frozen_layer(48, 32, 8, dtype=dtype)
    w0 = layer.base.weight.detach().clone()
    layer(torch.randn(3, 48, dtype=dtype))
    assert layer.folded and not torch.equal(layer.base.weight, w0)

    assert torch.equal(layer.state_dict()["base.weight"], w0)  # saving shows W0 ...
    assert not layer.folded  # ... by unfolding; the next forward folds again
    layer(torch.randn(3, 48, dtype=dtype))
    layer.unfold()
    assert torch.equal(layer.base.weight, w0)


def test_loading_a_state_dict_into_a_folded_layer_keeps_the_new_weights():
    layer = frozen_layer(32, 32, 4)
    layer(torch.randn(2, 32))
    new_weights = {key: torch.randn_like(value) for key, value in layer.state_dict().items()}
    layer.load_state_dict(new_weights)
    assert not layer.folded and torch.equal(layer.base.weight, new_weights["base.weight"])
    x = torch.randn(2, 32)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, dense_reference(layer, x, torch.zeros(2, 32))[0], rtol=1e-5, atol=1e-5)


def test_disabled_merged_and_detached_adapters_see_w0():
    torch.manual_seed(0)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    attach_diablo(model, DiaBloConfig(blocks=8, target_modules="QKVOGUD"))
    randomize_adapters(model)
    tokens = torch.randint(0, 100, (2, 9))
    model(input_ids=tokens)
    assert all(layer.folded for layer in adapted_layers(model).values())
    with torch.no_grad():
        bare = reference(input_ids=tokens).logits
        with adapters_disabled(model):
            assert torch.equal(model(input_ids=tokens).logits, bare)
        adapted = model(input_ids=tokens).logits

        merged = merge_diablo(copy.deepcopy(model))  # merges W0 + D once, not W0 + 2D
        torch.testing.assert_close(merged(input_ids=tokens).logits, adapted, rtol=1e-5, atol=1e-5)
    detach_diablo(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_whole_model_trains_the_same_with_either_kernel():
    """fp32 tiny Llama: loss and every adapter gradient of fold equal the reference block path's, with and
    without gradient checkpointing, after an optimizer step too."""
    losses, gradients = {}, {}
    for kernel, checkpointing in [("blocks", False), ("auto", False), ("auto", True)]:
        model = tiny_llama()
        attach_diablo(model, DiaBloConfig(blocks=8, target_modules="QKVOGUD", kernel=kernel))
        randomize_adapters(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
        run_losses = []
        for _ in range(2):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            run_losses.append(loss.item())
            grads = {name: layer.diablo_blocks.grad.clone() for name, layer in adapted_layers(model).items()}
            optimizer.step()
            optimizer.zero_grad()
        losses[(kernel, checkpointing)], gradients[(kernel, checkpointing)] = run_losses, grads
        assert all(layer.folded == (kernel == "auto") for layer in adapted_layers(model).values())
    reference = ("blocks", False)
    for key in [("auto", False), ("auto", True)]:
        assert losses[key] == pytest.approx(losses[reference], rel=1e-5)
        for name, grad in gradients[key].items():
            torch.testing.assert_close(grad, gradients[reference][name], rtol=1e-4, atol=1e-6)


def test_tied_weights_dropout_and_trainable_bases_are_not_folded():
    model = tiny_llama(tie_word_embeddings=True)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    attach_diablo(model, DiaBloConfig(blocks=4, target_modules=["lm_head", "q_proj"]))
    randomize_adapters(model)
    model(input_ids=torch.randint(0, 100, (1, 5)))
    layers = adapted_layers(model)
    assert not layers["lm_head"].folded and layers["lm_head"].shares_weight
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert all(layer.folded for name, layer in layers.items() if name != "lm_head")

    with_dropout = frozen_layer(32, 32, 4)
    with_dropout.dropout = nn.Dropout(0.1)
    with_dropout.train()
    with_dropout(torch.randn(2, 32))
    assert not with_dropout.folded  # dropout applies to the adapter branch alone: it needs the block path
    with_dropout.eval()
    with_dropout(torch.randn(2, 32))
    assert with_dropout.folded  # no dropout in evaluation

    trainable_base = frozen_layer(32, 32, 4)
    trainable_base.base.weight.requires_grad_(True)
    trainable_base(torch.randn(2, 32))
    assert not trainable_base.folded


@pytest.mark.parametrize("count, block_in, block_out", [(6, 8, 5), (6, 5, 8), (4, 6, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_gradient_equals_diagonal_blocks_of_the_weight_gradient(count, block_in, block_out, dtype):
    """Both operand orders (the smaller block side goes first) and a bf16 layer's inputs cast to fp32 blocks."""
    blocks = torch.zeros(count, block_in, block_out)
    x, grad = torch.randn(3, 11, count * block_in).to(dtype), torch.randn(3, 11, count * block_out).to(dtype)
    full = x.reshape(-1, count * block_in).double().T @ grad.reshape(-1, count * block_out).double()
    expected = torch.stack(
        [full[j * block_in : (j + 1) * block_in, j * block_out : (j + 1) * block_out] for j in range(count)]
    ).float()
    gradient = kernels.block_gradient(x, grad, blocks)
    assert gradient.dtype == torch.float32 and gradient.is_contiguous()
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-5)  # bf16 products are exact in fp32


def test_diagonal_view_writes_into_the_weight():
    weight = torch.zeros(30, 48)  # (out, in) = (6·5, 6·8)
    view = kernels.diagonal_blocks(weight, torch.zeros(6, 8, 5), transposed=False)
    view.copy_(torch.arange(6 * 8 * 5, dtype=torch.float32).reshape(6, 8, 5))
    blocks = torch.arange(6 * 8 * 5, dtype=torch.float32).reshape(6, 8, 5)
    assert torch.equal(weight, torch.block_diag(*(block.T for block in blocks)))  # independent of kernels.py


def test_an_unknown_kernel_is_a_one_line_error():
    with pytest.raises(DiaBloError, match=r"kernel: 'triton' is not a DiaBlo kernel; use one of auto, fold, blocks"):
        DiaBloConfig(kernel="triton")


def test_a_deep_copy_unfolds_and_loads_on_its_own():
    original = frozen_layer(32, 32, 4)
    original(torch.randn(2, 32))
    twin = copy.deepcopy(original)
    twin.load_state_dict({key: torch.zeros_like(value) for key, value in twin.state_dict().items()})
    assert original.folded and not twin.folded  # the hooks act on their own module, not the one copied
    assert torch.equal(twin.base.weight, torch.zeros(32, 32))
