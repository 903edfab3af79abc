"""Recipes: the YAML files that say what to train. Strict: every mistake names its key path and what is valid.

A recipe may ``extends:`` another (paths relative to the recipe's folder); keys given later win, nested
sections merge. ``--set a.b.c=VALUE`` overrides any key, the value read as a YAML scalar. Paths to data
files are resolved relative to the recipe's folder; ``bundled://NAME`` points into the package's
resources (the quickstart's data ships inside the package).
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from .adapter.config import DiaBloConfig, canonical_dtype
from .data.config import DataConfig, DatasetSource
from .divergence import DivergenceRule
from .errors import DiaBloError, did_you_mean
from .reading import read_text

BUNDLED_SCHEME = "bundled://"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


_BNB_4BIT_OPTIONS = ("quant_type", "double_quant", "compute_dtype")


class QuantizationSection(_Section):
    """A quantized base under the adapters. ``bnb-4bit``/``bnb-8bit`` quantize a full-precision checkpoint with
    bitsandbytes as it loads; ``gptq`` loads a GPTQ checkpoint (from `diablo quantize`, GPTQModel or
    transformers). ``none`` loads the checkpoint as it was saved, so a GPTQ or bitsandbytes checkpoint still
    loads quantized; a method names what the checkpoint must be (or become) and is checked against it."""

    method: Literal["none", "bnb-4bit", "bnb-8bit", "gptq"] = "none"
    quant_type: Literal["nf4", "fp4"] | None = None  # bnb-4bit; default nf4
    double_quant: bool | None = None  # bnb-4bit: quantize the quantization constants too (QLoRA); default true
    # bnb-4bit: the dtype its matmuls run in; default the model's dtype
    compute_dtype: Literal["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"] | None = None
    bits: int | None = Field(None, ge=2, le=8)  # gptq: a check, the checkpoint must have this many bits

    @model_validator(mode="after")
    def _options_fit_the_method(self) -> QuantizationSection:
        for name in _BNB_4BIT_OPTIONS:
            if getattr(self, name) is not None and self.method != "bnb-4bit":
                raise ValueError(f"{name} applies to method bnb-4bit only (method is {self.method})")
        if self.bits is not None and self.method != "gptq":
            raise ValueError(f"bits checks a GPTQ checkpoint and applies to method gptq only (method is {self.method})")
        return self


class ModelSection(_Section):
    dtype: Literal["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = None  # None = auto: training/setup.py's choose_attention
    gradient_checkpointing: bool = False
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, name: str | None) -> str | None:
        """Checked here, before anything loads; a kernels-hub repository (``org/name``) is transformers' to fetch
        and check."""
        if name is None or "/" in name:
            return name
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        valid = ["auto", "eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        if name not in valid and name.removeprefix("paged|") not in valid:
            raise ValueError(
                f"unknown attention {name!r}{did_you_mean(name, valid)}; use one of {', '.join(valid)}, or a "
                "kernels-hub repository (org/name)"
            )
        return name


class DiaBloAdapter(_Section):
    """``type: diablo`` (the default): the DiaBloConfig fields; see diablo_cli.adapter.config."""

    type: Literal["diablo"] = "diablo"
    blocks: int = Field(64, ge=1)
    target_modules: str | list[str] = "QKVUD"
    layers: tuple[int, int] | None = None
    blocks_by_module: dict[str, int] = Field(default_factory=dict)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dtype: str = "float32"
    kernel: Literal["auto", "fold", "blocks"] = "auto"

    @model_validator(mode="after")
    def _check_with_diablo_config(self) -> DiaBloAdapter:
        self.to_config()  # one source of truth for what a valid adapter is
        return self

    def to_config(self) -> DiaBloConfig:
        return DiaBloConfig(**self.model_dump(exclude={"type"}))

    def describe(self) -> str:
        return f"DiaBlo N={self.blocks} {_describe_targets(self.target_modules)}"

    def trainable_dtype(self, base_dtype: str) -> str:
        return canonical_dtype(self.dtype)


class LoraAdapter(_Section):
    """``type: lora`` or ``dora``: PEFT's LoRA (DoRA adds its magnitude vector) on the layers DiaBlo would adapt,
    chosen by the same ``target_modules`` letters, names or regex and ``layers`` range."""

    type: Literal["lora", "dora"]
    r: int = Field(16, ge=1)
    alpha: float | None = Field(None, gt=0)  # None: 2·r, the usual choice
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "QKVUD"
    layers: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _check_targets(self) -> LoraAdapter:
        self.target_config()
        return self

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r

    def target_config(self) -> DiaBloConfig:
        """The layer selection as DiaBlo states it, so both methods resolve letters to the very same layers."""
        return DiaBloConfig(blocks=1, target_modules=self.target_modules, layers=self.layers)

    def describe(self) -> str:
        return f"{'LoRA' if self.type == 'lora' else 'DoRA'} r={self.r} {_describe_targets(self.target_modules)}"

    def trainable_dtype(self, base_dtype: str) -> str:
        return "float32"  # PEFT keeps LoRA weights in fp32 on a 16-bit base


class FullAdapter(_Section):
    """``type: full``: every weight of the base trains (a baseline for small models; AdamW keeps 2 moments
    per weight, so memory is about 4× the model's in fp32)."""

    type: Literal["full"]

    def describe(self) -> str:
        return "full fine-tuning"

    def trainable_dtype(self, base_dtype: str) -> str:
        return base_dtype


ADAPTER_TYPES = ("diablo", "lora", "dora", "full")
AdapterSection = Annotated[
    Annotated[DiaBloAdapter, Tag("diablo")]
    | Annotated[LoraAdapter, Tag("lora")]
    | Annotated[LoraAdapter, Tag("dora")]
    | Annotated[FullAdapter, Tag("full")],
    Discriminator(lambda value: _adapter_type(value)),
]
"""The recipe's ``adapter:`` section, chosen by its ``type`` (default ``diablo``)."""


def _adapter_type(value: Any) -> str:
    return value.get("type", "diablo") if isinstance(value, dict) else getattr(value, "type", "diablo")


_ADAPTER_MODELS = {"diablo": DiaBloAdapter, "lora": LoraAdapter, "dora": LoraAdapter, "full": FullAdapter}


def _describe_targets(targets: str | list[str]) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


class DivergenceSection(_Section):
    """``training.divergence``: when a run counts as diverged (the rule is in diablo_cli/divergence.py) and what
    then: ``stop`` (exit 3, naming the last good checkpoint) or ``rollback`` to that checkpoint and go on at
    ``lr_factor`` × the learning rate, at most ``max_rollbacks`` times."""

    action: Literal["stop", "rollback"] = "stop"
    loss_factor: float = Field(10.0, gt=1)
    min_loss: float = Field(1.0, ge=0)
    patience: int = Field(3, ge=1)
    max_weight_rms: float = Field(100.0, gt=0)
    norm_factor: float = Field(10.0, gt=1)
    norm_window: int = Field(20, ge=1)
    max_rollbacks: int = Field(2, ge=1)
    lr_factor: float = Field(0.5, gt=0, lt=1)

    def rule(self) -> DivergenceRule:
        """The thresholds alone: what the loop's watchdog judges by (the action is the loop's business)."""
        return DivergenceRule(**self.model_dump(exclude={"action", "max_rollbacks", "lr_factor"}))


class TrainingSection(_Section):
    """Bounds catch nonsense before any work starts (a learning rate of 1e12 once trained to exit 0): each is
    wide enough for every sane run, and the error names the key and its valid range."""

    epochs: float = Field(1.0, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    optimizer: str = "adamw_torch_fused"  # transformers' own default: AdamW in one fused pass, same math
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    loss: Literal["auto", "dense", "chunked", "cce", "liger"] = "auto"  # loss.py: auto = chunked where it fits
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy's seed range
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    divergence: DivergenceSection = Field(default_factory=DivergenceSection)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        from transformers.training_args import OptimizerNames

        valid = [o.value for o in OptimizerNames]
        if name not in valid:
            raise ValueError(f"unknown optimizer {name!r}{did_you_mean(name, valid)}; transformers offers {valid}")
        return name

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainingSection:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        return self


class EvalTask(_Section):
    """One evaluation: a built-in benchmark (gsm8k, boolq, humaneval, ... see `diablo eval --list-tasks`), `loss`
    on a training-format dataset, or a custom held-out set scored by exact match (`dataset` in a training format).

    For a built-in task `dataset.path` is a local copy of its data in the format it is published in.
    """

    name: str
    task: str | None = None  # the built-in task; None: `name` when that is one, else a custom exact-match task
    dataset: DatasetSource | None = None
    metric: Literal["exact_match"] = "exact_match"  # custom tasks
    max_new_tokens: int | None = Field(None, ge=1)  # None: the task's default (custom tasks: 32)
    limit: int | None = Field(None, ge=1)
    scoring: Literal["generate", "loglik"] = "generate"  # loglik: most probable choice (multiple-choice tasks)
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    num_samples: int = Field(1, ge=1)  # humaneval pass@k needs k samples or more (and a temperature)
    stop: list[str] = Field(default_factory=list)  # extra stop strings, on top of the task's own

    @model_validator(mode="after")
    def _task_or_dataset(self) -> EvalTask:
        from .evaluate.tasks import TASKS, get_task

        kind = (self.task or self.name).lower()
        if self.task is not None and kind != "loss":
            try:
                get_task(kind)
            except DiaBloError as err:
                raise ValueError(str(err)) from None
        if kind not in TASKS and self.dataset is None:
            raise ValueError(
                f"{self.name!r} is not a built-in task ({', '.join(TASKS)}), so it needs `dataset:` (a held-out set "
                "in a training format, scored by exact match) or `task:` naming a built-in one"
            )
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError("num_samples > 1 needs a temperature above 0 (greedy decoding repeats itself)")
        return self


class EvalSection(_Section):
    tasks: list[EvalTask] = Field(default_factory=list)
    batch_size: int = Field(16, ge=1)
    compare_base: bool = True  # `diablo train`: score the base before training; `diablo eval`: add a base row
    template: Literal["alpaca", "chat", "plain"] | None = None  # built-in tasks' prompts; None: as in training
    seed: int = 0


class LoggingSection(_Section):
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str | None = None
    progress: bool = True


class OutputSection(_Section):
    dir: str = "out/run"
    overwrite: bool = False
    save_tokenizer: bool = True


class Recipe(_Section):
    """A whole training recipe. ``base_model`` stays at the top level, as in other fine-tuning tools."""

    base_model: str
    model: ModelSection = Field(default_factory=ModelSection)
    adapter: AdapterSection = Field(default_factory=DiaBloAdapter)
    data: DataConfig
    training: TrainingSection = Field(default_factory=TrainingSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    output: OutputSection = Field(default_factory=OutputSection)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge (``extends``), override (``--set``), resolve paths and validate a recipe file."""
    path = Path(path)
    raw = _read_with_extends(path, chain=())
    for override in overrides or []:
        _apply_override(raw, override)
    _resolve_data_paths(raw, path.parent)
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise DiaBloError(f"{source}: {_explain(err)}") from None
    except DiaBloError as err:  # raised by DiaBloConfig inside the adapter section
        raise DiaBloError(f"{source}: adapter.{err}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DiaBloError(f"recipe {path} does not exist{_closest_recipe(path)}")
    text = read_text(path, "recipe")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise DiaBloError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DiaBloError(f"{path}: a recipe is a mapping of sections (base_model:, data:, training: ...)")
    return data


def _closest_recipe(path: Path) -> str:
    """``; did you mean configs/paper/metamath.yaml?``: the recipe whose name is nearest, among those up to two
    folders below the nearest folder of ``path`` that exists (the shallowest of equal names); "" when none is close."""
    folder = next((p for p in path.parents if p.is_dir()), Path("."))
    found = [p for depth in ("", "*/", "*/*/") for p in sorted(folder.glob(f"{depth}*.y*ml")) if p.name[0] not in "._"]
    close = difflib.get_close_matches(path.stem, [p.stem for p in found], n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {min((p for p in found if p.stem == close[0]), key=lambda p: len(p.parts))}?"


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise DiaBloError(f"recipe extends itself in a cycle: {cycle}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise DiaBloError(f"{path}: extends: must be the path of another recipe, got {parent!r}")
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.is_file():
        raise DiaBloError(f"{path}: extends: {parent} does not exist (looked at {parent_path})")
    return deep_merge(_read_with_extends(parent_path, (*chain, resolved)), data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Nested dictionaries merge key by key; any other value in ``update`` replaces the one in ``base``.

    A section that changes its ``type`` (``adapter: {type: lora}`` over a DiaBlo recipe) replaces the inherited
    one whole: the keys of one adapter type mean nothing to another.
    """
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not _changes_type(merged[key], value):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _changes_type(section: dict[str, Any], update: dict[str, Any]) -> bool:
    return "type" in update and update["type"] != section.get("type", "diablo")


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key_path, sep, text = override.partition("=")
    if not sep or not key_path.strip():
        raise DiaBloError(f"--set {override!r}: expected KEY=VALUE, e.g. --set training.learning_rate=1e-4")
    if _undecodable(override):
        raise DiaBloError(f"--set {key_path.strip()!r}: the value holds bytes that are not UTF-8; type it as UTF-8")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    keys = key_path.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, key, keys[: depth + 1], override)]
            continue
        if not isinstance(node.get(key), (dict, list)):
            node[key] = {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, keys, override)] = value
    else:
        if last == "type" and _changes_type(node, {"type": value}):
            node.clear()  # as in deep_merge: another type starts from its own defaults
        node[last] = value


