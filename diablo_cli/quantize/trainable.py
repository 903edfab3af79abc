"""Training through quantized layers: gradients must reach every adapter, and never the packed weights.

A DiaBlo layer calls its quantized base as it is, so an adapter's gradient ``Xᵀ g`` is right only if every
quantized layer *after* it passes the gradient back to its input. Two CPU kernels stop doing that without a
word, both after one eval-mode forward pass without gradients (an evaluation before training, a validation
pass), and both from then on, in training mode too:

- GPTQModel's ``TorchAtenLinear`` (its automatic choice on CPU) and ``TorchFusedLinear`` repack their weights
  for an int4 op that runs under ``torch.no_grad`` (``linear_mode = "inference"``); the packed weights then no
  longer dequantize either. Their ``SUPPORTS_TRAINING`` flag is set all the same.
- bitsandbytes' ``Linear4bit``, on a CPU with AVX512-BF16, repacks its weight for a CPU kernel whose output
  has no gradient path to the input; the repacking also fails outright unless out_features is a multiple of
  32 and in_features of the quantization block size.

:func:`prepare_quantized_training` checks every quantized layer's kernel and pins it to its differentiable
path before the model first runs. A layer that already switched is refused: nothing reliable undoes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import DiaBloError
from ..models import TRAINABLE_QUANTIZATION, base_quantization, describe_quantization
from .dequantize import quantization_kind, quantized_layers

_INFERENCE = "inference"  # GPTQModel's LinearMode.INFERENCE (a str enum)
_TRAIN = "train"


@dataclass
class QuantizedBase:
    """What a quantized base is and which kernels its layers run, for the training report."""

    settings: dict[str, Any]  # base_quantization(): method, bits, group size / quant type
    layers: int = 0
    kernels: dict[str, str] = field(default_factory=dict)  # kernel class → how it trains

    def describe(self) -> str:
        """``GPTQ 4-bit, group 128, kernel TorchLinear (trainable), 21 quantized layers``."""
        kernels = ", ".join(f"kernel {name} ({how})" for name, how in self.kernels.items())
        return f"{describe_quantization(self.settings)}, {kernels}, {self.layers} quantized layers"


def prepare_quantized_training(model: nn.Module) -> QuantizedBase | None:
    """Make every quantized layer of ``model`` safe to train adapters through, before the model first runs.

    Freezes the packed weights, pins kernels that could switch to a no-gradient inference path to their
    training path, and refuses kernels that cannot pass gradients (or already switched) with a one-line
    error. Returns what the base is, or None for a full-precision model.
    """
    settings = base_quantization(getattr(model, "config", None))
    layers = quantized_layers(model)
    if settings is None and not layers:
        return None
    if settings is not None and settings["method"] not in TRAINABLE_QUANTIZATION:
        raise DiaBloError(
            f"the base is quantized with {settings['method']}; diablo-cli trains on GPTQ and bitsandbytes "
            "(4-bit, 8-bit) bases only"
        )
    if settings is None:  # quantized layers put in by hand: describe them by the first one
        first = next(iter(layers.values()))
        kind = quantization_kind(first)
        settings = {"method": kind, "bits": int(getattr(first, "bits", 4 if kind == "bnb-4bit" else 8))}
    base = QuantizedBase(settings, layers=len(layers))
    for name, module in layers.items():
        module.requires_grad_(False)
        kind = quantization_kind(module)
        how = _prepare_gptq(name, module) if kind == "gptq" else _prepare_bitsandbytes(name, module, kind)
        base.kernels.setdefault(type(module).__name__, how)
    return base


def _prepare_gptq(name: str, module: nn.Module) -> str:
    kernel = type(module).__name__
    if not getattr(module, "SUPPORTS_TRAINING", False):
        raise DiaBloError(
            f"{name}: the GPTQ kernel {kernel} cannot pass gradients; load the base with GPTQModel's torch "
            "backend (diablo_cli.models.load_base_model does)"
        )
    if not hasattr(module, "linear_mode"):
        return "trainable"
    if module.linear_mode == _INFERENCE:
        raise DiaBloError(
            f"{name}: the GPTQ kernel {kernel} switched to its inference path (no gradients, repacked weights) "
            "when the model ran without gradients; load the base again and prepare it before any forward pass"
        )
    module.linear_mode = _TRAIN  # the dequantize-and-matmul path, for good
    return "pinned to its training path"


def _prepare_bitsandbytes(name: str, module: nn.Module, kind: str) -> str:
    if kind == "bnb-8bit":  # LLM.int8 passes gradients to its input in both modes (measured, bitsandbytes 0.50)
        # ... and logs the fp16 cast below on every call of every layer; the report says it once instead.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return "trainable; its int8 matmul casts activations to fp16"
    state = getattr(module.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        raise DiaBloError(
            f"{name}: bitsandbytes repacked this 4-bit weight for its CPU inference kernel (which passes no "
            "gradients) when the model ran without gradients; load the base again and prepare it before any "
            "forward pass"
        )
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False  # never repack: keep the differentiable dequantize path
        return "CPU repacking off"
    return "trainable"
