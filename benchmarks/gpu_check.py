"""Every CUDA path in one command, for the day a GPU is lent: `make gpu-check` (≤ 8 minutes on one 80 GB GPU).

Runs, in order, each part timed, and prints one table (``--markdown`` for RESULTS.md):
  tests      the tests marked ``cuda`` (tests/test_cuda.py: placement in generation and log-likelihood, bitsandbytes
             4-bit CUDA kernels, GPTQ on GPTQModel's GPU kernels, one-process DDP/FSDP/FSDP2), one row each
  quickstart `diablo train configs/quickstart.yaml` on the GPU: wall time and held-out exact match before → after
  step       one training step of floor (frozen base, gradients to the input only), DiaBlo (QKVOGUD N=64, as
             `diablo train` runs it) and PEFT LoRA at DiaBlo's budget, on SmolLM2-135M and on a random
             Llama-2-7B-shaped bf16 model (benchmarks/model_step.py's builders): ms/step, tokens/s, MFU against
             the GPU's bf16 dense peak (diablo_cli/scaling.py's table; FLOPs as scaling.py counts them) and
             torch.cuda.max_memory_allocated
  loss       diablo's chunked loss (diablo_cli/loss.py) against the dense one at Llama-3's head (128,256 × 4096),
             forward + backward: peak memory above the inputs
Each part that fails becomes a FAIL row and the rest still run; the exit status is 1 if any row failed.
On a machine without CUDA it prints one line saying so and exits 0.

    python benchmarks/gpu_check.py                 # or: make gpu-check
    python benchmarks/gpu_check.py --markdown --skip quickstart
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # this checkout's diablo_cli, whatever is installed
sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table

ROOT = Path(__file__).parents[1]
PARTS = ("tests", "quickstart", "step", "loss")
HEADER = ["part", "check", "status", "seconds", "measured"]


@dataclass
class Row:
    """One line of the table: ``status`` is ok, FAIL or skip; ``measured`` says what was found."""

    part: str
    check: str
    status: str
    seconds: float | None
    measured: str = ""


def results_table(rows: list[Row], *, markdown: bool) -> str:
    """The one table gpu_check prints, with a last line counting what passed, failed and was skipped."""
    cells = [
        [row.part, row.check, row.status, "—" if row.seconds is None else f"{row.seconds:.1f}", row.measured]
        for row in rows
    ]
    counts = {status: sum(row.status == status for row in rows) for status in ("ok", "FAIL", "skip")}
    summary = f"{counts['ok']} ok, {counts['FAIL']} failed, {counts['skip']} skipped"
    return table(HEADER, cells, markdown=markdown) + "\n" + summary


def junit_rows(xml_text: str) -> list[Row]:
    """One row per test case of a pytest --junitxml report."""
    rows = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        name, seconds = case.get("name", "?"), float(case.get("time", 0.0))
        problem = next((case.find(tag) for tag in ("failure", "error") if case.find(tag) is not None), None)
        skipped = case.find("skipped")
        if problem is not None:
            message = (problem.get("message") or "failed").strip().splitlines()
            rows.append(Row("tests", name, "FAIL", seconds, message[0][:120] if message else "failed"))
        elif skipped is not None:
            rows.append(Row("tests", name, "skip", seconds, (skipped.get("message") or "")[:120]))
        else:
            rows.append(Row("tests", name, "ok", seconds))
    return rows


def step_row(
    model: str, variant: str, *, seconds: float, tokens: int, flops: float, peak_tflops: float | None, memory: int
) -> Row:
    """A step benchmark's row: ms/step, tokens/s, MFU (``flops`` per step over the GPU's peak; — when the GPU is not
    in scaling.py's table) and the peak allocated memory."""
    mfu = f"{flops / seconds / (peak_tflops * 1e12):.1%}" if peak_tflops else "—"
    memory_gib = memory / 2**30
    measured = (
        f"{seconds * 1e3:,.1f} ms/step, {tokens / seconds:,.0f} tokens/s, MFU {mfu}, max allocated {memory_gib:.2f} GiB"
    )
    return Row("step", f"{model}: {variant}", "ok", seconds, measured)


