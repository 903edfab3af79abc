"""`diablo train --dry-run` and `diablo inspect RECIPE`: what a run would do, on a weightless model."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from ..errors import DiaBloError
from ..loss import held_logit_rows, planned_loss
from ..models import base_quantization
from ..recipe import Recipe
from ..report import describe_supervision
from .setup import attach_adapter, print_dtype, training_layout


def show_plan(recipe: Recipe, console: Console):
    """The resolved recipe, its parameter table on a weightless (meta-device) model and the memory
    estimate; touches no data and no weights. Returns the base's tokenizer and config."""
    from rich.syntax import Syntax
    from transformers import AutoConfig, AutoTokenizer

    from ..memory import estimate_training_memory, packed_weight_bits, packed_weights_bytes
    from ..models import (
        base_dtype,
        check_local_model,
        compute_device,
        describe_quantization,
        resolve_model,
        skeleton_model,
    )
    from ..precision import choose_dtype
    from ..quantize.pipeline import quantized_layer_names

    console.print(Syntax(recipe.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    source = resolve_model(recipe.base_model)
    check_local_model(source, recipe.base_model, trust_remote_code=recipe.model.trust_remote_code)
    kwargs = {"trust_remote_code": recipe.model.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, revision=recipe.model.revision, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=recipe.model.revision, **kwargs)
    except (OSError, ValueError) as err:
        from ..models import _explain_load_failure

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
        training_layout(config)
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
    return tokenizer, config


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
    from ..data import prepare_data, supervision_runs

    console = console or Console()
    tokenizer, config = show_plan(recipe, console)
    seq2seq = training_layout(config) == "seq2seq"
    sample = recipe.data.model_copy(
        update={
            "datasets": [s.model_copy(update={"limit": min(s.limit or 16, 16)}) for s in recipe.data.datasets],
            "validation_ratio": 0.0,
            "validation_split": None,
        }
    )
    data = prepare_data(sample, tokenizer, seed=recipe.training.seed, seq2seq=seq2seq)
    for index in range(min(examples, len(data.train))):
        console.rule(f"example {index + 1}: [bold green]supervised[/] / [dim]masked[/]")
        console.print(describe_supervision(supervision_runs(tokenizer, data.train[index], seq2seq=seq2seq)))
