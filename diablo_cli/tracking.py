"""Where training metrics go: metrics.jsonl always (one JSON object a line, easy to plot), TensorBoard and
Weights & Biases when the recipe asks and they are installed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
from pathlib import Path
from typing import Any

from .errors import DiaBloError
from .run_folder import METRICS_FILE, TENSORBOARD_DIR


def memory_in_use() -> dict[str, float]:
    """Resident memory of this process (and peak GPU memory when CUDA is in use), in GiB."""
    usage: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as handle:
            usage["rss_gib"] = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:  # not Linux: the peak is the best we have
        usage["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        usage["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return usage


class MetricsLog:
    """Appends records to OUTPUT/metrics.jsonl and mirrors numeric values to the trackers that are on."""

    def __init__(
        self,
        output_dir: Path,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str | None = None,
        run_config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.path = output_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        self._tensorboard = self._wandb = None
        if tensorboard:
            _require("tensorboard", "logging.tensorboard: true")
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))
        if wandb:
            _require("wandb", "logging.wandb: true")
            import wandb as wandb_module

            self._wandb = wandb_module.init(
                project=wandb_project or "diablo-cli", dir=str(output_dir), config=run_config, resume="allow"
            )

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        step = record.get("step")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def rewind(self, step: int) -> None:
        """Forget the records past ``step``: a rollback replaces them (TensorBoard and W&B keep what they got)."""
        self._file.close()
        self._truncate_after(step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()

    def _truncate_after(self, step: int) -> None:
        """On resume, forget what the interrupted run logged past its checkpoint: it will be logged again."""
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def _require(package: str, setting: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise DiaBloError(f"{setting} needs the {package} package: pip install {package}")
