"""Where the quickstart's memory goes: `diablo train configs/quickstart.yaml` in this process, phase by phase.

Each phase of ``train()`` is marked by wrapping the function that does it; between two marks the process's
exact peak resident set is read from /proc/self/status (VmHWM) and then reset (``5`` into
/proc/self/clear_refs, Linux ≥ 4.0), so "peak within" is the kernel's own high-water mark for that phase, not a
sample. RSS counts file pages too (the mmap-ed safetensors shard, shared libraries); RssAnon is what the
process allocated itself. The table's last row is the whole process's peak, what `/usr/bin/time` reports.

    python benchmarks/quickstart_memory.py                      # the whole job (~4 min on a 2-core CPU)
    python benchmarks/quickstart_memory.py --max-steps 20       # a shorter run: same peaks, fewer steps
    python benchmarks/quickstart_memory.py --trim               # malloc_trim(0) after each phase: fragmentation
    MALLOC_ARENA_MAX=2 python benchmarks/quickstart_memory.py   # glibc's arenas capped
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import give_back_freed_memory

ROOT = Path(__file__).parents[1]
MIB = 1024


def status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in KiB."""
    wanted = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    with open("/proc/self/status") as handle:
        return {line.split(":")[0]: int(line.split()[1]) for line in handle if line.startswith(wanted)}


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Rows of (phase, RSS at its end, peak within, change, anonymous RSS at its end, seconds)."""

    def __init__(self, trim: bool) -> None:
        self.rows: list[tuple[str, dict[str, int], int, int, float]] = []
        self.process_peak = 0
        self.trim = trim
        self._name = "interpreter"
        self._started_rss = 0
        self._started = time.perf_counter()
        reset_peak()

    def mark(self, name: str) -> None:
        """End the current phase and start ``name``."""
        now = status()
        peak = now["VmHWM"]
        if self.trim:
            give_back_freed_memory()
            now = status()
        self.process_peak = max(self.process_peak, peak)
        self.rows.append((self._name, now, peak, now["VmRSS"] - self._started_rss, time.perf_counter() - self._started))
        self._name, self._started_rss, self._started = name, now["VmRSS"], time.perf_counter()
        reset_peak()

    def wrap(self, owner, attribute: str, name: str, after: str | None = None) -> None:
        """Mark ``name`` when ``owner.attribute`` is called and ``after`` (default: glue) when it returns."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def marked(*args, **kwargs):
            label = name(*args, **kwargs) if callable(name) else name
            self.mark(label)
            try:
                return original(*args, **kwargs)
            finally:
                self.mark(after or f"(after {label})")

        setattr(owner, attribute, marked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps")
    parser.add_argument("--eval-limit", type=int, default=None, help="score this many held-out examples")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each phase")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="recipe override KEY=VALUE")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    phases = Phases(args.trim)
    phases.mark("imports: torch, rich, diablo_cli.training")
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine, table

    import diablo_cli.data
    import diablo_cli.methods
    import diablo_cli.training.loop as loop_module
    import diablo_cli.training.run as run_module
    import diablo_cli.training.setup as setup_module
    from diablo_cli.recipe import load_recipe

    overrides = list(args.overrides)
    if args.max_steps:
        overrides.append(f"training.max_steps={args.max_steps}")
    if args.eval_limit:
        overrides.append(f"eval.tasks.0.limit={args.eval_limit}")
    out = tempfile.mkdtemp(prefix="quickstart-memory-")
    recipe = load_recipe(ROOT / "configs/quickstart.yaml", [*overrides, f"output.dir={out}", "output.overwrite=true"])

    phases.wrap(run_module, "optimizer_class", "optimizer class", "accelerator")
    phases.wrap(setup_module, "load_base_model", "model load (tokenizer, config, weights)")
    phases.wrap(setup_module, "attach_adapter", "attach adapters")
    phases.wrap(diablo_cli.data, "prepare_data", "data preparation")
    phases.wrap(run_module, "run_eval_tasks", lambda *a, label, **k: f"eval: {label} model")
    phases.wrap(loop_module.Loop, "run", "training steps")
    phases.wrap(diablo_cli.methods.DiaBloMethod, "save", "save adapter")
    phases.wrap(run_module, "plot_loss_curve", "loss plot")

    from rich.console import Console

    console = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (open for the process)
    phases.mark("train(): folder")
    run_module.train(recipe, console=console)
    phases.mark("end")
    final = status()

    shown = [(n, s, p, d, t) for n, s, p, d, t in phases.rows if not n.startswith("(after") or abs(d) > 8 * MIB]
    rows = [
        [n, f"{s['VmRSS'] / MIB:,.0f}", f"{p / MIB:,.0f}", f"{d / MIB:+,.0f}", f"{s['RssAnon'] / MIB:,.0f}", f"{t:.1f}"]
        for n, s, p, d, t in shown
    ]
    rows.append(
        ["whole process (VmHWM)", f"{final['VmRSS'] / MIB:,.0f}", f"{phases.process_peak / MIB:,.0f}", "", "", ""]
    )
    steps = recipe.training.max_steps or "all"
    print(f"# {machine('cpu')}, torch {torch.__version__}")
    print(
        f"# quickstart: dtype {recipe.model.dtype}, {steps} steps, eval limit {args.eval_limit or 'none'}, "
        f"malloc_trim after phases: {args.trim}, MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}"
    )
    header = ["phase", "RSS at end (MiB)", "peak within (MiB)", "change (MiB)", "anon at end (MiB)", "seconds"]
    print(table(header, rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
