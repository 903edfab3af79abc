"""The two ways a DiaBlo layer computes, and the math each one needs.

``blocks`` (the reference): ``y = base(x) + x·blockdiag(D)``, three block products per training step
(forward, input gradient, block gradient), every one in the adapter's dtype.

``fold``: for a dense float base whose dimensions the block count divides, the blocks are added into the
diagonal blocks of the frozen weight itself (``W = W0 + blockdiag(D)ᵀ``, the same arithmetic as a merge), so
the forward and the input gradient are the base's own matmuls at no extra cost, and only the block gradient
``blockdiag(xᵀ·∂y)`` is extra: one product instead of three. The original diagonal blocks are kept to
restore ``W0`` exactly. In fp32 this equals the reference up to rounding; on a bf16/fp16 base the forward
sees ``W0 + D`` rounded to the base dtype, exactly what the merged model computes, while ``D`` itself stays
in fp32 (mixed precision with fp32 master weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiaBloError

KERNELS = ("auto", "fold", "blocks")
"""``auto`` folds where it can (the default), ``fold`` is the same but says so, ``blocks`` never folds."""


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise DiaBloError(f"kernel: {kernel!r} is not a DiaBlo kernel; use one of {', '.join(KERNELS)}")
    return kernel


def block_diagonal_matmul(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` truncated to ``out_features`` columns, without building the dense matrix.

    ``x`` has any leading shape and ``in_features`` as its last dimension; ``blocks`` is ``(N, d1, d2)``.
    """
    count, block_in, block_out = blocks.shape
    padding = count * block_in - x.shape[-1]
    if padding:
        x = F.pad(x, (0, padding))
    lead = x.shape[:-1]
    y = torch.einsum("tnd,nde->tne", x.reshape(-1, count, block_in), blocks)
    y = y.reshape(*lead, count * block_out)
    return y[..., :out_features] if count * block_out != out_features else y


def dense_update(blocks: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The merged weight delta ``blockdiag(blocks)ᵀ[:out, :in]`` in torch's ``(out, in)`` layout."""
    count, block_in, block_out = blocks.shape
    delta = blocks.new_zeros(count * block_out, count * block_in)  # the padded grid: N divides it
    diagonal_blocks(delta, blocks, transposed=False).copy_(blocks)
    return delta[:out_features, :in_features]


def diagonal_of(weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """The diagonal blocks of an ``(out, in)`` matrix as an adapter holds them, ``(N, d1, d2)``, padding read
    as zeros: the inverse of :func:`dense_update` on the entries the blocks cover (a copy, not a view)."""
    out_features, in_features = weight.shape
    block_in, block_out = -(-in_features // blocks), -(-out_features // blocks)
    padded = weight.new_zeros(blocks * block_out, blocks * block_in)
    padded[:out_features, :in_features] = weight
    return diagonal_blocks(padded, (blocks, block_in, block_out), transposed=False).contiguous()


def diagonal_blocks(
    weight: torch.Tensor, blocks: torch.Tensor | tuple[int, int, int], *, transposed: bool
) -> torch.Tensor:
    """A view of the weight's diagonal blocks laid out like ``blocks`` (``(N, d1, d2)``, a tensor or its shape):
    writing to it writes into ``weight``. ``weight`` is ``(out, in)`` (``nn.Linear``) or ``(in, out)`` when
    ``transposed`` (GPT-2's ``Conv1D``); the block count must divide both dimensions."""
    count, block_in, block_out = blocks.shape if isinstance(blocks, torch.Tensor) else blocks
    if transposed:  # (in, out) = (N·d1, N·d2): block j is weight[j·d1:, j·d2:], already (d1, d2)
        return torch.diagonal(weight.view(count, block_in, count, block_out), dim1=0, dim2=2).permute(2, 0, 1)
    # (out, in) = (N·d2, N·d1): block j is weight[j·d2:, j·d1:] = D[j]ᵀ
    return torch.diagonal(weight.view(count, block_out, count, block_in), dim1=0, dim2=2).permute(2, 1, 0)


def block_gradient(x: torch.Tensor, grad_output: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``∂L/∂D[j] = x_jᵀ · ∂y_j`` for every block at once, accumulated in the blocks' dtype (so a bf16 base's
    gradient is exact in fp32, as in the reference path); shapes must divide.

    One batched product over strided views (a bf16/fp16 input is cast first, its only copy), the side with the
    smaller block dimension first: CPU BLAS runs a short-and-wide product about 2× faster than a tall-and-narrow
    one (SmolLM2's k/v blocks, 24 × 8: half the time; ``benchmarks/block_gradient.py``)."""
    count, block_in, block_out = blocks.shape
    x = x.reshape(-1, count, block_in).to(blocks.dtype)
    grad_output = grad_output.reshape(-1, count, block_out).to(blocks.dtype)
    if block_out < block_in:  # (N, d2, T) @ (N, T, d1), transposed back
        return torch.bmm(grad_output.permute(1, 2, 0), x.transpose(0, 1)).transpose(1, 2).contiguous()
    return torch.bmm(x.permute(1, 2, 0), grad_output.transpose(0, 1))  # (N, d1, T) @ (N, T, d2)


class FoldedLinear(torch.autograd.Function):
    """``base(x)`` with the blocks already folded into ``weight``; backward gives the input gradient from the
    folded weight (one matmul, as the frozen base would) and the block gradient from the saved input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, blocks: torch.Tensor, base: nn.Module, transposed: bool):
        ctx.save_for_backward(x, weight, blocks)  # weight: the frozen parameter itself, no copy
        ctx.transposed = transposed
        return base(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, blocks = ctx.saved_tensors
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ (weight.T if ctx.transposed else weight)
        if ctx.needs_input_grad[2]:
            grad_blocks = block_gradient(x, grad_output, blocks)
        return grad_x, None, grad_blocks, None, None
