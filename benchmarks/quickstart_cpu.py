"""The README's main job on both kinds of CPU: `diablo train configs/quickstart.yaml`, whole process, timed.

The project's machines are of two kinds: CPUs that compute bf16 natively (AVX512-BF16, AMX) and AVX2-only
CPUs where PyTorch's bf16 matmul falls to a slow path. One machine can stand in for the second kind: with
oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2), ATen's kernels at AVX2 and MKL at AVX2, PyTorch reports
no native bf16 and takes the same fallback (this script checks that it does). Variants run interleaved,
in rotating order; each prints its wall time, training tokens/s and the held-out scores.

    python benchmarks/quickstart_cpu.py                     # auto here vs auto as AVX2, 1 round
    python benchmarks/quickstart_cpu.py --rounds 3 --with-forced-bf16
    python benchmarks/quickstart_cpu.py --with-dense-loss     # also training.loss: dense on both
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table

ROOT = Path(__file__).parents[1]
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
DONE = re.compile(r"done: (\d+) steps in (\d+)s \(([\d,]+) tokens/s\)")
SCORE = re.compile(r"dates: exact match ([\d.]+)% → ([\d.]+)%")
DTYPE = re.compile(r"^dtype: (\S+) \(([^)]*\)?)\)", re.MULTILINE)


def variants(forced_bf16: bool, dense_loss: bool) -> dict[str, tuple[dict[str, str], list[str]]]:
    found = {"this CPU, dtype auto": ({}, []), "as AVX2, dtype auto": (AVX2_ONLY, [])}
    if dense_loss:  # the loss before issue 25: Hugging Face's, over every position's logits
        found["this CPU, loss dense"] = ({}, ["--set", "training.loss=dense"])
        found["as AVX2, loss dense"] = (AVX2_ONLY, ["--set", "training.loss=dense"])
    if forced_bf16:  # hours for the whole job: five steps are enough to show the rate
        short = ["--set", "training.max_steps=5", "--set", "eval.tasks=[]", "--set", "training.logging_steps=1"]
        found["as AVX2, dtype bf16 (5 steps)"] = (AVX2_ONLY, ["--set", "model.dtype=bf16", *short])
    return found


def inductor_cache(env: dict[str, str]) -> dict[str, str]:
    """A separate torch.compile cache for the AVX2 stand-in: kernels compiled for AVX512 crash under it."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(Path(tempfile.gettempdir()) / "diablo-inductor-avx2")} if env else {}


def native_bf16(env: dict[str, str]) -> bool:
    probe = "import torch; print(torch.ops.mkldnn._is_mkldnn_bf16_supported())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env})
    return done.stdout.strip() == "True"


def run(env: dict[str, str], extra: list[str], out: Path, log: Path | None) -> dict[str, str | float]:
    command = [sys.executable, "-m", "diablo_cli", "train", str(ROOT / "configs/quickstart.yaml"), "-o", str(out)]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--overwrite", *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **env, **inductor_cache(env)},
        cwd=ROOT,
    )
    wall = time.perf_counter() - started
    if log is not None:
        log.write_text(f"$ {' '.join(command[2:])}\n{done.stdout}{done.stderr}", encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"diablo train failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    text = done.stdout + done.stderr
    steps, seconds, speed = DONE.search(text).groups()
    score = SCORE.search(text)
    dtype = DTYPE.search(text)
    return {
        "wall_s": wall,
        "train_s": float(seconds),
        "tokens_per_s": float(speed.replace(",", "")),
        "steps": steps,
        "dtype": f"{dtype.group(1)}" if dtype else "?",
        "score": f"{score.group(1)}% → {score.group(2)}%" if score else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--with-forced-bf16", action="store_true", help="Also time 5 bf16 steps as AVX2.")
    parser.add_argument("--with-dense-loss", action="store_true", help="Also run with training.loss: dense.")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--logs", type=Path, help="Keep each run's terminal output in this folder.")
    args = parser.parse_args()
    print(f"# {machine('cpu')}")
    if native_bf16(AVX2_ONLY):
        print("# as AVX2: PyTorch still reports native bf16 with oneDNN capped (the stand-in does not hold here)")
    chosen = variants(args.with_forced_bf16, args.with_dense_loss)
    names = list(chosen)
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                env, extra = chosen[name]
                log = None
                if args.logs is not None:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    log = args.logs / f"{name.replace(' ', '-').replace(',', '')}-{round_index + 1}.txt"
                results[name].append(run(env, extra, Path(scratch) / "run", log))
                print(f"# round {round_index + 1}, {name}: {results[name][-1]}", flush=True)
    baseline = statistics.median(r["tokens_per_s"] for r in results[names[0]])
    rows = []
    for name in names:
        runs = results[name]
        speed = statistics.median(r["tokens_per_s"] for r in runs)
        rows.append(
            [
                name,
                runs[0]["dtype"],
                f"{statistics.median(r['wall_s'] for r in runs):.0f}",
                f"{statistics.median(r['train_s'] for r in runs):.0f}",
                f"{speed:,.0f}",
                f"{speed / baseline:.3f}",
                runs[0]["score"],
            ]
        )
    header = ["variant", "dtype", "wall (s)", "training (s)", "tokens/s", "× this CPU", "held-out exact match"]
    print(table(header, rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
