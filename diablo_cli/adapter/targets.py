"""Which linear layers of a model get an adapter, and with how many blocks.

The paper names modules by letters (Q K V O G U D). Architectures spell them differently, and some fuse
several into one layer (GPT-2's ``c_attn`` holds Q, K and V). Each rule below says which letters a
module path ending holds; a fused layer is adapted as one layer only when every letter it holds was
asked for, because the block-diagonal structure of a fused layer is not that of its parts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..errors import AdapterSettingError, DiaBloError, did_you_mean
from .config import DiaBloConfig, is_letter_spec
from .layer import BlockLayout, DiaBloLinear, linear_features

_LETTER_RULES: tuple[tuple[str, str], ...] = (
    # Llama, Mistral, Qwen2, Gemma, OPT, BART, BERT-style, T5 (SelfAttention/EncDecAttention.q/k/v/o).
    (r"q_proj|query|wq|(?:SelfAttention|EncDecAttention)\.q", "Q"),
    (r"k_proj|key|wk|(?:SelfAttention|EncDecAttention)\.k", "K"),
    (r"v_proj|value|wv|(?:SelfAttention|EncDecAttention)\.v", "V"),
    # Fused attention inputs: GPT-2, GPT-NeoX/Pythia, Falcon, Phi-3, MPT, Baichuan.
    (r"c_attn|query_key_value|qkv_proj|Wqkv|W_pack", "QKV"),
    (
        r"o_proj|out_proj|(?:SelfAttention|EncDecAttention)\.o|attn\.c_proj|(?:self_)?attention\.dense"
        r"|attention\.output\.dense",
        "O",
    ),
    (r"gate_proj|w1|DenseReluDense\.wi_0", "G"),
    (r"up_proj|w3|DenseReluDense\.wi(?:_1)?|fc1|mlp\.c_fc|dense_h_to_4h|intermediate\.dense", "U"),
    (r"gate_up_proj", "GU"),
    (r"down_proj|w2|DenseReluDense\.wo|fc2|mlp\.c_proj|dense_4h_to_h|\d+\.output\.dense", "D"),
)
_COMPILED_RULES = tuple((re.compile(rf"(?:^|\.)(?:{pattern})$"), letters) for pattern, letters in _LETTER_RULES)
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")
_OUTPUT_HEADS = ("lm_head", "embed_out", "output", "classifier", "score", "qa_outputs")
MAX_PADDING_SHARE = 0.5
"""The largest share of a layer's block parameters that may be zero padding (never trained). Up to a layer's
smaller side a block count pads less than this in almost every shape; beyond it most blocks are dead, so the
count is refused rather than trained with a warning."""


@dataclass(frozen=True)
class Target:
    """One linear layer chosen for adaptation."""

    name: str
    in_features: int
    out_features: int
    blocks: int


def module_letters(name: str) -> str:
    """The paper letters that the layer at dotted path ``name`` holds ("" for none)."""
    for pattern, letters in _COMPILED_RULES:
        if pattern.search(name):
            return letters
    return ""


def layer_index(name: str) -> int | None:
    """Index of the transformer block a module path belongs to (the first number in it), if any."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[int, int]]]:
    """Every linear-like layer that is not already inside a DiaBlo adapter, with its features."""
    inside_adapter: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, DiaBloLinear):
            inside_adapter.add(name + ".")
            continue
        if any(name.startswith(prefix) for prefix in inside_adapter):
            continue
        features = linear_features(module)
        if features is not None and name:
            yield name, module, features


def select_targets(model: nn.Module, config: DiaBloConfig) -> list[Target]:
    """Resolve ``config`` against ``model``; an empty or impossible selection is an error that says why."""
    candidates = list(linear_modules(model))
    if not candidates:
        raise DiaBloError(f"{type(model).__name__} has no linear layers to adapt")
    _check_layer_range(config, candidates)
    matches = [
        (name, features)
        for name, _, features in candidates
        if _in_layer_range(name, config.layers) and _matches(name, config.target_modules)
    ]
    if not matches:
        raise DiaBloError(
            f"target_modules {config.target_modules!r}"
            + (f" in layers {list(config.layers)}" if config.layers else "")
            + f" matched no linear layer of {type(model).__name__}; its linear layers are: "
            + describe_modules(name for name, _, _ in candidates)
        )
    _check_names_found(config, [name for name, _, _ in candidates], type(model).__name__)
    targets = [Target(name, in_f, out_f, blocks_for(name, config)) for name, (in_f, out_f) in matches]
    _check_overrides_used(config, targets)
    check_block_counts(targets, config)
    return targets


def check_block_counts(targets: list[Target], config: DiaBloConfig) -> None:
    """Refuse a block count no layer can hold: more blocks than a layer's smaller side, or more than
    ``MAX_PADDING_SHARE`` of its block parameters padding. The error names the setting, the layer and the
    valid range for the layers that setting covers."""
    shapes: dict[str, set[tuple[int, int]]] = {}
    for target in targets:
        shapes.setdefault(block_setting(target.name, config), set()).add((target.in_features, target.out_features))
    checked: set[tuple[int, int, int]] = set()  # a 70B model repeats a handful of shapes hundreds of times
    for target in targets:
        layout = BlockLayout(target.in_features, target.out_features, target.blocks)
        if (layout.in_features, layout.out_features, layout.blocks) in checked:
            continue
        checked.add((layout.in_features, layout.out_features, layout.blocks))
        side = min(target.in_features, target.out_features)
        share = padding_share(layout)
        if target.blocks <= side and share <= MAX_PADDING_SHARE:
            continue
        key = block_setting(target.name, config)
        limit = min(largest_block_count(*shape) for shape in shapes[key])
        kind = target.name.rsplit(".", 1)[-1]
        problem = (
            f"exceeds {kind}'s smaller side ({side}; the layer is {target.in_features}×{target.out_features})"
            if target.blocks > side
            else f"makes {share:.0%} of {kind}'s block parameters padding (at most {MAX_PADDING_SHARE:.0%} is allowed)"
        )
        raise AdapterSettingError(
            f"{key}: {target.blocks} {problem}; valid for this model: 1–{limit} (at most "
            f"{MAX_PADDING_SHARE:.0%} padding); a count that divides every adapted side pads nothing"
        )


