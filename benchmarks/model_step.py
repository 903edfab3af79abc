"""One training step of a real model (the bundled SmolLM2-135M) for each way of fine-tuning it, time and memory.

Variants, each a fresh copy of the same loaded base, one step = forward + backward + AdamW step + zero_grad:
  floor-hf       frozen base, gradients to the input only, Hugging Face's loss over full logits
  floor          the same with diablo's own loss path (loss.py, as `diablo train` runs it): what any adapter's
                 step costs at least
  diablo         DiaBlo as `diablo train` runs it (kernel auto: blocks folded into the dense weights; its loss)
  diablo-blocks  DiaBlo with kernel=blocks: the three separate block products (the reference math)
  diablo-adamw-loop  DiaBlo stepped by torch's per-tensor AdamW loop (`adamw_torch`, diablo's old default)
                 instead of the fused AdamW that diablo train, and transformers' Trainer, now use
  lora           PEFT LoRA on the same modules at the rank whose budget is closest to DiaBlo's, with HF's loss
                 (what a PEFT user runs)
  full           full fine-tuning (every weight trainable), diablo's loss
``--prompt F`` masks the first F of every row's tokens from the loss, as a prompt-masked recipe does (the
quickstart supervises ~15% of its tokens); the default 0 supervises every token.
Times are medians over repetitions, interleaved (see common.py); ratios are against the floor and against
LoRA measured in the same run. ``--memory`` runs every variant in a fresh process and reports what training
adds above the loaded model: the peak of the process's own memory (CPU: sampled RssAnon; CUDA: peak
allocated), the activations autograd saved in one forward, and the optimizer state.

    python benchmarks/model_step.py                                  # fp32 and bf16, batch 4 × 256, N=24
    python benchmarks/model_step.py --dtypes bf16 --repeats 9 --memory --markdown
    python benchmarks/model_step.py --llama3-head                    # the loss's own peak, dense vs chunked
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    PeakAnon,
    default_dtypes,
    interleaved,
    keep_freed_memory,
    machine,
    medians,
    saved_activation_bytes,
    status_kib,
    table,
)

from diablo_cli import DiaBloConfig, attach_diablo
from diablo_cli.adapter.targets import select_targets
from diablo_cli.loss import choose_loss

VARIANTS = ("floor-hf", "floor", "diablo", "diablo-blocks", "diablo-adamw-loop", "lora", "full")
HF_LOSS = ("floor-hf", "lora")
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # QKVOGUD


def load(dtype: str, device: str):
    from diablo_cli.models import load_base_model

    model, _ = load_base_model("smollm2-135m", dtype=dtype)
    return model.to(device).requires_grad_(False)


def closest_lora_rank(model, blocks: int) -> tuple[int, int, int]:
    """(rank, LoRA parameters, DiaBlo parameters): the LoRA rank whose budget is nearest DiaBlo's on QKVOGUD."""
    targets = select_targets(model, DiaBloConfig(blocks=blocks, target_modules="QKVOGUD"))
    diablo = sum(t.in_features * t.out_features // blocks for t in targets)
    per_rank = sum(t.in_features + t.out_features for t in targets)
    rank = max(1, round(diablo / per_rank))
    return rank, rank * per_rank, diablo


def build(variant: str, base, *, blocks: int, rank: int, copy_base: bool = True):
    """The model for ``variant`` and the parameters its optimizer steps (None for the floor)."""
    model = copy.deepcopy(base) if copy_base else base
    if variant.startswith("floor"):
        model.enable_input_require_grads()
        return model, None
    if variant.startswith("diablo"):
        kernel = "blocks" if variant == "diablo-blocks" else "auto"
        attach_diablo(model, DiaBloConfig(blocks=blocks, target_modules="QKVOGUD", kernel=kernel))
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=MODULES))
    elif variant == "full":
        model.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = variant != "diablo-adamw-loop"  # adamw_torch_fused: the default of diablo train and of transformers
    return model, torch.optim.AdamW(trainable, lr=1e-5, fused=fused, foreach=None if fused else False)


