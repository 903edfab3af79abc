"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

The config records everything needed to rebuild the adapter on a base without the recipe. Both files
carry the same random ``adapter_id``, so a pair left mixed by an interrupted save is detected on load.
Only safetensors are ever read: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..atomic import atomic_path, write_text_atomic
from ..base_config import base_quantization
from ..errors import AdapterMismatchError, DiaBloError
from ..reading import open_safetensors, read_json
from ..run_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .config import ADAPTER_DTYPES, DiaBloConfig, canonical_dtype
from .layer import ADAPTER_PARAMETER, BlockLayout, linear_features
from .model import CONFIG_ATTRIBUTE, adapted_layers, bare_name, wrap_targets
from .targets import Target

CONFIG_FILE = ADAPTER_CONFIG
WEIGHTS_FILE = ADAPTER_WEIGHTS
FORMAT_NAME = "diablo-adapter"
FORMAT_VERSION = 1
OFFICIAL_CHECKPOINT = "adapter.chkpt"
"""What the official DiaBlo trainer (ziyangjoy/DiaBlo) saves instead; diablo_cli/convert.py reads it."""
DAMAGED_ADAPTER_ADVICE = "copy the adapter folder again from where it was saved, or train it again"


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
    blocks: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's adapters to ``path`` (created if needed); returns the directory.

    ``base_model`` overrides the base name recorded in the config (default: the model's
    ``name_or_path``). An existing adapter in ``path`` is replaced only with ``overwrite=True``. ``blocks``
    (``{module}.diablo_blocks`` → tensor) replaces the layers' own tensors: a sharded engine's gathered copy.
    """
    layers = {bare_name(name): layer for name, layer in adapted_layers(model).items()}
    if not layers:
        raise DiaBloError("this model has no DiaBlo adapters to save; call attach_diablo first")
    if any(layer.merged for layer in layers.values()):
        raise DiaBloError("the adapters are merged into the base weights; unmerge_diablo(model) before saving")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise DiaBloError(f"{directory} exists and is not a directory")
    existing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if (directory / name).exists()]
    if existing and not overwrite:
        raise DiaBloError(
            f"{directory} already holds an adapter ({', '.join(existing)}); pass overwrite=True to replace it"
        )

    live = {f"{name}.{ADAPTER_PARAMETER}": layer.diablo_blocks for name, layer in layers.items()}
    source = blocks if blocks is not None else live
    config: DiaBloConfig | None = getattr(model, CONFIG_ATTRIBUTE, None)
    return write_adapter_folder(
        directory,
        {name: source[f"{name}.{ADAPTER_PARAMETER}"] for name in layers},
        {name: (layer.in_features, layer.out_features) for name, layer in layers.items()},
        base=describe_base(model, base_model),
        config=config,
        dropout=_dropout_of(layers),
    )


def write_adapter_folder(
    directory: str | os.PathLike,
    blocks: dict[str, torch.Tensor],
    features: dict[str, tuple[int, int]],
    *,
    base: dict[str, Any],
    config: DiaBloConfig | None,
    dropout: float,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and the weights from plain tensors (module name → ``(N, d1, d2)`` blocks,
    module name → ``(in_features, out_features)``): how ``save_adapter`` writes a model's adapters, and how
    ``diablo convert`` and ``extract`` write adapters that never were in a model. ``source`` records where the
    blocks came from. The caller decides whether ``directory`` may be written."""
    directory = Path(directory)
    tensors = {}
    for name, tensor in blocks.items():
        expected = BlockLayout(*features[name], tensor.shape[0]).shape
        if tuple(tensor.shape) != expected:
            raise DiaBloError(f"{name}: blocks of shape {tuple(tensor.shape)}, expected {expected} for its layer")
        tensors[f"{name}.{ADAPTER_PARAMETER}"] = tensor.detach().to("cpu").contiguous()
    adapter_id = uuid.uuid4().hex
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "adapter_id": adapter_id,
        "diablo_cli_version": __version__,
        "base_model": base,
        "adapter_dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
        "dropout": dropout,
        "config": config.to_dict() if config is not None else None,
        "parameters": sum(t.numel() for t in tensors.values()),
        "modules": {
            name: {
                "in_features": layout.in_features,
                "out_features": layout.out_features,
                "blocks": layout.blocks,
                "block_in": layout.block_in,
                "block_out": layout.block_out,
            }
            for name, layout in ((name, BlockLayout(*features[name], blocks[name].shape[0])) for name in blocks)
        },
    }
    if source is not None:
        document["source"] = source
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "adapter_id": adapter_id})
    write_text_atomic(directory / CONFIG_FILE, json.dumps(document, indent=2) + "\n")
    return directory


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check an adapter directory's config; the errors name the file and what is wrong."""
    directory = Path(path)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise DiaBloError(f"adapter directory {directory} does not exist")
    if not config_path.is_file() and (directory / "config.json").is_file():
        raise DiaBloError(
            f"{directory} is a model folder (a `type: full` run?), not an adapter: use it as a model "
            "(diablo eval --model DIR), it needs no merge"
        )
    if not config_path.is_file() and [
        *directory.glob(OFFICIAL_CHECKPOINT),
        *directory.glob(f"*/{OFFICIAL_CHECKPOINT}"),
    ]:
        raise DiaBloError(
            f"{directory} is a run of the official DiaBlo code ({OFFICIAL_CHECKPOINT}); convert it first: "
            f"diablo convert {directory} --base BASE -o ADAPTER_DIR"
        )
    if not config_path.is_file():
        raise DiaBloError(
            f"{directory} has no {CONFIG_FILE}; a DiaBlo adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    if not (directory / WEIGHTS_FILE).is_file():
        raise DiaBloError(f"{directory} has no {WEIGHTS_FILE} (only safetensors adapter weights are loaded)")
    document = read_json(config_path, "adapter config")
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise DiaBloError(f'{config_path} is not a DiaBlo adapter config (expected "format": "{FORMAT_NAME}")')
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DiaBloError(
            f"{config_path} has format_version {version!r}; this diablo-cli {__version__} reads up to {FORMAT_VERSION}"
        )
    if not isinstance(document.get("modules"), dict) or not document["modules"]:
        raise DiaBloError(f"{config_path} lists no adapted modules")
    for name, entry in document["modules"].items():
        fields = ("in_features", "out_features", "blocks")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(f), int) and entry[f] > 0 for f in fields):
            raise DiaBloError(f"{config_path}: modules[{name!r}] needs positive whole numbers for {', '.join(fields)}")
    return document


