"""Training's parts, built before the loop: the optimizer and schedule transformers offers, the method attached
to the base, and the dtype line every run prints."""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console

from ..adapter.budget import ParameterReport
from ..methods import TrainingMethod, training_method
from ..precision import DtypeChoice
from ..recipe import Recipe
from ..report import method_table


def attach_adapter(
    recipe: Recipe, model: torch.nn.Module, console: Console | None
) -> tuple[TrainingMethod, torch.nn.Module, ParameterReport]:
    """Put the recipe's adapter (or baseline) on ``model``; print its parameter table when given a console.
    Returns the method, the model to train (PEFT wraps it) and its parameter report."""
    method = training_method(recipe.adapter)
    model = method.attach(model)
    report = method.report(model)
    if console is not None:
        title = f"{recipe.adapter.describe()} on {recipe.base_model}"
        console.print(method_table(report, method.trainable_groups(model), title))
        for line in method.notes(model):
            console.print(line)
    return method, model, report


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


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def print_dtype(console: Console, dtype: DtypeChoice) -> None:
    console.print(dtype.describe(), highlight=False)
    if dtype.warning:
        console.print(f"[yellow]warning:[/] {dtype.warning}", highlight=False, soft_wrap=True)
