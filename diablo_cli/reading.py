"""Reading the user's files: every way one can be unreadable ends in one line that names the file, says where
it breaks and what to do, so that no command shows a decoder's or a Rust library's traceback instead.

Text is UTF-8 (a UTF-8 byte-order mark is accepted); weights are safetensors, whose header is checked before
anything is read from them, so a truncated download or an interrupted copy is named as such.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .errors import DiaBloError

_UTF16_MARKS = {b"\xff\xfe": "UTF-16 (little-endian)", b"\xfe\xff": "UTF-16 (big-endian)"}
_UTF8_MARK = b"\xef\xbb\xbf"
DAMAGED_WEIGHTS_ADVICE = "re-download or re-create it"


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text, or one line naming ``source``, the first bad byte's offset and the encoding it
    seems to be in. A NUL byte is refused too: valid UTF-8, but only UTF-16 or a binary file holds one."""
    for mark, name in _UTF16_MARKS.items():
        if data.startswith(mark):
            raise DiaBloError(f"{source} is {name} text; diablo reads UTF-8: save it as UTF-8")
    try:
        text = data.decode("utf-8-sig" if data.startswith(_UTF8_MARK) else "utf-8")
    except UnicodeDecodeError as err:
        raise DiaBloError(
            f"{source} is not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x}); diablo reads UTF-8: "
            "save it as UTF-8 (a Latin-1 or Windows-1252 file, for one, is not)"
        ) from None
    if "\x00" in text:
        offset = data.index(b"\x00")
        raise DiaBloError(
            f"{source} is not UTF-8 text (byte {offset} is 0x00: UTF-16 without a byte-order mark, or a binary "
            "file); diablo reads UTF-8: save it as UTF-8"
        )
    return text


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file the user gave; ``what`` names it in errors (``recipe``, ``dataset file``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DiaBloError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise DiaBloError(f"cannot read {what} {path}: {err.strerror or err}") from None
    return decode_utf8(data, f"{what} {path}")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """A JSON document; errors name the file and the line and column where it breaks, or say it is empty."""
    path = Path(path)
    text = read_text(path, what)
    if not text.strip():
        raise DiaBloError(f"{what} {path} is empty; it should hold a JSON document")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise DiaBloError(f"{what} {path} is not valid JSON ({where}: {err.msg})") from None


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """A JSON file that must hold one object (a ``config.json``, an ``adapter_config.json``)."""
    document = read_json(path, what)
    if not isinstance(document, dict):
        raise DiaBloError(f"{what} {path} holds a JSON {type(document).__name__}, not an object ({{...}})")
    return document


def read_json_lines(path: str | os.PathLike, what: str = "file") -> list[Any]:
    """One JSON value per line (blank lines skipped); an error names the file's own line number, counted from 1.
    A file with no lines at all is an error too: it is empty."""
    path = Path(path)
    text = read_text(path, what)
    if not text.strip():
        raise DiaBloError(f"{what} {path} is empty; it should hold one JSON object per line")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DiaBloError(
                f"{what} {path}: line {number} is not valid JSON (column {err.colno}: {err.msg})"
            ) from None
    return records


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, advice: str = DAMAGED_WEIGHTS_ADVICE) -> Iterator[Any]:
    """``safe_open`` that names a missing, truncated or damaged file (and ``advice``: what to do) in one line
    instead of raising safetensors' own error."""
    path = Path(path)
    try:
        reader = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise DiaBloError(f"{path} does not exist") from None
    except (SafetensorError, OSError) as err:
        raise DiaBloError(damaged_weights_message(path, err, advice)) from None
    with reader:
        yield reader


def check_safetensors(folder: str | os.PathLike, advice: str = DAMAGED_WEIGHTS_ADVICE) -> None:
    """Open every safetensors file in a model folder (the header only, no weights are read), so a damaged shard
    is named before transformers, which does not say which file failed, loads the folder."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open_safetensors(file, advice):
            pass


def damaged_weights_message(path: Path, err: BaseException, advice: str) -> str:
    reason = " ".join(str(err).split()).removeprefix("Error while deserializing header: ")
    return f"{path} is damaged or truncated (safetensors: {reason}); {advice}"