def gpu_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of the GPU torch names, from scaling.py's table (None for a GPU not in it)."""
    from diablo_cli.scaling import GPUS

    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))  # "NVIDIA A100-SXM4-80GB" → nvidia a100 sxm4 80gb
    for key in sorted(GPUS, key=len, reverse=True):  # h100-pcie before h100
        family, _, variant = key.partition("-")
        if family in words and (not variant or variant in words):
            return GPUS[key].bf16_tflops
    return None


# -- the parts --------------------------------------------------------------------------------------------------------


def run_tests(args) -> list[Row]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        subprocess.run([*command, "tests/test_cuda.py"], cwd=ROOT, env=child_environment(), timeout=args.timeout)
        return junit_rows(report.read_text())


def run_quickstart(args) -> list[Row]:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "quickstart"
        command = [
            sys.executable,
            "-m",
            "diablo_cli",
            "train",
            "configs/quickstart.yaml",
            "-o",
            str(out),
            "--overwrite",
        ]
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=ROOT, env=child_environment(), capture_output=True, text=True, timeout=args.timeout
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            return [Row("quickstart", "diablo train configs/quickstart.yaml", "FAIL", seconds, last_line(done))]
        summary = json.loads((out / "train_summary.json").read_text())
    scores = ", ".join(
        f"{task} {before:.1%} → {summary['eval_after'][task][metric]:.1%}"
        for task, values in summary["eval_before"].items()
        for metric, before in values.items()
        if isinstance(before, float)
    )
    measured = f"{summary['steps']} steps, {summary['tokens_per_second']:,.0f} tokens/s; {scores or 'no eval'}"
    return [Row("quickstart", "diablo train configs/quickstart.yaml", "ok", seconds, measured)]


def run_steps(args) -> list[Row]:
    import torch

    rows = []
    peak = gpu_peak_tflops(torch.cuda.get_device_name())
    for model_name, make, batch, seq_len in (
        ("SmolLM2-135M bf16", smollm2, 8, 512),
        ("Llama-2-7B shape bf16", llama2_7b_shape, 1, 2048),
    ):
        for variant in ("floor", "diablo", "lora"):
            started = time.perf_counter()
            try:
                rows.append(time_step(model_name, make, variant, batch, seq_len, peak, args.steps))
            except Exception as err:  # a FAIL row; the other variants still run
                rows.append(Row("step", f"{model_name}: {variant}", "FAIL", time.perf_counter() - started, brief(err)))
            torch.cuda.empty_cache()
    return rows


def smollm2():
    from diablo_cli.models import load_base_model

    model, _ = load_base_model("smollm2-135m", dtype="bf16")
    return model.to("cuda").requires_grad_(False), None