def _undecodable(argument: str) -> bool:
    """Python hands command-line bytes that are not UTF-8 over as lone surrogates, which no file can hold."""
    try:
        argument.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _list_index(node: list, key: str, keys: list[str], override: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise DiaBloError(f"--set {override!r}: {'.'.join(keys)} needs an index 0-{len(node) - 1} into that list")
    return int(key)


def _resolve_data_paths(raw: dict[str, Any], base_dir: Path) -> None:
    sources = list((raw.get("data") or {}).get("datasets") or [])
    tasks = (raw.get("eval") or {}).get("tasks") or []
    sources += [task.get("dataset") or {} for task in tasks if isinstance(task, dict)]
    for source in sources:
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            source["path"] = resolve_data_path(source["path"], base_dir)


def resolve_data_path(value: str, base_dir: Path) -> str:
    """``bundled://x`` → inside the package; a relative path that exists beside the recipe → absolute;
    anything else (a hub id, an absolute path) is left as written."""
    if value.startswith(BUNDLED_SCHEME):
        name = value[len(BUNDLED_SCHEME) :]
        resource = importlib.resources.files("diablo_cli") / "resources" / name
        if not resource.is_file():
            raise DiaBloError(f"{value}: no such bundled resource (diablo_cli/resources/{name})")
        return str(resource)
    expanded = Path(value).expanduser()
    if not expanded.is_absolute() and (base_dir / expanded).exists():
        return str((base_dir / expanded).resolve())
    return str(expanded) if value.startswith("~") else value


def _explain(err: ValidationError) -> str:
    """The first validation error as one line: key path, what is wrong, and a suggestion where one exists."""
    first = err.errors()[0]
    location = [str(part) for part in first["loc"]]
    adapter_type = None
    if location[:1] == ["adapter"] and len(location) > 1 and location[1] in _ADAPTER_MODELS:
        adapter_type = location.pop(1)  # the union's tag is not a key the user wrote
    key = ".".join(location) or "recipe"
    if first["type"] == "union_tag_invalid":
        given = str(first["ctx"]["tag"])
        return (
            f"{key}.type: unknown adapter type {given!r}{did_you_mean(given, list(ADAPTER_TYPES))}; "
            f"valid types: {', '.join(ADAPTER_TYPES)}"
        )
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(location[:-1], adapter_type)
        kind = f" for adapter type {adapter_type}" if adapter_type and location[-2:-1] == ["adapter"] else ""
        return f"{key}: unknown key{kind}{did_you_mean(location[-1], valid)}; valid keys here: {', '.join(valid)}"
    if first["type"] == "missing":
        return f"{key}: required but missing"
    if first["type"] in _RANGE_ERRORS:
        bounds = _valid_range(location, adapter_type) or first["msg"]
        finite = "a finite number " if first["type"] == "finite_number" else ""
        return f"{key}: {first.get('input')} is out of range; valid: {finite}{bounds}"
    given = first.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
    message = first["msg"].removeprefix("Value error, ")
    return f"{key}: {message}{shown}"


def _valid_keys(location: list[str], adapter_type: str | None = None) -> list[str]:
    model: Any = Recipe
    for part in location:
        if part.isdigit():
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _ADAPTER_MODELS[adapter_type] if part == "adapter" and adapter_type else _model_in(field.annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number")
_BOUND_WORDS = {"gt": "above {}", "ge": "at least {}", "lt": "below {}", "le": "at most {}"}


def _valid_range(location: list[str], adapter_type: str | None) -> str | None:
    """A numeric key's bounds in words (``above 0 and at most 1``), read from the schema itself."""
    model: Any = Recipe
    field = None
    for part in location:
        if part.isdigit():
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _ADAPTER_MODELS[adapter_type] if part == "adapter" and adapter_type else _model_in(field.annotation)
    words = [
        template.format(getattr(bound, name))
        for bound in (field.metadata if field is not None else [])
        for name, template in _BOUND_WORDS.items()
        if getattr(bound, name, None) is not None
    ]
    return " and ".join(words) if words else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
