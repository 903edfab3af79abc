"""What to adapt and how: the settings that fully describe a DiaBlo adapter, independent of any model."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import DiaBloError
from .kernels import check_kernel

MODULE_LETTERS = "QKVOGUD"
"""The paper's module letters: query, key, value, output, gate, up, down."""

ADAPTER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def is_letter_spec(spec: str) -> bool:
    """True for strings such as "QKVUD" that name modules by the paper's letters (no repeats)."""
    return bool(spec) and all(c in MODULE_LETTERS for c in spec) and len(set(spec)) == len(spec)


def letters_in_either_case(spec: str) -> str:
    """``qkvud`` (the official DiaBlo code's spelling) as ``QKVUD``; any other string as it is. Only
    ``target_modules`` reads letters case-blind: as a regex a lowercase ``qkvud`` must match a whole dotted path,
    so it names no real layer, whereas a ``blocks_by_module`` key such as T5's ``o`` is a module name."""
    return spec.upper() if isinstance(spec, str) and is_letter_spec(spec.upper()) else spec


def canonical_dtype(name: str) -> str:
    """Map "fp32"/"bf16"/"fp16" and torch spellings to one of ADAPTER_DTYPES' keys."""
    key = str(name).removeprefix("torch.").lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in ADAPTER_DTYPES:
        raise DiaBloError(
            f"dtype: {name!r} is not an adapter dtype; use one of {', '.join(ADAPTER_DTYPES)} (or fp32/bf16/fp16)"
        )
    return key


@dataclass
class DiaBloConfig:
    """Settings of a DiaBlo adapter.

    ``target_modules`` is either the paper's letters ("QKVUD", or "qkvud" as the official code spells them),
    ``"all-linear"`` (every linear layer of
    the transformer blocks, not the output head), a list of module names (matched against the end of the
    dotted module path, as in PEFT), or any other string, read as a regular expression that must match
    the whole dotted path. ``layers`` restricts adaptation to an inclusive range of block indices
    (paper A.3.7). ``blocks_by_module`` overrides ``blocks`` for a letter or a module name, e.g.
    ``{"D": 128}``. ``dropout`` acts on the adapter branch only. ``dtype`` is the adapter's own dtype:
    fp32 by default whatever the base's dtype (the paper's setting). ``kernel`` is how layers compute, not
    what they learn: ``auto`` folds the blocks into dense float base weights during training (one extra
    product per step instead of three, see :mod:`.kernels`), ``blocks`` keeps them separate everywhere.
    """

    blocks: int = 64
    target_modules: str | list[str] = "QKVUD"
    layers: tuple[int, int] | None = None
    blocks_by_module: dict[str, int] = field(default_factory=dict)
    dropout: float = 0.0
    dtype: str = "float32"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        self.blocks = _check_block_count("blocks", self.blocks)
        self.blocks_by_module = {
            str(key): _check_block_count(f"blocks_by_module[{key!r}]", value)
            for key, value in dict(self.blocks_by_module).items()
        }
        self.target_modules = _check_targets(self.target_modules)
        if self.layers is not None:
            self.layers = _check_layer_range(self.layers)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not (0.0 <= self.dropout < 1.0)
        ):
            raise DiaBloError(f"dropout: {self.dropout!r} must be a number in [0, 1)")
        self.dropout = float(self.dropout)
        self.dtype = canonical_dtype(self.dtype)
        self.kernel = check_kernel(self.kernel)

    @property
    def torch_dtype(self) -> torch.dtype:
        return ADAPTER_DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiaBloConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise DiaBloError(f"unknown DiaBlo setting(s) {unknown}; valid settings are {sorted(known)}")
        return cls(**data)


def _check_block_count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DiaBloError(f"{key}: {value!r} must be a positive whole number of diagonal blocks")
    return value


def _check_targets(targets: Any) -> str | list[str]:
    if isinstance(targets, str):
        targets = letters_in_either_case(targets)
        if not targets:
            raise DiaBloError("target_modules: empty; use letters such as 'QKVUD', a list of names or a regex")
        if not is_letter_spec(targets) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as err:
                raise DiaBloError(
                    f"target_modules: {targets!r} is neither module letters from {MODULE_LETTERS!r} "
                    f"(each at most once) nor a valid regular expression ({err})"
                ) from None
        return targets
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
        return list(targets)
    raise DiaBloError(
        f"target_modules: {targets!r} must be letters such as 'QKVUD', 'all-linear', a non-empty list of "
        "module names, or a regex string"
    )


def _check_layer_range(layers: Any) -> tuple[int, int]:
    if (
        isinstance(layers, (list, tuple))
        and len(layers) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        and layers[0] <= layers[1]
    ):
        return (layers[0], layers[1])
    raise DiaBloError(f"layers: {layers!r} must be [first, last], whole numbers with 0 <= first <= last")