def padding_share(layout: BlockLayout) -> float:
    """The share of a layout's block parameters that only ever see zero padding."""
    return layout.dead_parameters / layout.parameters


def largest_block_count(in_features: int, out_features: int) -> int:
    """The most blocks a layer holds within its smaller side and the padding limit."""
    blocks = min(in_features, out_features)
    while blocks > 1 and padding_share(BlockLayout(in_features, out_features, blocks)) > MAX_PADDING_SHARE:
        blocks -= 1
    return blocks


def block_setting(name: str, config: DiaBloConfig) -> str:
    """The setting that gives one layer its block count, as messages name it: ``blocks`` or an override."""
    key = next((key for key in config.blocks_by_module if _override_applies(name, key)), None)
    return "blocks" if key is None else f"blocks_by_module[{key!r}]"


def unheld_letters_note(model: nn.Module, config: DiaBloConfig) -> list[str]:
    """A line for the plan when a letter ``target_modules`` asks for letters no linear layer of ``model`` holds
    (``QKVOGUD`` on OPT: G; on Mixtral, whose experts are fused 3-D parameters rather than linear layers: G, U,
    D): those parts of the model stay frozen, which the parameter table shows only by leaving rows out."""
    spec = config.target_modules
    if not isinstance(spec, str) or not is_letter_spec(spec):
        return []
    held = {letter for name, _, _ in linear_modules(model) for letter in module_letters(name)}
    unheld = [letter for letter in spec if letter not in held]
    if not unheld:
        return []
    return [
        f"note: target_modules {spec}: {type(model).__name__} has no linear layer for {', '.join(unheld)}; "
        "those parts stay frozen"
    ]


def describe_modules(names: Iterator[str] | list[str]) -> str:
    """Collapse layer numbers so that 30 identical blocks read as one line: ``model.layers.*.mlp.up_proj (30)``."""
    counts = Counter(_LAYER_INDEX.sub(lambda m: m.group(0).replace(m.group(1), "*"), name, count=1) for name in names)
    return ", ".join(f"{pattern} ({count})" if count > 1 else pattern for pattern, count in counts.items())


def blocks_for(name: str, config: DiaBloConfig) -> int:
    """Block count for one layer: a per-module override (by letter or by name) wins over ``blocks``."""
    for key, blocks in config.blocks_by_module.items():
        if _override_applies(name, key):
            return blocks
    return config.blocks


def _override_applies(name: str, key: str) -> bool:
    if is_letter_spec(key):
        letters = module_letters(name)
        return bool(letters) and set(letters) <= set(key)
    return _name_matches(name, key)


def _matches(name: str, spec: str | list[str]) -> bool:
    if isinstance(spec, list):
        return any(_name_matches(name, entry) for entry in spec)
    if spec == "all-linear":
        return layer_index(name) is not None and name.rsplit(".", 1)[-1] not in _OUTPUT_HEADS
    if is_letter_spec(spec):
        letters = module_letters(name)
        if letters and set(letters) & set(spec) and not set(letters) <= set(spec):
            raise DiaBloError(
                f"target_modules {spec!r}: {name} fuses {'/'.join(letters)} into one layer; ask for all of "
                f"{letters!r} or name the layer explicitly"
            )
        return bool(letters) and set(letters) <= set(spec)
    return re.fullmatch(spec, name) is not None


def _name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _in_layer_range(name: str, layers: tuple[int, int] | None) -> bool:
    if layers is None:
        return True
    index = layer_index(name)
    return index is not None and layers[0] <= index <= layers[1]


def _check_layer_range(config: DiaBloConfig, candidates: list[tuple[str, nn.Module, tuple[int, int]]]) -> None:
    if config.layers is None:
        return
    indices = {layer_index(name) for name, _, _ in candidates} - {None}
    if not indices:
        raise DiaBloError("layers: this model's linear layers are not numbered blocks, so a layer range cannot apply")
    if config.layers[0] > max(indices):
        raise DiaBloError(
            f"layers: {list(config.layers)} starts past the last block; this model has blocks "
            f"{min(indices)}-{max(indices)}"
        )


def _check_names_found(config: DiaBloConfig, names: list[str], model_name: str) -> None:
    """A layer named in a list that the model does not have is a typo or another architecture's name: refused,
    not quietly left out (the run would train fewer layers than the recipe says)."""
    if not isinstance(config.target_modules, list):
        return
    for entry in config.target_modules:
        if not any(_name_matches(name, entry) for name in names):
            endings = sorted({name.rsplit(".", 1)[-1] for name in names})
            hint = did_you_mean(entry.rsplit(".", 1)[-1], endings)
            raise AdapterSettingError(
                f"target_modules: {entry!r} names no linear layer of {model_name}{hint}; "
                f"its linear layers are: {describe_modules(names)}"
            )


def _check_overrides_used(config: DiaBloConfig, targets: list[Target]) -> None:
    for key in config.blocks_by_module:
        if not any(_override_applies(t.name, key) for t in targets):
            raise DiaBloError(
                f"blocks_by_module: {key!r} matches none of the adapted layers ("
                + describe_modules([t.name for t in targets])
                + ")"
            )
