"""`diablo train`: recipe → base + adapter → data → the loop (loop.py) → adapter, summary and plot on disk.

``train`` holds the run folder for the whole run; ``_train_in_folder`` reads as the recipe's story, each line a
part built in setup.py or here.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..atomic import save_pretrained_into, write_text_atomic
from ..checkpoint import (
    TrainerState,
    find_checkpoint,
    last_good_checkpoint,
    load_checkpoint,
)
from ..distributed import (
    accelerator_on_cpu,
    gather_trainable,
    is_sharded,
    join_cpu_processes,
    load_full_optimizer_state,
)
from ..errors import DiaBloError
from ..recipe import Recipe
from ..report import format_metric, plot_loss_curve, spinner
from ..run_folder import (
    LOSS_PLOT,
    METRICS_FILE,
    RECIPE_FILE,
    SUMMARY_FILE,
    RunFolder,
    disk_advice,
    disk_errno,
    newest_intact_checkpoint,
)
from ..tracking import MetricsLog, read_metrics
from .evals import run_eval_tasks, tasks_to_score
from .loop import Loop, stop_on_signals
from .setup import build_optimizer, load_and_attach, optimizer_class, plan_steps, start_processes, training_layout


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    seconds: float
    tokens_per_second: float
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)  # the trained model, adapters attached


def train(
    recipe: Recipe,
    *,
    resume: str | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Run a recipe to the end (or to an interruption, which leaves a checkpoint to ``resume`` from)."""
    from accelerate import Accelerator

    console = console or Console()
    optimizer_cls, optimizer_kwargs = optimizer_class(recipe)  # before Accelerator: it resets accelerate's state
    join_cpu_processes()
    accelerator = Accelerator(mixed_precision=recipe.training.mixed_precision, cpu=accelerator_on_cpu())
    folder = None
    if accelerator.is_main_process:  # one process holds the folder; the others write only through it
        folder = RunFolder.claim(
            Path(recipe.output.dir), overwrite=recipe.output.overwrite, resuming=resume is not None
        )
        if folder.cleaned:
            console.print(f"removed what interrupted runs left in {folder.path}: {', '.join(folder.cleaned)}")
    try:
        return _train_in_folder(recipe, resume, console, accelerator, optimizer_cls, optimizer_kwargs, folder)
    except BaseException as err:
        if folder is not None and folder.discard():
            console.print(f"removed what this run wrote in {folder.path}: it stopped before its first checkpoint")
        code = disk_errno(err)
        if code is None:
            raise
        written = Path(getattr(err, "filename", None) or recipe.output.dir)
        path = written.parent if written.name.startswith(".") else written  # a staging file: name its folder
        raise DiaBloError(f"cannot write {path}: {os.strerror(code)}; {_after_disk_fault(recipe, code)}") from None
    finally:
        if folder is not None:
            folder.release()


