"""`diablo train`'s public names where they were before training became a package (diablo_cli/training/)."""

from . import training
from .training import *  # noqa: F403
from .training.evals import run_eval_tasks

__all__ = [*training.__all__, "run_eval_tasks"]
