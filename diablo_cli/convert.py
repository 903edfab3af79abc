"""``diablo convert``: adapters trained with the official DiaBlo code (github.com/ziyangjoy/DiaBlo) in and out.

The official trainer saves ``adapter.chkpt``: ``torch.save`` of a flat dict ``{"<module path>.block_A": A}``, no
config, no record of the base. For ``--num_blocks N`` a layer with ``in`` inputs and ``out`` outputs gets
``d1 = ⌈in/N⌉``, ``d2 = ⌈out/N⌉`` and ``N_eff = max(⌈in/d1⌉, ⌈out/d2⌉)`` blocks, ``A`` shaped ``(N_eff, d1, d2)``;
input chunk ``j`` (zero-padded) times ``A[j]`` gives output chunk ``j``, truncated to ``out``. ``N_eff < N``
where ``N`` does not divide a side: e.g. a 64×64 layer with N=9 has d1 = d2 = 8 and 8 blocks, and Llama-2-7B
with N=320 has 316 blocks in every layer.

That is this project's layout exactly, with ``N_eff`` blocks: ``⌈in/N_eff⌉ = d1`` because
``in/d1 ≤ N_eff ≤ N`` (likewise for ``out``), and the orientation is the same. So a converted layer keeps its
tensor bit for bit and records ``N_eff`` as its block count (``blocks_by_module`` where it differs from the
run's ``N``). Going back, a layer of ours with ``N`` blocks whose last ``N − N_eff`` blocks lie wholly in the
padding drops them: they never see an input or reach an output.

Official checkpoints are pickles: they are read with ``torch.load(weights_only=True)`` only, which refuses
(without running it) anything but tensors and plain containers.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .adapter import DiaBloConfig, read_adapter_config, select_targets
from .adapter.config import canonical_dtype
from .adapter.files import (
    DAMAGED_ADAPTER_ADVICE,
    OFFICIAL_CHECKPOINT,
    WEIGHTS_FILE,
    describe_base,
    write_adapter_folder,
)
from .adapter.layer import ADAPTER_PARAMETER, linear_features
from .adapter.targets import layer_index, module_letters
from .atomic import atomic_path
from .errors import DiaBloError
from .inspection import load_model_config
from .models import skeleton_model
from .reading import open_safetensors
from .records import ConversionReport
from .run_folder import CONVERT, ModelOutput

OFFICIAL_KEY_SUFFIX = ".block_A"
OFFICIAL_DROPOUT = 0.05
"""The official trainer's ``--dropout`` default (ours is 0)."""
OFFICIAL_LAYER_MAX = 31
"""The official trainer's ``--layer_max`` default: layers past 31 (a 40-layer Llama-2-13B's) get no adapter."""
OFFICIAL_LETTERS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "g": "gate_proj",
    "u": "up_proj",
    "d": "down_proj",
}
"""The official ``--target_modules`` letters and the layers they name (the paper's QKVOGUD, lowercase)."""
_OFFICIAL_PATH = re.compile(rf"^model\.layers\.(\d+)\.(?:.+\.)?(?:{'|'.join(OFFICIAL_LETTERS.values())})$")
_RUN_NAME_BLOCKS = re.compile(r"_block(\d+)_")  # the official run folder: {model}_block{N}_lr{lr}_bs…_{task}
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def official_block_count(in_features: int, out_features: int, blocks: int) -> int:
    """``N_eff``: how many blocks the official code gives an ``in × out`` layer for ``--num_blocks blocks``."""
    block_in, block_out = math.ceil(in_features / blocks), math.ceil(out_features / blocks)
    return max(math.ceil(in_features / block_in), math.ceil(out_features / block_out))


def official_shape(in_features: int, out_features: int, blocks: int) -> tuple[int, int, int]:
    """The shape of the official ``block_A`` of an ``in × out`` layer for ``--num_blocks blocks``."""
    count = official_block_count(in_features, out_features, blocks)
    return count, math.ceil(in_features / blocks), math.ceil(out_features / blocks)


# ---- official → diablo -----------------------------------------------------------------------------------------