def _train_in_folder(
    recipe: Recipe, resume: str | None, console: Console, accelerator, optimizer_cls, optimizer_kwargs, folder
) -> TrainResult:
    """``train`` once the main process holds the output folder (``folder``; None on the other processes): the
    recipe's story, each part built in setup.py, run in loop.py, or written below."""
    main, processes = accelerator.is_main_process, accelerator.num_processes
    say = console if main else None  # one process reports
    output_dir = Path(recipe.output.dir)
    engine = start_processes(recipe, accelerator)
    method, model, tokenizer, report, loss_path = load_and_attach(recipe, accelerator, say)
    checkpoint = _checkpoint_to_resume(output_dir, resume, say)
    if checkpoint is not None:  # the weights go in before accelerate shards them; the optimizer's state after
        method.restore(model, checkpoint)
    data, collator = _prepare_data(recipe, tokenizer, model.config, say)
    steps = plan_steps(recipe.training, len(data.train), processes)
    model, optimizer, scheduler = build_optimizer(recipe, accelerator, model, optimizer_cls, optimizer_kwargs, steps)
    state = TrainerState(recipe=recipe.model_dump(mode="json"), data_fingerprint=data.train._fingerprint)
    if checkpoint is not None:
        state = _resume_state(recipe, checkpoint, accelerator, model, optimizer, scheduler, engine, data, say)

    eval_tasks = tasks_to_score(recipe, engine, processes, method.deliverable, say)
    eval_before: dict[str, float] = {}
    if eval_tasks and recipe.eval.compare_base and resume is None and main:
        eval_before = run_eval_tasks(recipe, accelerator.unwrap_model(model), tokenizer, console, label="base")

    metrics = _open_metrics(recipe, state, resume) if main else None
    if main:
        console.print(steps.describe(recipe.training, processes))
    loop = Loop(
        recipe,
        method,
        accelerator,
        model,
        optimizer,
        scheduler,
        data,
        collator,
        state,
        metrics,
        output_dir,
        steps.batches_per_epoch,
        engine,
        loss_path,
        console=say,
    )
    started = time.perf_counter()
    try:
        with stop_on_signals() as stop_flag:
            loop.run(steps.total_steps, stop_flag, console if main and recipe.logging.progress else None)
    finally:
        if metrics is not None:
            metrics.close()
    seconds = time.perf_counter() - started

    unwrapped = accelerator.unwrap_model(model)
    gathered = gather_trainable(accelerator, model, engine) if is_sharded(engine) else None  # every rank takes part
    eval_after: dict[str, float] = {}
    if main:
        _save_deliverable(recipe, method, unwrapped, tokenizer, gathered, folder)
        if eval_tasks:
            eval_after = run_eval_tasks(recipe, unwrapped, tokenizer, console, label="fine-tuned")
    accelerator.wait_for_everyone()
    tokens_per_second = loop.tokens_this_session / seconds if seconds else 0.0
    result = TrainResult(
        output_dir, state.global_step, state.last_loss, seconds, tokens_per_second, eval_before, eval_after, unwrapped
    )
    if main:
        _write_summary(result, report, data.stats)
        _print_result(console, result, method.deliverable)
    return result


def _checkpoint_to_resume(output_dir: Path, resume: str | None, console: Console | None) -> Path | None:
    """The checkpoint ``--resume`` names (``latest``: the newest intact one), warning of damaged ones skipped."""
    if resume is None:
        return None
    notes: list[str] = []
    checkpoint = find_checkpoint(output_dir, resume, notes)
    for line in notes if console is not None else []:
        console.print(f"[yellow]warning:[/] {line}")
    return checkpoint


def _prepare_data(recipe: Recipe, tokenizer, config, console: Console | None):
    """The recipe's data, tokenised and masked in the layout the base's architecture learns from, and the
    collator that pads its batches."""
    from ..data import DataCollator, prepare_data  # datasets loads here, not when `diablo inspect` shows a plan

    seq2seq = training_layout(config) == "seq2seq"
    with spinner(console, "preparing data") if console is not None else nullcontext():
        data = prepare_data(recipe.data, tokenizer, seed=recipe.training.seed, seq2seq=seq2seq)
    if console is not None:
        _print_data_stats(console, data.stats, recipe)
    start = config.decoder_start_token_id if seq2seq else None
    return data, DataCollator(pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=start)


def _resume_state(
    recipe: Recipe, checkpoint: Path, accelerator, model, optimizer, scheduler, engine: str, data, console
) -> TrainerState:
    """The checkpoint's optimizer, schedule and RNG states back in place, and its trainer state, now carrying
    this run's recipe (the differences from the saved one are warned of)."""
    state = load_checkpoint(
        checkpoint,
        lambda saved: load_full_optimizer_state(accelerator, model, optimizer, engine, saved),
        scheduler,
        rank=accelerator.process_index,
    )
    if console is not None:
        _warn_on_resume_differences(console, state, recipe, data.train._fingerprint, checkpoint)
    state.recipe = recipe.model_dump(mode="json")
    return state


