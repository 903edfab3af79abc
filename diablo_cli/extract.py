"""``diablo extract``: the diagonal blocks of a full fine-tune's update, as a DiaBlo adapter.

The paper's own evidence for diagonal blocks (Table 5, A.4.8) fully fine-tunes a model, keeps only the diagonal
blocks of each update ``W_ft − W_pre``, scaled by ``s``, and measures what accuracy survives; mergekit's
``extract-lora`` does the like for LoRA. Both models are read one tensor at a time from their safetensors (the
fine-tune shard by shard, the base's matching tensor beside it), so memory holds one pair of weights, never
two models. Each targeted layer reports the share of the update's Frobenius energy its blocks keep.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .adapter import DiaBloConfig, base_parameter_count, select_targets
from .adapter.files import describe_base, write_adapter_folder
from .adapter.kernels import diagonal_of
from .adapter.layer import is_conv1d
from .adapter.model import tied_parameter_names
from .adapter.targets import blocks_for
from .base_config import base_quantization
from .errors import DiaBloError
from .inspection import choose_blocks, parse_budget
from .merge import checkpoint_keys
from .models import DAMAGED_MODEL_ADVICE, local_model_folder, skeleton_model
from .reading import open_safetensors, read_json_object
from .records import ExtractedModule, ExtractReport, Progress
from .run_folder import EXTRACT, ModelOutput

DEFAULT_BLOCKS = 64


def extract_adapter(
    base: str,
    finetuned: str,
    output: str | os.PathLike,
    *,
    blocks: int | None = None,
    budget: str | None = None,
    targets: str | list[str] = "QKVUD",
    layers: tuple[int, int] | None = None,
    scale: float = 1.0,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> ExtractReport:
    """Write ``s · (diagonal blocks of W_ft − W_pre)`` of every targeted layer to ``output`` as an adapter folder:
    merged into ``base`` it gives ``W_pre + s · blockdiag(W_ft − W_pre)``. ``blocks`` is N (default 64), or
    ``budget`` picks it as ``diablo inspect --budget`` does."""
    if blocks is not None and budget is not None:
        raise DiaBloError("give either --blocks or --budget, not both")
    base_dir = local_model_folder(base, trust_remote_code=trust_remote_code)
    tuned_dir = local_model_folder(finetuned, trust_remote_code=trust_remote_code, role="fine-tuned model")
    if base_dir.resolve() == tuned_dir.resolve():
        raise DiaBloError(f"--finetuned {finetuned} is the base itself; give the fully fine-tuned model's folder")
    for folder, option in ((base_dir, "--base"), (tuned_dir, "--finetuned")):
        quantized = base_quantization(read_json_object(folder / "config.json", "model config"))
        if quantized is not None:
            raise DiaBloError(
                f"{option} {folder} is quantized ({quantized['method']}); extract subtracts full-precision weights"
            )
    from transformers import AutoConfig

    skeleton = skeleton_model(
        AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code), trust_remote_code=trust_remote_code
    )
    report = ExtractReport(base, finetuned, Path(output), 0, scale)
    selection = select_targets(skeleton, DiaBloConfig(blocks=1, target_modules=targets, layers=layers))
    if budget is not None:
        total = base_parameter_count(skeleton)
        limit, report.budget_source = parse_budget(budget, total)
        blocks = int(choose_blocks(selection, limit, total).blocks)
    config = DiaBloConfig(blocks=blocks or DEFAULT_BLOCKS, target_modules=targets, layers=layers)
    chosen = select_targets(skeleton, config)  # refuses a block count these layers cannot hold
    report.blocks = config.blocks

    (base_files, base_shapes), (tuned_files, tuned_shapes) = tensor_files(base_dir), tensor_files(tuned_dir)
    modules = dict(skeleton.named_modules())
    aliases = tied_parameter_names(skeleton)
    weight_keys: dict[str, str] = {}  # checkpoint key → module name
    for target in chosen:
        key = f"{target.name}.weight"
        stored = [k for k in (key, *aliases.get(key, ())) if k in base_files and k in tuned_files]
        if not stored:
            missing = base_dir if key not in base_files else tuned_dir
            raise DiaBloError(f"{missing} has no tensor {key} for the targeted layer {target.name}")
        weight_keys[stored[0]] = target.name
    _check_shapes(weight_keys, base_shapes, tuned_shapes)
    features = {t.name: (t.in_features, t.out_features) for t in chosen}

    with ModelOutput(Path(output), command=EXTRACT, overwrite=overwrite) as output:
        report.cleaned = output.cleaned
        extracted = _stream_blocks(base_files, tuned_files, weight_keys, modules, config, report, progress)
        staging = output.staging("extracting")
        write_adapter_folder(
            staging,
            {name: extracted[name] for name in features},
            features,
            base=describe_base(skeleton, base),
            config=config,
            dropout=0.0,
            source={"extracted_from": finetuned, "base": base, "scale": scale},
        )
        output.publish(staging)
    order = {name: index for index, name in enumerate(features)}
    report.modules.sort(key=lambda m: order[m.name])  # model order, as the shards' sorted keys are not
    report.parameters = sum(t.numel() for t in extracted.values())
    return report


def _stream_blocks(
    base_files: dict[str, Path],
    tuned_files: dict[str, Path],
    weight_keys: dict[str, str],
    modules: dict[str, torch.nn.Module],
    config: DiaBloConfig,
    report: ExtractReport,
    progress: Progress | None,
) -> dict[str, torch.Tensor]:
    """Walk the fine-tune's shards one tensor at a time beside the base's: the targeted weights give their scaled
    diagonal blocks and energies, every other changed float tensor adds to the energy left out."""
    extracted: dict[str, torch.Tensor] = {}
    shards: dict[Path, list[str]] = {}
    for key, shard in tuned_files.items():
        if key in base_files:
            shards.setdefault(shard, []).append(key)
    total, done = sum(map(len, shards.values())), 0
    for shard, keys in shards.items():  # one fine-tune shard mapped at a time, each base tensor read beside it
        with open_safetensors(shard, DAMAGED_MODEL_ADVICE) as tuned_reader:
            for key in keys:
                tuned = tuned_reader.get_tensor(key)
                with open_safetensors(base_files[key], DAMAGED_MODEL_ADVICE) as base_reader:
                    pre = base_reader.get_tensor(key)
                _measure(key, tuned, pre, weight_keys.get(key), modules, config, report, extracted)
                done += 1
                if progress:
                    progress(f"tensors ({shard.name})", done, total)
    return extracted


def _measure(
    key: str,
    tuned: torch.Tensor,
    pre: torch.Tensor,
    name: str | None,
    modules: dict[str, torch.nn.Module],
    config: DiaBloConfig,
    report: ExtractReport,
    extracted: dict[str, torch.Tensor],
) -> None:
    """One weight pair: a targeted layer (``name``) gives its scaled diagonal blocks and energies; any other changed
    float tensor adds to the energy left out."""
    if tuned.shape != pre.shape:  # not a targeted weight (checked before): e.g. embeddings resized for new tokens
        report.other_tensors += 1
        return
    if not tuned.is_floating_point():
        return
    update = tuned.float() - pre.float()
    if name is None:
        energy = float(update.square().sum(dtype=torch.float64))
        report.other_energy += energy
        report.other_tensors += int(energy > 0)
        return
    if is_conv1d(modules[name]):
        update = update.T
    diagonal = diagonal_of(update, blocks_for(name, config))
    update_energy = float(update.square().sum(dtype=torch.float64))
    kept_energy = float(diagonal.square().sum(dtype=torch.float64))
    report.modules.append(ExtractedModule(name, diagonal.shape[0], update_energy, kept_energy))
    extracted[name] = diagonal * report.scale


def _check_shapes(
    weight_keys: dict[str, str], base_shapes: dict[str, tuple[int, ...]], tuned_shapes: dict[str, tuple[int, ...]]
) -> None:
    """Before any weight is read: every targeted weight has one shape in both models (from the headers)."""
    for key in weight_keys:
        if tuned_shapes[key] != base_shapes[key]:
            raise DiaBloError(
                f"{key}: the fine-tune's is {tuned_shapes[key]}, the base's {base_shapes[key]}; "
                "give the base the fine-tune started from"
            )


def tensor_files(folder: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """Every tensor key of a model folder's safetensors with the file holding it (in shard order) and its shape,
    from one reading of each shard's header."""
    shards, _ = checkpoint_keys(folder)
    located: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        with open_safetensors(shard, DAMAGED_MODEL_ADVICE) as reader:
            for key in reader.keys():  # noqa: SIM118 (safe_open has keys(), no iteration)
                located[key] = shard
                shapes[key] = tuple(reader.get_slice(key).get_shape())
    return located, shapes
