"""One linear layer, forward + backward: what DiaBlo adds to it against PEFT LoRA at the same budget, over sizes,
token counts and dtypes.

Variants, all with a frozen base and gradients flowing to the layer input (as inside a network):
  floor          the frozen base alone
  diablo         + DiaBlo as training runs it (kernel auto: the blocks folded into the weight)
  diablo-blocks  + DiaBlo with kernel=blocks (separate block products, the reference math)
  lora           + PEFT LoRA with the same number of parameters, r = in·out / (N·(in+out)), fp32 on any base
The adapter alone is the variant's median minus the floor's; "× LoRA" compares adapters alone. Blocks stay
fp32 on a bf16 base (the paper's setting), as PEFT keeps LoRA's weights.

    python benchmarks/layer_sweep.py                                   # 576…8192 square, 2048 tokens
    python benchmarks/layer_sweep.py --sizes 4096 --tokens 512 2048 --dtypes bf16 --markdown
    python benchmarks/layer_sweep.py --features 4096 11008 --blocks 64 # one rectangular shape
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import default_dtypes, interleaved, machine, medians, table

from diablo_cli import DiaBloLinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("floor", "diablo", "diablo-blocks", "lora")


class OneLayer(nn.Module):
    """A module holding the layer under a name PEFT can target."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def lora_rank(in_f: int, out_f: int, blocks: int) -> int:
    return max(1, round(in_f * out_f / (blocks * (in_f + out_f))))


def build(variant: str, base: nn.Linear, blocks: int) -> nn.Module:
    layer = copy.deepcopy(base)
    if variant == "floor":
        return layer
    if variant.startswith("diablo"):
        return DiaBloLinear(layer, blocks, kernel="blocks" if variant == "diablo-blocks" else "auto")
    from peft import LoraConfig, inject_adapter_in_model

    rank = lora_rank(layer.in_features, layer.out_features, blocks)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["proj"])
    model = inject_adapter_in_model(config, OneLayer(layer))
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()  # PEFT's default on a half base: fp32 adapter weights
    return model


def run(in_f: int, out_f: int, tokens: int, blocks: int, dtype_name: str, args) -> dict[str, float]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False, device=args.device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, in_f, device=args.device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=args.device, dtype=dtype)

    def builder(variant: str):
        def make():
            layer = build(variant, base, blocks)

            def step() -> None:
                layer(x).backward(grad)
                x.grad = None
                for parameter in layer.parameters():
                    parameter.grad = None

            return step

        return make

    times = interleaved(
        {v: builder(v) for v in args.variants}, repeats=args.repeats, runs=args.runs, device=args.device
    )
    return medians(times)


def shapes(args) -> list[tuple[int, int]]:
    if args.features:
        return [tuple(args.features)]
    return [(size, size) for size in args.sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1024, 2048, 4096, 8192])
    parser.add_argument("--features", type=int, nargs=2, metavar=("IN", "OUT"), help="one rectangular layer")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per build (after one warm-up run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    args.dtypes = args.dtypes or default_dtypes()
    if "floor" not in args.variants:
        args.variants.insert(0, "floor")

    print(f"# {machine(args.device)}")
    print(f"# fwd+bwd of one layer, N={args.blocks}, medians of {args.repeats} repetitions × {args.runs} runs")
    header = ["shape", "tokens", "dtype", "LoRA r", "variant", "ms", "× floor", "adapter ms", "adapter × LoRA's"]
    rows = []
    for in_f, out_f in shapes(args):
        for tokens in args.tokens:
            for dtype_name in args.dtypes:
                result = run(in_f, out_f, tokens, args.blocks, dtype_name, args)
                floor = result["floor"]
                lora_cost = result.get("lora", float("nan")) - floor
                for variant, seconds in result.items():
                    cost = seconds - floor
                    rows.append(
                        [
                            f"{in_f}×{out_f}",
                            str(tokens),
                            dtype_name,
                            str(lora_rank(in_f, out_f, args.blocks)),
                            variant,
                            f"{seconds * 1e3:.2f}",
                            f"{seconds / floor:.3f}",
                            "—" if variant == "floor" else f"{cost * 1e3:.2f}",
                            "—" if variant in ("floor", "lora") or "lora" not in result else f"{cost / lora_cost:.2f}",
                        ]
                    )
                print(table(header, rows[-len(result) :], markdown=False), flush=True)
    if args.markdown:
        print(table(header, rows, markdown=True))


if __name__ == "__main__":
    main()
