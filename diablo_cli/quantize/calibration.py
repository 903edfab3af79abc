"""Calibration text for quantization: where it comes from, and how it becomes fixed-length token windows.

The default needs no download: CPython's own documentation topics (``pydoc_data.topics``, the text behind
``help("if")``; ~465 kB of English prose and code in every Python install). Anything the data layer reads
works too (a preset such as ``math10k``, a hub id, a local .jsonl/.csv/.parquet in any training format, each
row rendered exactly as training renders it) and so does a plain .txt file (paragraphs split at blank lines).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DiaBloError
from ..reading import read_text

PYTHON_DOCS = "python-docs"
DEFAULT_CALIBRATION = PYTHON_DOCS
HELD_OUT_SHARE = 0.1
"""The tail of the token stream kept out of calibration, for the perplexity before/after (``--eval``)."""
MAX_HELD_OUT_WINDOWS = 16


@dataclass
class CalibrationData:
    """Token windows to calibrate on, and a disjoint held-out slice to measure perplexity on."""

    source: str
    windows: list[torch.Tensor]  # each (seq_len,) int64, drawn at seeded random offsets from the calibration part
    held_out: list[torch.Tensor]  # consecutive non-overlapping windows from the held-out tail
    stream_tokens: int  # tokens in the whole text before splitting

    @property
    def seq_len(self) -> int:
        return int(self.windows[0].numel())

    def batches(self, windows: list[torch.Tensor], batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
        """Model inputs, ``batch_size`` windows at a time (all windows are full: no padding, no mask needed)."""
        return [{"input_ids": torch.stack(windows[i : i + batch_size])} for i in range(0, len(windows), batch_size)]


def calibration_texts(name: str, tokenizer: Any) -> list[str]:
    """The texts of a calibration source (see the module docstring for what ``name`` may be)."""
    if name == PYTHON_DOCS:
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    path = Path(name).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise DiaBloError(f"--calibration {name}: no such file")
        paragraphs = [p.strip() for p in read_text(path, "--calibration file").split("\n\n")]
        return [p for p in paragraphs if p]
    return _dataset_texts(name, tokenizer)


def _dataset_texts(name: str, tokenizer: Any) -> list[str]:
    from ..data.config import DatasetSource
    from ..data.formats import render_example
    from ..data.presets import PRESETS
    from ..data.sources import infer_source, load_rows

    hint = f"pass a local copy (--calibration FILE), or the default {DEFAULT_CALIBRATION!r} which needs no download"
    source = DatasetSource(preset=name) if name in PRESETS else infer_source(name, local_hint=hint)
    rows = load_rows(source, local_hint=hint)
    return [render_example(row, source, tokenizer).text for row in rows]


def check_windows(samples: int, seq_len: int) -> None:
    """Refuse window settings that leave nothing to calibrate on (checked before any model is loaded)."""
    if samples < 1 or seq_len < 8:
        raise DiaBloError(f"--samples {samples} / --seq-len {seq_len}: at least 1 sample of at least 8 tokens")


def build_calibration(
    name: str, tokenizer: Any, *, samples: int, seq_len: int, seed: int = 0, held_out: bool = True
) -> CalibrationData:
    """``samples`` windows of ``seq_len`` tokens from the source's text (joined by the tokenizer's end-of-text
    token), as GPTQ's reference recipe draws them: random offsets into one long stream. The last 10% of the
    stream is kept out of calibration for the perplexity check."""
    check_windows(samples, seq_len)
    texts = calibration_texts(name, tokenizer)
    separator = tokenizer.eos_token or "\n\n"
    stream = tokenizer(separator.join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    cut = len(stream) - (int(len(stream) * HELD_OUT_SHARE) if held_out else 0)
    calibration_part, tail = stream[:cut], stream[cut:]
    if len(calibration_part) < seq_len:
        raise DiaBloError(
            f"--calibration {name}: {len(calibration_part)} tokens of calibration text, fewer than --seq-len "
            f"{seq_len}; lower --seq-len or use a larger source"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(calibration_part) - seq_len + 1, (samples,), generator=generator)
    windows = [calibration_part[s : s + seq_len].clone() for s in starts.tolist()]
    held_windows = [
        tail[i : i + seq_len].clone() for i in range(0, len(tail) - seq_len + 1, seq_len)[:MAX_HELD_OUT_WINDOWS]
    ]
    return CalibrationData(name, windows, held_windows, len(stream))


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int = 4) -> float:
    """exp(mean next-token loss) over every token of the windows (each window scored on its own)."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(windows), batch_size):
            ids = torch.stack(windows[i : i + batch_size]).to(device)
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total_loss += loss.item()
            total_tokens += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return float(torch.exp(torch.tensor(total_loss / max(total_tokens, 1))))