def find_official_checkpoint(source: str | os.PathLike) -> tuple[Path, str | None]:
    """The ``adapter.chkpt`` that ``source`` names: the file, a folder holding it, or an official run folder
    (its newest ``checkpoint-N``); with a note saying which checkpoint was taken when there was a choice."""
    source = Path(source)
    if source.is_file():
        return source, None
    if not source.is_dir():
        raise DiaBloError(f"{source} does not exist; give an official run folder or its {OFFICIAL_CHECKPOINT}")
    if (source / OFFICIAL_CHECKPOINT).is_file():
        return source / OFFICIAL_CHECKPOINT, None
    steps = sorted(
        (int(match.group(1)), path)
        for path in source.iterdir()
        if (match := _CHECKPOINT_DIR.match(path.name)) and (path / OFFICIAL_CHECKPOINT).is_file()
    )
    if steps:
        chosen = steps[-1][1] / OFFICIAL_CHECKPOINT
        note = None if len(steps) == 1 else f"took {chosen.parent.name}, the newest of {len(steps)} checkpoints"
        return chosen, note
    if (source / "adapter_config.json").is_file():
        raise DiaBloError(f"{source} is a diablo adapter folder already; to write the official format, --to official")
    raise DiaBloError(
        f"{source} holds no {OFFICIAL_CHECKPOINT} (nor checkpoint-N/{OFFICIAL_CHECKPOINT}); the official DiaBlo "
        "trainer saves its adapter there (--save_adapter_only)"
    )


def read_official_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The ``block_A`` tensors of an official checkpoint, read with ``torch.load(weights_only=True)``: a pickle
    holding anything but tensors is refused before any of it runs; so is any other file, in one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on files it then refuses
            loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, even KeyError for a file of text
        blocked = _BLOCKED_GLOBAL.search(str(err))
        if blocked or "Weights only load failed" in str(err):
            what = f"it would call {blocked.group(1)}" if blocked else "it holds objects other than tensors"
            raise DiaBloError(
                f"{path}: refused, not loaded: {what}; diablo reads checkpoints with torch.load(weights_only=True), "
                "which runs no code, and an official DiaBlo adapter.chkpt holds tensors only"
            ) from None
        raise DiaBloError(
            f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {' '.join(str(err).split())[:120]}); "
            f"give the {OFFICIAL_CHECKPOINT} the official DiaBlo trainer saved"
        ) from None
    if not isinstance(loaded, dict) or not loaded:
        raise DiaBloError(
            f"{path} holds a {type(loaded).__name__}, not an official DiaBlo adapter (a dict of "
            f"'<module>{OFFICIAL_KEY_SUFFIX}' tensors)"
        )
    for key, value in loaded.items():
        if not isinstance(key, str) or not key.endswith(OFFICIAL_KEY_SUFFIX):
            raise DiaBloError(
                f"{path} holds {key!r}, which is not an official DiaBlo adapter tensor (keys end in "
                f"{OFFICIAL_KEY_SUFFIX}); give the {OFFICIAL_CHECKPOINT} the trainer saved with --save_adapter_only"
            )
        if not isinstance(value, torch.Tensor) or value.ndim != 3 or not value.is_floating_point():
            described = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise DiaBloError(f"{path}: {key} is {described}, not a float tensor of blocks (N, d1, d2)")
    return loaded


def infer_block_count(
    layers: dict[str, tuple[int, int, tuple[int, int, int]]],
    *,
    given: int | None,
    hinted: int | None,
    checkpoint: Path,
) -> tuple[int, str]:
    """The ``--num_blocks`` a run used, from its layers (name → in, out, block_A shape): ``given`` when it fits,
    else the run folder's name (``hinted``), else the smallest count the shapes allow. Counts that fit all give
    the very same layout."""
    shapes = {(i, o, s) for i, o, s in layers.values()}

    def first_misfit(blocks: int) -> str | None:
        return next((n for n, (i, o, s) in layers.items() if official_shape(i, o, blocks) != s), None)

    if given is not None:
        name = first_misfit(given)
        if name is not None:
            i, o, s = layers[name]
            raise DiaBloError(
                f"--blocks {given}: {checkpoint} holds {name}{OFFICIAL_KEY_SUFFIX} of shape {s}, but the official "
                f"code with --num_blocks {given} stores {official_shape(i, o, given)} for that {i}×{o} layer; "
                "leave --blocks out to infer it"
            )
        return given, "--blocks"
    largest = max(max(i, o) for i, o, _ in shapes)
    for i, o, s in shapes:
        if not any(official_shape(i, o, n) == s for n in range(s[0], largest + 1)):
            name = next(n for n, v in layers.items() if v == (i, o, s))
            raise DiaBloError(
                f"{checkpoint}: {name}{OFFICIAL_KEY_SUFFIX} has shape {s}, which the official code makes for no "
                f"block count on the base's {i}×{o} (in×out) {name}; is the base the model the run trained? "
                f"(N blocks store (N_eff, ⌈{i}/N⌉, ⌈{o}/N⌉))"
            )
    fitting = [n for n in range(max(s[0] for _, _, s in shapes), largest + 1) if first_misfit(n) is None]
    if not fitting:
        raise DiaBloError(
            f"{checkpoint}: no single --num_blocks gives every layer its shape ("
            + ", ".join(f"{i}×{o}: {s}" for i, o, s in sorted(shapes))
            + "); the official code uses one block count for all layers"
        )
    if hinted in fitting:
        return hinted, "the run folder's name"
    alike = f" (counts {fitting[0]}–{fitting[-1]} fit, all alike)" if len(fitting) > 1 else ""
    return fitting[0], "the shapes" + alike


