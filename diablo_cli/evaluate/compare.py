"""The rows of a `diablo eval` comparison: which base, which adapters and models, with which template, in what
order, loading each model once.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DiaBloError
from ..run_folder import read_saved_recipe
from .runner import (
    EvalResult,
    EvalSettings,
    ModelRow,
    Progress,
    TaskSpec,
    evaluate_model,
    training_template,
)


@dataclass
class EvalPlan:
    """Everything a run needs, resolved: the base, the rows in order, the tasks and the settings."""

    base: str | None
    rows: list[ModelRow]
    tasks: list[TaskSpec]
    settings: EvalSettings = field(default_factory=EvalSettings)
    notes: list[str] = field(default_factory=list)  # what was inferred (template, base, dtype) and from where
    base_dtype: str | None = None  # the shared base's dtype: --dtype, else the adapter's training dtype


def plan_rows(
    *,
    base: str | None,
    adapters: list[Path],
    models: list[str],
    include_base: bool,
    template: str | None,
    recipe_base: str | None = None,
    recipe_template: str | None = None,
) -> tuple[str | None, list[ModelRow], list[str]]:
    """The base to load and one row per model: the base (unless left out), each adapter, each standalone model.

    The base is ``--base``, else the recipe's, else the one the first adapter records. Each adapter row uses
    the template its own saved recipe trained with; the base row uses the first adapter's (so the two differ
    only by the adapter); ``template`` (``--template``) overrides them all.
    """
    from ..methods import recorded_base

    notes: list[str] = []
    rows: list[ModelRow] = []
    adapter_templates: list[str | None] = []
    recorded_bases: list[str | None] = []
    for directory in adapters:
        recorded_bases.append(recorded_base(directory))
        adapter_templates.append(training_template(read_saved_recipe(directory)))
    base = base or recipe_base or next((b for b in recorded_bases if b), None)
    if adapters and base is None:
        raise DiaBloError(f"{adapters[0]} does not record its base model; name it with --base")
    first_known = next((t for t in adapter_templates if t), None)
    shared = template or recipe_template or first_known
    if include_base and base is not None:
        rows.append(ModelRow("base", template=shared))
    labels: set[str] = {"base"}
    for directory, own, recorded in zip(adapters, adapter_templates, recorded_bases, strict=True):
        label = _unique_label(Path(directory).name or str(directory), labels)
        chosen = template or own or shared
        rows.append(ModelRow(label, adapter=Path(directory), template=chosen))
        if recorded and base and Path(recorded).name != Path(base).name and recorded != base:
            notes.append(f"{label} was trained on {recorded}; evaluating it on {base}")
        if own and not template:
            notes.append(f"{label}: built-in tasks are prompted with the {own!r} template of its training recipe")
    for name in models:
        label = _unique_label(Path(name).name or name, labels)
        rows.append(ModelRow(label, model=name, template=shared))
    if not rows:
        raise DiaBloError("nothing to evaluate: give --base, --adapter or --model (or a recipe)")
    return base, rows, notes


def _unique_label(label: str, taken: set[str]) -> str:
    candidate, number = label, 2
    while candidate in taken:
        candidate, number = f"{label}-{number}", number + 1
    taken.add(candidate)
    return candidate


def run_evaluation(
    plan: EvalPlan,
    *,
    progress: Callable[[str], Progress] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> EvalResult:
    """Evaluate every row of the plan; the base is loaded once and carries each adapter in turn.

    ``progress(label)`` returns the per-task progress callback for a row (the CLI draws a bar with it).
    """
    from ..methods import attach_saved_adapter, detach_saved_adapter
    from ..models import load_base_model
    from ..quantize.trainable import prepare_quantized_training

    settings = plan.settings
    result = EvalResult()

    def score(model, tokenizer, row: ModelRow) -> None:
        evaluate_model(
            model,
            tokenizer,
            plan.tasks,
            label=row.label,
            template=row.template,
            settings=settings,
            result=result,
            progress=progress(row.label) if progress else None,
            log=log,
        )

    def load(name: str, dtype: str | None):
        log(f"loading {name}")
        model, tokenizer = load_base_model(
            name,
            dtype=dtype,
            trust_remote_code=settings.trust_remote_code,
            revision=settings.revision,
            on_dtype=lambda choice: log(
                f"{name}: {choice.describe()}" + (f"; {choice.warning}" if choice.warning else "")
            ),
        )
        # A quantized base keeps the kernels it trained with: bitsandbytes' CPU repacking would otherwise fail on
        # shapes its kernel does not take, and the scores would come from other arithmetic than training's.
        prepare_quantized_training(model)
        return model, tokenizer

    shared_rows = [row for row in plan.rows if row.model is None]
    if shared_rows:
        model, tokenizer = load(plan.base, plan.base_dtype or settings.dtype)
        for row in shared_rows:
            if row.adapter is not None:
                model = attach_saved_adapter(model, row.adapter)
            try:
                score(model, tokenizer, row)
            finally:
                if row.adapter is not None:
                    model = detach_saved_adapter(model)
        del model
        gc.collect()
    for row in plan.rows:
        if row.model is not None:
            model, tokenizer = load(row.model, settings.dtype)
            score(model, tokenizer, row)
            del model
            gc.collect()
    return result


def build_plan(
    *,
    recipe=None,
    base: str | None = None,
    adapters: list[Path] | None = None,
    models: list[str] | None = None,
    task_names: list[str] | None = None,
    specs: list[TaskSpec] | None = None,
    data: str | None = None,
    include_base: bool = True,
    template: str | None = None,
    scoring: str | None = None,
    max_new_tokens: int | None = None,
    stop: list[str] | None = None,
    sampling=None,
    settings: EvalSettings | None = None,
) -> EvalPlan:
    """Resolve a `diablo eval` invocation: flags win over the recipe's `eval:` section, which wins over what the
    first adapter's saved recipe says (dtype, template). ``specs`` (Python API) gives the tasks directly."""
    from .runner import spec_from_name, spec_from_recipe_task

    adapters = [Path(a) for a in adapters or []]
    settings = settings or EvalSettings()
    for directory in adapters:
        if not Path(directory).is_dir():
            raise DiaBloError(f"--adapter {directory}: no such folder (give a `diablo train` output folder)")
    if specs:
        specs = list(specs)
    elif task_names:
        if data is not None and len(task_names) != 1:
            raise DiaBloError("--data is the local copy of one task's data: give exactly one --task with it")
        specs = [
            spec_from_name(
                name, data, scoring=scoring, sampling=sampling, max_new_tokens=max_new_tokens, stop=tuple(stop or ())
            )
            for name in task_names
        ]
    elif recipe is not None and recipe.eval.tasks:
        specs = [spec_from_recipe_task(task, recipe.data.max_length) for task in recipe.eval.tasks]
    elif settings.harness:
        specs = []
    else:
        from .tasks import TASKS

        raise DiaBloError(f"no task to run: give --task NAME (built-in: {', '.join(TASKS)}, loss) or a recipe")
    saved = read_saved_recipe(adapters[0]) if adapters else None
    base_dtype = settings.dtype
    if base_dtype is None:  # as trained; standalone models (--model) run in the auto dtype unless --dtype says
        source = recipe.model.dtype if recipe is not None else ((saved or {}).get("model") or {}).get("dtype")
        base_dtype = None if source in (None, "auto") else source
    recipe_template = None
    if recipe is not None:
        recipe_template = recipe.eval.template or training_template(recipe.model_dump(mode="json"))
    base, rows, notes = plan_rows(
        base=base,
        adapters=adapters,
        models=list(models or []),
        include_base=include_base and (recipe is None or recipe.eval.compare_base or not adapters),
        template=template,
        recipe_base=recipe.base_model if recipe is not None else None,
        recipe_template=recipe_template,
    )
    if base_dtype and any(row.model is None for row in rows):
        inferred = settings.dtype is None and (saved is not None or recipe is not None)
        notes.append(f"{base} runs in {base_dtype}" + (" (as the adapter was trained)" if inferred else ""))
    return EvalPlan(base, rows, specs, settings, notes, base_dtype)
