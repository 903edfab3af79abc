"""`diablo train` as a package: ``setup`` builds the parts, ``loop`` runs the steps, ``evals`` scores the recipe's
tasks, ``plan`` shows a dry run, and ``run.train`` tells the recipe's story with them."""

from .loop import checkpoint_health, scale_learning_rate, trainable_norm, validation_loss
from .plan import dry_run, show_plan
from .run import TrainResult, train
from .setup import attach_adapter, build_scheduler, optimizer_class, print_dtype

__all__ = [
    "TrainResult",
    "attach_adapter",
    "build_scheduler",
    "checkpoint_health",
    "dry_run",
    "optimizer_class",
    "print_dtype",
    "scale_learning_rate",
    "show_plan",
    "train",
    "trainable_norm",
    "validation_loss",
]
