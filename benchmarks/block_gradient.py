"""The block gradient ``∂L/∂D[j] = x_jᵀ·∂y_j`` alone, at SmolLM2's seven layer shapes: which operand order of the
batched product CPU BLAS runs fastest, and what the kernel in ``adapter/kernels.py`` does.

Variants, each the same 30 layers × 7 modules of one step (distinct tensors per layer, so the data is as cold as
in a real backward pass), interleaved (common.py):
  x-first   (N, d_in, T) @ (N, T, d_out) for every module
  g-first   (N, d_out, T) @ (N, T, d_in), transposed back, for every module
  kernel    ``kernels.block_gradient``: the smaller block side first
A bf16 input is cast to the blocks' fp32 first in every variant (the gradient stays exact in fp32).

    python benchmarks/block_gradient.py                              # 4 × 256 tokens, N=24, fp32 and bf16
    python benchmarks/block_gradient.py --tokens 260 --blocks 32      # the quickstart's micro batch and N
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import default_dtypes, interleaved, machine, medians, table

from diablo_cli.adapter import kernels

SHAPES = {  # SmolLM2-135M: (in, out) of q, k, v, o, gate, up, down
    "q_proj": (576, 576),
    "k_proj": (576, 192),
    "v_proj": (576, 192),
    "o_proj": (576, 576),
    "gate_proj": (576, 1536),
    "up_proj": (576, 1536),
    "down_proj": (1536, 576),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def x_first(x: torch.Tensor, grad: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    count, block_in, block_out = blocks.shape
    x = x.reshape(-1, count, block_in).float()
    grad = grad.reshape(-1, count, block_out).float()
    return torch.bmm(x.permute(1, 2, 0), grad.transpose(0, 1))


def g_first(x: torch.Tensor, grad: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    count, block_in, block_out = blocks.shape
    x = x.reshape(-1, count, block_in).float()
    grad = grad.reshape(-1, count, block_out).float()
    return torch.bmm(grad.permute(1, 2, 0), x.transpose(0, 1)).transpose(1, 2).contiguous()


VARIANTS = {"x-first": x_first, "g-first": g_first, "kernel": kernels.block_gradient}


def step_data(tokens: int, blocks: int, dtype: torch.dtype, layers: int, modules: list[str]):
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(layers):
        for name in modules:
            fan_in, fan_out = SHAPES[name]
            x = torch.randn(tokens, fan_in, generator=generator).to(dtype)
            grad = torch.randn(tokens, fan_out, generator=generator).to(dtype)
            data.append((x, grad, torch.zeros(blocks, fan_in // blocks, fan_out // blocks)))
    return data


def time_dtype(args, dtype: str, modules: list[str]) -> dict[str, float]:
    data = step_data(args.tokens, args.blocks, DTYPES[dtype], args.layers, modules)
    for function in VARIANTS.values():  # every order computes the same numbers
        for x, grad, blocks in data[: len(modules)]:
            torch.testing.assert_close(function(x, grad, blocks), x_first(x, grad, blocks), rtol=1e-4, atol=1e-4)

    def builder(function):
        def step() -> None:
            for x, grad, blocks in data:
                function(x, grad, blocks)

        return lambda: step

    times = interleaved({name: builder(f) for name, f in VARIANTS.items()}, repeats=args.repeats, runs=args.runs)
    return medians(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, default=1024, help="rows of one micro batch (batch × sequence)")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(f"# {machine('cpu')}")
    print(f"# {args.layers} layers × 7 modules, {args.tokens} tokens, N={args.blocks}; milliseconds per step")
    rows = []
    for dtype in args.dtypes or default_dtypes():
        whole = time_dtype(args, dtype, list(SHAPES))
        rows.append([dtype, "all seven", *(f"{1000 * whole[name]:.1f}" for name in VARIANTS)])
        for name in ("k_proj", "gate_proj", "down_proj"):  # the three shapes where the order matters
            one = time_dtype(args, dtype, [name])
            rows.append([dtype, name, *(f"{1000 * one[variant]:.1f}" for variant in VARIANTS)])
    print(table(["dtype", "modules", *VARIANTS], rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
