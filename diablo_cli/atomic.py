"""Writes that either complete or leave nothing behind: a temp file (or folder) beside the target, then a rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``target`` in one rename.

    If the body raises, the temporary file is removed and ``target`` is untouched. The file ends up with the
    permissions an ordinary write would give it (``mkstemp`` makes it private to its owner, which would hide an
    adapter from the rest of a team on a shared machine).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        ordinary_permissions(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def ordinary_permissions(path: Path) -> None:
    """Give a file or folder that ``mkstemp``/``mkdtemp`` made private (0600/0700) the permissions an ordinary
    write would give it under the umask, before it is renamed into place; a folder's files too."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for item in path.iterdir():
            if item.is_file():
                item.chmod(0o666 & ~mask)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Swap a finished folder in with renames: the old output survives until the new one is complete.

    The staging folder was made private (mkdtemp); the output gets the permissions the umask gives. If the new
    folder cannot be moved in, the old one is put back."""
    ordinary_permissions(staging)
    previous = None
    if output_dir.exists():
        previous = output_dir.with_name(f".{output_dir.name}-replaced-{os.getpid()}")
        output_dir.rename(previous)
    try:
        staging.rename(output_dir)
    except BaseException:
        if previous is not None:
            previous.rename(output_dir)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def save_pretrained_into(saveable, directory: Path, *, prefix: str, **kwargs) -> None:
    """``saveable.save_pretrained`` (a model, tokenizer or PEFT adapter) into an existing folder that holds other
    files too: written to a private folder beside them first, then each file renamed into place."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=directory, prefix=prefix) as staging:
        saveable.save_pretrained(staging, **kwargs)
        ordinary_permissions(Path(staging))  # safetensors' writer makes its files private (0600), as mkstemp does
        for item in Path(staging).iterdir():
            item.replace(directory / item.name)
