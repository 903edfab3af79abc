"""configs/compare/run.py, the DiaBlo-vs-LoRA comparison: its table, JSON and plot from finished run folders (tiny
runs here; the README's numbers come from the real script on SmolLM2)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

from rich.console import Console

from diablo_cli.recipe import load_recipe
from diablo_cli.train import train

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_run", ROOT / "configs" / "compare" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipes_differ_only_in_the_adapter_at_an_equal_budget():
    script = load_script()
    diablo, lora = (load_recipe(path).model_dump(mode="json") for path in script.RECIPES.values())
    assert diablo.pop("adapter")["type"] == "diablo" and lora.pop("adapter")["type"] == "lora"
    diablo["output"].pop("dir"), lora["output"].pop("dir")
    assert diablo == lora


def test_report_plots_both_methods_and_writes_the_table(tmp_path):
    script = load_script()
    quiet = Console(file=io.StringIO(), width=200)
    for method, extra in {
        "DiaBlo": [],
        "LoRA": ["adapter.type=lora", "adapter.r=2", "adapter.target_modules=QKVOGUD"],
    }.items():
        folder = script.run_dir(tmp_path, method, 1e-3)
        overrides = [f"output.dir={folder}", "training.max_steps=4", "logging.progress=false", *extra]
        train(load_recipe(TINY, overrides), console=quiet)
    runs = script.collect(tmp_path, (1e-3, 5e-3))  # lr 5e-3 was never run: left out, not an error
    assert [run["method"] for run in runs] == ["DiaBlo", "LoRA"]
    assert all(len(run["curve"]) == 4 and run["trainable"] > 0 and math.isnan(run["score"]) for run in runs)
    script.report(quiet, runs, tmp_path)
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    document = json.loads((tmp_path / "compare.json").read_text())
    assert [run["adapter"] for run in document["runs"]] == ["DiaBlo N=8 QKVOGUD", "LoRA r=2 QKVOGUD"]
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert table[0].startswith("| method | adapter | trainable |") and len(table) == 4


def test_each_run_is_diablo_train_with_the_grid_point_and_the_overrides(tmp_path, monkeypatch):
    script = load_script()
    commands = []

    def run(command, check):
        commands.append(command)
        return script.subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(script.subprocess, "run", run)
    recipe = script.RECIPES["LoRA"]
    script.train_one(Console(file=io.StringIO()), "LoRA", recipe, 2e-3, tmp_path, score_base=False,
                     overrides=["training.seed=7"])  # fmt: skip
    (command,) = commands
    assert command[1:5] == ["-m", "diablo_cli", "train", str(recipe)]
    assert command[command.index("-o") + 1] == str(tmp_path / "lora-lr0.002")
    assert "training.learning_rate=0.002" in command and "eval.compare_base=false" in command
    assert command[-1] == "--set=training.seed=7"
