"""Putting adapters into a model and taking them out again (merge)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import nn

from ..errors import DiaBloError
from .config import DiaBloConfig
from .layer import DiaBloLinear
from .targets import Target, select_targets

log = logging.getLogger("diablo_cli")

CONFIG_ATTRIBUTE = "diablo_config"
"""Attribute under which an adapted model keeps the DiaBloConfig it was adapted with."""


def adapted_layers(model: nn.Module) -> dict[str, DiaBloLinear]:
    """Every DiaBlo layer in ``model`` by dotted path, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, DiaBloLinear)}


_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def bare_name(name: str) -> str:
    """A module or parameter name as the bare model has it: without the path segments that FSDP, activation
    checkpoint wrappers and torch.compile insert."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def attach_diablo(model: nn.Module, config: DiaBloConfig) -> nn.Module:
    """Wrap the layers ``config`` selects with zero-initialised DiaBlo adapters, in place.

    Afterwards only the adapter blocks require gradients; the model's outputs are unchanged until the
    blocks are trained. Returns ``model`` for chaining.
    """
    if adapted_layers(model):
        raise DiaBloError("this model already has DiaBlo adapters; merge them or start from a fresh base")
    targets = select_targets(model, config)
    wrap_targets(model, targets, dropout=config.dropout, dtype=config.torch_dtype, trainable=True, kernel=config.kernel)
    setattr(model, CONFIG_ATTRIBUTE, config)
    return model


def wrap_targets(
    model: nn.Module, targets: list[Target], *, dropout: float, dtype, trainable: bool, kernel: str = "auto"
) -> None:
    """Freeze everything, then replace each target layer by a DiaBloLinear around it."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    aliases = tied_parameter_names(model)
    dead_blocks = 0
    for target in targets:
        base = model.get_submodule(target.name)
        layer = DiaBloLinear(base, target.blocks, dropout=dropout, dtype=dtype, kernel=kernel)
        layer.shares_weight = bool(aliases.get(f"{target.name}.weight"))  # folding would write into the other
        layer.diablo_blocks.requires_grad_(trainable)
        _replace_module(model, target.name, layer)
        dead_blocks += layer.layout.dead_blocks
    if dead_blocks:
        log.warning(
            "%d diagonal blocks lie wholly in the zero padding and will never train: N·⌈features/N⌉ overshoots "
            "a layer's features by a block or more; a block count that divides the layers' dimensions avoids this",
            dead_blocks,
        )


def describe_kernel(model: nn.Module) -> str:
    """One line for ``diablo train``: how many adapted layers fold their blocks into the base weight in training."""
    layers = list(adapted_layers(model).values())
    folding = sum(layer.can_fold(training=True) for layer in layers)
    if folding == len(layers):
        return f"kernel: fold on all {len(layers)} layers (blocks added into the frozen weights; one extra product)"
    if folding == 0:
        return f"kernel: blocks on all {len(layers)} layers (separate block products)"
    return f"kernel: fold on {folding} of {len(layers)} layers, blocks on the rest (quantized, tied or non-dividing)"


def merge_diablo(model: nn.Module, *, keep_adapter: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (``W = W0 + blockdiag(D)ᵀ``, arithmetic in fp32).

    By default the DiaBlo layers are then removed, leaving the model's original plain layers with merged
    weights. ``keep_adapter=True`` keeps them in a merged state so :func:`unmerge_diablo` can undo it.
    """
    layers = adapted_layers(model)
    if not layers:
        raise DiaBloError("this model has no DiaBlo adapters to merge")
    for layer in layers.values():  # all or nothing: never leave a model half-merged
        layer.check_mergeable()
    _untie_shared_weights(model, layers)
    for name, layer in layers.items():
        layer.merge()
        if not keep_adapter:
            _replace_module(model, name, layer.base)
    if not keep_adapter and hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    return model


def unmerge_diablo(model: nn.Module) -> nn.Module:
    """Subtract merged adapters from their base weights again (after ``merge_diablo(keep_adapter=True)``)."""
    layers = adapted_layers(model)
    if not layers:
        raise DiaBloError("this model has no DiaBlo adapters to unmerge")
    for layer in layers.values():
        layer.unmerge()
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its bare base inside the block (to compare base and adapted outputs in one model)."""
    layers = adapted_layers(model).values()
    previous = [layer.active for layer in layers]
    try:
        for layer in layers:
            layer.active = False
        yield model
    finally:
        for layer, active in zip(layers, previous, strict=True):
            layer.active = active


def detach_diablo(model: nn.Module) -> nn.Module:
    """Take every (unmerged) adapter off again, leaving the base layers exactly as they were: one loaded base
    can then carry several adapters in turn (``diablo eval`` with several ``--adapter``)."""
    for name, layer in adapted_layers(model).items():
        if layer.merged:
            raise DiaBloError(f"{name}: the adapter is merged into the weight; unmerge it before detaching")
        layer.unfold()
        _replace_module(model, name, layer.base)
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    return model


def tied_parameter_names(model: nn.Module) -> dict[str, list[str]]:
    """For each parameter name, the other names the same tensor goes by (tied embeddings); [] when untied."""
    by_tensor: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(parameter), []).append(name)
    return {name: [other for other in names if other != name] for names in by_tensor.values() for name in names}


def _untie_shared_weights(model: nn.Module, layers: dict[str, DiaBloLinear]) -> None:
    """A merged update belongs to one layer only: a weight tied to another module (``lm_head`` and the input
    embeddings) is copied first, and the model's config no longer claims the tie."""
    aliases = tied_parameter_names(model)
    for name, layer in layers.items():
        if aliases.get(f"{name}.base.weight"):
            log.info("%s shares its weight with another module (tied embeddings); merging into a copy", name)
            layer.untie_base_weight()
            config = getattr(model, "config", None)
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False


def _replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, replacement)
