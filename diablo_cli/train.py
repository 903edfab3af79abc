"""`diablo train`: recipe → base + DiaBlo adapter → data → the accelerate loop → adapter on disk.

The loop counts optimizer steps. Each step takes a window of ``gradient_accumulation_steps``
micro-batches and normalises the loss by the supervised tokens of the whole window (summed over
processes), so the gradient is the same however the window is split into micro-batches or processes.
Data order depends only on the seed and the epoch, which is what lets a resumed run replay the exact
batches the interrupted one would have seen.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from .adapter.budget import ParameterReport
from .atomic import save_pretrained_into, write_text_atomic
from .checkpoint import (
    CHECKPOINTS,
    TrainerState,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    torch_rng_states,
)
from .distributed import (
    accelerator_on_cpu,
    backward,
    clip_gradients,
    configure_sharding,
    full_optimizer_state,
    gather_trainable,
    is_sharded,
    load_full_optimizer_state,
    sharding_engine,
)
from .errors import DiaBloError, TrainingStopped
from .interrupts import Interrupted
from .methods import TrainingMethod, training_method
from .models import base_quantization, load_base_model
from .quantize.trainable import prepare_quantized_training
from .recipe import Recipe
from .report import plot_loss_curve, spinner, training_progress
from .tracking import METRICS_FILE, MetricsLog, memory_in_use, read_metrics

RECIPE_FILE = "recipe.yaml"
LOSS_PLOT = "loss.png"
SUMMARY_FILE = "train_summary.json"
_RUN_MARKERS = (RECIPE_FILE, METRICS_FILE, CHECKPOINTS, "adapter_config.json")


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
    from accelerate.utils import set_seed

    console = console or Console()
    training = recipe.training
    optimizer_cls, optimizer_kwargs = optimizer_class(recipe)  # before Accelerator: it resets accelerate's state
    accelerator = Accelerator(mixed_precision=training.mixed_precision, cpu=accelerator_on_cpu())
    main = accelerator.is_main_process
    output_dir = Path(recipe.output.dir)
    if main:
        prepare_output_dir(output_dir, overwrite=recipe.output.overwrite, resuming=resume is not None)
    if not main:  # one process reports; the others would repeat every loading bar and warning
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    accelerator.wait_for_everyone()
    set_seed(training.seed, device_specific=True)  # rank 0 keeps the seed; other ranks draw their own dropout

    model, tokenizer = load_base_model(
        recipe.base_model,
        dtype=recipe.torch_dtype_name,
        trust_remote_code=recipe.model.trust_remote_code,
        revision=recipe.model.revision,
        attn_implementation=recipe.model.attn_implementation,
        quantization=recipe.model.quantization,
        device=accelerator.device,
    )
    quantized = prepare_quantized_training(model)  # before any forward pass: see quantize/trainable.py
    if main and quantized is not None:
        console.print(f"base: {quantized.describe()}")
    method, model, report = attach_adapter(recipe, model, console if main else None)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    engine = sharding_engine(accelerator)
    sharding_notes = configure_sharding(
        accelerator,
        model,
        micro_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_grad_norm=training.max_grad_norm,
    )
    if main:
        for line in sharding_notes:
            console.print(line)
    checkpoint = find_checkpoint(output_dir, resume) if resume is not None else None
    if checkpoint is not None:  # the weights go in before accelerate shards them; the optimizer's state after
        method.restore(model, checkpoint)

    from .data import DataCollator, prepare_data

    with spinner(console, "preparing data") if main else nullcontext():
        data = prepare_data(recipe.data, tokenizer, seed=training.seed)
    if main:
        _print_data_stats(console, data.stats, recipe)
    collator = DataCollator(pad_token_id=tokenizer.pad_token_id)

    processes = accelerator.num_processes
    batches_per_epoch = math.ceil(len(data.train) / (training.micro_batch_size * processes))  # per process
    steps_per_epoch = math.ceil(batches_per_epoch / training.gradient_accumulation_steps)
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))
    warmup = training.warmup_steps or math.ceil(training.warmup_ratio * total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls([{"params": trainable, "weight_decay": training.weight_decay}], **optimizer_kwargs)
    scheduler = build_scheduler(optimizer, recipe.training.lr_scheduler, warmup, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainerState(recipe=recipe.model_dump(mode="json"), data_fingerprint=data.train._fingerprint)
    if checkpoint is not None:
        state = load_checkpoint(
            checkpoint,
            lambda saved: load_full_optimizer_state(accelerator, model, optimizer, engine, saved),
            scheduler,
            rank=accelerator.process_index,
        )
        if main:
            _warn_on_resume_differences(console, state, recipe, data.train._fingerprint, checkpoint)
        state.recipe = recipe.model_dump(mode="json")

    eval_before: dict[str, float] = {}
    eval_tasks = recipe.eval.tasks if not is_sharded(engine) else []
    if recipe.eval.tasks and not eval_tasks and main:
        console.print(
            f"eval: the model is sharded over {processes} processes under {engine}, and generation runs on one; "
            f"score the saved {method.deliverable} with diablo eval afterwards"
        )
    if eval_tasks and recipe.eval.compare_base and resume is None and main:
        eval_before = run_eval_tasks(recipe, accelerator.unwrap_model(model), tokenizer, console, label="base")

    metrics = None
    if main:
        write_text_atomic(output_dir / RECIPE_FILE, recipe.to_yaml())
        metrics = MetricsLog(
            output_dir,
            tensorboard=recipe.logging.tensorboard,
            wandb=recipe.logging.wandb,
            wandb_project=recipe.logging.wandb_project,
            run_config=recipe.model_dump(mode="json"),
            resume_step=state.global_step if resume is not None else None,
        )
        console.print(
            f"training {total_steps} steps ({steps_per_epoch} per epoch): global batch "
            f"{training.micro_batch_size} × {training.gradient_accumulation_steps} accumulation × {processes} "
            f"process(es) = {training.micro_batch_size * training.gradient_accumulation_steps * processes} examples"
        )

    loop = _Loop(
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
        batches_per_epoch,
        engine,
    )
    started = time.perf_counter()
    try:
        with _stop_on_signals() as stop_flag:
            loop.run(total_steps, stop_flag, console if main and recipe.logging.progress else None)
    finally:
        if metrics is not None:
            metrics.close()
    seconds = time.perf_counter() - started

    unwrapped = accelerator.unwrap_model(model)
    gathered = gather_trainable(accelerator, model, engine) if is_sharded(engine) else None  # every rank takes part
    eval_after: dict[str, float] = {}
    if main:
        method.save(unwrapped, output_dir, base_model=recipe.base_model, tensors=gathered)
        if recipe.output.save_tokenizer:
            save_pretrained_into(tokenizer, output_dir, prefix=".tokenizer-")
        plot_loss_curve(read_metrics(output_dir / METRICS_FILE), output_dir / LOSS_PLOT, title=_plot_title(recipe))
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


def attach_adapter(
    recipe: Recipe, model: torch.nn.Module, console: Console | None
) -> tuple[TrainingMethod, torch.nn.Module, ParameterReport]:
    """Put the recipe's adapter (or baseline) on ``model``; print its parameter table when given a console.
    Returns the method, the model to train (PEFT wraps it) and its parameter report."""
    method = training_method(recipe.adapter)
    model = method.attach(model)
    report = method.report(model)
    if console is not None:
        console.print(method.table(model, title=f"{recipe.adapter.describe()} on {recipe.base_model}"))
        for line in method.notes(model):
            console.print(line)
    return method, model, report


class _Loop:
    """The step loop, with its bookkeeping kept in one place (TrainerState) so checkpoints capture it."""

    def __init__(
        self,
        recipe,
        method: TrainingMethod,
        accelerator,
        model,
        optimizer,
        scheduler,
        data,
        collator,
        state,
        metrics,
        output_dir,
        batches_per_epoch,
        engine: str = "none",
    ):
        self.recipe, self.training, self.method = recipe, recipe.training, method
        self.engine = engine  # distributed.sharding_engine: how backward, clipping and checkpoints go
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.data, self.collator, self.state, self.metrics, self.output_dir = data, collator, state, metrics, output_dir
        self.tokens_this_session = 0
        self._window_losses: list[float] = []
        self._window_tokens = 0
        self._window_started = time.perf_counter()
        self._grad_norm: float | None = None
        self.batches_per_epoch = batches_per_epoch  # micro-batches per epoch and process

    def run(self, total_steps: int, stop_flag: dict, console: Console | None) -> None:
        progress_context = training_progress(console, total_steps, self.state.global_step) if console else None
        progress, task = progress_context if progress_context else (None, None)
        with progress if progress is not None else nullcontext():
            while self.state.global_step < total_steps:
                for window in self._windows():
                    self._step(window)
                    self._after_step(total_steps, progress, task)
                    if stop_flag.get("signal"):
                        self._stop_for_signal(stop_flag["signal"])
                    if self.state.global_step >= total_steps:
                        return
                self.state.epoch += 1
                self.state.batches_into_epoch = 0

    def _windows(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """This epoch's micro-batches in windows of ``gradient_accumulation_steps``, skipping those consumed
        before a resume. The order depends only on (seed, epoch)."""
        from torch.utils.data import DataLoader

        rows = self.data.train
        if self.recipe.data.shuffle:
            rows = rows.shuffle(seed=self.training.seed + self.state.epoch)
        loader = DataLoader(
            rows,
            batch_size=self.training.micro_batch_size,
            collate_fn=self.collator,
            generator=_private_generator(self.training.seed),
        )
        loader = self.accelerator.prepare_data_loader(loader, device_placement=True)
        if self.state.batches_into_epoch:
            loader = self.accelerator.skip_first_batches(loader, self.state.batches_into_epoch)
        window: list[dict[str, torch.Tensor]] = []
        for batch in loader:
            window.append(batch)
            if len(window) == self.training.gradient_accumulation_steps:
                yield window
                window = []
        if window:
            yield window

    def _step(self, window: list[dict[str, torch.Tensor]]) -> None:
        accelerator, model = self.accelerator, self.model
        model.train()
        supervised = sum(int((b["labels"][..., 1:] != -100).sum()) for b in window)
        supervised_all = int(accelerator.reduce(torch.tensor(supervised, device=accelerator.device), "sum"))
        if supervised_all == 0:
            raise DiaBloError(
                f"step {self.state.global_step + 1}: a batch of examples has no supervised tokens (every label is "
                "masked), so there is nothing to learn; check data.max_length against your prompts, or set "
                "data.train_on_inputs: true"
            )
        window_loss = 0.0
        for index, batch in enumerate(window):
            last = index == len(window) - 1
            with nullcontext() if last else accelerator.no_sync(model):
                # Sum of token losses / supervised tokens of the whole window on all processes; DDP then
                # averages gradients over processes, which the factor undoes.
                loss = model(**batch, num_items_in_batch=supervised_all, use_cache=False).loss
                loss = loss * accelerator.num_processes
                backward(accelerator, model, loss, window_end=last, engine=self.engine)
            window_loss += loss.detach().float().item() / accelerator.num_processes
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            self._window_tokens += tokens
        window_loss = float(accelerator.reduce(torch.tensor(window_loss, device=accelerator.device), "sum"))
        if not math.isfinite(window_loss):
            self._stop_for_nan(window_loss)
        self._grad_norm = None
        if self.training.max_grad_norm:
            self._grad_norm = clip_gradients(accelerator, model, self.training.max_grad_norm, self.engine)
        self.optimizer.step()  # under DeepSpeed a no-op: the engine stepped at the window's end
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.state.batches_into_epoch += len(window)
        self.state.supervised_tokens_seen += supervised_all
        self.state.last_loss = window_loss
        self._window_losses.append(window_loss)

    def _after_step(self, total_steps: int, progress, task) -> None:
        state, training = self.state, self.training
        step = state.global_step
        at_end = step >= total_steps
        if step % training.logging_steps == 0 or at_end:
            elapsed = time.perf_counter() - self._window_started
            tokens = int(self.accelerator.reduce(torch.tensor(self._window_tokens), "sum"))
            state.tokens_seen += tokens
            state.elapsed_seconds += elapsed
            self.tokens_this_session += tokens
            record = {
                "step": step,
                "epoch": round(state.epoch + state.batches_into_epoch / self.batches_per_epoch, 4),
                "loss": sum(self._window_losses) / len(self._window_losses),
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": self._grad_norm,
                "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                "tokens_seen": state.tokens_seen,
                **memory_in_use(),
            }
            if self.metrics is not None:
                self.metrics.log(record)
            if progress is not None:
                memory = f"{record['rss_gib']:.1f} GiB" + (
                    f", GPU {record['gpu_peak_gib']:.1f}" if "gpu_peak_gib" in record else ""
                )
                progress.update(
                    task,
                    completed=step,
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    speed=f"{record['tokens_per_s']:,.0f}",
                    memory=memory,
                )
            self._window_losses, self._window_tokens, self._window_started = [], 0, time.perf_counter()
        elif progress is not None:
            progress.update(task, completed=step)
        if self.data.validation is not None and training.eval_steps and (step % training.eval_steps == 0 or at_end):
            self._validate(step)
        if training.save_steps and step % training.save_steps == 0 and not at_end:
            self._checkpoint()

    def _validate(self, step: int) -> None:
        loss = validation_loss(
            self.accelerator, self.model, self.data.validation, self.collator, self.training.micro_batch_size
        )
        if self.metrics is not None:
            self.metrics.log({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))})

    def _checkpoint(self) -> Path | None:
        from accelerate.utils import gather_object

        self.accelerator.wait_for_everyone()
        rng_states = gather_object([torch_rng_states()])  # every rank's, so that dropout resumes on each
        trainable = optimizer_state = None
        if is_sharded(self.engine):  # gathered collectively: every rank takes part, rank 0 writes
            trainable = gather_trainable(self.accelerator, self.model, self.engine)
            optimizer_state = full_optimizer_state(self.accelerator, self.model, self.optimizer, self.engine)
        path = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.output_dir,
                self.method,
                self.accelerator.unwrap_model(self.model),
                self.optimizer,
                self.scheduler,
                self.state,
                keep=self.training.save_total_limit,
                process_rng_states=rng_states,
                trainable=trainable,
                optimizer_state=optimizer_state,
            )
        self.accelerator.wait_for_everyone()
        return path

    def _stop_for_signal(self, name: str) -> None:
        path = self._checkpoint()
        code = 130 if name == "SIGINT" else 143
        where = f"; checkpoint saved to {path}" if path else ""
        raise TrainingStopped(
            f"stopped by {name} at step {self.state.global_step}{where}; continue with --resume", exit_code=code
        )

    def _stop_for_nan(self, loss: float) -> None:
        from .checkpoint import list_checkpoints

        found = list_checkpoints(self.output_dir)
        kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved before it"
        # DeepSpeed steps inside the window's last backward, before the loss is known everywhere
        updated = (
            "DeepSpeed had already applied the step"
            if self.engine.startswith("deepspeed")
            else ("stopped without updating the adapter")
        )
        raise TrainingStopped(
            f"loss became {loss} at step {self.state.global_step + 1}; {updated}; "
            f"{kept}. Lower training.learning_rate or check the data",
            exit_code=3,
        )


def optimizer_class(recipe: Recipe) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer transformers offers under ``training.optimizer`` (default AdamW), with its arguments.

    Goes through TrainingArguments so every name transformers knows works here; that object resets
    accelerate's global state when built, so call this before creating the Accelerator.
    """
    import tempfile

    from transformers import Trainer, TrainingArguments

    training = recipe.training
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            optim=training.optimizer,
            learning_rate=training.learning_rate,
            weight_decay=training.weight_decay,
            adam_beta1=training.adam_beta1,
            adam_beta2=training.adam_beta2,
            adam_epsilon=training.adam_epsilon,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
        )
        return Trainer.get_optimizer_cls_and_kwargs(args)


