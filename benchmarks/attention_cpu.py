"""A DiaBlo training step on CPU with PyTorch's fused attention (``sdpa``) against transformers' ``eager`` one.

PyTorch's CPU flash-attention backward is slow on short rows (a few milliseconds per layer at 65 tokens, where
the plain matmul-softmax-matmul backward takes one), so on short sequences eager attention trains faster; on
long ones the fused kernel wins and saves memory (eager keeps each layer's batch × heads × L × L attention
weights). This measures where the two cross on the bundled SmolLM2-135M, each length at about 1,024 tokens per
step (the quickstart's 4 × 65 as it is), rows of unequal length padded like a real batch, the last fifth of each
row supervised. Times are interleaved medians (common.py); "saved" is what autograd keeps for the backward.

    python benchmarks/attention_cpu.py                           # fp32 (and bf16 where native), 65 … 1,024
    python benchmarks/attention_cpu.py --dtypes bf16 --lengths 65 256 --repeats 7 --markdown
    python benchmarks/attention_cpu.py --wide --dtypes bf16 --lengths 65 128 256    # two 7B-shaped layers

``--wide`` replaces SmolLM2 by two random layers of Llama-2-7B's widths (hidden 4,096, 32 heads × 128,
intermediate 11,008; vocabulary 32,000) with DiaBlo N=64: attention is a smaller share of a wide layer's step,
which is why ``diablo train`` picks eager only up to 128 tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import default_dtypes, give_back_freed_memory, interleaved, machine, medians, saved_activation_bytes, table
from model_step import build as build_variant
from model_step import loss_function, step_function

IMPLEMENTATIONS = ("sdpa", "eager")


def padded_batch(length: int, rows: int, vocabulary: int) -> dict[str, torch.Tensor]:
    """``rows`` rows up to ``length`` tokens, three of every four shorter by a few tokens and right-padded."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocabulary, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(rows):
        mask[row, length - (0, 7, 15, 3)[row % 4] :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : round(0.8 * length)] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def wide_base(dtype: str):
    """Two random layers at Llama-2-7B's widths (the shapes matter here, not the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=2,
        vocab_size=32000,
    )
    return LlamaForCausalLM(config).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])


def build(base, implementation: str, blocks: int):
    """model_step.py's DiaBlo variant (a fresh copy of ``base``, fused AdamW) with ``implementation``'s attention."""
    model, optimizer = build_variant("diablo", base, blocks=blocks, rank=0)
    model.set_attn_implementation(implementation)
    return model, optimizer


def saved_mib(base, implementation: str, blocks: int, batch) -> float:
    model, _ = build(base, implementation, blocks)
    loss, saved = saved_activation_bytes(loss_function("diablo", model, batch), list(model.parameters()))
    del loss
    return saved / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[65, 128, 256, 512, 1024])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step above 4 × 65 (rows = tokens/L)")
    parser.add_argument("--blocks", type=int, default=None, help="DiaBlo's N (default 32; 64 with --wide)")
    parser.add_argument("--wide", action="store_true", help="two random layers of Llama-2-7B's widths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diablo_cli.models import load_base_model

    print(f"# {machine('cpu')}")
    args.blocks = args.blocks or (64 if args.wide else 32)
    model_name = "two random layers at Llama-2-7B's widths" if args.wide else "SmolLM2-135M"
    print(f"# {model_name}, DiaBlo N={args.blocks} QKVOGUD, medians of {args.repeats} repetitions × {args.runs} steps")
    rows = []
    for dtype in args.dtypes or default_dtypes():
        base = wide_base(dtype) if args.wide else load_base_model("smollm2-135m", dtype=dtype)[0]
        base.requires_grad_(False)
        for length in args.lengths:
            batch = padded_batch(length, 4 if length <= 65 else max(1, args.tokens // length), base.config.vocab_size)
            times = medians(
                interleaved(
                    {
                        name: (
                            lambda name=name, base=base, batch=batch: step_function(
                                "diablo", *build(base, name, args.blocks), batch
                            )
                        )
                        for name in IMPLEMENTATIONS
                    },
                    repeats=args.repeats,
                    runs=args.runs,
                )
            )
            saved = {name: saved_mib(base, name, args.blocks, batch) for name in IMPLEMENTATIONS}
            shape = f"{batch['input_ids'].shape[0]} × {length}"
            rows.append(
                [
                    dtype,
                    shape,
                    f"{times['sdpa']:.3f}",
                    f"{times['eager']:.3f}",
                    f"{times['eager'] / times['sdpa']:.3f}",
                    f"{saved['sdpa']:,.0f}",
                    f"{saved['eager']:,.0f}",
                ]
            )
            print("  ".join(rows[-1]), flush=True)
            give_back_freed_memory()
        del base
    header = ["dtype", "batch", "sdpa (s)", "eager (s)", "eager × sdpa", "saved, sdpa (MiB)", "saved, eager (MiB)"]
    print(table(header, rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
