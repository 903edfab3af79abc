"""Peak memory and time of ``diablo merge`` on the bundled SmolLM2-135M, by shard size, with and without
verification.

Each run is a fresh ``diablo merge`` process; a sampler reads its /proc status every 10 ms and keeps the
peak of RssAnon (memory the process itself allocated: what a merge really needs) beside VmHWM (peak
resident set, which also counts pages of the mmap-ed input shards: reclaimable file cache). Runs are
interleaved over the settings and repeated; the table gives medians. Linux only (/proc).

    python benchmarks/merge_memory.py                     # the quickstart adapter (out/quickstart) if present
    python benchmarks/merge_memory.py --adapter DIR --repeats 3 --markdown
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, status_kib

SETTINGS = [  # (label, extra CLI arguments)
    ("5GB shards, --no-verify", ["--max-shard-size", "5GB", "--no-verify"]),
    ("100MB shards, --no-verify", ["--max-shard-size", "100MB", "--no-verify"]),
    ("20MB shards, --no-verify", ["--max-shard-size", "20MB", "--no-verify"]),
    ("5GB shards, verified", ["--max-shard-size", "5GB"]),
]


def measure(adapter: Path, output: Path, extra: list[str]) -> dict[str, float]:
    """One merge process: wall time, peak RssAnon (sampled) and VmHWM (kernel's own peak), in MiB."""
    command = [sys.executable, "-m", "diablo_cli", "merge", "--adapter", str(adapter), "--output", str(output)]
    started = time.perf_counter()
    process = subprocess.Popen([*command, "--overwrite", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = peak_rss = 0
    while process.poll() is None:
        try:
            peak_anon = max(peak_anon, status_kib(process.pid, "RssAnon"))
            peak_rss = max(peak_rss, status_kib(process.pid, "VmHWM"))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            break
        time.sleep(0.01)
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"merge failed: {stderr.decode()[-500:]}")
    return {"seconds": time.perf_counter() - started, "anon": peak_anon / 1024, "rss": peak_rss / 1024}


def baseline_process_mib() -> float:
    """What importing torch + transformers + diablo_cli alone costs (the floor under every row)."""
    code = "import diablo_cli.merge, transformers, torch; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) for line in out.splitlines() if line.startswith("RssAnon:")) / 1024


def random_adapter(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from diablo_cli import DiaBloConfig, adapted_layers, attach_diablo, save_adapter
    from diablo_cli.models import bundled_model_dir

    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir())
    attach_diablo(model, DiaBloConfig(blocks=32, target_modules="QKVOGUD"))
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.diablo_blocks.normal_(0, 1e-3)
    return save_adapter(model, folder, base_model="smollm2-135m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=Path("out/quickstart"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as scratch:
        adapter = args.adapter if args.adapter.is_dir() else random_adapter(Path(scratch) / "adapter")
        results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in SETTINGS}
        for _ in range(args.repeats):
            for label, extra in SETTINGS:
                results[label].append(measure(adapter, Path(scratch) / "merged", extra))
        floor = baseline_process_mib()
        model_bytes = sum(f.stat().st_size for f in (Path(scratch) / "merged").glob("*.safetensors"))

    print(f"# {machine('cpu')}")
    print(
        f"adapter: {adapter}; medians of {args.repeats} interleaved runs; importing the libraries alone: "
        f"{floor:,.0f} MiB anonymous"
    )
    header = (
        "setting",
        "time (s)",
        "MB/s",
        "peak anon (MiB)",
        "above imports (MiB)",
        "peak RSS incl. file pages (MiB)",
    )
    rows = []
    for label, runs in results.items():
        anon = statistics.median(r["anon"] for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        rows.append(
            (
                label,
                f"{seconds:.1f}",
                f"{model_bytes / 1e6 / seconds:.0f}",
                f"{anon:,.0f}",
                f"{anon - floor:,.0f}",
                f"{statistics.median(r['rss'] for r in runs):,.0f}",
            )
        )
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in (header, *rows):
            print(f"{row[0]:<28}" + "".join(f"{cell:>32}" for cell in row[1:]))


if __name__ == "__main__":
    main()
