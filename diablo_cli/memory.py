"""A first-order estimate of training memory, so a recipe can be sized before it runs.

Weights at their dtype; the adapter in its dtype with its gradient and AdamW's two fp32 moments;
activations per the usual transformer accounting (Korthikanti et al. 2022: about 34·h + 5·a·s bytes
per token per layer at 16-bit, only the layer inputs when checkpointing), plus the fp32 logits and their
gradient: of every token under the dense loss, of one slice of rows under the chunked one (loss.py).
`diablo inspect` will refine it; here it is a sanity check, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    weights: float
    adapter_and_optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter_and_optimizer + self.activations + self.logits

    def describe(self) -> str:
        gib = 2**30
        return (
            f"≈ {self.total / gib:.2f} GiB (weights {self.weights / gib:.2f}, adapter + grads + AdamW "
            f"{self.adapter_and_optimizer / gib:.2f}, activations {self.activations / gib:.2f}, logits "
            f"{self.logits / gib:.2f}); a first-order estimate"
        )


def estimate_training_memory(
    config,
    *,
    base_parameters: int,
    trainable_parameters: int,
    base_dtype: str,
    adapter_dtype: str,
    batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    logits_rows: int | None = None,
) -> MemoryEstimate:
    """``logits_rows``: the rows of logits the loss holds at once (None: every token's, the dense loss)."""
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    act_bytes = _BYTES.get(base_dtype, 4)
    tokens = batch * seq_len
    if gradient_checkpointing:
        per_layer = tokens * hidden * act_bytes  # the saved layer input; one layer is recomputed at a time
        activations = layers * per_layer + tokens * (34 * hidden + 5 * heads * seq_len) * act_bytes / 2
    else:
        activations = layers * tokens * (34 * hidden + 5 * heads * seq_len) * act_bytes / 2
    adapter_bytes = _BYTES.get(adapter_dtype, 4)
    return MemoryEstimate(
        weights=base_parameters * act_bytes,
        adapter_and_optimizer=trainable_parameters * (2 * adapter_bytes + 8),
        activations=activations,
        logits=2 * min(tokens, logits_rows or tokens) * config.vocab_size * 4,
    )


QUANTIZED_BITS = {"none": None, "bnb-4bit": 4.127, "bnb-8bit": 8.0, "gptq-4bit": 4.25, "gptq-8bit": 8.25}
"""Bits per linear weight, storage overhead included (NF4 with double-quantised scales; GPTQ group 128)."""


def packed_weights_bytes(base_parameters: int, linear_parameters: int, dtype: str, bits: float) -> float:
    """A quantized base's weights: its linear layers at ``bits`` each, everything else as ``dtype`` stores it."""
    return (base_parameters - linear_parameters) * _BYTES.get(dtype, 4) + linear_parameters * bits / 8


def packed_weight_bits(settings: dict) -> float:
    """Bits per packed linear weight of a base quantized as ``settings`` says (``models.base_quantization``):
    bitsandbytes as above; GPTQ its bits plus an fp16 scale and a packed zero point per group."""
    method = settings["method"]
    if method in ("bnb-4bit", "bnb-8bit"):
        return QUANTIZED_BITS[method]
    group = settings.get("group_size") or 128
    return settings.get("bits", 4) + (32 / group if group > 0 else 0)


@dataclass
class AdapterMemory:
    """Training memory of one adapter choice, by part, in bytes; ``checkpointed`` with gradient checkpointing."""

    method: str
    trainable: int
    weights: float
    adapter_and_optimizer: float
    activations: float
    checkpointed_activations: float
    adapter_inputs: float  # what the adapter branch saves for its own backward
    checkpointed_adapter_inputs: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter_and_optimizer + self.activations + self.adapter_inputs + self.logits

    @property
    def checkpointed_total(self) -> float:
        return (
            self.weights
            + self.adapter_and_optimizer
            + self.checkpointed_activations
            + self.checkpointed_adapter_inputs
            + self.logits
        )


def compare_adapter_memory(
    config,
    *,
    base_parameters: int,
    linear_parameters: int,
    targeted: list[tuple[int, int, int]],
    diablo_trainable: int,
    lora_rank: int,
    dtype: str,
    adapter_dtype: str,
    quantization: str,
    batch: int,
    seq_len: int,
    logits_rows: int | None = None,
) -> list[AdapterMemory]:
    """DiaBlo and LoRA (rank ``lora_rank``) on the same layers, same base, same batch: the parts that differ are
    the trainable count and what each adapter saves for backward (DiaBlo: its input in the adapter dtype;
    LoRA: its input and ``x·A``); ``logits_rows`` as in estimate_training_memory. ``targeted`` lists
    (in_features, out_features, layer count) per kind.
    ``linear_parameters`` are the weights a quantization method packs (``quantization`` in QUANTIZED_BITS)."""
    if quantization not in QUANTIZED_BITS:
        raise ValueError(f"quantization {quantization!r}: one of {', '.join(QUANTIZED_BITS)}")
    plain, checkpointed = (
        estimate_training_memory(
            config,
            base_parameters=base_parameters,
            trainable_parameters=0,
            base_dtype=dtype,
            adapter_dtype=adapter_dtype,
            batch=batch,
            seq_len=seq_len,
            gradient_checkpointing=checkpointing,
            logits_rows=logits_rows,
        )
        for checkpointing in (False, True)
    )
    bits = QUANTIZED_BITS[quantization]
    weights = plain.weights
    if bits is not None:
        weights = packed_weights_bytes(base_parameters, linear_parameters, dtype, bits)
    tokens = batch * seq_len
    adapter_bytes = _BYTES.get(adapter_dtype, 4)
    layers = max(1, getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 1))
    inputs = tokens * sum(i * count for i, _, count in targeted) * adapter_bytes
    lora_extra = tokens * lora_rank * sum(count for _, _, count in targeted) * adapter_bytes
    lora_trainable = lora_rank * sum((i + o) * count for i, o, count in targeted)
    per_parameter = 2 * adapter_bytes + 8  # the parameter, its gradient, AdamW's two fp32 moments
    rows = []
    for method, trainable, saved in (
        ("DiaBlo", diablo_trainable, inputs),
        (f"LoRA r={lora_rank}", lora_trainable, inputs + lora_extra),
    ):
        rows.append(
            AdapterMemory(
                method=method,
                trainable=trainable,
                weights=weights,
                adapter_and_optimizer=trainable * per_parameter,
                activations=plain.activations,
                checkpointed_activations=checkpointed.activations,
                adapter_inputs=saved,
                checkpointed_adapter_inputs=saved / layers,  # recomputed layer by layer
                logits=plain.logits,
            )
        )
    return rows