def llama2_7b_shape():
    """Llama-2-7B's paper config with random bf16 weights made on the GPU (seconds; nothing read from disk)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = json.loads((ROOT / "diablo_cli/resources/models/paper/llama2-7b.json").read_text())
    for key in ("architectures", "model_type", "_name_or_path", "torch_dtype"):
        settings.pop(key, None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(LlamaConfig(**settings), dtype=torch.bfloat16)
    return model.requires_grad_(False), None


def time_step(model_name: str, make: Callable, variant: str, batch: int, seq_len: int, peak, steps: int) -> Row:
    """One variant on a fresh model: two warm-up steps, then ``steps`` timed; FLOPs from scaling.py's count."""
    import torch
    from model_step import build, closest_lora_rank, step_function

    from diablo_cli.scaling import training_flops_per_token

    base, _ = make()
    config = base.config
    rank, _, _ = closest_lora_rank(base, 64)
    model, optimizer = build(variant, base, blocks=64, rank=rank, copy_base=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator).cuda()
    step = step_function(variant, model, optimizer, {"input_ids": ids, "labels": ids.clone()})
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head = hidden * config.vocab_size
    linear = layers * (
        hidden * (config.num_attention_heads + 2 * config.num_key_value_heads) * (hidden // config.num_attention_heads)
        + hidden * hidden
        + 3 * hidden * config.intermediate_size
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if variant != "floor" else 0
    flops = training_flops_per_token(
        linear_parameters=linear + head,
        head_parameters=head,
        trainable_parameters=trainable,
        layers=layers,
        attention_width=hidden,
        seq_len=seq_len,
        gradient_checkpointing=False,
    ).total * (batch * seq_len)
    row = step_row(
        model_name,
        variant,
        seconds=seconds,
        tokens=batch * seq_len,
        flops=flops,
        peak_tflops=peak,
        memory=torch.cuda.max_memory_allocated(),
    )
    if variant != "floor":
        row.check += f" ({trainable / 1e6:.1f}M trainable)"
    del model, optimizer, base, step
    return row


def run_loss(args) -> list[Row]:
    """The loss alone at Llama-3's head, 4 × 4,096 tokens in bf16: dense logits (2 GiB + their fp32 copy and
    gradient) against diablo's chunked path."""
    import torch
    import torch.nn.functional as F

    from diablo_cli.loss import _LinearCrossEntropy, slice_rows

    vocab, hidden, tokens = 128_256, 4096, 4 * 4096
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=generator, device="cuda") * 0.02).bfloat16()
    states = torch.randn(tokens, hidden, generator=generator, device="cuda").bfloat16().requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=generator, device="cuda")
    rows, peaks = [], {}
    for kind in ("dense", "chunked"):
        states.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        if kind == "dense":
            loss = F.cross_entropy(F.linear(states, weight).float(), targets)
        else:
            loss = _LinearCrossEntropy.apply(states, weight, None, targets, 1.0 / tokens, slice_rows(vocab))
        loss.backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peaks[kind] = torch.cuda.max_memory_allocated() - before
        ratio = f" ({peaks[kind] / peaks['dense']:.2f}× dense)" if kind == "chunked" else ""
        measured = f"peak {peaks[kind] / 2**30:.2f} GiB above its inputs{ratio}, loss {float(loss):.4f}"
        rows.append(Row("loss", f"{kind}, 128,256 × 4,096 head, {tokens:,} tokens", "ok", seconds, measured))
        del loss
    return rows


# -- running them -----------------------------------------------------------------------------------------------------


def child_environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1][:160] if lines else f"exit {done.returncode}"


def brief(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:140] if str(err) else ''}"


def no_cuda_line() -> str | None:
    """The one line printed where there is no GPU to check; None where there is one."""
    try:
        import torch
    except ImportError:
        return "gpu-check: torch is not installed; nothing to check"
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"gpu-check: no CUDA device here (torch {torch.__version__}, {build}); nothing to check"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after two warm-up steps)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds for each child process")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    line = no_cuda_line()
    if line is not None:
        print(line)
        return 0
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parts = {"tests": run_tests, "quickstart": run_quickstart, "step": run_steps, "loss": run_loss}
    rows: list[Row] = []
    started = time.perf_counter()
    for name, part in parts.items():
        if name in args.skip:
            continue
        began = time.perf_counter()
        print(f"# {name} …", file=sys.stderr, flush=True)
        try:
            rows += part(args)
        except Exception as err:
            traceback.print_exc()
            rows.append(Row(name, "(the whole part)", "FAIL", time.perf_counter() - began, brief(err)))
        torch.cuda.empty_cache()
    print(f"# {machine('cuda')}, {torch.cuda.get_device_name()}; {time.perf_counter() - started:.0f} s in all")
    print(results_table(rows, markdown=args.markdown))
    return 1 if any(row.status == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
