"""Training's parts, built before the loop: the processes (engine, seed), the base with the recipe's method
attached, the step counts, and the optimizer and schedule transformers offers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console

from ..adapter.budget import ParameterReport
from ..distributed import configure_sharding, is_sharded, sharding_engine
from ..errors import DiaBloError
from ..loss import LossPath, choose_loss
from ..methods import TrainingMethod, training_method
from ..models import load_base_model
from ..precision import DtypeChoice, short_name
from ..quantize.trainable import prepare_quantized_training
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


TORCH_ADAMW = {"adamw_torch": {}, "adamw_torch_fused": {"fused": True}}
"""The optimizer names that are torch's own AdamW, and what transformers adds to its arguments for each."""


def optimizer_class(recipe: Recipe) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer transformers offers under ``training.optimizer`` (default AdamW), with its arguments.

    torch's AdamW (the default) is built here directly: the same class and arguments as transformers gives
    (a test holds the two equal), without importing its Trainer, ~3.5 s of a quickstart's start-up. Every
    other name goes through TrainingArguments so whatever transformers knows works here; that object resets
    accelerate's global state when built, so call this before creating the Accelerator.
    """
    training = recipe.training
    if training.optimizer in TORCH_ADAMW:
        betas = (training.adam_beta1, training.adam_beta2)
        arguments = {"lr": training.learning_rate, "betas": betas, "eps": training.adam_epsilon}
        return torch.optim.AdamW, arguments | TORCH_ADAMW[training.optimizer]
    import tempfile

    from transformers import Trainer, TrainingArguments

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


def start_processes(recipe: Recipe, accelerator) -> str:
    """Refuse what the engine cannot do, quiet the processes that do not report, seed every rank; returns the
    sharding engine (distributed.sharding_engine) the loop hands to backward, clipping and checkpoints."""
    from accelerate.utils import set_seed

    engine = sharding_engine(accelerator)
    if recipe.training.divergence.action == "rollback" and is_sharded(engine):
        raise DiaBloError(
            f"training.divergence.action: rollback restores weights in place, which is not safe while {engine} shards "
            "them; use action: stop (the run still stops on divergence), or train in one process or with DDP"
        )
    if not accelerator.is_main_process:  # one process reports; the others would repeat every loading bar and warning
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    accelerator.wait_for_everyone()
    set_seed(recipe.training.seed, device_specific=True)  # rank 0 keeps the seed; other ranks draw their own dropout
    return engine


def training_layout(config) -> str:
    """The layout of rows this architecture learns from: ``causal`` (prompt and answer in one stream, decoder-only
    models) or ``seq2seq`` (the prompt for the encoder, the answer for the decoder: T5 and the other text
    encoder-decoders transformers loads as a seq2seq LM). Any other family is refused before data is tokenised:
    training it on the causal layout would exit 0 and teach the wrong thing."""
    if not getattr(config, "is_encoder_decoder", False):
        return "causal"
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None) or type(config).__name__
    if model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise DiaBloError(
            f"base_model: {model_type!r} is an encoder-decoder model that is not a text-to-text language model, "
            "which `diablo train` has no loop for; train a decoder-only model or a text encoder-decoder such as T5"
        )
    if getattr(config, "decoder_start_token_id", None) is None:
        raise DiaBloError(
            f"base_model: the {model_type!r} config sets no decoder_start_token_id, so its decoder has no first "
            "input; set it in the model's config.json (T5 uses its pad token id, 0)"
        )
    return "seq2seq"


EAGER_ATTENTION_UP_TO = 128
"""Rows up to this many tokens train faster on CPU in bf16/fp16 with transformers' eager attention than with
PyTorch's fused one, whose CPU backward costs milliseconds per call on short rows (benchmarks/attention_cpu.py:
0.82-0.85× the step on SmolLM2 at 65-128 tokens; 7B-shaped layers 0.98-0.99×). Longer rows keep the fused
kernel: SmolLM2 still gains up to 512 tokens, but 7B-shaped layers lose 2-6% at 256-512 and eager's saved
attention weights grow with the square of the length (RESULTS.md)."""


def choose_attention(
    model: torch.nn.Module, requested: str | None, max_length: int, device: str | torch.device = "cpu"
) -> str:
    """Set the attention ``auto`` (or None) picks for training ``model`` on ``device`` (where it will train: a
    full-precision base is still on the CPU when this runs) on rows up to ``max_length`` tokens, and return the
    line that says which and why. A named implementation was given to transformers at load time."""
    current = getattr(model.config, "_attn_implementation", None) or "eager"
    if requested not in (None, "auto"):
        return f"attention: {current} (the recipe's)"
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu or model.dtype not in (torch.bfloat16, torch.float16) or current != "sdpa":
        return f"attention: {current} (auto: transformers' choice)"
    if max_length > EAGER_ATTENTION_UP_TO:
        return f"attention: sdpa (auto: rows up to {max_length} tokens, where the fused kernel is fastest)"
    model.set_attn_implementation("eager")
    return f"attention: eager (auto: faster than sdpa for {short_name(model.dtype)} on CPU, rows ≤ {max_length} tokens)"


def load_and_attach(
    recipe: Recipe, accelerator, console: Console | None
) -> tuple[TrainingMethod, torch.nn.Module, Any, ParameterReport, LossPath]:
    """The base on this process's device, made trainable when quantized, with the recipe's method attached, its
    loss path chosen (loss.py) and the engine's sharding configured; ``console`` (the main process's) hears what
    was chosen."""
    training = recipe.training
    model, tokenizer = load_base_model(
        recipe.base_model,
        dtype=recipe.model.dtype,
        on_dtype=(lambda choice: print_dtype(console, choice)) if console is not None else None,
        trust_remote_code=recipe.model.trust_remote_code,
        revision=recipe.model.revision,
        attn_implementation=None if recipe.model.attn_implementation == "auto" else recipe.model.attn_implementation,
        quantization=recipe.model.quantization,
        device=accelerator.device,
    )
    training_layout(model.config)
    attention = choose_attention(model, recipe.model.attn_implementation, recipe.data.max_length, accelerator.device)
    if console is not None:
        console.print(attention, highlight=False)
    quantized = prepare_quantized_training(model)  # before any forward pass: see quantize/trainable.py
    if console is not None and quantized is not None:
        console.print(f"base: {quantized.describe()}")
    method, model, report = attach_adapter(recipe, model, console)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    announce = (lambda line: console.print(line, highlight=False)) if console is not None else None
    loss_path = choose_loss(model, training.loss, announce=announce)  # probes the model before accelerate wraps it
    if announce is not None:
        announce(loss_path.choice.describe())
    sharding_notes = configure_sharding(
        accelerator,
        model,
        micro_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_grad_norm=training.max_grad_norm,
    )
    for line in sharding_notes if console is not None else []:
        console.print(line)
    return method, model, tokenizer, report, loss_path


@dataclass
class StepPlan:
    """How many steps the run takes, counted from the data: micro-batches per epoch are per process."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def describe(self, training, processes: int) -> str:
        window = training.micro_batch_size * training.gradient_accumulation_steps * processes
        return (
            f"training {self.total_steps} steps ({self.steps_per_epoch} per epoch): global batch "
            f"{training.micro_batch_size} × {training.gradient_accumulation_steps} accumulation × {processes} "
            f"process(es) = {window} examples"
        )


def plan_steps(training, rows: int, processes: int) -> StepPlan:
    batches_per_epoch = math.ceil(rows / (training.micro_batch_size * processes))  # per process
    steps_per_epoch = math.ceil(batches_per_epoch / training.gradient_accumulation_steps)
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))
    warmup = training.warmup_steps or math.ceil(training.warmup_ratio * total_steps)
    return StepPlan(batches_per_epoch, steps_per_epoch, total_steps, warmup)


def build_optimizer(recipe: Recipe, accelerator, model, optimizer_cls, optimizer_kwargs, steps: StepPlan):
    """The optimizer over the trainable parameters and its schedule, with model and optimizer prepared by
    accelerate; returns (model, optimizer, scheduler)."""
    training = recipe.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls([{"params": trainable, "weight_decay": training.weight_decay}], **optimizer_kwargs)
    scheduler = build_scheduler(optimizer, training.lr_scheduler, steps.warmup_steps, steps.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler
