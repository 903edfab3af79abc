"""`diablo train`'s public names where they were before training became a package (diablo_cli/training/)."""

from .training import (
    TrainResult,
    attach_adapter,
    build_scheduler,
    checkpoint_health,
    dry_run,
    optimizer_class,
    print_dtype,
    scale_learning_rate,
    show_plan,
    train,
    trainable_norm,
    validation_loss,
)
from .training.evals import run_eval_tasks

__all__ = [
    "TrainResult",
    "attach_adapter",
    "build_scheduler",
    "checkpoint_health",
    "dry_run",
    "optimizer_class",
    "print_dtype",
    "run_eval_tasks",
    "scale_learning_rate",
    "show_plan",
    "train",
    "trainable_norm",
    "validation_loss",
]
