"""Do a merged model and its adapter generate the same text? Greedy answers on a run's held-out task.

    diablo train configs/quickstart.yaml           # -> out/quickstart
    diablo merge --adapter out/quickstart          # -> out/quickstart-merged
    python examples/merged_generations.py [ADAPTER_DIR] [MERGED_DIR]

Loads the base + adapter (the base in the merged model's dtype) and the merged folder with plain
transformers, generates greedily for every example of the recipe's first eval task, and prints how many
generations are identical and the exact-match score of each.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from diablo_cli import load_adapter
from diablo_cli.adapter import read_adapter_config
from diablo_cli.data import generation_prompt_ids, load_raw_examples, reference_response
from diablo_cli.evaluate import exact_match, generate
from diablo_cli.models import local_model_folder
from diablo_cli.recipe import load_recipe

console = Console()


def main(adapter_dir: Path, merged_dir: Path) -> None:
    recipe = load_recipe(adapter_dir / "recipe.yaml")
    task = recipe.eval.tasks[0]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    examples = load_raw_examples(task.dataset)
    prompts = [generation_prompt_ids(example, task.dataset, tokenizer) for example in examples]
    references = [reference_response(example, task.dataset) for example in examples]

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, its saved dtype
    base_name = read_adapter_config(adapter_dir)["base_model"]["name_or_path"]
    adapted = AutoModelForCausalLM.from_pretrained(local_model_folder(base_name), dtype=merged.dtype).eval()
    load_adapter(adapted, adapter_dir)

    outputs = {}
    for label, model in (("base + adapter", adapted), ("merged", merged)):
        started = time.perf_counter()
        outputs[label] = generate(
            model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, batch_size=recipe.eval.batch_size
        )
        console.print(
            f"{label:>15}: exact match {exact_match(outputs[label], references):.1%} on {len(prompts)} "
            f"{task.name} examples ({time.perf_counter() - started:.0f}s, {merged.dtype})"
        )
    same = sum(a == b for a, b in zip(outputs["base + adapter"], outputs["merged"], strict=True))
    console.print(f"identical greedy generations: {same} of {len(prompts)}")
    for a, b, ref in list(zip(outputs["base + adapter"], outputs["merged"], references, strict=True))[:3]:
        console.print(f"  {a!r} | {b!r} (reference {ref!r})")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    adapter = Path(arguments[0] if arguments else "out/quickstart")
    main(adapter, Path(arguments[1]) if len(arguments) > 1 else adapter.with_name(adapter.name + "-merged"))
