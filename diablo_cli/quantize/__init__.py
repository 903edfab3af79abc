"""Quantized bases: dequantizing their packed layers (merging needs a float weight), and ``diablo quantize``
(GPTQ through GPTQModel, round-to-nearest, bitsandbytes 4-bit, MagR preprocessing)."""

from .dequantize import (
    dequantize_linear,
    dequantize_model,
    dequantize_weight,
    dequantized_layers,
    quantization_kind,
    replace_layers,
)

__all__ = [
    "dequantize_linear",
    "dequantize_model",
    "dequantize_weight",
    "dequantized_layers",
    "quantization_kind",
    "replace_layers",
]