def _private_generator(seed: int) -> torch.Generator:
    """A DataLoader draws a base seed when it starts iterating; from the global RNG that draw would shift
    dropout masks whenever a loader is created (e.g. right after a resume), so loaders get their own."""
    return torch.Generator().manual_seed(seed)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


@torch.no_grad()
def validation_loss(accelerator, model, rows, collator, batch_size: int) -> float:
    """Mean loss per supervised token over the validation rows (all processes)."""
    from torch.utils.data import DataLoader

    model.eval()
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=collator, generator=_private_generator(0))
    loader = accelerator.prepare_data_loader(loader)
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        count = int((batch["labels"][..., 1:] != -100).sum())
        if count:
            loss = model(**batch, num_items_in_batch=count, use_cache=False).loss
            total += torch.tensor([loss.item() * count, count], device=accelerator.device, dtype=torch.float64)
    total = accelerator.reduce(total, "sum")
    model.train()
    return float(total[0] / total[1]) if total[1] else float("nan")


def run_eval_tasks(recipe: Recipe, model, tokenizer, console: Console, *, label: str) -> dict[str, float]:
    """Score the recipe's eval tasks with `diablo eval`'s runner (same prompts, same judges), one line per task.

    Returns each task's headline metric, keyed "task:metric" (e.g. "dates:exact_match"). Code tasks are left
    to `diablo eval --allow-code-execution`: training never runs generated code.
    """
    from .evaluate.runner import (
        EvalResult,
        EvalSettings,
        evaluate_model,
        format_metric,
        headline_metric,
        spec_from_recipe_task,
        training_template,
    )

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


