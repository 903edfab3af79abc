"""diablo-cli: fine-tune LLMs with DiaBlo, trainable block-diagonal updates to frozen linear layers.

The Python API under the ``diablo`` command::

    from diablo_cli import DiaBloConfig, attach_diablo, merge_diablo, save_adapter, load_adapter
"""

from ._version import __version__
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
from .errors import AdapterMismatchError, AdapterSettingError, DiaBloError

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
