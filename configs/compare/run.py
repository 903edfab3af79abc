"""DiaBlo vs LoRA at an equal budget on the quickstart task: the same steps and learning-rate grid, one PNG.

    python configs/compare/run.py                       # both recipes × the grid, then the plot and the table
    python configs/compare/run.py --lr 2e-3 --lr 5e-3   # another grid
    python configs/compare/run.py --report-only         # re-plot and re-print finished runs
    python configs/compare/run.py --set training.seed=7 --output out/compare-seed7   # another seed

Each run is `diablo train RECIPE --set training.learning_rate=LR` in its own process (a fresh model, no memory
carried over), alternating between the recipes so that a slow spell of the machine does not favour one. Writes
out/compare/<method>-lr<LR>/ (a normal run folder each), out/compare/compare.png (every loss curve, the best
learning rate of each method drawn bold) and out/compare/compare.json; prints the final held-out exact match.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from diablo_cli.recipe import load_recipe
from diablo_cli.report import plot_curves
from diablo_cli.run_folder import METRICS_FILE, RECIPE_FILE, SUMMARY_FILE
from diablo_cli.tracking import read_metrics

HERE = Path(__file__).parent
RECIPES = {"DiaBlo": HERE / "diablo.yaml", "LoRA": HERE / "lora.yaml"}
GRID = (1e-3, 2e-3, 5e-3)
OUTPUT = Path("out/compare")
COLOURS = {"DiaBlo": "tab:blue", "LoRA": "tab:orange"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, action="append", help=f"learning rates (default {GRID})")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--report-only", action="store_true", help="only plot and print finished runs")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a recipe override for both methods, e.g. training.seed=7 (with its own --output)",
    )  # fmt: skip
    args = parser.parse_args()
    grid = tuple(args.lr or GRID)
    console = Console()
    if not args.report_only:
        base_run = True
        for lr in grid:
            for method, recipe in RECIPES.items():
                train_one(console, method, recipe, lr, args.output, score_base=base_run, overrides=args.overrides)
                base_run = False
    runs = collect(args.output, grid)
    if not runs:
        sys.exit(f"no finished runs under {args.output}; run without --report-only first")
    report(console, runs, args.output)


def run_dir(output: Path, method: str, lr: float) -> Path:
    return output / f"{method.lower()}-lr{lr:g}"


def train_one(
    console: Console, method: str, recipe: Path, lr: float, output: Path, *, score_base: bool, overrides: list[str]
) -> None:
    target = run_dir(output, method, lr)
    console.rule(f"{method}, learning rate {lr:g} → {target}")
    command = [
        sys.executable, "-m", "diablo_cli", "train", str(recipe), "-o", str(target), "--overwrite",
        "--set", f"training.learning_rate={lr}", "--set", "logging.progress=false",
        "--set", f"eval.compare_base={'true' if score_base else 'false'}",
        *(f"--set={override}" for override in overrides),
    ]  # fmt: skip
    done = subprocess.run(command, check=False)
    if done.returncode != 0:  # diablo train has said why, in one line, above
        sys.exit(f"{method} at learning rate {lr:g} failed (exit {done.returncode}); the runs before it are kept")


def collect(output: Path, grid: tuple[float, ...]) -> list[dict]:
    """Every finished run of the grid: its loss curve, final held-out score, parameters and time."""
    runs = []
    for lr in grid:
        for method in RECIPES:
            folder = run_dir(output, method, lr)
            summary_path = folder / SUMMARY_FILE
            if not summary_path.is_file():
                continue
            summary = json.loads(summary_path.read_text())
            metric, score = next(iter(summary["eval_after"].items()), ("—", float("nan")))
            runs.append(
                {
                    "method": method,
                    "lr": lr,
                    "adapter": load_recipe(folder / RECIPE_FILE).adapter.describe(),
                    "trainable": summary["parameters"]["trainable"],
                    "final_loss": summary["final_loss"],
                    "metric": metric,
                    "score": score,
                    "base_score": next(iter(summary["eval_before"].values()), None),
                    "seconds": summary["seconds"],
                    "curve": [(m["step"], m["loss"]) for m in read_metrics(folder / METRICS_FILE) if "loss" in m],
                }
            )
    return runs


def report(console: Console, runs: list[dict], output: Path) -> None:
    best = {}
    for run in runs:
        if run["method"] not in best or run["score"] > best[run["method"]]["score"]:
            best[run["method"]] = run
    curves = {}
    for run in runs:
        chosen = best[run["method"]] is run
        label = f"{run['method']} lr {run['lr']:g}" + (" (best)" if chosen else "")
        style = {
            "color": COLOURS.get(run["method"]),
            "linewidth": 2.0 if chosen else 0.8,
            "alpha": 1 if chosen else 0.45,
        }
        curves[label] = (run["curve"], style)
    title = "SmolLM2-135M, quickstart dates task, QKVOGUD\nDiaBlo N=32 vs LoRA r=11 (equal budget), same steps and data"
    plot_curves(curves, output / "compare.png", title)
    base = next((r["base_score"] for r in runs if r["base_score"] is not None), None)
    table = Table(title="held-out exact match after training (200 examples)", title_justify="left")
    for column in ("method", "adapter", "trainable", "lr", "final train loss", "exact match", "training time"):
        table.add_column(column, justify="left" if column in ("method", "adapter") else "right")
    for run in runs:
        mark = " ★" if best[run["method"]] is run else ""
        table.add_row(
            run["method"], run["adapter"], f"{run['trainable']:,}", f"{run['lr']:g}", f"{run['final_loss']:.4f}",
            f"{100 * run['score']:.1f}%{mark}", f"{run['seconds']:.0f} s",
        )  # fmt: skip
    console.print(table)
    if base is not None:
        console.print(f"base model before training: {100 * base:.1f}% exact match")
    console.print(f"loss curves: {output / 'compare.png'}")
    document = [{k: v for k, v in run.items() if k != "curve"} for run in runs]
    (output / "compare.json").write_text(json.dumps({"base_score": base, "runs": document}, indent=2) + "\n")
    (output / "compare.md").write_text(markdown_table(runs, best))
    console.print(f"the table as Markdown: {output / 'compare.md'}")


def markdown_table(runs: list[dict], best: dict) -> str:
    """The same table for a README."""
    lines = [
        "| method | adapter | trainable | lr | final train loss | exact match | training time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        mark = " (best)" if best[run["method"]] is run else ""
        lines.append(
            f"| {run['method']} | {run['adapter']} | {run['trainable']:,} | {run['lr']:g} | {run['final_loss']:.4f} "
            f"| {100 * run['score']:.1f}%{mark} | {run['seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
