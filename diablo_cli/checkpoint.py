"""Training checkpoints that resume exactly: adapter, optimizer, scheduler, RNG states and data position.

Everything is safetensors + JSON — even the optimizer state — so resuming never unpickles anything.
A checkpoint is written into a hidden temporary folder and renamed into place, so a crash leaves either
the whole checkpoint or none; older ones are rotated out after the new one is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import ordinary_permissions
from .divergence import CheckpointHealth, WatchState
from .errors import DiaBloError
from .run_folder import (
    CHECKPOINTS,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    checkpoint_damage,
    checkpoint_dir,
    checkpoint_step,
    disk_advice,
    disk_errno,
    list_checkpoints,
    newest_intact_checkpoint,
    remove_checkpoint,
)


@dataclass
class TrainerState:
    """Where a run is: counted in optimizer steps, and micro-batches into the current epoch."""

    global_step: int = 0
    epoch: int = 0
    batches_into_epoch: int = 0
    tokens_seen: int = 0
    supervised_tokens_seen: int = 0
    elapsed_seconds: float = 0.0
    last_loss: float | None = None
    data_fingerprint: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    lr_scale: float = 1.0  # the recipe's learning rate × this, after divergence rollbacks
    rollbacks: int = 0
    watch: WatchState = field(default_factory=WatchState)
    health: CheckpointHealth | None = None  # measured as the checkpoint was written; None in older checkpoints

    def __post_init__(self) -> None:
        if isinstance(self.watch, dict):  # as read back from trainer_state.json
            self.watch = WatchState(**self.watch)
        if isinstance(self.health, dict):
            self.health = CheckpointHealth(**self.health)


def saved_state(path: Path) -> TrainerState | None:
    """A checkpoint's recorded position and health, without loading it; None when its state file is unreadable."""
    try:
        return TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["state"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def last_good_checkpoint(output_dir: Path) -> tuple[Path, TrainerState] | None:
    """The newest intact checkpoint whose weights were finite and that was not written while the run diverged."""
    for path in reversed(list_checkpoints(output_dir)):
        state = None if checkpoint_damage(path) else saved_state(path)
        if state is not None and state.health is not None and state.health.good:
            return path, state
    return None


def discard_checkpoints_after(output_dir: Path, step: int) -> None:
    """Remove the checkpoints past ``step``: after a rollback they belong to a run that no longer exists."""
    for path in reversed(list_checkpoints(output_dir)):
        if checkpoint_step(path) > step:
            remove_checkpoint(path)


def save_checkpoint(
    output_dir: Path,
    save_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    *,
    keep: int | None,
    process_rng_states: list[dict[str, torch.Tensor]] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of the whole run. ``process_rng_states``: every process's torch RNG states, in rank
    order (``torch_rng_states()`` on each), so that dropout resumes exactly on every rank; default this one's.
    Under a sharding engine ``trainable`` and ``optimizer_state`` are the gathered, unsharded weights and optimizer
    state (diablo_cli.distributed), so that the checkpoint is the same as one process would write.
    ``save_weights(folder)`` writes the trainable weights (the training method's deliverable) into ``folder``."""
    target = checkpoint_dir(output_dir, state.global_step)
    previous = list_checkpoints(output_dir)
    try:
        _write_checkpoint(target, save_weights, optimizer, scheduler, state, process_rng_states, optimizer_state)
    except Exception as err:
        code = disk_errno(err)
        if code is None:
            raise
        then = (
            f"the previous checkpoint {previous[-1]} is intact; {disk_advice(code)}, then continue with --resume"
            if previous
            else f"no earlier checkpoint was saved; {disk_advice(code)}, then run again"
        )
        raise DiaBloError(f"cannot write checkpoint {target}: {os.strerror(code)}; {then}") from None
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            remove_checkpoint(old)
    return target


def _write_checkpoint(
    target: Path,
    save_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    process_rng_states: list[dict[str, torch.Tensor]] | None,
    optimizer_state: dict[str, Any] | None,
) -> None:
    """Everything into a hidden staging folder, then one rename: a checkpoint is whole or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_weights(staging)
        tensors, optimizer_meta = _flatten_optimizer(
            optimizer_state if optimizer_state is not None else optimizer.state_dict()
        )
        save_file(tensors, str(staging / OPTIMIZER_FILE), metadata={"format": "pt"})
        ranks = process_rng_states or [torch_rng_states()]
        rng = {f"rank{r}.{key}" if r else key: t for r, states in enumerate(ranks) for key, t in states.items()}
        save_file(rng, str(staging / RNG_FILE), metadata={"format": "pt", "processes": str(len(ranks))})
        document = {
            "state": asdict(state),
            "optimizer": optimizer_meta,
            "scheduler": scheduler.state_dict(),
            "python_rng": _jsonable(random.getstate()),
            "numpy_rng": _jsonable(np.random.get_state()),
            "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())},  # checkpoint_damage checks them
        }
        (staging / STATE_FILE).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        if target.exists():  # the same step saved again (e.g. interrupted right after a periodic save)
            remove_checkpoint(target)
        ordinary_permissions(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def find_checkpoint(output_dir: Path, requested: str, notes: list[str] | None = None) -> Path:
    """``latest`` → the newest intact checkpoint in ``output_dir`` (a line in ``notes`` for each damaged one
    skipped); else a checkpoint folder's path, which must be intact."""
    if requested == "latest":
        found, skipped = newest_intact_checkpoint(output_dir)
        damaged = "; ".join(f"{path.relative_to(output_dir)} is damaged ({reason})" for path, reason in skipped)
        if found is None:
            where = output_dir / CHECKPOINTS
            raise DiaBloError(
                f"--resume: {where} holds no intact checkpoint to resume from" + (f": {damaged}" if damaged else "")
            )
        if skipped and notes is not None:
            notes.append(f"{damaged}; resuming from {found.name}")
        return found
    path = Path(requested)
    if not (path / STATE_FILE).is_file():
        raise DiaBloError(f"--resume {requested}: not a checkpoint folder (it has no {STATE_FILE})")
    reason = checkpoint_damage(path)
    if reason is not None:
        raise DiaBloError(f"--resume {requested}: the checkpoint is damaged ({reason}); resume from an older one")
    return path


def load_checkpoint(
    path: Path,
    load_optimizer_state: Callable[[dict[str, Any]], None],
    scheduler: Any,
    *,
    rank: int = 0,
) -> TrainerState:
    """Restore the optimizer (through ``load_optimizer_state``, e.g. an optimizer's ``load_state_dict``), the
    scheduler and the RNG states in place; returns the saved position. The trainable weights are the method's
    ``restore``, called before accelerate shards the model. Process ``rank`` takes its own torch RNG states
    (rank 0's when the checkpoint had fewer processes)."""
    document = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    load_optimizer_state(_unflatten_optimizer(load_file(str(path / OPTIMIZER_FILE)), document["optimizer"]))
    scheduler.load_state_dict(document["scheduler"])
    _restore_torch_rng(_rank_states(load_file(str(path / RNG_FILE)), rank))
    random.setstate(_python_rng_state(document["python_rng"]))
    kind, keys, pos, has_gauss, cached = document["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return TrainerState(**document["state"])


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": _jsonable(state_dict["param_groups"])}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def torch_rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{index}"] = cuda_state
    return states


def _rank_states(saved: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    prefix = f"rank{rank}."
    own = {key.removeprefix(prefix): t for key, t in saved.items() if rank and key.startswith(prefix)}
    return own or {key: t for key, t in saved.items() if not key.startswith("rank")}


def _restore_torch_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _python_rng_state(value: list) -> tuple:
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
