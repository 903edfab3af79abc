"""Quantized bases: ``diablo quantize`` (GPTQ through GPTQModel, round-to-nearest, bitsandbytes 4-bit, MagR
preprocessing), training safely through quantized kernels, and dequantizing their packed layers (merging
needs a float weight)."""

from .dequantize import (
    dequantize_linear,
    dequantize_model,
    dequantize_weight,
    dequantized_layers,
    dequantized_weights,
    quantization_kind,
    replace_layers,
)
from .magr import magr
from .pipeline import QuantizeReport, quantize_model, read_quantize_report
from .trainable import prepare_quantized_training

__all__ = [
    "QuantizeReport",
    "dequantize_linear",
    "dequantize_model",
    "dequantize_weight",
    "dequantized_layers",
    "dequantized_weights",
    "magr",
    "prepare_quantized_training",
    "quantization_kind",
    "quantize_model",
    "read_quantize_report",
    "replace_layers",
]