def load_adapter(
    base_model: nn.Module, path: str | os.PathLike, *, trainable: bool = False, kernel: str = "auto"
) -> nn.Module:
    """Attach the adapter saved in ``path`` to ``base_model`` (in place) and return the model.

    Every recorded module must exist in the base with the recorded shape; the first that does not is
    named in the error. ``trainable=True`` leaves the blocks requiring gradients (to continue training);
    ``kernel`` is how the layers compute (see :class:`DiaBloConfig`).
    """
    directory = Path(path)
    document = read_adapter_config(directory)
    if adapted_layers(base_model):
        raise DiaBloError("this model already has DiaBlo adapters; load into a fresh base")
    targets = check_against_base(base_model, document, directory)
    with open_safetensors(directory / WEIGHTS_FILE, DAMAGED_ADAPTER_ADVICE) as weights:
        if (weights.metadata() or {}).get("adapter_id") != document.get("adapter_id"):
            raise DiaBloError(
                f"{directory}: {WEIGHTS_FILE} and {CONFIG_FILE} come from different saves (adapter_id differs); "
                "the directory was left half-written, save the adapter again"
            )
        expected = {f"{t.name}.{ADAPTER_PARAMETER}": t for t in targets}
        available = set(weights.keys())
        unexpected = sorted(available - set(expected))
        if unexpected:
            raise DiaBloError(f"{directory / WEIGHTS_FILE} has tensors its config does not list, e.g. {unexpected[0]}")
        tensors = {}
        for key, target in expected.items():
            if key not in available:
                raise DiaBloError(f"{directory / WEIGHTS_FILE} lacks the tensor {key}")
            tensor = weights.get_tensor(key)
            wanted = BlockLayout(target.in_features, target.out_features, target.blocks).shape
            if tuple(tensor.shape) != wanted:
                raise DiaBloError(
                    f"{directory / WEIGHTS_FILE}: {key} has shape {tuple(tensor.shape)}, expected {wanted}"
                )
            tensors[target.name] = tensor
    dtype = ADAPTER_DTYPES[canonical_dtype(next(iter(tensors.values())).dtype)]
    dropout = float(document.get("dropout") or 0.0)
    wrap_targets(base_model, targets, dropout=dropout, dtype=dtype, trainable=trainable, kernel=kernel)
    layers = adapted_layers(base_model)
    with torch.no_grad():
        for name, tensor in tensors.items():
            layers[name].diablo_blocks.copy_(tensor)
    if document.get("config"):
        setattr(base_model, CONFIG_ATTRIBUTE, DiaBloConfig.from_dict(document["config"]))
    return base_model


def check_against_base(model: nn.Module, document: dict[str, Any], directory: Path) -> list[Target]:
    modules = dict(model.named_modules())
    targets = []
    for name, entry in document["modules"].items():
        module = modules.get(name)
        if module is None:
            raise AdapterMismatchError(
                f"adapter {directory} adapts {name}, which the base model ({type(model).__name__}) does not have"
            )
        features = linear_features(module)
        recorded = (entry.get("in_features"), entry.get("out_features"))
        if features != recorded:
            raise AdapterMismatchError(
                f"adapter {directory} expects {name} with in_features={recorded[0]}, out_features={recorded[1]}; "
                + (
                    f"the base has in_features={features[0]}, out_features={features[1]}"
                    if features
                    else f"the base's {name} is a {type(module).__name__}, not a linear layer"
                )
            )
        targets.append(Target(name, features[0], features[1], int(entry["blocks"])))
    return targets


def describe_base(model: nn.Module, override: str | None) -> dict[str, Any]:
    """What an adapter records of its base: the name to load it by, the architecture, how it was quantized."""
    config = getattr(model, "config", None)
    return {
        "name_or_path": override or getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None),
        "architectures": getattr(config, "architectures", None) or [type(model).__name__],
        "model_type": getattr(config, "model_type", None),
        "quantization": base_quantization(config) if config is not None else None,  # what the adapter trained on
    }


def _dropout_of(layers: dict) -> float:
    first = next(iter(layers.values()))
    return float(getattr(first.dropout, "p", 0.0))
