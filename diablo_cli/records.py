"""The plain records the commands return — what a merge, a quantization, an inspection or a parameter count
found — and the one progress callback they report through. Standard library only: computing code fills these
in, report/ renders them, and neither needs the other."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Progress = Callable[[str, int, "int | None"], None]
"""Called with (phase, done, total) as a long job goes; total is None for a phase of unknown length."""


@dataclass
class ModuleTypeCount:
    """Adapter parameters of all layers sharing one name (``q_proj``, ``down_proj``, ...)."""

    module: str
    layers: int = 0
    parameters: int = 0
    dead_parameters: int = 0
    blocks: set[int] = field(default_factory=set)
    shapes: set[tuple[int, int, int]] = field(default_factory=set)


@dataclass
class ParameterReport:
    """Trainable versus base parameters of an adapted model.

    ``base`` counts logical weights: a 4-bit or GPTQ layer counts ``in × out``, not its packed storage.
    ``dead`` counts adapter entries that only ever see zero padding (see BlockLayout.dead_parameters):
    they are included in ``adapter`` and ``trainable``, as the paper counts them, but never learn.
    """

    trainable: int
    adapter: int
    base: int
    dead: int
    dead_blocks: int
    by_module: list[ModuleTypeCount]

    @property
    def percent_of_base(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def to_dict(self) -> dict:
        return {
            "trainable": self.trainable,
            "adapter": self.adapter,
            "base": self.base,
            "percent_of_base": self.percent_of_base,
            "dead": self.dead,
            "dead_blocks": self.dead_blocks,
            "by_module": [
                {
                    "module": m.module,
                    "layers": m.layers,
                    "parameters": m.parameters,
                    "dead_parameters": m.dead_parameters,
                    "blocks": sorted(m.blocks),
                    "block_shapes": sorted(m.shapes),
                }
                for m in self.by_module
            ],
        }


@dataclass
class Verification:
    """How closely the merged model reproduces base+adapter on a probe batch of token ids."""

    max_abs: float
    max_relative: float
    adapter_effect: float  # max |logit change| the adapter makes over the bare base: 0 means a no-op
    tolerance: float
    tokens: int
    rounding_floor: float = 0.0  # relative logit change from rounding the bare base to the output dtype

    @property
    def passed(self) -> bool:
        return self.max_relative <= self.tolerance


@dataclass
class MergeReport:
    """What a merge did, for the CLI's summary and for Python callers."""

    output_dir: Path
    base: str
    base_dir: Path
    dtype: str
    adapted_weights: int = 0
    changed_weights: int = 0
    changed_values: int = 0
    adapted_values: int = 0  # weight entries the diagonal blocks cover (padding excluded)
    tensors: int = 0
    shards: int = 0
    bytes_written: int = 0
    untied: list[str] = field(default_factory=list)
    dequantized: str | None = None
    dequantization_gap: float | None = None  # max |logit change| from dequantizing a quantized base
    verification: Verification | None = None
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    cleaned: list[str] = field(default_factory=list)  # what interrupted merges left beside the output: removed


@dataclass
class LayerReport:
    """One quantized linear layer: how far its outputs moved on the calibration inputs."""

    name: str
    error: float  # ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖, Ŵ the dequantized result, W the original weight
    magr_error: float | None = None  # the same for MagR's full-precision W' alone
    max_before: float | None = None  # max |W| per output channel, mean over channels, before MagR
    max_after: float | None = None  # ... and after


@dataclass
class QuantizeReport:
    base: str
    output: str
    method: str
    bits: int
    group_size: int | None
    desc_act: bool = False
    magr: dict[str, Any] | None = None  # {"alpha", "iterations", "group_size"} when MagR ran
    calibration: dict[str, Any] = field(default_factory=dict)
    size_before_bytes: int = 0
    size_after_bytes: int = 0
    layers: list[LayerReport] = field(default_factory=list)
    perplexity_before: float | None = None
    perplexity_magr: float | None = None  # full precision after MagR, before quantizing
    perplexity_after: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    log: str | None = None
    cleaned: list[str] = field(default_factory=list)  # what interrupted quantizations left beside the output: removed

    def error_summary(self) -> dict[str, float]:
        errors = sorted(layer.error for layer in self.layers)
        if not errors:
            return {}
        return {
            "mean": sum(errors) / len(errors),
            "median": errors[len(errors) // 2],
            "max": errors[-1],
        }

    def worst_layer(self) -> LayerReport | None:
        return max(self.layers, key=lambda layer: layer.error, default=None)


@dataclass
class ModuleShape:
    """One kind of targeted layer (``q_proj``, ``down_proj``, …): its shape and how many layers have it."""

    module: str
    letters: str
    in_features: int
    out_features: int
    layers: int


@dataclass
class Candidate:
    """What a block count (one N, or one per module kind) costs on the targeted layers."""

    blocks: int | dict[str, int]
    trainable: int
    percent_of_base: float
    dead: int
    dead_blocks: int
    lora_rank: float  # the LoRA rank with the same budget: Σ N·d1·d2 = r · Σ (in + out)
    block_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    divides: bool = True  # N divides every targeted dimension (no padding)
    chosen: bool = False


@dataclass
class ModelInspection:
    """The model's linear layers, the targeted ones, and a table of candidate block counts."""

    model: str
    architecture: str
    base_parameters: int
    linear_modules: list[ModuleShape]
    targets: str | list[str]
    layers: tuple[int, int] | None
    targeted: list[ModuleShape]
    candidates: list[Candidate]
    budget: int | None = None
    budget_source: str | None = None
    recipe_snippet: str | None = None
    lora_rank: int | None = None  # the equal-budget LoRA baseline, once N is chosen
    lora_snippet: str | None = None
    memory_settings: dict[str, Any] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)  # bytes by part, DiaBlo then LoRA
    probe: list[dict[str, Any]] = field(default_factory=list)  # ProbedModule rows, with --probe
    scaling: dict[str, Any] = field(default_factory=dict)  # scaling.ScalingEstimate of the DiaBlo choice
    notes: list[str] = field(default_factory=list)  # e.g. target letters no linear layer holds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerNorm:
    """How far one adapted layer moved: the Frobenius norm of its blocks (zero at initialisation)."""

    module: str
    blocks: int
    parameters: int
    norm: float

    @property
    def rms(self) -> float:
        """Norm per entry: comparable across layers of different sizes."""
        return self.norm / math.sqrt(self.parameters) if self.parameters else 0.0