def loss_function(variant: str, model, batch: dict[str, torch.Tensor]):
    """The step's loss: Hugging Face's (mean over supervised tokens) or diablo's path, which equals it."""
    if variant in HF_LOSS:
        return lambda: model(**batch).loss
    path = choose_loss(model)
    count = int((batch["labels"][:, 1:] != -100).sum())
    return lambda: path.loss(model, batch, count)


def step_function(variant: str, model, optimizer, batch: dict[str, torch.Tensor]):
    loss = loss_function(variant, model, batch)

    def step() -> None:
        loss().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def time_variants(args, dtype: str) -> dict[str, float]:
    base = load(dtype, args.device)
    rank, _, _ = closest_lora_rank(base, args.blocks)
    batch = token_batch(args)

    def builder(variant: str):
        return lambda: step_function(variant, *build(variant, base, blocks=args.blocks, rank=rank), batch)

    times = interleaved(
        {v: builder(v) for v in args.variants}, repeats=args.repeats, runs=args.runs, device=args.device
    )
    return medians(times)


def token_batch(args) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq_len), generator=generator).to(args.device)
    labels = ids.clone()
    labels[:, : round(args.prompt * args.seq_len)] = -100
    return {"input_ids": ids, "labels": labels}


def measure_memory(args, dtype: str, variant: str) -> dict[str, float]:
    """In this (fresh) process: memory that training ``variant`` adds above the loaded model, in MiB."""
    base = load(dtype, args.device)
    rank, _, _ = closest_lora_rank(base, args.blocks)
    model, optimizer = build(variant, base, blocks=args.blocks, rank=rank, copy_base=False)
    loss_of_batch = loss_function(variant, model, token_batch(args))
    parameters = list(model.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = status_kib("self", "RssAnon") * 1024
    with PeakAnon() as sampler:
        for _ in range(2):
            loss, saved = saved_activation_bytes(loss_of_batch, parameters)
            loss.backward()
            del loss
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else sampler.peak_kib * 1024
    state = sum(
        t.numel() * t.element_size()
        for s in (optimizer.state.values() if optimizer else [])
        for t in s.values()
        if torch.is_tensor(t)
    )
    mib = 1024 * 1024
    return {"trainable": trainable, "peak": (peak - before) / mib, "saved": saved / mib, "optimizer": state / mib}


def memory_table(args, dtype: str) -> dict[str, dict[str, float]]:
    results = {}
    for variant in args.variants:
        command = [sys.executable, __file__, "--child-memory", variant, "--dtypes", dtype, *child_arguments(args)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"memory run of {variant} failed:\n{done.stderr[-2000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def child_arguments(args) -> list[str]:
    keep = ["--keep-freed-memory"] if args.keep_freed_memory else []
    return ["--blocks", str(args.blocks), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
            "--prompt", str(args.prompt), "--device", args.device, *keep]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--blocks", type=int, default=24, help="DiaBlo's N (24: 4.42M parameters on SmolLM2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt", type=float, default=0.0, help="fraction of each row masked from the loss")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runs", type=int, default=2, help="timed steps per build (after one warm-up step)")
    parser.add_argument("--memory", action="store_true", help="also measure memory, one process per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keep-freed-memory", action="store_true", help="glibc: no mmap, no trim (common.py)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--llama3-head", action="store_true", help="the loss's own peak at Llama-3's head shape")
    parser.add_argument("--child-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-head", choices=("dense", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtypes = args.dtypes or default_dtypes()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory needs glibc")
    if args.child_memory:
        print(json.dumps(measure_memory(args, args.dtypes[0], args.child_memory)))
        return
    if args.child_head:
        print(json.dumps(head_loss_memory(args, args.dtypes[0], args.child_head)))
        return
    if args.llama3_head:
        head_table(args)
        return

    base = load("fp32", "cpu")
    rank, lora_parameters, diablo_parameters = closest_lora_rank(base, args.blocks)
    del base
    print(f"# {machine(args.device)}")
    print(
        f"# SmolLM2-135M, batch {args.batch} × {args.seq_len} tokens, QKVOGUD; DiaBlo N={args.blocks} "
        f"({diablo_parameters / 1e6:.2f}M), LoRA r={rank} ({lora_parameters / 1e6:.2f}M); medians of "
        f"{args.repeats} repetitions × {args.runs} steps"
        + ("; glibc keeps freed memory (--keep-freed-memory)" if args.keep_freed_memory else "")
    )
    mask = f"; first {args.prompt:.0%} of each row masked" if args.prompt else "; every token supervised"
    print(f"# floor-hf and lora: Hugging Face's loss; the others: diablo's ({mask[2:]})")
    header = ["dtype", "variant", "step (s)", "× floor", "× floor-hf", "× LoRA"]
    if args.memory:
        header += ["peak above model (MiB)", "saved activations (MiB)", "optimizer state (MiB)"]
    rows = []
    for dtype in args.dtypes:
        times = time_variants(args, dtype)
        memory = memory_table(args, dtype) if args.memory else {}
        for variant, seconds in times.items():
            row = [dtype, variant, f"{seconds:.3f}"]
            row.append(f"{seconds / times['floor']:.3f}" if "floor" in times else "—")
            row.append(f"{seconds / times['floor-hf']:.3f}" if "floor-hf" in times else "—")
            row.append(f"{seconds / times['lora']:.3f}" if "lora" in times else "—")
            if memory:
                m = memory[variant]
                row += [f"{m['peak']:,.0f}", f"{m['saved']:,.0f}", f"{m['optimizer']:,.1f}"]
            rows.append(row)
        print(table(header, rows[-len(times) :], markdown=False), flush=True)
    if args.markdown:
        print(table(header, rows, markdown=True))


LLAMA3_HEAD = {"hidden": 4096, "vocab": 128256}


def head_loss_memory(args, dtype: str, kind: str) -> dict[str, float]:
    """In this (fresh) process: the peak memory of the loss alone (head + cross-entropy, forward and backward)
    above its inputs, for hidden states of Llama-3's width and its 128,256-token head, in MiB; and its time."""
    import time

    import torch.nn.functional as F

    from diablo_cli.loss import _LinearCrossEntropy, slice_rows

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    generator = torch.Generator().manual_seed(0)
    tokens = args.batch * args.seq_len
    weight = (torch.randn(LLAMA3_HEAD["vocab"], LLAMA3_HEAD["hidden"], generator=generator) * 0.02).to(torch_dtype)
    hidden = torch.randn(tokens, LLAMA3_HEAD["hidden"], generator=generator).to(torch_dtype).requires_grad_(True)
    targets = torch.randint(0, LLAMA3_HEAD["vocab"], (tokens,), generator=generator)
    before = status_kib("self", "RssAnon") * 1024
    started = time.perf_counter()
    with PeakAnon() as sampler:
        if kind == "dense":
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum") / tokens
        else:
            loss = _LinearCrossEntropy.apply(hidden, weight, None, targets, 1.0 / tokens, slice_rows(weight.shape[0]))
        loss.backward()
    seconds = time.perf_counter() - started
    mib = 1024 * 1024
    return {"peak": (sampler.peak_kib * 1024 - before) / mib, "seconds": seconds, "loss": float(loss)}


def head_table(args) -> None:
    print(f"# {machine('cpu')}")
    tokens = args.batch * args.seq_len
    print(
        f"# the loss alone at Llama-3's head: {tokens:,} tokens ({args.batch} × {args.seq_len}) × hidden "
        f"{LLAMA3_HEAD['hidden']:,} → {LLAMA3_HEAD['vocab']:,} logits; forward + backward, each in a fresh process"
    )
    rows, peaks = [], {}
    for dtype in args.dtypes:
        for kind in ("dense", "chunked"):
            command = [sys.executable, __file__, "--child-head", kind, "--dtypes", dtype, *child_arguments(args)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode != 0:
                raise SystemExit(f"head run {kind} failed:\n{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            peaks[kind] = result["peak"]
            ratio = f"{result['peak'] / peaks['dense']:.3f}" if kind == "chunked" else "1"
            rows.append(
                [dtype, kind, f"{result['peak']:,.0f}", ratio, f"{result['seconds']:.2f}", f"{result['loss']:.5f}"]
            )
    print(
        table(
            ["dtype", "loss", "peak above inputs (MiB)", "× dense", "seconds", "loss value"],
            rows,
            markdown=args.markdown,
        )
    )


if __name__ == "__main__":
    main()
