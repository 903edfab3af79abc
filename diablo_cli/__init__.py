"""diablo-cli: fine-tune LLMs with DiaBlo, trainable block-diagonal updates to frozen linear layers.

The Python API under the ``diablo`` command::

    from diablo_cli import DiaBloConfig, attach_diablo, merge_diablo, save_adapter, load_adapter

The names load on first use (PEP 562): ``diablo`` itself imports this package before it can catch Ctrl-C, and
importing torch here would leave the first seconds of every command without its interrupt handling.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import AdapterMismatchError, AdapterSettingError, DiaBloError

if TYPE_CHECKING:
    from .adapter import (
        DiaBloConfig,
        DiaBloLinear,
        ParameterReport,
        adapted_layers,
        attach_diablo,
        load_adapter,
        merge_diablo,
        parameter_report,
        save_adapter,
        unmerge_diablo,
    )

__all__ = [
    "AdapterMismatchError",
    "AdapterSettingError",
    "DiaBloConfig",
    "DiaBloError",
    "DiaBloLinear",
    "ParameterReport",
    "__version__",
    "adapted_layers",
    "attach_diablo",
    "load_adapter",
    "merge_diablo",
    "parameter_report",
    "save_adapter",
    "unmerge_diablo",
]


def __getattr__(name: str):
    if name in __all__:  # the adapter's names: the others are bound above
        return getattr(importlib.import_module(".adapter", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