@dataclass
class AdapterInspection:
    """An adapter folder's recorded settings, its size, and which layers its training moved most."""

    path: str
    base_model: str | None
    config: dict[str, Any] | None
    adapter_dtype: Any
    parameters: int
    bytes_on_disk: int
    layers: list[LayerNorm]
    by_module: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProbedModule:
    """Effective ranks of one module kind's inputs (r1) and output gradients (r2), and what Theorem 2 allows."""

    module: str
    in_features: int
    out_features: int
    layers: int
    rows: int  # b: tokens per probed batch
    r1_mean: float
    r1_max: int
    r2_mean: float
    r2_max: int
    largest_n: int | None  # with the largest ranks seen, so the condition holds for every probed layer
    approximate_bound: float  # m1·m2 / (r1·r2), the paper's ceiling-free form


@dataclass
class TrainableGroup:
    """The trainable tensors of one kind (``q_proj.lora_A``, ``q_proj`` under full fine-tuning ...)."""

    kind: str
    tensors: int
    shapes: list[str]  # distinct shapes, as "in×out"
    parameters: int


@dataclass
class SupervisedRun:
    """Consecutive tokens of a training row that are all supervised or all masked, decoded."""

    example: int  # which packed example they belong to (0 when the row holds one)
    supervised: bool
    text: str


@dataclass
class ConversionReport:
    """What ``diablo convert`` did, in either direction (``to``: "diablo" or "official")."""

    source: Path
    output: Path
    to: str
    blocks: int  # the official --num_blocks N
    blocks_from: str  # how N was found: "--blocks", "the run folder's name", "the shapes", "the adapter"
    modules: int
    parameters: int
    dtype: str
    shrunk: dict[str, int] = field(default_factory=dict)  # module kind → N_eff, where the official code shrank N
    targets: str | list[str] = ""
    layers: tuple[int, int] | None = None
    dropout: float = 0.0
    trimmed: int = 0  # layers whose trailing padding-only blocks the official layout leaves out
    official_arguments: str | None = None  # what to pass the official scripts
    notes: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)


@dataclass
class ExtractedModule:
    """One layer of a full fine-tune's update: its Frobenius energy, and how much of it the diagonal blocks hold."""

    name: str
    blocks: int
    update_energy: float  # ‖W_ft − W_pre‖²_F
    kept_energy: float  # ‖diagonal blocks of W_ft − W_pre‖²_F (before the scale s)

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def share(self) -> float | None:
        """The share of the update's energy the blocks keep; None for a layer the fine-tune left unchanged."""
        return self.kept_energy / self.update_energy if self.update_energy > 0 else None


@dataclass
class ExtractReport:
    """What ``diablo extract`` took from a full fine-tune, for the CLI's table and for Python callers."""

    base: str
    finetuned: str
    output: Path
    blocks: int
    scale: float
    modules: list[ExtractedModule] = field(default_factory=list)
    parameters: int = 0
    other_energy: float = 0.0  # the update's energy in tensors outside the targeted layers (left out)
    other_tensors: int = 0  # how many such tensors changed
    budget_source: str | None = None  # "1% of 6,738,415,616" when --budget chose N
    cleaned: list[str] = field(default_factory=list)

    @property
    def targeted_energy(self) -> float:
        return sum(m.update_energy for m in self.modules)

    def kinds(self) -> list[str]:
        """The module kinds (``q_proj``, ...) in model order."""
        return list(dict.fromkeys(m.kind for m in self.modules))

    @staticmethod
    def share_of(modules: list[ExtractedModule]) -> float | None:
        """The energy the blocks keep over the update's, summed over ``modules``."""
        update = sum(m.update_energy for m in modules)
        return sum(m.kept_energy for m in modules) / update if update > 0 else None
