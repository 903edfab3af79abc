"""``diablo inspect``: choose N against a parameter budget before spending GPU hours, and look inside a
model, an adapter folder or a recipe.

Models are read from their config only and built on the meta device: no weights are downloaded or loaded.
The paper's models ship their ``config.json`` in the package, so inspecting them works offline. Budgets are
plain arithmetic over the targeted layers' shapes (``N·⌈in/N⌉·⌈out/N⌉`` per layer), so any N is cheap.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .adapter import DiaBloConfig, base_parameter_count, select_targets
from .adapter.config import is_letter_spec
from .adapter.layer import BlockLayout
from .adapter.targets import Target, linear_modules, module_letters, unheld_letters_note
from .errors import DiaBloError
from .models import MODEL_ALIASES, _explain_load_failure, check_local_model, resolve_model, skeleton_model
from .precision import AUTO, DtypeChoice, choose_dtype
from .reading import open_safetensors
from .records import AdapterInspection, Candidate, LayerNorm, ModelInspection, ModuleShape, ProbedModule

PAPER_CONFIGS = "models/paper"
OUTPUT_HEADS = ("lm_head", "embed_out", "output")
"""Names of the output projection (not quantized, not recomputed under checkpointing)."""


def packaged_config(name: str) -> dict[str, Any] | None:
    """The shipped ``config.json`` of one of the paper's models (by alias), or None."""
    resource = importlib.resources.files("diablo_cli") / "resources" / PAPER_CONFIGS / f"{name}.json"
    return json.loads(resource.read_text()) if resource.is_file() else None


