"""The recipe's eval tasks, scored before and after training with `diablo eval`'s runner."""

from __future__ import annotations

from rich.console import Console

from ..distributed import is_sharded
from ..evaluate.runner import (
    EvalResult,
    EvalSettings,
    evaluate_model,
    headline_metric,
    spec_from_recipe_task,
    training_template,
)
from ..recipe import Recipe
from ..report import format_metric, spinner


def run_eval_tasks(recipe: Recipe, model, tokenizer, console: Console, *, label: str) -> dict[str, float]:
    """Score the recipe's eval tasks with `diablo eval`'s runner (same prompts, same judges), one line per task.

    Returns each task's headline metric, keyed "task:metric" (e.g. "dates:exact_match"). Code tasks are left
    to `diablo eval --allow-code-execution`: training never runs generated code.
    """
    specs = [spec_from_recipe_task(task, recipe.data.max_length) for task in recipe.eval.tasks]
    skipped = [spec.name for spec in specs if spec.family == "code"]
    if skipped:
        console.print(f"[dim]{', '.join(skipped)}: run generated code only with diablo eval --allow-code-execution[/]")
    specs = [spec for spec in specs if spec.family != "code"]
    settings = EvalSettings(batch_size=recipe.eval.batch_size, seed=recipe.eval.seed)
    template = recipe.eval.template or training_template(recipe.model_dump(mode="json"))
    result = EvalResult()
    scores: dict[str, float] = {}
    for spec in specs:
        with spinner(console, f"evaluating {label} model on {spec.name}"):
            row = evaluate_model(
                model, tokenizer, [spec], label=label, template=template, settings=settings, result=result
            )
        metric, value = headline_metric(row[spec.name])
        scores[f"{spec.name}:{metric}"] = value
        example = next((r for r in result.predictions if r["task"] == spec.name), {})
        shown = example.get("generation", example.get("extracted"))
        sample = f"; e.g. {shown!r} for {example.get('reference')!r}" if "reference" in example else ""
        console.print(
            f"{label} model, {spec.name}: {metric.replace('_', ' ')} [bold]{format_metric(metric, value)}[/] on "
            f"{int(row[spec.name]['n'])} held-out examples ({result.seconds[f'{label}/{spec.name}']:.0f}s){sample}"
        )
    return scores


def tasks_to_score(recipe: Recipe, engine: str, processes: int, deliverable: str, console: Console | None) -> list:
    """The recipe's eval tasks this run can score itself: none while an engine shards the model (generation runs
    in one process), which ``console`` hears about."""
    if not is_sharded(engine):
        return recipe.eval.tasks
    if recipe.eval.tasks and console is not None:
        console.print(
            f"eval: the model is sharded over {processes} processes under {engine}, and generation runs on one; "
            f"score the saved {deliverable} with diablo eval afterwards"
        )
    return []
