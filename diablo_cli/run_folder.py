"""The folders diablo writes — a train run, a merged or quantized model — and the rules that keep a user's own
folders safe: what each folder holds (the layout's names live here), a marker that says diablo wrote it, a lock
that lets one run hold it, the leftovers a killed run leaves, and which checkpoint is newest and intact.

Ownership is written down, never guessed from file names: the marker (a hidden JSON file, which transformers and
vLLM ignore) is the first thing diablo writes into a folder, and it lists the top-level entries diablo wrote.
``--overwrite`` replaces only a folder that carries it, and refuses, with a line naming them, when the user added
files of their own. The lock is an ``fcntl.flock`` on a file, which the kernel drops when its process dies: a
``kill -9`` never leaves a folder locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ._version import __version__
from .atomic import move_into_place, write_text_atomic
from .errors import DiaBloError
from .interrupts import signals_held
from .reading import read_text

MARKER_FILE = ".diablo-folder.json"
LOCK_FILE = ".diablo-lock"
LOG_FILE = "diablo.log"  # third-party output of the command that wrote the folder (diablo_cli/quiet.py)
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # DiaBlo's and PEFT's alike
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"  # present exactly when a tokenizer was saved
TOKENIZER_FILES = (  # what save_pretrained writes for a tokenizer (output.save_tokenizer), by the kinds there are
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

TRAIN, MERGE, QUANTIZE = "train", "merge", "quantize"
CONVERT, EXTRACT = "convert", "extract"  # adapter folders written from an official checkpoint, or a full fine-tune
TENSORBOARD_DIR = "tensorboard"  # logging.tensorboard's event files
WANDB_DIR = "wandb"  # logging.wandb's local run files (wandb names it inside the folder it is given)
RUN_FILES = (RECIPE_FILE, METRICS_FILE, SUMMARY_FILE, LOSS_PLOT, CHECKPOINTS, TENSORBOARD_DIR, WANDB_DIR)
"""What a train run always writes, whatever its method: a marked run folder owns these names."""

_STEP_DIR = re.compile(r"^step-(\d+)$")
_RUN_LEFTOVER = re.compile(r"^\.(.+\.tmp|tokenizer-.+|peft-.+|model-.+)$")  # atomic.py's staging names
_CHECKPOINT_LEFTOVER = re.compile(r"^\.(step-\d+\..+|trash-.+)$")  # a checkpoint being written or deleted
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass
class Marker:
    """The content of MARKER_FILE: which diablo command wrote the folder, when, and the entries it wrote."""

    command: str
    version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    entries: list[str] = field(default_factory=list)

    def write(self, folder: Path) -> None:
        write_text_atomic(folder / MARKER_FILE, json.dumps({"tool": "diablo-cli", **asdict(self)}, indent=1) + "\n")


def read_marker(folder: Path) -> Marker | None:
    """The folder's marker, None when it has none; a marker that cannot be read is an error naming it."""
    path = folder / MARKER_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return Marker(
            command=str(document["command"]),
            version=str(document.get("version", "")),
            created=str(document.get("created", "")),
            entries=[str(name) for name in document.get("entries", [])],
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise DiaBloError(f"{path} is damaged ({err}); delete it only if diablo wrote this folder") from None


def read_saved_recipe(adapter_dir: Path) -> dict[str, Any] | None:
    """The recipe `diablo train` saved beside the adapter (recipe.yaml), or None when there is none."""
    path = Path(adapter_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        document = yaml.safe_load(read_text(path, "saved recipe"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise DiaBloError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    return document if isinstance(document, dict) else None


# ---- checkpoints --------------------------------------------------------------------------------------------------


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step-{step:07d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder (``checkpoints/step-N``) was saved at."""
    return int(path.name.removeprefix("step-"))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first (whether intact or not: see ``checkpoint_damage``)."""
    folder = output_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_damage(path: Path) -> str | None:
    """What is wrong with a checkpoint folder (e.g. "optimizer.safetensors truncated"), None when it is intact.

    Cheap: file sizes against those the checkpoint recorded, and each safetensors header against its file's size;
    no tensor is read."""
    try:
        document = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{STATE_FILE} missing"
    except (OSError, UnicodeDecodeError, ValueError):
        return f"{STATE_FILE} unreadable"
    if not isinstance(document, dict) or not isinstance(document.get("state"), dict):
        return f"{STATE_FILE} incomplete"
    recorded = document.get("files")
    expected = recorded if isinstance(recorded, dict) else dict.fromkeys((OPTIMIZER_FILE, RNG_FILE))
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if size is not None and file.stat().st_size != size:
            return f"{name} {'truncated' if file.stat().st_size < size else 'changed size'}"
    weights = sorted(path.glob("*.safetensors"))
    if not [p for p in weights if p.name not in (OPTIMIZER_FILE, RNG_FILE)]:
        return "weights missing"
    for file in weights:
        reason = safetensors_damage(file)
        if reason is not None:
            return f"{file.name} {reason}"
    return None


def safetensors_damage(path: Path) -> str | None:
    """Why a safetensors file cannot be whole ("truncated", "empty", …), None when its header and size agree."""
    size = path.stat().st_size
    if size == 0:
        return "empty"
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_size > size - 8:
                return "truncated"
            header = json.loads(handle.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
        return "has a broken header"
    if 8 + header_size + end > size:
        return "truncated"
    if 8 + header_size + end < size:
        return "longer than its header says"
    return None


def newest_intact_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint, and the newer damaged ones skipped on the way (each with what is wrong)."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(output_dir)):
        reason = checkpoint_damage(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def trash_name(path: Path) -> Path:
    """Where a checkpoint goes before it is deleted: a hidden name no listing takes for a checkpoint, so a
    deletion cut short never leaves half a checkpoint that looks whole."""
    return path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")


def remove_checkpoint(path: Path) -> None:
    """Rename to a trash name, then delete: see ``trash_name``."""
    trash = trash_name(path)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---- the lock -------------------------------------------------------------------------------------------------------


class FolderLock:
    """An exclusive ``flock`` on a lock file holding the holder's pid; released on ``release()`` or by the kernel
    when the process dies."""

    def __init__(self, path: Path, handle: int) -> None:
        self.path, self._handle = path, handle

    @classmethod
    def acquire(cls, path: Path, *, folder: Path, option: str) -> FolderLock:
        for _ in range(10):  # the holder may remove the file between our open and our lock: then lock the new one
            try:
                handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise DiaBloError(f"cannot lock {folder}: {path}: {err.strerror}; choose another {option}") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(handle, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(handle)
                raise DiaBloError(
                    f"{folder} is in use by another diablo run (pid {holder}); wait for it to finish, "
                    f"or choose another {option}"
                ) from None
            try:
                same = os.stat(path).st_ino == os.fstat(handle).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(handle, 0)
                os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
                return cls(path, handle)
            os.close(handle)
        raise DiaBloError(f"cannot lock {folder}: {path} keeps changing; is another diablo run starting there?")

    def release(self) -> None:
        if self._handle < 0:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._handle).st_ino:
                self.path.unlink()
        os.close(self._handle)
        self._handle = -1


# ---- a train run's folder -----------------------------------------------------------------------------------------


@dataclass
class RunFolder:
    """A train run's output folder, claimed: marked as diablo's and locked by this process until ``release()``."""

    path: Path
    created: Path | None  # the topmost folder this run made (the run folder or one above it), if any
    before: frozenset[str]  # its entries when claimed (after an --overwrite cleared it)
    lock: FolderLock
    cleaned: list[str] = field(default_factory=list)  # leftovers of earlier, killed runs, removed when claimed
    saved: bool = False  # the run's deliverable is written: a later failure (an eval, the plot) keeps the folder

    @classmethod
    def claim(cls, path: Path, *, overwrite: bool, resuming: bool, option: str = "--output-dir") -> RunFolder:
        """Take ``path`` for a train run: a missing or empty folder; a marked one when ``resuming`` (an unmarked
        one too when it holds diablo checkpoints, as runs of older diablo versions do) or, with ``overwrite``, a
        marked one holding nothing the user added. Anything else is refused with one line."""
        names = _entries(path, option)
        marker = read_marker(path) if names else None
        lock = FolderLock.acquire(path / LOCK_FILE, folder=path, option=option) if marker else None
        created = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
        try:
            visible = sorted(names - {MARKER_FILE, LOCK_FILE})
            if visible and resuming:
                if marker is None and not list_checkpoints(path):
                    raise DiaBloError(
                        f"--resume: {path} is not a diablo run (no {MARKER_FILE}, no {CHECKPOINTS}/step-N); "
                        f"it holds {_some(visible)}"
                    )
            elif visible and not overwrite:
                raise DiaBloError(
                    f"output dir {path} is not empty ({_some(visible)}); pass --overwrite to replace it, --resume to "
                    f"continue it, or choose another {option}"
                )
            elif visible:
                _check_replaceable(path, marker, visible, TRAIN, option)
                for name in visible:
                    _remove(path / name)
                marker = None
            _make_folder(path, option)
            before = frozenset(_entries(path, option))
            if marker is None:
                _write_marker(Marker(TRAIN), path, option)  # first: whatever follows is in a folder marked diablo's
            lock = lock or FolderLock.acquire(path / LOCK_FILE, folder=path, option=option)
            return cls(path, created, before, lock, clean_run_leftovers(path))
        except BaseException:
            if lock is not None:
                lock.release()
            _remove_made_folders(path, created)
            raise

    def record_written(self) -> None:
        """Add the entries this run wrote since it claimed the folder to the marker's list."""
        marker = read_marker(self.path) or Marker(TRAIN)
        new = {name for name in _entries(self.path) - self.before if not name.startswith(".")}
        if not new <= set(marker.entries):
            marker.entries = sorted(set(marker.entries) | new)
            marker.write(self.path)

    def discard(self) -> bool:
        """After a failure before the first checkpoint: remove what this run wrote (the folder too, when this run
        made it). Returns whether anything was removed; a folder holding a checkpoint or the saved adapter is left
        as it is."""
        if self.saved or list_checkpoints(self.path):
            return False
        marker = read_marker(self.path)
        owned = set(RUN_FILES) | set(marker.entries if marker else [])
        for name in _entries(self.path) - self.before:
            if name in owned or _RUN_LEFTOVER.match(name):
                _remove(self.path / name)
        if MARKER_FILE not in self.before:
            (self.path / MARKER_FILE).unlink(missing_ok=True)
        self.release()
        _remove_made_folders(self.path, self.created)
        return True

    def release(self) -> None:
        self.lock.release()


def clean_run_leftovers(path: Path) -> list[str]:
    """Remove what killed runs left in a run folder this process holds: staging files and folders of atomic
    writes and checkpoints, and checkpoints caught half-deleted. Returns their names, relative to ``path``."""
    found = [p for p in path.iterdir() if _RUN_LEFTOVER.match(p.name)]
    if (path / CHECKPOINTS).is_dir():
        found += [p for p in (path / CHECKPOINTS).iterdir() if _CHECKPOINT_LEFTOVER.match(p.name)]
    for item in found:
        _remove(item)
    return [item.relative_to(path).as_posix() for item in found]


# ---- a merged or quantized model's folder -------------------------------------------------------------------------


def check_model_output(output_dir: Path, *, command: str, overwrite: bool, option: str = "--output") -> None:
    """Refuse an output that is a file, a non-empty folder without ``overwrite``, and even with it a folder that
    is not a model diablo's ``command`` wrote, or one the user added files to."""
    names = _entries(output_dir, option)
    visible = sorted(names - {MARKER_FILE})
    if not visible:
        return
    if not overwrite:
        raise DiaBloError(
            f"{option} {output_dir} is not empty ({_some(visible)}); pass --overwrite to replace it or choose "
            "another folder"
        )
    _check_replaceable(output_dir, read_marker(output_dir), visible, command, option)


class ModelOutput:
    """Writes a model folder the way merge, quantize, convert and extract do: in marked staging folders beside the
    output, moved into place whole, with the output locked meanwhile (the lock file sits beside it, as it is
    swapped by rename). Use it as a context manager: ``with ModelOutput(...) as output: ... output.publish(staging)``.
    """

    def __init__(self, output_dir: Path, *, command: str, overwrite: bool, option: str = "--output") -> None:
        self.output_dir, self.command = output_dir, command
        parent = output_dir.parent
        self._created = next((p for p in reversed([parent, *parent.parents]) if not p.exists()), None)
        self._stagings: list[Path] = []
        self._lock: FolderLock | None = None
        self._published = False
        try:
            _make_folder(parent, option)
            self._lock = FolderLock.acquire(parent / f".{output_dir.name}{LOCK_FILE}", folder=output_dir, option=option)
            self.restored = self._restore_interrupted_swap()
            check_model_output(output_dir, command=command, overwrite=overwrite, option=option)
            self.cleaned = self._clean_leftovers()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ModelOutput:
        return self

    def __exit__(self, _kind, err, _traceback) -> None:
        """Close; a full disk or a blocked write on the way out becomes one line (``raise_disk_fault``)."""
        try:
            if isinstance(err, Exception):
                self.raise_disk_fault(err)
        finally:
            self.close()

    def staging(self, purpose: str) -> Path:
        """A private folder beside the output (``.NAME-PURPOSE-xxxx``), marked first, removed by ``close()``."""
        path = Path(tempfile.mkdtemp(prefix=f".{self.output_dir.name}-{purpose}-", dir=self.output_dir.parent))
        self._stagings.append(path)
        Marker(self.command).write(path)
        return path

    def publish(self, staging: Path) -> None:
        """Record what ``staging`` holds in its marker and swap it in for the output."""
        marker = read_marker(staging) or Marker(self.command)
        marker.entries = sorted(p.name for p in staging.iterdir() if p.name != MARKER_FILE)
        marker.write(staging)
        with signals_held():  # two renames: the old model or the new one, never neither
            move_into_place(staging, self.output_dir)
        self._published = True

    def raise_disk_fault(self, err: BaseException) -> None:
        """Turn a full disk or a blocked write into one line naming the output, what was kept and what to do;
        return for any other fault, for the caller to re-raise."""
        code = disk_errno(err)
        if code is None:
            return
        kept = (
            f"the previous {self.output_dir} is kept as it was"
            if self.output_dir.exists()
            else f"nothing was written to {self.output_dir}"
        )
        written = Path(err.filename) if isinstance(err, OSError) and isinstance(err.filename, str) else None
        if written is not None and not self._beside_output(written):  # a file elsewhere, e.g. a temporary one
            advice = f"; {disk_advice(code)}" if code in (errno.ENOSPC, errno.EDQUOT) else ""
            raise DiaBloError(f"{written}: {os.strerror(code)}; {kept}{advice}") from None
        raise DiaBloError(f"cannot write {self.output_dir}: {os.strerror(code)}; {kept}; {disk_advice(code)}") from None

    def close(self) -> None:
        """Remove the staging folders and release the output; unless it was published, also remove the parent
        folders this command made (while they are empty, as the user may have put something there meanwhile)."""
        for path in self._stagings:
            shutil.rmtree(path, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
        if not self._published:
            _remove_made_folders(self.output_dir.parent, self._created)

    def _beside_output(self, path: Path) -> bool:
        """Whether ``path`` is the output, or in one of the hidden folders diablo writes it through."""
        try:
            first = path.resolve().relative_to(self.output_dir.parent.resolve()).parts[0]
        except (ValueError, IndexError):
            return False
        return first == self.output_dir.name or first.startswith(f".{self.output_dir.name}")

    def _clean_leftovers(self) -> list[str]:
        """Staging and replaced folders that killed merges or quantizations of this output left beside it: only
        those that are empty or carry diablo's marker (and, first in the list, a previous model put back)."""
        purposes = "merging|quantizing|converting|extracting|source|replaced"
        pattern = re.compile(rf"^\.{re.escape(self.output_dir.name)}-({purposes})-.+$")
        found = [
            p
            for p in self.output_dir.parent.iterdir()
            if pattern.match(p.name) and p.is_dir() and not p.is_symlink() and _marked_or_empty(p)
        ]
        for item in found:
            shutil.rmtree(item, ignore_errors=True)
        return self.restored + sorted(item.name for item in found)

    def _restore_interrupted_swap(self) -> list[str]:
        """A swap killed between its two renames leaves no output and the previous model under a hidden
        ``.NAME-replaced-PID`` name: put it back (before the output is checked, so --overwrite still decides)."""
        if self.output_dir.exists():
            return []
        pattern = re.compile(rf"^\.{re.escape(self.output_dir.name)}-replaced-\d+$")
        previous = [p for p in self.output_dir.parent.iterdir() if pattern.match(p.name) and read_marker(p)]
        if not previous:
            return []
        newest = max(previous, key=lambda p: p.stat().st_mtime)
        newest.rename(self.output_dir)
        return [f"{newest.name} (the previous {self.output_dir.name}, put back)"]


# ---- disk faults --------------------------------------------------------------------------------------------------


def disk_errno(err: BaseException) -> int | None:
    """The errno of a full disk or a write that is not allowed, from an OSError or a safetensors error (which
    carries it only in its text); None for anything else."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and type(err).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(err))
        code = int(found.group(1)) if found else None
    return code if code in _DISK_ERRORS else None


def disk_advice(code: int) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free some space there (or choose another output folder)"
    return "the folder is not writable: choose another output folder"


# ---- helpers ------------------------------------------------------------------------------------------------------


def _entries(path: Path, option: str = "output") -> set[str]:
    """The names in ``path`` (none when it does not exist); one line when the path is a file or runs through one."""
    blocked = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocked == path:
        raise DiaBloError(f"{option} {path} exists and is not a folder; choose another {option}")
    if blocked is not None:
        raise DiaBloError(f"{option} {path}: {blocked} is a file, not a folder; choose another {option}")
    try:
        return {p.name for p in path.iterdir()} if path.is_dir() else set()
    except OSError as err:
        raise DiaBloError(f"{option} {path} cannot be read ({err.strerror}); choose another {option}") from None


def _make_folder(path: Path, option: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiaBloError(f"{option} {path} cannot be created ({err.strerror}); choose another {option}") from None


def _write_marker(marker: Marker, path: Path, option: str) -> None:
    try:
        marker.write(path)
    except OSError as err:
        raise DiaBloError(
            f"{option} {path}: cannot write {MARKER_FILE} there ({err.strerror}); {disk_advice(err.errno)}"
        ) from None


def _check_replaceable(path: Path, marker: Marker | None, visible: list[str], command: str, option: str) -> None:
    """``--overwrite`` replaces only what diablo's ``command`` wrote; say what to do about anything else."""
    if marker is None:
        if RECIPE_FILE in visible or CHECKPOINTS in visible:
            resume = " (--resume still continues a run of an older diablo)" if command == TRAIN else ""
            raise DiaBloError(
                f"--overwrite: {path} has no {MARKER_FILE}, the mark diablo leaves in folders it writes; it may be a "
                f"run of an older diablo, which left no mark, or another tool's folder, so diablo will not delete it: "
                f"delete it yourself if it is yours, or choose another {option}{resume}"
            )
        raise DiaBloError(
            f"--overwrite: {path} was not written by diablo (no {MARKER_FILE}; it holds {_some(visible)}); "
            f"diablo replaces only folders it wrote: choose another {option}"
        )
    if marker.command != command:
        raise DiaBloError(
            f"--overwrite: {path} holds the output of diablo {marker.command}, not of diablo {command}; "
            f"refusing to replace it: choose another {option}"
        )
    owned = set(marker.entries) | {LOG_FILE} | (set(RUN_FILES) if command == TRAIN else set())
    added = [name for name in visible if name not in owned and not _RUN_LEFTOVER.match(name)]
    if added:
        raise DiaBloError(
            f"--overwrite: {path} holds files diablo did not write ({_some(added)}); move them out first, "
            f"or choose another {option}"
        )


def _remove_made_folders(path: Path, created: Path | None) -> None:
    """Remove the empty folders from ``path`` up to ``created``, the topmost one diablo made; stop at one that
    holds anything (the user put something there meanwhile)."""
    if created is None:
        return
    for folder in [path, *path.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return


def _marked_or_empty(path: Path) -> bool:
    try:
        return (path / MARKER_FILE).is_file() or not any(path.iterdir())
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _some(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (", …" if len(names) > shown else "")