def convert_from_official(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    base: str,
    blocks: int | None = None,
    dropout: float = OFFICIAL_DROPOUT,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ConversionReport:
    """Turn an official ``adapter.chkpt`` (or run folder) into a diablo adapter folder for ``base``: every tensor
    kept bit for bit, each layer with the block count the official code gave it. Only the base's config is read."""
    checkpoint, note = find_official_checkpoint(source)
    tensors = read_official_checkpoint(checkpoint)
    skeleton = skeleton_model(
        load_model_config(base, trust_remote_code=trust_remote_code), trust_remote_code=trust_remote_code
    )
    modules = dict(skeleton.named_modules())
    layers: dict[str, tuple[int, int, tuple[int, int, int]]] = {}
    for key, tensor in tensors.items():
        name = key.removesuffix(OFFICIAL_KEY_SUFFIX)
        features = linear_features(modules[name]) if name in modules else None
        if features is None:
            what = "has no module" if name not in modules else f"has a {type(modules[name]).__name__}, no linear layer,"
            raise DiaBloError(
                f"{checkpoint} adapts {name}, but base {base} ({type(skeleton).__name__}) {what} there; "
                "give the base the run trained (--base)"
            )
        layers[name] = (*features, tuple(tensor.shape))
    hinted = next((int(m.group(1)) for part in checkpoint.parts if (m := _RUN_NAME_BLOCKS.search(part))), None)
    count, found_by = infer_block_count(layers, given=blocks, hinted=hinted, checkpoint=checkpoint)
    dtype = canonical_dtype(next(iter(tensors.values())).dtype)
    config = _official_config(skeleton, layers, count, dropout=dropout, dtype=dtype)

    with ModelOutput(Path(output), command=CONVERT, overwrite=overwrite) as target:
        staging = target.staging("converting")
        write_adapter_folder(
            staging,
            {key.removesuffix(OFFICIAL_KEY_SUFFIX): tensor for key, tensor in tensors.items()},
            {name: (i, o) for name, (i, o, _) in layers.items()},
            base=describe_base(skeleton, base),
            config=config,
            dropout=dropout,
            source={"format": "official DiaBlo adapter.chkpt", "path": str(checkpoint), "num_blocks": count},
        )
        target.publish(staging)
    return ConversionReport(
        source=checkpoint,
        output=Path(output),
        to="diablo",
        blocks=count,
        blocks_from=found_by,
        modules=len(tensors),
        parameters=sum(t.numel() for t in tensors.values()),
        dtype=dtype,
        shrunk=_shrunk(layers, count),
        targets=config.target_modules,
        layers=config.layers,
        dropout=dropout,
        notes=[note] if note else [],
        cleaned=target.cleaned,
    )


def _official_config(
    skeleton: torch.nn.Module,
    layers: dict[str, tuple[int, int, tuple[int, int, int]]],
    blocks: int,
    *,
    dropout: float,
    dtype: str,
) -> DiaBloConfig:
    """What the run's settings were, as a DiaBloConfig: its letters and layer range when they select exactly these
    layers of the base (else the layers by name), ``blocks`` = its N and an override where the official code
    shrank N (by module kind, or by full name where one kind's layers differ)."""
    letters = "".join(c for c in "QKVOGUD" if any(c in module_letters(name) for name in layers))
    indices = sorted({index for name in layers if (index := layer_index(name)) is not None})
    span = (indices[0], indices[-1]) if indices else None
    depth = getattr(getattr(skeleton, "config", None), "num_hidden_layers", None)
    span = None if span is not None and depth is not None and span == (0, depth - 1) else span
    targets: str | list[str] = list(layers)
    if letters and all(module_letters(name) for name in layers):
        chosen = select_targets(skeleton, DiaBloConfig(blocks=1, target_modules=letters, layers=span))
        if {t.name for t in chosen} == set(layers):
            targets = letters
    counts: dict[str, set[int]] = {}
    for name, (_, _, shape) in layers.items():
        counts.setdefault(name.rsplit(".", 1)[-1], set()).add(shape[0])
    overrides: dict[str, int] = {}
    for name, (_, _, shape) in layers.items():
        kind = name.rsplit(".", 1)[-1]
        if len(counts[kind]) > 1 and shape[0] != blocks:
            overrides[name] = shape[0]
    for kind, found in counts.items():
        if len(found) == 1 and (count := next(iter(found))) != blocks:
            overrides[kind] = count
    return DiaBloConfig(
        blocks=blocks,
        target_modules=targets,
        layers=span if targets == letters else None,
        blocks_by_module=overrides,
        dropout=dropout,
        dtype=dtype,
    )


def _shrunk(layers: dict[str, tuple[int, int, tuple[int, int, int]]], blocks: int) -> dict[str, int]:
    """Module kind → the block count the official code gave it, where fewer than ``blocks``."""
    return {name.rsplit(".", 1)[-1]: s[0] for name, (_, _, s) in layers.items() if s[0] != blocks}


# ---- diablo → official -----------------------------------------------------------------------------------------


def convert_to_official(adapter_dir: str | os.PathLike, output: str | os.PathLike) -> ConversionReport:
    """Write a diablo adapter as the official trainer would have saved it: the same keys, shapes and dtypes, so
    its scripts (merge.py, the evaluations) load it with the ``--num_blocks``/``--target_modules`` printed. A
    file already at ``output`` is never replaced; a folder gets ``adapter.chkpt`` inside it."""
    adapter_dir = Path(adapter_dir)
    document = read_adapter_config(adapter_dir)
    modules: dict[str, Any] = document["modules"]
    for name in modules:
        if not _OFFICIAL_PATH.match(name):
            raise DiaBloError(
                f"{adapter_dir} adapts {name}, which the official DiaBlo code cannot: it adapts only "
                f"{', '.join(OFFICIAL_LETTERS.values())} inside model.layers.<i> of a causal LM"
            )
    recorded = (document.get("config") or {}).get("blocks")
    count = _official_count(modules, recorded, adapter_dir)
    target = Path(output)
    if target.is_dir() or str(output).endswith(os.sep):
        target = target / OFFICIAL_CHECKPOINT
    if target.exists() or target.is_symlink():
        raise DiaBloError(
            f"-o {target} exists; diablo does not replace a file it cannot tell it wrote: delete it or choose another"
        )
    tensors: dict[str, torch.Tensor] = {}
    trimmed = 0
    with open_safetensors(adapter_dir / WEIGHTS_FILE, DAMAGED_ADAPTER_ADVICE) as weights:
        for name, entry in modules.items():
            blocks = weights.get_tensor(f"{name}.{ADAPTER_PARAMETER}")
            kept = official_block_count(entry["in_features"], entry["out_features"], count)
            trimmed += int(blocks.shape[0] > kept)
            tensors[f"{name}{OFFICIAL_KEY_SUFFIX}"] = blocks[:kept].clone()
    with atomic_path(target) as tmp:
        torch.save(tensors, tmp)
    dtype = canonical_dtype(next(iter(tensors.values())).dtype)
    letters = "".join(c for c, kind in OFFICIAL_LETTERS.items() if any(n.endswith("." + kind) for n in modules))
    indices = sorted({int(_OFFICIAL_PATH.match(name).group(1)) for name in modules})
    dropout = float(document.get("dropout") or 0.0)
    arguments = (
        f"--num_blocks {count} --target_modules {letters} --layer_min {indices[0]} --layer_max {indices[-1]} "
        f"--dropout {dropout:g}"
    )
    return ConversionReport(
        source=adapter_dir,
        output=target,
        to="official",
        blocks=count,
        blocks_from="the adapter",
        modules=len(tensors),
        parameters=sum(t.numel() for t in tensors.values()),
        dtype=dtype,
        shrunk={},
        targets=letters,
        layers=(indices[0], indices[-1]),
        dropout=dropout,
        trimmed=trimmed,
        official_arguments=arguments,
    )


def _official_count(modules: dict[str, Any], recorded: int | None, adapter_dir: Path) -> int:
    """The one ``--num_blocks`` under which the official code gives every layer this adapter's block size and
    at most its block count (the rest being padding only); the recorded N first."""
    counts = sorted({int(entry["blocks"]) for entry in modules.values()})
    for candidate in ([recorded] if isinstance(recorded, int) else []) + counts:
        if all(_fits_official(entry, candidate) for entry in modules.values()):
            return candidate
    first = next(iter(modules))
    raise DiaBloError(
        f"{adapter_dir}: its layers use block counts {counts} (e.g. {first}: {modules[first]['blocks']}), and no "
        "single --num_blocks of the official code gives every layer its block shape; the official format "
        "cannot hold this adapter"
    )


def _fits_official(entry: dict[str, Any], blocks: int) -> bool:
    in_features, out_features, ours = entry["in_features"], entry["out_features"], entry["blocks"]
    same_size = (math.ceil(in_features / ours), math.ceil(out_features / ours)) == (
        math.ceil(in_features / blocks),
        math.ceil(out_features / blocks),
    )
    return same_size and ours >= official_block_count(in_features, out_features, blocks)
