"""Counting parameters: what trains, what the base holds, and what is wasted on padding."""

from __future__ import annotations

from torch import nn

from ..records import ModuleTypeCount, ParameterReport
from .layer import DiaBloLinear, linear_features


def base_parameter_count(model: nn.Module) -> int:
    """Logical parameters of the base model, excluding adapters; tied weights are counted once."""
    counted: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, DiaBloLinear):
            counted.add(id(module.diablo_blocks))
            continue
        features = linear_features(module)
        if features is None:
            continue
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) not in counted:  # a weight shared by two layers counts once
            total += features[0] * features[1]
        bias = getattr(module, "bias", None)
        if bias is not None and id(bias) not in counted:
            total += bias.numel()
        counted.update(id(t) for t in (weight, bias) if t is not None)
    for parameter in model.parameters():
        if id(parameter) not in counted:
            total += parameter.numel()
            counted.add(id(parameter))
    return total


def parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable, adapter, base and dead-padding parameter counts, with a breakdown by module name."""
    by_module: dict[str, ModuleTypeCount] = {}
    adapter = dead = dead_blocks = 0
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, DiaBloLinear)):
        layout = layer.layout
        entry = by_module.setdefault(name.rsplit(".", 1)[-1], ModuleTypeCount(name.rsplit(".", 1)[-1]))
        entry.layers += 1
        entry.parameters += layout.parameters
        entry.dead_parameters += layout.dead_parameters
        entry.blocks.add(layout.blocks)
        entry.shapes.add(layout.shape)
        adapter += layout.parameters
        dead += layout.dead_parameters
        dead_blocks += layout.dead_blocks
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterReport(
        trainable=trainable,
        adapter=adapter,
        base=base_parameter_count(model),
        dead=dead,
        dead_blocks=dead_blocks,
        by_module=list(by_module.values()),
    )
