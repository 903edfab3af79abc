"""Quantized bases: turning their packed layers back into dense ones (merging needs a float weight).

bitsandbytes 4-bit (NF4/FP4) and 8-bit layers, and GPTQ quant-linear layers from GPTQModel, become plain
``nn.Linear`` layers holding the dequantized weight, which is exactly the weight the quantized layer
multiplies by. GPTQ layers must not have run an inference-only kernel first (see ``quantization_kind``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapter.layer import DiaBloLinear
from ..errors import DiaBloError


def quantization_kind(module: nn.Module) -> str | None:
    """``bnb-4bit``, ``bnb-8bit`` or ``gptq`` for a quantized linear layer; None for anything else."""
    weight = getattr(module, "weight", None)
    if getattr(weight, "quant_state", None) is not None or type(weight).__name__ == "Params4bit":
        return "bnb-4bit"
    if type(weight).__name__ == "Int8Params" or type(module).__name__ == "Linear8bitLt":
        return "bnb-8bit"
    if hasattr(module, "qweight") and callable(getattr(module, "dequantize_weight", None)):
        return "gptq"
    return None


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense ``(out, in)`` fp32 weight a quantized linear layer computes with."""
    kind = quantization_kind(module)
    if kind == "bnb-4bit":
        import bitsandbytes.functional as bnb_functional

        weight = module.weight
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its AVX512 CPU kernel on the first eval-mode forward, and
            # its inverse is lossy for some shapes (measured: up to 0.03 off on a 64×128 layer): refuse.
            raise DiaBloError(
                f"{type(module).__name__}: bitsandbytes repacked this 4-bit weight for its CPU kernel when the "
                "model ran; dequantize right after loading, before any forward pass"
            )
        return bnb_functional.dequantize_4bit(data, state).float()
    if kind == "bnb-8bit":
        import bitsandbytes.functional as bnb_functional

        weight = module.weight
        codes = getattr(weight, "CB", None)
        scales = getattr(weight, "SCB", None)
        if codes is None:  # after the first forward pass bitsandbytes keeps the int8 codes in .data
            codes, scales = weight.data, getattr(module.state, "SCB", None)
        if scales is None:
            raise DiaBloError(f"{type(module).__name__}: the 8-bit layer has no scales (SCB); was it quantized?")
        return bnb_functional.int8_vectorwise_dequant(codes, scales).float()
    if kind == "gptq":
        dense = module.dequantize_weight().float()  # GPTQ packs (in, out)
        expected = (module.in_features, module.out_features)
        if tuple(dense.shape) != expected:
            raise DiaBloError(f"GPTQ layer dequantized to {tuple(dense.shape)}, expected {expected}")
        return dense.T
    raise DiaBloError(f"{type(module).__name__} is not a quantized linear layer diablo-cli can dequantize")


def dequantize_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` that computes what the quantized ``module`` computes."""
    weight = dequantize_weight(module)
    bias = getattr(module, "bias", None)
    device = weight.device
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight.to(dtype))
        if bias is not None:
            dense.bias.copy_(bias.detach().to(dtype))
    dense.requires_grad_(False)
    return dense


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear layer by path (the bases inside DiaBlo layers included)."""
    return {
        name: module
        for name, module in model.named_modules()
        if not isinstance(module, DiaBloLinear) and quantization_kind(module) is not None
    }


def dequantized_layers(model: nn.Module, dtype: torch.dtype) -> dict[str, nn.Linear]:
    """A dense stand-in for every quantized linear layer (also those inside DiaBlo layers), by path.

    Call it before the model runs: bitsandbytes' CPU kernel repacks 4-bit weights on the first forward.
    """
    return {name: dequantize_linear(module, dtype) for name, module in quantized_layers(model).items()}


def replace_layers(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put ``layers`` in place by path and drop the model's claim to be quantized."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:  # transformers would treat it as still quantized
        model.hf_quantizer = None
    for attribute in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attribute, False):
            setattr(model, attribute, False)


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized linear layer by a dense one in ``dtype``; returns how many were replaced."""
    layers = dequantized_layers(model, dtype)
    replace_layers(model, layers)
    return len(layers)


def dequantized_weights(folder: str | Path, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """Every quantized layer of a saved model, dequantized to fp32 ``(out, in)`` and keyed by module path,
    loaded the way training loads it (transformers, GPTQ on the autograd-friendly torch kernel) and read before
    any forward pass could repack it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import quantized_loading

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        **quantized_loading(str(folder), config, None),
    )
    return {name: dequantize_weight(module).contiguous() for name, module in quantized_layers(model).items()}
