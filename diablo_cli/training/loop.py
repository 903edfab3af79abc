"""The step loop. Each optimizer step takes a window of ``gradient_accumulation_steps`` micro-batches and
normalises the loss by the supervised tokens of the whole window (summed over processes), so the gradient is the
same however the window is split into micro-batches or processes. Data order depends only on the seed and the
epoch, which is what lets a resumed run replay the exact batches the interrupted one would have seen."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..checkpoint import (
    TrainerState,
    discard_checkpoints_after,
    last_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    saved_state,
    torch_rng_states,
)
from ..distributed import (
    backward,
    clip_gradients,
    full_optimizer_state,
    gather_trainable,
    is_sharded,
    load_full_optimizer_state,
    steps_in_backward,
)
from ..divergence import CheckpointHealth, Strike, Watchdog
from ..errors import DiaBloError, TrainingStopped
from ..interrupts import Interrupted
from ..loss import LossPath
from ..methods import TrainingMethod
from ..report import step_display, training_progress
from ..tracking import memory_in_use


class Loop:
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
        self.total_steps, self.stop_flag, self.show = 0, {}, None  # run() sets them
        self.watchdog = Watchdog(self.training.divergence.rule(), state.watch)
        self._losses_finite = True  # since the last checkpoint

    def run(self, total_steps: int, stop_flag: dict, console: Console | None) -> None:
        """Steps until ``total_steps``, epoch after epoch; ``stop_flag`` is set by a signal (stop_on_signals)."""
        self.total_steps, self.stop_flag = total_steps, stop_flag
        progress = training_progress(console, total_steps, self.state.global_step) if console else None
        self.show = step_display(*progress) if progress else None
        with progress[0] if progress else nullcontext():
            while self.state.global_step < total_steps:
                for window in self._windows():
                    if not self.step(window):  # rolled back: start again from the restored data position
                        if self.show is not None:
                            self.show(self.state.global_step, None)
                        break
                    if self.state.global_step >= total_steps:
                        return
                else:
                    self.state.epoch += 1
                    self.state.batches_into_epoch = 0

    def step(self, window: list[dict[str, torch.Tensor]]) -> bool:
        """One optimizer step, read top to bottom: accumulate → step → log → validate → save → stop. False when
        divergence rolled the run back instead."""
        loss, supervised = self._accumulate(window)
        if not math.isfinite(loss):  # judged before stepping: only DeepSpeed has already applied it
            self._losses_finite = False
            strike = self.watchdog.observe(self.state.global_step + 1, loss, None, 0)
            return self._rolled_back_or_stop(strike, stepped=steps_in_backward(self.engine))
        self._optimizer_step()
        self.state.global_step += 1
        self.state.batches_into_epoch += len(window)
        self.state.supervised_tokens_seen += supervised
        self.state.last_loss = loss
        self._window_losses.append(loss)
        if not self._watch(loss):
            return False
        training, step, at_end = self.training, self.state.global_step, self.state.global_step >= self.total_steps
        if step % training.logging_steps == 0 or at_end:
            self._log(step)
        elif self.show is not None:
            self.show(step, None)
        if self.data.validation is not None and training.eval_steps and (step % training.eval_steps == 0 or at_end):
            self._validate(step)
        if training.save_steps and step % training.save_steps == 0 and not at_end:
            self._checkpoint()
        if self.stop_flag.get("signal"):
            self._stop_for_signal(self.stop_flag["signal"])
        return True

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

    def _accumulate(self, window: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """Forward and backward over the window's micro-batches: the window's loss (all processes) and its
        supervised tokens (all processes)."""
        accelerator, model = self.accelerator, self.model
        model.train()
        supervised = sum(self.collator.supervised_tokens(b) for b in window)
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
            self._window_tokens += self.collator.tokens(batch)
        window_loss = float(accelerator.reduce(torch.tensor(window_loss, device=accelerator.device), "sum"))
        return window_loss, supervised_all

    def _optimizer_step(self) -> None:
        """Clip, step, schedule, zero (under DeepSpeed the step is a no-op: the engine stepped at the window's end)."""
        self._grad_norm = None
        if self.training.max_grad_norm:
            self._grad_norm = clip_gradients(self.accelerator, self.model, self.training.max_grad_norm, self.engine)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

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
            return self._rolled_back_or_stop(strike)
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

    def _log(self, step: int) -> None:
        """One metrics record for the steps since the last: mean loss, lr, gradient norm, speed and memory."""
        state = self.state
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
        if self.show is not None:
            self.show(step, record)
        self._window_losses, self._window_tokens, self._window_started = [], 0, time.perf_counter()

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
            model = self.accelerator.unwrap_model(self.model)
            base_model = self.state.recipe.get("base_model")
            path = save_checkpoint(
                self.output_dir,
                lambda folder: self.method.save(model, folder, base_model=base_model, tensors=trainable),
                self.optimizer,
                self.scheduler,
                self.state,
                keep=self.training.save_total_limit if self.state.health.good else None,  # never rotate out the good
                process_rng_states=rng_states,
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

    def _rolled_back_or_stop(self, strike: Strike, *, stepped: bool = True) -> bool:
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


def _private_generator(seed: int) -> torch.Generator:
    """A DataLoader draws a base seed when it starts iterating; from the global RNG that draw would shift
    dropout masks whenever a loader is created (e.g. right after a resume), so loaders get their own."""
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def validation_loss(accelerator, model, rows, collator, batch_size: int, loss_path: LossPath) -> float:
    """Mean loss per supervised token over the validation rows (all processes)."""
    from torch.utils.data import DataLoader

    model.eval()
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=collator, generator=_private_generator(0))
    loader = accelerator.prepare_data_loader(loader)
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        count = collator.supervised_tokens(batch)
        if count:
            loss = loss_path.loss(model, batch, count)
            total += torch.tensor([loss.item() * count, count], device=accelerator.device, dtype=torch.float64)
    total = accelerator.reduce(total, "sum")
    model.train()
    return float(total[0] / total[1]) if total[1] else float("nan")


@contextmanager
def stop_on_signals():
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