def _open_metrics(recipe: Recipe, state: TrainerState, resume: str | None) -> MetricsLog:
    """The run's recipe on disk, and its metrics log (rewound to the checkpoint's step on a resume)."""
    output_dir = Path(recipe.output.dir)
    write_text_atomic(output_dir / RECIPE_FILE, recipe.to_yaml())
    return MetricsLog(
        output_dir,
        tensorboard=recipe.logging.tensorboard,
        wandb=recipe.logging.wandb,
        wandb_project=recipe.logging.wandb_project,
        run_config=recipe.model_dump(mode="json"),
        resume_step=state.global_step if resume is not None else None,
    )


def _save_deliverable(recipe: Recipe, method, model, tokenizer, tensors, folder: RunFolder) -> None:
    """The method's deliverable (and the tokenizer) into the run folder, recorded as diablo's, then the loss plot."""
    output_dir = Path(recipe.output.dir)
    try:
        method.save(model, output_dir, base_model=recipe.base_model, tensors=tensors)
        if recipe.output.save_tokenizer:
            save_pretrained_into(tokenizer, output_dir, prefix=".tokenizer-")
    finally:  # even cut short, what was written is diablo's
        folder.record_written()
    folder.saved = True
    plot_loss_curve(read_metrics(output_dir / METRICS_FILE), output_dir / LOSS_PLOT, title=_plot_title(recipe))


def _after_disk_fault(recipe: Recipe, code: int) -> str:
    """What to do after a full disk or a blocked write ended a run, naming the checkpoint that survives it."""
    intact, _ = newest_intact_checkpoint(Path(recipe.output.dir))
    if intact is None:
        return f"{disk_advice(code)}, then run again"
    return f"the checkpoint {intact} is intact: {disk_advice(code)}, then continue with --resume"


def _warn_on_resume_differences(console, state: TrainerState, recipe: Recipe, fingerprint: str, path: Path) -> None:
    console.print(f"resuming from {path} at step {state.global_step}")
    if state.health is not None and not state.health.good:
        good = last_good_checkpoint(path.parent.parent)
        instead = f"; the last good one is {good[0]}" if good is not None else ""
        console.print(f"[yellow]warning:[/] {path.name} is not a good checkpoint: {state.health.describe()}{instead}")
    saved, current = _flatten(state.recipe), _flatten(recipe.model_dump(mode="json"))
    changed = sorted(
        k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and not k.startswith("output.")
    )
    if changed:
        console.print(f"[yellow]warning:[/] the recipe differs from the checkpoint's in: {', '.join(changed[:6])}")
    if state.data_fingerprint and state.data_fingerprint != fingerprint:
        console.print("[yellow]warning:[/] the training data differ from the checkpoint's; batches will not replay")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _print_data_stats(console: Console, stats, recipe: Recipe) -> None:
    cut = f", {stats.truncated} cut to max_length {recipe.data.max_length}" if stats.truncated else ""
    dropped = f", {stats.dropped_no_supervision} dropped (no supervised token)" if stats.dropped_no_supervision else ""
    packed = f", packed into {stats.packed_rows} rows" if stats.packed_rows else ""
    console.print(
        f"data: {stats.train_examples} training and {stats.validation_examples} validation examples{cut}{dropped}"
        f"{packed}; {stats.supervised_tokens:,} of {stats.total_tokens:,} tokens supervised"
    )


def _plot_title(recipe: Recipe) -> str:
    return f"{recipe.base_model} · {recipe.adapter.describe()} · lr {recipe.training.learning_rate}"


def _write_summary(result: TrainResult, report, stats) -> None:
    import json

    summary = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
        "parameters": report.to_dict(),
        "data": stats.__dict__,
    }
    write_text_atomic(result.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")


def _print_result(console: Console, result: TrainResult, deliverable: str) -> None:
    console.print(
        f"[bold green]done:[/] {result.steps} steps in {result.seconds:.0f}s "
        f"({result.tokens_per_second:,.0f} tokens/s); {deliverable} in {result.output_dir}/"
    )
    for key, after in result.eval_after.items():
        task, _, metric = key.partition(":")
        before = result.eval_before.get(key)
        shown = format_metric(metric, after)
        change = f"{format_metric(metric, before)} → {shown}" if before is not None else shown
        console.print(f"  {task}: {metric.replace('_', ' ')} {change}")
