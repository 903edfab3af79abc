"""Raw examples from wherever a recipe says: a hub id, a local file or folder, a file URL, or a preset.

Every failure is one line that names the dataset and says what to do, because the hub is often unreachable
(offline clusters, CI) and a local copy is then the answer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import datasets

from ..cache import cache_dir
from ..errors import DiaBloError
from ..reading import read_json, read_json_lines, read_text
from .config import DatasetSource
from .formats import OPTIONAL_FIELDS, field_columns, format_of
from .presets import get_preset, resolve_source

_OFFLINE_NAMES = ("Offline", "Connect", "Timeout")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_raw_examples(source: DatasetSource, split: str | None = None) -> datasets.Dataset:
    """The source's raw rows (`split` overrides the source's), limited and checked to have the needed columns."""
    dataset = load_rows(source, split)
    check_columns(dataset, resolve_source(source), source_label(source))
    return dataset


def load_rows(source: DatasetSource, split: str | None = None, *, local_hint: str | None = None) -> datasets.Dataset:
    """The source's raw rows, limited (and rewritten into its format by a preset that says how), with no check
    of columns (evaluation tasks read their own columns).

    ``local_hint`` is the advice given when the data cannot be downloaded (default: set `path:` to a local copy).
    """
    label = source_label(source)
    resolved = resolve_source(source)
    split = split or resolved.split
    hint = local_hint or _local_copy_hint(source.preset)
    path = resolved.path
    assert path is not None  # a resolved source always has one
    if "://" in path:
        dataset = _load_file(_fetch_url(path, label, hint), "train", label)
    elif Path(path).expanduser().exists():
        local = Path(path).expanduser()
        dataset = _load_folder(local, split, label) if local.is_dir() else _load_file(local, split, label)
    elif _looks_like_file(path):
        raise DiaBloError(f"dataset file {path!r} does not exist (looked for {Path(path).expanduser().resolve()})")
    else:
        dataset = _load_hub(resolved, split, label, hint)
    if resolved.limit is not None:
        dataset = dataset.select(range(min(resolved.limit, len(dataset))))
    convert = get_preset(source.preset).rows if source.preset else None
    if convert is not None:  # a preset whose data needs rewriting into its format (GLUE → prompt/completion)
        dataset = dataset.map(convert, remove_columns=dataset.column_names, desc=f"{source.preset} rows")
    return dataset


def infer_source(path: str, *, local_hint: str | None = None) -> DatasetSource:
    """A dataset in whichever training format its columns say (messages, prompt/completion, instruction, text),
    so that `--task loss --data FILE` and `diablo quantize --calibration FILE` need no format flag."""
    columns = set(load_rows(DatasetSource(path=str(path)), local_hint=local_hint).column_names)
    for fmt, needed in (
        ("chat", {"messages"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("instruction", {"instruction", "output"}),
        ("text", {"text"}),
    ):
        if needed <= columns:
            return DatasetSource(path=str(path), format=fmt)
    raise DiaBloError(
        f"{path}: cannot tell its training format from its columns ({', '.join(sorted(columns))}); expected messages, "
        "prompt + completion, instruction + output, or text"
    )


def source_label(source: DatasetSource) -> str:
    """How messages name a source: its preset, else its path."""
    return f"preset {source.preset!r}" if source.preset else repr(source.path)


def check_columns(dataset: datasets.Dataset, source: DatasetSource, label: str | None = None) -> None:
    """Every field the format needs has a column (`input` may be absent unless `fields:` maps it)."""
    label = label or source_label(source)
    fmt = format_of(source)
    existing = dataset.column_names
    for logical, column in field_columns(source).items():
        if column in existing or (logical in OPTIONAL_FIELDS and logical not in source.fields):
            continue
        raise DiaBloError(
            f"dataset {label} has no column {column!r} for the {logical!r} field of format {fmt!r}; its columns are: "
            f"{', '.join(existing) or '(none)'}; set `fields: {{{logical}: <column>}}` to read another column"
        )


def _looks_like_file(path: str) -> bool:
    return Path(path).suffix.lower() in FILE_BUILDERS or path.startswith(("/", "./", "../", "~", "\\")) or ":\\" in path


def _load_file(path: Path, split: str, label: str) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DiaBloError(
            f"dataset {label}: cannot read {path.name!r}; supported files: {', '.join(FILE_BUILDERS)} (or a folder)"
        )
    if split.split("[")[0] != "train":
        raise DiaBloError(
            f"dataset {label}: a single file holds only the 'train' split, not {split!r}; put train.jsonl and "
            f"validation.jsonl in a folder and point `path` at it, or use `validation_ratio`"
        )
    if builder == "json":
        return _guarded(lambda: _read_json_split(path, split), label)
    if builder == "csv" and not read_text(path, "dataset file").strip():
        raise DiaBloError(f"dataset file {path} is empty; a CSV file needs a header row and one row per example")
    return _guarded(lambda: datasets.load_dataset(builder, data_files=str(path), split=split), label)


def _load_folder(path: Path, split: str, label: str) -> datasets.Dataset:
    """A folder of data files; splits come from file names (train.jsonl, validation.jsonl, test.jsonl, ...)."""
    name = split.split("[")[0]
    for candidate in (path / f"{name}.jsonl", path / f"{name}.json"):
        if candidate.is_file():
            return _guarded(lambda file=candidate: _read_json_split(file, split), label)
    return _guarded(lambda: datasets.load_dataset(str(path), split=split), label)


def _read_json_split(path: Path, split: str) -> datasets.Dataset:
    """JSON / JSON Lines records as they are written. Read through Python's json, not pyarrow's reader,
    which turns strings that look like dates ("2021-03-05") into timestamps and so changes the data."""
    if path.suffix.lower() == ".jsonl":
        records = read_json_lines(path, "dataset file")
    else:
        records = read_json(path, "dataset file")
        if isinstance(records, dict) and len(records) == 1 and isinstance(next(iter(records.values())), list):
            records = next(iter(records.values()))  # {"data": [...]}
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DiaBloError(f"{path}: expected a list of JSON objects (or one object per line in a .jsonl file)")
    rows = datasets.Dataset.from_list(records)
    instruction = datasets.ReadInstruction.from_spec(split.replace(split.split("[")[0], "train", 1))
    window = instruction.to_absolute({"train": len(rows)})[0]
    return rows.select(range(window.from_ or 0, window.to if window.to is not None else len(rows)))


def _load_hub(source: DatasetSource, split: str, label: str, hint: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source.path, source.name, split=split)
    except Exception as err:
        if _is_offline_error(err):
            raise DiaBloError(
                f"dataset {label} is on the Hugging Face hub ({source.path}), which cannot be reached (offline or no "
                f"network); download it where the hub is reachable, e.g. datasets.load_dataset({source.path!r}, "
                f"split={split!r}).to_json('data.jsonl'), and {hint}"
            ) from None
        raise DiaBloError(f"could not load dataset {label} from the hub: {_first_line(err)}") from None


def _guarded(load, label: str) -> datasets.Dataset:
    try:
        return load()
    except DiaBloError:
        raise
    except Exception as err:
        raise DiaBloError(f"could not read dataset {label}: {_first_line(err)}") from None


def cached_download_path(url: str) -> Path:
    """Where a data file fetched from `url` is kept (in the diablo-cli cache, $DIABLO_CACHE overrides)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return cache_dir() / "data" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def _fetch_url(url: str, label: str, hint: str) -> Path:
    """Download a data file once into the diablo-cli cache (presets whose data is not on the hub)."""
    target = cached_download_path(url)
    if target.is_file():
        return target
    if any(
        os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        raise DiaBloError(
            f"dataset {label} is downloaded from {url}, which offline mode (HF_HUB_OFFLINE) forbids; download that "
            f"file elsewhere and {hint}, or copy it to {target}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".download-", dir=target.parent)
    os.close(handle)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(staging, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(staging, target)
    except OSError as err:
        raise DiaBloError(
            f"could not download dataset {label} from {url} ({_first_line(err)}); download that file elsewhere and "
            f"{hint}"
        ) from None
    finally:
        Path(staging).unlink(missing_ok=True)
    return target


def _local_copy_hint(preset: str | None) -> str:
    if preset:
        return f"add `path: <that file>` beside `preset: {preset}`"
    return "set `path:` to that local file (same format and fields)"


def _is_offline_error(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, (ConnectionError, TimeoutError)) or any(k in name for k in _OFFLINE_NAMES):
            return True
        if "Couldn't reach" in str(seen) or "offline" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
