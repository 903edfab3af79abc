"""`diablo train`: recipe → base + DiaBlo adapter → data → the accelerate loop → adapter on disk.

The loop counts optimizer steps. Each step takes a window of ``gradient_accumulation_steps``
micro-batches and normalises the loss by the supervised tokens of the whole window (summed over
processes), so the gradient is the same however the window is split into micro-batches or processes.
Data order depends only on the seed and the epoch, which is what lets a resumed run replay the exact
batches the interrupted one would have seen.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from .adapter.budget import ParameterReport
from .atomic import save_pretrained_into, write_text_atomic
from .checkpoint import (
    TrainerState,
    discard_checkpoints_after,
    find_checkpoint,
    last_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    saved_state,
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
from .divergence import CheckpointHealth, Strike, Watchdog
from .errors import DiaBloError, TrainingStopped
from .interrupts import Interrupted
from .loss import LossPath, choose_loss, held_logit_rows, planned_loss
from .methods import TrainingMethod, training_method
from .models import base_quantization, load_base_model
from .precision import DtypeChoice
from .quantize.trainable import prepare_quantized_training
from .recipe import Recipe
from .report import plot_loss_curve, spinner, training_progress
from .run_folder import (
    LOSS_PLOT,
    METRICS_FILE,
    RECIPE_FILE,
    SUMMARY_FILE,
    RunFolder,
    disk_advice,
    disk_errno,
    newest_intact_checkpoint,
)
from .tracking import MetricsLog, memory_in_use, read_metrics


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
    """``train`` once the main process holds the output folder (``folder``; None on the other processes)."""
    from accelerate.utils import set_seed

    training = recipe.training
    main = accelerator.is_main_process
    engine = sharding_engine(accelerator)
    if training.divergence.action == "rollback" and is_sharded(engine):
        raise DiaBloError(
            f"training.divergence.action: rollback restores weights in place, which is not safe while {engine} shards "
            "them; use action: stop (the run still stops on divergence), or train in one process or with DDP"
        )
    output_dir = Path(recipe.output.dir)
    if not main:  # one process reports; the others would repeat every loading bar and warning
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    accelerator.wait_for_everyone()
    set_seed(training.seed, device_specific=True)  # rank 0 keeps the seed; other ranks draw their own dropout

    model, tokenizer = load_base_model(
        recipe.base_model,
        dtype=recipe.model.dtype,
        on_dtype=(lambda choice: print_dtype(console, choice)) if main else None,
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
    announce = (lambda line: console.print(line, highlight=False)) if main else None
    loss_path = choose_loss(model, training.loss, announce=announce)  # probes the model before accelerate wraps it
    if main:
        console.print(loss_path.choice.describe(), highlight=False)
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
    resume_notes: list[str] = []
    checkpoint = find_checkpoint(output_dir, resume, resume_notes) if resume is not None else None
    for line in resume_notes if main else []:
        console.print(f"[yellow]warning:[/] {line}")
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
        loss_path,
        console=console if main else None,
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
        try:
            method.save(unwrapped, output_dir, base_model=recipe.base_model, tensors=gathered)
            if recipe.output.save_tokenizer:
                save_pretrained_into(tokenizer, output_dir, prefix=".tokenizer-")
        finally:  # even cut short, what was written is diablo's
            folder.record_written()
        folder.saved = True
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
        engine: str,
        loss_path: LossPath,
        *,
        console: Console | None = None,
    ):
        self.recipe, self.training, self.method = recipe, recipe.training, method
        self.engine = engine  # distributed.sharding_engine: how backward, clipping and checkpoints go
        self.loss_path = loss_path  # how a micro-batch's loss is computed (loss.py): the same for validation
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.data, self.collator, self.state, self.metrics, self.output_dir = data, collator, state, metrics, output_dir
        self.tokens_this_session = 0
        self._window_losses: list[float] = []
        self._window_tokens = 0
        self._window_started = time.perf_counter()
        self._grad_norm: float | None = None
        self.batches_per_epoch = batches_per_epoch  # micro-batches per epoch and process
        self.console = console  # the main process's, for warnings; the progress bar is run()'s
        self.watchdog = Watchdog(self.training.divergence.rule(), state.watch)
        self._losses_finite = True  # since the last checkpoint

    def run(self, total_steps: int, stop_flag: dict, console: Console | None) -> None:
        progress_context = training_progress(console, total_steps, self.state.global_step) if console else None
        progress, task = progress_context if progress_context else (None, None)
        with progress if progress is not None else nullcontext():
            while self.state.global_step < total_steps:
                for window in self._windows():
                    if not self._step(window):  # rolled back: start again from the restored data position
                        if progress is not None:
                            progress.update(task, completed=self.state.global_step)
                        break
                    self._after_step(total_steps, progress, task)
                    if stop_flag.get("signal"):
                        self._stop_for_signal(stop_flag["signal"])
                    if self.state.global_step >= total_steps:
                        return
                else:
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

    def _step(self, window: list[dict[str, torch.Tensor]]) -> bool:
        """One optimizer step; False when divergence rolled the run back instead."""
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
                loss = self.loss_path.loss(model, batch, supervised_all)
                loss = loss * accelerator.num_processes
                backward(accelerator, model, loss, window_end=last, engine=self.engine)
            window_loss += loss.detach().float().item() / accelerator.num_processes
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            self._window_tokens += tokens
        window_loss = float(accelerator.reduce(torch.tensor(window_loss, device=accelerator.device), "sum"))
        if not math.isfinite(window_loss):
            self._losses_finite = False
            strike = self.watchdog.observe(self.state.global_step + 1, window_loss, None, 0)
            return self._on_divergence(strike, stepped=self.engine.startswith("deepspeed"))
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
        return self._watch(window_loss)

    def _trainable(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.model.parameters() if p.requires_grad]

    def _watch(self, loss: float) -> bool:
        """Judge the step just taken: warn at a first strike, stop or roll back when the run diverged. Under a
        sharding engine the weights are measured at checkpoints only, where they are gathered anyway."""
        norm, numel = (None, 0) if is_sharded(self.engine) else trainable_norm(self._trainable())
        strike = self.watchdog.observe(self.state.global_step, loss, norm, numel)
        if strike is None:
            return True
        if strike.fatal:
            return self._on_divergence(strike)
        if strike.count == 1 and self.accelerator.is_main_process:
            settings = self.training.divergence
            then = "rolls back" if settings.action == "rollback" else "stops"
            if self.console is not None:
                self.console.print(
                    f"[yellow]warning:[/] step {strike.step}: {strike.reason}; the run {then} if this lasts "
                    f"{settings.patience} steps (training.divergence.patience)"
                )
            if self.metrics is not None:
                self.metrics.log({"step": strike.step, "event": "divergence_warning", "reason": strike.reason})
        return True

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
            self.accelerator,
            self.model,
            self.data.validation,
            self.collator,
            self.training.micro_batch_size,
            self.loss_path,
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
            self.state.health = checkpoint_health(
                trainable.values() if trainable is not None else self._trainable(),
                losses_finite=self._losses_finite,
                diverging=self.watchdog.state.strikes > 0,
            )
            path = save_checkpoint(
                self.output_dir,
                self.method,
                self.accelerator.unwrap_model(self.model),
                self.optimizer,
                self.scheduler,
                self.state,
                keep=self.training.save_total_limit if self.state.health.good else None,  # never rotate out the good
                process_rng_states=rng_states,
                trainable=trainable,
                optimizer_state=optimizer_state,
            )
        self._losses_finite = True
        self.accelerator.wait_for_everyone()
        return path

    def _stop_for_signal(self, name: str) -> None:
        path = self._checkpoint()
        code = 130 if name == "SIGINT" else 143
        where = f"; checkpoint saved to {path}" if path else ""
        raise TrainingStopped(
            f"stopped by {name} at step {self.state.global_step}{where}; continue with --resume", exit_code=code
        )

    def _on_divergence(self, strike: Strike, *, stepped: bool = True) -> bool:
        """The run diverged: roll back to the last good checkpoint when the recipe asks and may, else stop (exit 3)
        naming that checkpoint. ``stepped``: the diverging step updated the weights (DeepSpeed steps inside the
        window's last backward, before a non-finite loss is known). Returns False after a rollback."""
        from accelerate.utils import broadcast_object_list

        settings = self.training.divergence
        good = [last_good_checkpoint(self.output_dir) if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:  # one decision for all processes: the main one reads the folder
            broadcast_object_list(good)
        found = good[0]
        if settings.action == "rollback" and found is not None and self.state.rollbacks < settings.max_rollbacks:
            self._roll_back(strike, *found)
            return False
        raise TrainingStopped(self._divergence_message(strike, found, stepped=stepped), exit_code=3)

    def _divergence_message(self, strike: Strike, found: tuple[Path, TrainerState] | None, *, stepped: bool) -> str:
        settings = self.training.divergence
        if strike.reason.startswith("loss became"):
            updated = "DeepSpeed had already applied the step" if stepped else "stopped without updating the adapter"
            what = f"{strike.reason} at step {strike.step}; {updated}"
        elif strike.count > 1:
            what = f"training diverged at step {strike.step}: {strike.reason}, {strike.count} steps in a row"
        else:
            what = f"training diverged at step {strike.step}: {strike.reason}"
        if found is not None:
            path, state = found
            kept = f"the last good checkpoint is {path} (step {state.global_step}, {state.health.describe()})"
        else:
            saved = list_checkpoints(self.output_dir)
            measured = [(path, state.health) for path in saved if (state := saved_state(path)) and state.health]
            if measured:
                kept = f"no checkpoint is good (the newest, {measured[-1][0].name}: {measured[-1][1].describe()})"
            elif saved:
                kept = f"no checkpoint is known to be good ({len(saved)} saved without a health record)"
            else:
                kept = "no good checkpoint was saved before it"
        if settings.action == "rollback":
            budget = settings.max_rollbacks
            done = f"rolled back {self.state.rollbacks} of {budget} times (training.divergence.max_rollbacks)"
            kept += f"; {done}" if self.state.rollbacks >= budget else "; nothing to roll back to"
            advice = "lower training.learning_rate or check the data"
        else:
            advice = "lower training.learning_rate, check the data, or set training.divergence.action: rollback"
        return f"{what}; {kept}. {advice[0].upper()}{advice[1:]}"

    def _roll_back(self, strike: Strike, path: Path, saved: TrainerState) -> None:
        """Go back to checkpoint ``path`` — weights, optimizer, scheduler, data position, RNG — and on at a lower
        learning rate; re-save it so that --resume keeps the lower rate."""
        settings = self.training.divergence
        scale, rollbacks = self.state.lr_scale * settings.lr_factor, self.state.rollbacks + 1
        self.accelerator.wait_for_everyone()
        self.method.restore(self.accelerator.unwrap_model(self.model), path)
        restored = load_checkpoint(
            path,
            lambda optimizer_state: load_full_optimizer_state(
                self.accelerator, self.model, self.optimizer, self.engine, optimizer_state
            ),
            self.scheduler,
            rank=self.accelerator.process_index,
        )
        scale_learning_rate(self.optimizer, self.scheduler, scale / restored.lr_scale)
        self.optimizer.zero_grad(set_to_none=True)
        restored.recipe, restored.lr_scale, restored.rollbacks = self.state.recipe, scale, rollbacks
        vars(self.state).update(vars(restored))  # in place: train() reads the final position from this object
        self.watchdog = Watchdog(settings.rule(), self.state.watch)
        self._window_losses, self._window_tokens, self._window_started = [], 0, time.perf_counter()
        self._losses_finite = True
        step = self.state.global_step
        if self.accelerator.is_main_process:
            discard_checkpoints_after(self.output_dir, step)
            if self.metrics is not None:
                self.metrics.rewind(step)
                self.metrics.log(
                    {
                        "step": step,
                        "event": "rollback",
                        "from_step": strike.step,
                        "to_step": step,
                        "lr_factor": settings.lr_factor,
                        "lr_scale": scale,
                        "reason": strike.reason,
                    }
                )
            if self.console is not None:
                self.console.print(
                    f"[yellow]rolled back[/] to step {step} ({path}) after step {strike.step}: {strike.reason}; "
                    f"going on at {scale:g}× the learning rate (rollback {rollbacks} of {settings.max_rollbacks})"
                )
        self._checkpoint()


def trainable_norm(tensors: Iterable[torch.Tensor]) -> tuple[float, int]:
    """The L2 norm of the trainable weights, finite exactly when they all are, and how many values they hold.

    Each tensor's norm is taken in its own dtype (float64 throughout costs 50× on CPU); one that overflows there
    (fp32 squares do past ~1e19) is taken again in float64, so that huge weights are not mistaken for infinite."""
    tensors = list(tensors)
    if not tensors:
        return 0.0, 0
    norms = torch.stack([torch.linalg.vector_norm(t).to(torch.float64) for t in tensors])
    for index in torch.isinf(norms).nonzero().flatten().tolist():
        norms[index] = torch.linalg.vector_norm(tensors[index], dtype=torch.float64)
    return float(torch.linalg.vector_norm(norms)), sum(t.numel() for t in tensors)


def checkpoint_health(tensors: Iterable[torch.Tensor], *, losses_finite: bool, diverging: bool) -> CheckpointHealth:
    """What a checkpoint records about itself so that "the last good checkpoint" is one that is (see divergence.py)."""
    norm, _ = trainable_norm(tensors)
    finite = math.isfinite(norm)
    return CheckpointHealth(finite, norm if finite else None, losses_finite, diverging)


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Multiply the learning rate now and for the rest of the schedule (its base rates), keeping its shape."""
    scheduler.base_lrs = [rate * factor for rate in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor


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
def validation_loss(accelerator, model, rows, collator, batch_size: int, loss_path: LossPath) -> float:
    """Mean loss per supervised token over the validation rows (all processes)."""
    from torch.utils.data import DataLoader

    model.eval()
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=collator, generator=_private_generator(0))
    loader = accelerator.prepare_data_loader(loader)
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        count = int((batch["labels"][..., 1:] != -100).sum())
        if count:
            loss = loss_path.loss(model, batch, count)
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
    from .models import (
        base_dtype,
        check_local_model,
        compute_device,
        describe_quantization,
        resolve_model,
        skeleton_model,
    )
    from .precision import choose_dtype
    from .quantize.pipeline import quantized_layer_names

    console.print(Syntax(recipe.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    source = resolve_model(recipe.base_model)
    check_local_model(source, recipe.base_model, trust_remote_code=recipe.model.trust_remote_code)
    kwargs = {"trust_remote_code": recipe.model.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, revision=recipe.model.revision, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=recipe.model.revision, **kwargs)
    except (OSError, ValueError) as err:
        from .models import _explain_load_failure

        raise DiaBloError(_explain_load_failure(recipe.base_model, source, err)) from None
    try:
        dtype = base_dtype(
            recipe.base_model,
            config,
            recipe.model.dtype,
            device=compute_device(),
            quantization=recipe.model.quantization,
            **kwargs,
        )
        print_dtype(console, dtype)
        console.print(planned_loss(config, recipe.training.loss).describe(), highlight=False)
    except DiaBloError as err:  # a plan shows what would stop the run, then goes on
        console.print(f"[bold red]would stop:[/] {err}", highlight=False, soft_wrap=True)
        dtype = choose_dtype(recipe.model.dtype, device=compute_device())
    model = skeleton_model(config, **kwargs)
    packed = _planned_quantization(recipe, config)
    linear_parameters = sum(model.get_submodule(name).weight.numel() for name in quantized_layer_names(model))
    _, model, report = attach_adapter(recipe, model, console)
    estimate = estimate_training_memory(
        config,
        base_parameters=report.base,
        trainable_parameters=report.trainable,
        base_dtype=dtype.name,
        adapter_dtype=recipe.adapter.trainable_dtype(dtype.name),
        batch=recipe.training.micro_batch_size,
        seq_len=recipe.data.max_length,
        gradient_checkpointing=recipe.model.gradient_checkpointing,
        logits_rows=held_logit_rows(config, recipe.training.loss),
    )
    if packed is not None:
        estimate.weights = packed_weights_bytes(report.base, linear_parameters, dtype.name, packed_weight_bits(packed))
        console.print(f"base: {describe_quantization(packed)} ({linear_parameters:,} packed weights)")
    console.print(
        f"memory at micro batch {recipe.training.micro_batch_size} × {recipe.data.max_length} tokens: "
        + estimate.describe()
    )
    return tokenizer


def print_dtype(console: Console, dtype: DtypeChoice) -> None:
    console.print(dtype.describe(), highlight=False)
    if dtype.warning:
        console.print(f"[yellow]warning:[/] {dtype.warning}", highlight=False, soft_wrap=True)


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
