"""The data layer: recipe `data:` section -> raw examples -> prompt/response text -> masked tokens -> rows.

`config`, `formats` and `presets` are light and imported at once (the recipe schema needs them); the parts that
need `datasets` load on first use, so that `diablo --help` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .config import DataConfig, DatasetSource
from .formats import generation_prompt, generation_prompt_ids, reference_response
from .presets import PRESETS

if TYPE_CHECKING:
    from .collator import DataCollator
    from .prepare import DataStats, PreparedData, prepare_data
    from .preview import supervision_runs
    from .sources import load_raw_examples

_LAZY = {
    "DataCollator": "collator",
    "DataStats": "prepare",
    "PreparedData": "prepare",
    "prepare_data": "prepare",
    "supervision_runs": "preview",
    "load_raw_examples": "sources",
}

__all__ = [
    "PRESETS",
    "DataCollator",
    "DataConfig",
    "DataStats",
    "DatasetSource",
    "PreparedData",
    "generation_prompt",
    "generation_prompt_ids",
    "load_raw_examples",
    "prepare_data",
    "reference_response",
    "supervision_runs",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
