"""Rich renderings of the records the commands return (diablo_cli/records.py), shared by the CLI and the examples.
Rendering only: nothing here computes, and nothing that computes imports it (pyproject.toml's import contracts)."""

from .conversion import conversion_summary, extract_summary, extract_table
from .inspection import adapter_inspection_view, memory_table, model_inspection_view, probe_table, scaling_table
from .progress import row_progress, spinner, step_display, task_progress, training_progress
from .tables import (
    PERCENT_METRICS,
    cleaned_line,
    describe_supervision,
    eval_table,
    format_metric,
    iter_metric_cells,
    merge_summary,
    method_table,
    parameter_table,
    plot_curves,
    plot_loss_curve,
    quantize_summary,
)

__all__ = [
    "PERCENT_METRICS",
    "adapter_inspection_view",
    "cleaned_line",
    "conversion_summary",
    "describe_supervision",
    "eval_table",
    "extract_summary",
    "extract_table",
    "format_metric",
    "iter_metric_cells",
    "memory_table",
    "merge_summary",
    "method_table",
    "model_inspection_view",
    "parameter_table",
    "plot_curves",
    "plot_loss_curve",
    "probe_table",
    "quantize_summary",
    "row_progress",
    "scaling_table",
    "spinner",
    "step_display",
    "task_progress",
    "training_progress",
]
