"""DiaBlo adapters: the layer math, target selection, merge, adapter files and parameter budgets.

Knows torch and nothing about recipes, data or the command line.
"""

from .budget import ParameterReport, base_parameter_count, parameter_report
from .config import MODULE_LETTERS, DiaBloConfig
from .files import load_adapter, read_adapter_config, save_adapter
from .layer import BlockLayout, DiaBloLinear, block_diagonal_matmul, dense_update
from .model import adapted_layers, adapters_disabled, attach_diablo, detach_diablo, merge_diablo, unmerge_diablo
from .targets import Target, module_letters, select_targets

__all__ = [
    "MODULE_LETTERS",
    "BlockLayout",
    "DiaBloConfig",
    "DiaBloLinear",
    "ParameterReport",
    "Target",
    "adapted_layers",
    "adapters_disabled",
    "attach_diablo",
    "base_parameter_count",
    "block_diagonal_matmul",
    "dense_update",
    "detach_diablo",
    "load_adapter",
    "merge_diablo",
    "module_letters",
    "parameter_report",
    "read_adapter_config",
    "save_adapter",
    "select_targets",
    "unmerge_diablo",
]