def prepare_output_dir(output_dir: Path, *, overwrite: bool, resuming: bool) -> None:
    """Refuse to write into a non-empty folder unless resuming there, or told to replace a previous run."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DiaBloError(f"output dir {output_dir} exists and is not a folder")
    contents = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if not contents or resuming:
        output_dir.mkdir(parents=True, exist_ok=True)
        return
    if not overwrite:
        raise DiaBloError(
            f"output dir {output_dir} is not empty ({', '.join(contents[:4])}{', …' if len(contents) > 4 else ''}); "
            "pass --overwrite to replace it, --resume to continue it, or choose another --output-dir"
        )
    if not any(name in _RUN_MARKERS for name in contents):
        raise DiaBloError(
            f"--overwrite: {output_dir} does not look like a diablo run (no {RECIPE_FILE} or {METRICS_FILE}); "
            "refusing to delete it; choose another --output-dir"
        )
    shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)


@contextmanager
def _stop_on_signals():
    """Ctrl-C / SIGTERM ask the loop to checkpoint and stop after the current step; a second Ctrl-C aborts at
    once. Outside the loop a signal raises Interrupted (cli.py), like in every other command."""
    flag: dict[str, str] = {}

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if flag.get("signal") and signum == signal.SIGINT:
            raise Interrupted("SIGINT")
        flag["signal"] = name

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _warn_on_resume_differences(console, state: TrainerState, recipe: Recipe, fingerprint: str, path: Path) -> None:
    console.print(f"resuming from {path} at step {state.global_step}")
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
    from .evaluate.runner import format_metric

    for key, after in result.eval_after.items():
        task, _, metric = key.partition(":")
        before = result.eval_before.get(key)
        shown = format_metric(metric, after)
        change = f"{format_metric(metric, before)} → {shown}" if before is not None else shown
        console.print(f"  {task}: {metric.replace('_', ' ')} {change}")


def show_plan(recipe: Recipe, console: Console):
    """The resolved recipe, its parameter table on a weightless (meta-device) model and the memory
    estimate; touches no data and no weights. Returns the base's tokenizer."""
    from rich.syntax import Syntax
    from transformers import AutoConfig, AutoTokenizer

    from .memory import estimate_training_memory, packed_weight_bits, packed_weights_bytes
    from .models import describe_quantization, resolve_model, skeleton_model
    from .quantize.pipeline import quantized_layer_names

    console.print(Syntax(recipe.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    source = resolve_model(recipe.base_model)
    kwargs = {"trust_remote_code": recipe.model.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, revision=recipe.model.revision, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=recipe.model.revision, **kwargs)
    except (OSError, ValueError) as err:
        from .models import _explain_load_failure

        raise DiaBloError(_explain_load_failure(recipe.base_model, source, err)) from None
    model = skeleton_model(config, **kwargs)
    packed = _planned_quantization(recipe, config)
    linear_parameters = sum(model.get_submodule(name).weight.numel() for name in quantized_layer_names(model))
    _, model, report = attach_adapter(recipe, model, console)
    base_dtype = recipe.torch_dtype_name or str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    estimate = estimate_training_memory(
        config,
        base_parameters=report.base,
        trainable_parameters=report.trainable,
        base_dtype=base_dtype,
        adapter_dtype=recipe.adapter.trainable_dtype(base_dtype),
        batch=recipe.training.micro_batch_size,
        seq_len=recipe.data.max_length,
        gradient_checkpointing=recipe.model.gradient_checkpointing,
    )
    if packed is not None:
        estimate.weights = packed_weights_bytes(report.base, linear_parameters, base_dtype, packed_weight_bits(packed))
        console.print(f"base: {describe_quantization(packed)} ({linear_parameters:,} packed weights)")
    console.print(
        f"memory at micro batch {recipe.training.micro_batch_size} × {recipe.data.max_length} tokens: "
        + estimate.describe()
    )
    return tokenizer


def _planned_quantization(recipe: Recipe, config) -> dict[str, Any] | None:
    """The base's quantization as training will load it: the checkpoint's own, else what the recipe asks
    bitsandbytes to do while loading."""
    saved = base_quantization(config)
    if saved is not None:
        return saved
    section = recipe.model.quantization
    if section.method == "bnb-4bit":
        return {"method": "bnb-4bit", "bits": 4, "quant_type": section.quant_type or "nf4"}
    if section.method == "bnb-8bit":
        return {"method": "bnb-8bit", "bits": 8}
    return None


def dry_run(recipe: Recipe, *, console: Console | None = None, examples: int = 2) -> None:
    """Show what `train` would do — the resolved recipe, the parameter report on a weightless copy of the
    model, a memory estimate, and tokenised examples with the supervised tokens visible — and stop."""
    from .data import describe_supervision, prepare_data

    console = console or Console()
    tokenizer = show_plan(recipe, console)
    sample = recipe.data.model_copy(
        update={
            "datasets": [s.model_copy(update={"limit": min(s.limit or 16, 16)}) for s in recipe.data.datasets],
            "validation_ratio": 0.0,
            "validation_split": None,
        }
    )
    data = prepare_data(sample, tokenizer, seed=recipe.training.seed)
    for index in range(min(examples, len(data.train))):
        console.rule(f"example {index + 1}: [bold green]supervised[/] / [dim]masked[/]")
        console.print(describe_supervision(tokenizer, data.train[index]))