def load_model_config(name: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """A transformers config for ``name``: shipped for the paper's aliases, else read from a local folder or
    fetched from the hub (``config.json`` only)."""
    from transformers import AutoConfig

    shipped = packaged_config(name)
    if shipped is not None:
        values = dict(shipped)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    source = resolve_model(name)
    check_local_model(source, name, trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise DiaBloError(_explain_load_failure(name, source, err)) from None


def inspect_model(
    name: str,
    *,
    targets: str | list[str] = "QKVUD",
    layers: tuple[int, int] | None = None,
    blocks: list[int] | None = None,
    budget: str | None = None,
    match_lora: int | None = None,
    per_module: bool = False,
    seq_len: int = 512,
    batch: int = 1,
    dtype: str | None = None,
    quantization: str = "none",
    gradient_checkpointing: bool = False,
    gpus: int = 1,
    sharding: str | None = None,
    gpu: str | None = None,
    gpu_tflops: float | None = None,
    mfu: float | None = None,
    interconnect_gbps: float | None = None,
    gpu_memory_gib: float | None = None,
    tokens: int = 100_000_000,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> ModelInspection:
    """Candidate block counts for ``name``'s targeted layers, the one a budget asks for, the training memory
    of that choice (or of N=64) against LoRA at the same budget, and what training it costs on ``gpus`` GPUs
    (scaling.py; None settings take its defaults: one A100 80 GB)."""
    if budget is not None and match_lora is not None:
        raise DiaBloError("give either --budget or --match-lora, not both")
    from .scaling import check_sharding, default_sharding, gpu_spec

    check_sharding(sharding or default_sharding(gpus), gpus)  # before reading the model: a typo fails fast
    if gpu is not None:
        gpu_spec(gpu)
    config = load_model_config(name, trust_remote_code=trust_remote_code, revision=revision)
    model = skeleton_model(config, trust_remote_code=trust_remote_code)
    wanted = DiaBloConfig(blocks=1, target_modules=targets, layers=layers)
    selection = select_targets(model, wanted)
    base = base_parameter_count(model)
    targeted = group_shapes(selection)
    inspection = ModelInspection(
        model=name,
        architecture=type(model).__name__,
        base_parameters=base,
        linear_modules=group_shapes([Target(name, *features, 1) for name, _, features in linear_modules(model)]),
        targets=targets,
        layers=layers,
        targeted=targeted,
        candidates=[],
        notes=unheld_letters_note(model, wanted),
    )
    dims = sorted({d for shape in targeted for d in (shape.in_features, shape.out_features)})
    counts = sorted(set(common_divisors(dims)) | set(blocks or []))
    inspection.candidates = [count_blocks(selection, n, base) for n in counts]
    if budget is not None or match_lora is not None:
        limit, source = parse_budget(budget, base) if budget is not None else lora_budget(selection, match_lora)
        inspection.budget, inspection.budget_source = limit, source
        chosen = choose_blocks(selection, limit, base, per_module=per_module)
        chosen.chosen = True
        inspection.candidates = [c for c in inspection.candidates if c.blocks != chosen.blocks] + [chosen]
        inspection.candidates.sort(key=lambda c: -c.trainable)
        inspection.recipe_snippet = recipe_snippet(chosen.blocks, targets, layers)
    reference = next((c for c in inspection.candidates if c.chosen), None)
    if reference is None:
        wanted = (blocks or [64])[0]
        reference = next((c for c in inspection.candidates if c.blocks == wanted), None)
        reference = reference or count_blocks(selection, wanted, base)
    rank = match_lora or closest_lora_rank(reference.lora_rank)
    if inspection.budget is not None or len(blocks or []) == 1:
        inspection.lora_rank = rank
        inspection.lora_snippet = lora_recipe_snippet(rank, targets, layers)
    dtype_choice = _estimate_dtype(dtype, gpus)
    dtype = dtype_choice.name
    inspection.memory_settings = {
        "dtype_reason": dtype_choice.reason,
        "blocks": reference.blocks,
        "lora_rank": rank,
        "seq_len": seq_len,
        "batch": batch,
        "dtype": dtype,
        "adapter_dtype": "float32",
        "quantization": quantization,
    }
    from .loss import held_logit_rows
    from .memory import QUANTIZED_BITS, compare_adapter_memory

    if quantization not in QUANTIZED_BITS:
        raise DiaBloError(f"--quantization {quantization!r}: choose one of {', '.join(QUANTIZED_BITS)}")
    rows = compare_adapter_memory(
        config,
        base_parameters=base,
        linear_parameters=sum(
            m.in_features * m.out_features * m.layers for m in inspection.linear_modules if m.module not in OUTPUT_HEADS
        ),
        targeted=[(m.in_features, m.out_features, m.layers) for m in targeted],
        diablo_trainable=reference.trainable,
        lora_rank=rank,
        dtype=dtype,
        adapter_dtype="float32",
        quantization=quantization,
        batch=batch,
        seq_len=seq_len,
        logits_rows=held_logit_rows(config),
    )
    inspection.memory = [
        {**asdict(row), "total": row.total, "checkpointed_total": row.checkpointed_total} for row in rows
    ]
    inspection.scaling = _scaling(
        config,
        model,
        inspection,
        rows[0],
        batch=batch,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        gpus=gpus,
        sharding=sharding,
        gpu=gpu,
        gpu_tflops=gpu_tflops,
        mfu=mfu,
        interconnect_gbps=interconnect_gbps,
        gpu_memory_gib=gpu_memory_gib,
        tokens=tokens,
    )
    return inspection


def _scaling(config, model, inspection: ModelInspection, diablo, **settings) -> dict[str, Any]:
    """The DiaBlo row's memory and the model's shape, handed to scaling.estimate_scaling. The attention term
    counts ``num_hidden_layers`` (an encoder-decoder's encoder depth: first order there too)."""
    from . import scaling

    checkpointing = settings["gradient_checkpointing"]
    activations = (
        diablo.checkpointed_activations + diablo.checkpointed_adapter_inputs
        if checkpointing
        else diablo.activations + diablo.adapter_inputs
    )
    linear = sum(m.in_features * m.out_features * m.layers for m in inspection.linear_modules)
    head = sum(m.in_features * m.out_features * m.layers for m in inspection.linear_modules if m.module in OUTPUT_HEADS)
    attention_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None)
    estimate = scaling.estimate_scaling(
        weights=diablo.weights,
        block_weights=diablo.weights * largest_block_parameters(model) / inspection.base_parameters,
        linear_parameters=linear,
        head_parameters=head,
        trainable_parameters=diablo.trainable,
        adapter_bytes=4,  # the adapter is fp32 (memory_settings["adapter_dtype"])
        layers=config.num_hidden_layers,
        attention_width=attention_heads * (head_dim or config.hidden_size // attention_heads),
        activations=activations,
        logits=diablo.logits,
        **{key: value for key, value in settings.items() if value is not None},  # None: scaling's defaults
    )
    return estimate.to_dict()


def largest_block_parameters(model) -> int:
    """Parameters of the largest unit ZeRO-3/FSDP gathers at once when each repeated block (a decoder layer) is
    its own unit: the largest such block, or the largest single tensor outside them (the embedding)."""
    from torch import nn

    sizes = [p.numel() for p in model.parameters()]
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            sizes += [sum(p.numel() for p in child.parameters()) for child in module]
    return max(sizes, default=0)


def closest_lora_rank(equal_budget_rank: float) -> int:
    """The whole LoRA rank whose budget ``r·Σ(in+out)`` lies closest to DiaBlo's (``equal_budget_rank`` is the
    fractional rank that matches it exactly). A budget is linear in r, so that is the nearest integer; on an
    exact tie the smaller one, so the baseline never trains more than DiaBlo for nothing. At least 1."""
    return max(1, math.ceil(equal_budget_rank - 0.5))


def lora_recipe_snippet(rank: int, targets: str | list[str], layers: tuple[int, int] | None) -> str:
    """The ``adapter:`` section of the LoRA baseline at DiaBlo's budget: same layers, alpha = 2r, dropout 0.05."""
    lines = ["adapter:", "  type: lora", f"  r: {rank}", f"  alpha: {2 * rank}", "  dropout: 0.05"]
    lines.append(f"  target_modules: {_targets_yaml(targets)}")
    if layers is not None:
        lines.append(f"  layers: [{layers[0]}, {layers[1]}]")
    return "\n".join(lines)


def _targets_yaml(targets: str | list[str]) -> str:
    """Letters and names as they are; a regex quoted (JSON is YAML), since ``[``, ``*`` or ``|`` mean YAML syntax."""
    if isinstance(targets, list):
        return "[" + ", ".join(targets) + "]"
    return targets if re.fullmatch(r"[\w.-]+", targets) else json.dumps(targets)


def _estimate_dtype(requested: str | None, gpus: int) -> DtypeChoice:
    """The base dtype the estimate assumes: as requested, else what `diablo train` picks by the hardware (on
    several GPUs, a GPU's: bf16 on every GPU worth sharding over)."""
    if (requested is None or requested == AUTO) and gpus > 1:
        return DtypeChoice("bfloat16", AUTO, f"auto on {gpus} GPUs with native bf16")
    try:
        return choose_dtype(requested)
    except DiaBloError:
        raise DiaBloError(f"--dtype {requested!r}: choose one of auto, fp32, bf16, fp16") from None


def group_shapes(targets: list[Target]) -> list[ModuleShape]:
    """Layers grouped by their last name and shape, in model order (``q_proj 4096×4096 ×32``)."""
    groups: dict[tuple[str, int, int], ModuleShape] = {}
    for target in targets:
        kind = target.name.rsplit(".", 1)[-1]
        key = (kind, target.in_features, target.out_features)
        if key not in groups:
            groups[key] = ModuleShape(kind, module_letters(target.name), target.in_features, target.out_features, 0)
        groups[key].layers += 1
    return list(groups.values())


def common_divisors(dims: list[int]) -> list[int]:
    """Every N that divides all ``dims`` (no padding anywhere)."""
    if not dims:
        return []
    g = 0
    for d in dims:
        g = math.gcd(g, d)
    return [n for n in range(1, g + 1) if g % n == 0]


def _blocks_of(target: Target, blocks: int | dict[str, int]) -> int:
    if isinstance(blocks, int):
        return blocks
    return blocks[target.name.rsplit(".", 1)[-1]]


def count_blocks(targets: list[Target], blocks: int | dict[str, int], base: int) -> Candidate:
    """Trainable, dead and LoRA-equivalent counts of ``blocks`` on ``targets`` (no model needed)."""
    trainable = dead = dead_blocks = 0
    shapes: dict[str, tuple[int, int]] = {}
    divides = True
    layouts: dict[BlockLayout, int] = {}  # layers share a few shapes: count each layout once
    for target in targets:
        layout = BlockLayout(target.in_features, target.out_features, _blocks_of(target, blocks))
        layouts[layout] = layouts.get(layout, 0) + 1
        shapes.setdefault(target.name.rsplit(".", 1)[-1], (layout.block_in, layout.block_out))
    for layout, layers in layouts.items():
        trainable += layers * layout.parameters
        dead += layers * layout.dead_parameters
        dead_blocks += layers * layout.dead_blocks
        divides &= layout.in_features % layout.blocks == 0 and layout.out_features % layout.blocks == 0
    return Candidate(
        blocks=blocks,
        trainable=trainable,
        percent_of_base=100.0 * trainable / base if base else 0.0,
        dead=dead,
        dead_blocks=dead_blocks,
        lora_rank=trainable / sum(t.in_features + t.out_features for t in targets),
        block_shapes=shapes,
        divides=divides,
    )


_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([%kKmMbBgG]?)\s*$")


def parse_budget(text: str, base: int) -> tuple[int, str]:
    """``1%`` of the base, or a count: ``70M``, ``2.5m``, ``500k``, ``1B``, ``1234567``."""
    match = _BUDGET.match(str(text))
    if not match:
        raise DiaBloError(f"--budget {text!r}: give a percentage of the model (1%) or a count (70M, 500k, 1234567)")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        return int(base * value / 100), f"{value:g}% of {base:,}"
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[unit]
    return int(value * scale), f"{text.strip()}"


def lora_budget(targets: list[Target], rank: int) -> tuple[int, str]:
    """What LoRA rank ``rank`` trains on the same layers: ``r·(in+out)`` each."""
    if rank < 1:
        raise DiaBloError(f"--match-lora {rank}: a LoRA rank is a positive whole number")
    return rank * sum(t.in_features + t.out_features for t in targets), f"LoRA r={rank} on the same layers"


def choose_blocks(targets: list[Target], limit: int, base: int, *, per_module: bool = False) -> Candidate:
    """The block count (or one per module kind) whose budget comes closest to ``limit`` from below."""
    if not per_module:
        return _closest_from_below(targets, limit, base)
    kinds: dict[str, list[Target]] = {}
    for target in targets:
        kinds.setdefault(target.name.rsplit(".", 1)[-1], []).append(target)
    total_width = sum(t.in_features + t.out_features for t in targets)
    chosen = {}
    for kind, members in kinds.items():  # each kind gets its share of the budget, as LoRA would spend it
        share = limit * sum(t.in_features + t.out_features for t in members) / total_width
        chosen[kind] = _closest_from_below(members, int(share), base).blocks
    return count_blocks(targets, chosen, base)


def _closest_from_below(targets: list[Target], limit: int, base: int) -> Candidate:
    largest = max(max(t.in_features, t.out_features) for t in targets)
    best = None
    for n in range(1, largest + 1):  # parameters fall roughly as 1/N: the first N under the limit is closest
        candidate = count_blocks(targets, n, base)
        if candidate.trainable <= limit:
            best = candidate
            break
    if best is None:
        raise DiaBloError(
            f"a budget of {limit:,} parameters is below what even N={largest} trains on these layers; "
            "target fewer modules or layers"
        )
    # Padding makes the count wobble: a slightly larger N can land closer to the limit.
    for n in range(int(best.blocks) + 1, min(largest, int(best.blocks) * 2) + 1):
        candidate = count_blocks(targets, n, base)
        if best.trainable < candidate.trainable <= limit:
            best = candidate
    return best


def recipe_snippet(blocks: int | dict[str, int], targets: str | list[str], layers: tuple[int, int] | None) -> str:
    """The ``adapter:`` section to paste into a recipe."""
    lines = ["adapter:"]
    if isinstance(blocks, int):
        lines.append(f"  blocks: {blocks}")
    else:
        values = sorted(set(blocks.values()))
        common = max(values, key=lambda v: list(blocks.values()).count(v))
        lines.append(f"  blocks: {common}")
        overrides = {k: v for k, v in blocks.items() if v != common}
        if overrides:
            lines.append("  blocks_by_module: {" + ", ".join(f"{k}: {v}" for k, v in overrides.items()) + "}")
    lines.append(f"  target_modules: {_targets_yaml(targets)}")
    if layers is not None:
        lines.append(f"  layers: [{layers[0]}, {layers[1]}]")
    return "\n".join(lines)


def parse_targets(text: str) -> str | list[str]:
    """``QKVUD``, ``all-linear``, a regex, or comma-separated names (``q_proj,v_proj``)."""
    if is_letter_spec(text) or text == "all-linear" or "," not in text:
        return text
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_layers(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match or int(match.group(1)) > int(match.group(2)):
        raise DiaBloError(f"--layers {text!r}: give an inclusive range such as 0-15")
    return int(match.group(1)), int(match.group(2))


def parse_block_list(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = [0]
    if any(v < 1 for v in values):
        raise DiaBloError(f"--blocks {text!r}: give positive whole numbers, e.g. 32,64,128")
    return values


def known_models() -> list[str]:
    """The aliases inspect can read offline."""
    return [name for name in MODEL_ALIASES if packaged_config(name) is not None]


def inspect_adapter(path: str | Path) -> AdapterInspection:
    """Read an adapter folder (one tensor at a time) and measure each layer's block norm."""
    from .adapter import read_adapter_config
    from .adapter.files import DAMAGED_ADAPTER_ADVICE, WEIGHTS_FILE
    from .adapter.layer import ADAPTER_PARAMETER

    directory = Path(path)
    document = read_adapter_config(directory)
    layers = []
    with open_safetensors(directory / WEIGHTS_FILE, DAMAGED_ADAPTER_ADVICE) as weights:
        stored = set(weights.keys())
        for name, entry in document["modules"].items():
            key = f"{name}.{ADAPTER_PARAMETER}"
            if key not in stored:
                raise DiaBloError(f"{directory / WEIGHTS_FILE} lacks the tensor {key}")
            tensor = weights.get_tensor(key)
            layers.append(LayerNorm(name, int(entry["blocks"]), tensor.numel(), float(tensor.float().norm())))
    by_module: dict[str, dict[str, float]] = {}
    for layer in layers:
        kind = layer.module.rsplit(".", 1)[-1]
        stats = by_module.setdefault(kind, {"layers": 0, "parameters": 0, "mean_norm": 0.0, "max_norm": 0.0})
        stats["layers"] += 1
        stats["parameters"] += layer.parameters
        stats["mean_norm"] += layer.norm
        stats["max_norm"] = max(stats["max_norm"], layer.norm)
    for stats in by_module.values():
        stats["mean_norm"] /= stats["layers"]
    return AdapterInspection(
        path=str(directory),
        base_model=(document.get("base_model") or {}).get("name_or_path"),
        config=document.get("config"),
        adapter_dtype=document.get("adapter_dtype"),
        parameters=sum(layer.parameters for layer in layers),
        bytes_on_disk=sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("adapter_")),
        layers=layers,
        by_module=by_module,
    )


def effective_rank(matrix, energy: float = 0.95) -> int:
    """The fewest singular values holding ``energy`` of the squared Frobenius norm (paper A.2)."""
    import torch

    squares = torch.linalg.svdvals(matrix.float()) ** 2
    total = squares.sum()
    if total == 0:
        return 0
    return int((torch.cumsum(squares, 0) < energy * total).sum().item()) + 1


def theorem2_blocks(m1: int, m2: int, r1: int, r2: int) -> int | None:
    """The largest common factor N of ``m1`` and ``m2`` with ``N ≥ ⌈r1·N/m1⌉·⌈r2·N/m2⌉`` (paper Theorem 2)."""
    fitting = [n for n in common_divisors([m1, m2]) if n >= math.ceil(r1 * n / m1) * math.ceil(r2 * n / m2)]
    return max(fitting) if fitting else None


def probe_theorem2(
    name: str,
    data: str,
    *,
    targets: str | list[str] = "QKVUD",
    layers: tuple[int, int] | None = None,
    batches: int = 2,
    batch: int = 1,
    seq_len: int = 512,
    energy: float = 0.95,
    trust_remote_code: bool = False,
) -> list[ProbedModule]:
    """Run a few training batches of ``data`` (any training format) through the model (weights loaded: the one
    part of inspect that needs them), measure the effective rank of every targeted layer's input and output
    gradient per batch, and report by module kind the largest N for which Theorem 2's condition holds."""
    from torch.utils.data import DataLoader

    from .adapter import adapted_layers, attach_diablo
    from .data import DataCollator, prepare_data
    from .data.config import DataConfig
    from .models import load_base_model

    model, tokenizer = load_base_model(name, dtype="fp32", trust_remote_code=trust_remote_code)
    attach_diablo(model, DiaBloConfig(blocks=1, target_modules=targets, layers=layers))  # zero blocks: a gradient path
    source = _probe_source(data, limit=max(64, batches * batch * 8))
    config = DataConfig(datasets=[source], max_length=seq_len, packing=True)
    rows = prepare_data(config, tokenizer, seed=0).train
    loader = DataLoader(rows, batch_size=batch, collate_fn=DataCollator(pad_token_id=tokenizer.pad_token_id))
    ranks: dict[str, dict[str, list[int]]] = {n: {"r1": [], "r2": []} for n in adapted_layers(model)}
    handles = []
    for layer_name, layer in adapted_layers(model).items():

        def on_forward(module, inputs, output, layer_name=layer_name):
            x = inputs[0].detach().reshape(-1, module.in_features)
            ranks[layer_name]["r1"].append(effective_rank(x, energy))
            output.register_hook(
                lambda g: ranks[layer_name]["r2"].append(effective_rank(g.reshape(-1, g.shape[-1]), energy))
            )

        handles.append(layer.register_forward_hook(on_forward))
    model.train()
    tokens = 0
    for index, inputs in enumerate(loader):
        if index >= batches:
            break
        model(**inputs, use_cache=False).loss.backward()
        tokens = inputs["input_ids"].numel()
    for handle in handles:
        handle.remove()
    if not tokens:
        raise DiaBloError(f"--probe {data}: no training rows came out of it")
    kinds: dict[tuple[str, int, int], list[str]] = {}
    for layer_name, layer in adapted_layers(model).items():
        kinds.setdefault((layer_name.rsplit(".", 1)[-1], layer.in_features, layer.out_features), []).append(layer_name)
    report = []
    for (kind, m1, m2), members in kinds.items():
        r1 = [r for member in members for r in ranks[member]["r1"]]
        r2 = [r for member in members for r in ranks[member]["r2"]]
        r1_max, r2_max = max(r1), max(r2)
        report.append(
            ProbedModule(
                module=kind,
                in_features=m1,
                out_features=m2,
                layers=len(members),
                rows=tokens,
                r1_mean=sum(r1) / len(r1),
                r1_max=r1_max,
                r2_mean=sum(r2) / len(r2),
                r2_max=r2_max,
                largest_n=theorem2_blocks(m1, m2, r1_max, r2_max),
                approximate_bound=m1 * m2 / max(1, r1_max * r2_max),
            )
        )
    return report


def _probe_source(data: str, *, limit: int):
    """A dataset source for ``data`` in whichever training format its columns fit (or a preset's name)."""
    from .data import load_raw_examples
    from .data.config import DatasetSource
    from .data.presets import PRESETS
    from .recipe import resolve_data_path

    if data in PRESETS:
        return DatasetSource(preset=data, limit=limit)
    data = resolve_data_path(data, Path.cwd())
    for fmt in ("instruction", "prompt_completion", "chat", "text"):
        source = DatasetSource(path=data, format=fmt, limit=limit)
        try:
            load_raw_examples(source.model_copy(update={"limit": 1}))
        except DiaBloError:
            continue
        return source
    raise DiaBloError(
        f"--probe {data}: its columns fit no training format (instruction/input/output, prompt/completion, "
        "messages, or text)"
    )
