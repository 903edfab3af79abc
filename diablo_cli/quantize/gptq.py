"""GPTQ and round-to-nearest through GPTQModel, run in a child process.

GPTQModel is loud (its own log bars on stdout), changes process-wide state (environment variables, torch
allocator settings, a ``logs/`` folder in the working directory) and holds on to memory; a child process keeps
all of that away from the caller. The parent passes a job file, the calibration windows as safetensors (never
pickles), and reads one progress line per finished decoder layer from a pipe; the child's own output goes to
``quantize.log`` in the output folder.

Run as ``python -m diablo_cli.quantize.gptq JOB.json PROGRESS_FD`` (the parent does this).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import DiaBloError

LOG_FILE = "quantize.log"
GPTQ_BITS = (2, 3, 4, 8)


@dataclass
class GPTQJob:
    """Everything the child needs; written as JSON."""

    source_dir: str
    output_dir: str
    method: str  # gptq | rtn
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    damp_percent: float
    calibration_file: str | None  # safetensors with a "windows" (samples, seq_len) int64 tensor; None for rtn
    batch_size: int
    trust_remote_code: bool
    device: str
    dtype: str = "bfloat16"  # what the model runs in while calibrating (precision.choose_dtype: native types only)
    dequantized_file: str | None = None  # also write every quantized layer's dequantized fp32 weight here


def run_gptq(
    job: GPTQJob,
    windows: list[torch.Tensor] | None,
    *,
    layers: int,
    progress: Callable[[str, int, int | None], None] | None = None,
    failure_log: Path | None = None,
) -> Path:
    """Quantize ``job.source_dir`` into ``job.output_dir`` in a child process; returns the log file's path.

    When the child fails: a DiaBloError with the log's telling line, the whole log copied to ``failure_log``
    (the output folder is a staging folder that the caller removes)."""
    progress = progress or (lambda phase, done, total: None)
    job.source_dir = str(Path(job.source_dir).resolve())  # the child runs in a scratch working directory
    job.output_dir = str(Path(job.output_dir).resolve())
    if job.dequantized_file is not None:
        job.dequantized_file = str(Path(job.dequantized_file).resolve())
    output = Path(job.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / LOG_FILE
    with tempfile.TemporaryDirectory(prefix="diablo-gptq-") as scratch:
        if windows is not None:
            job.calibration_file = str(Path(scratch) / "calibration.safetensors")
            save_file({"windows": torch.stack(windows).contiguous()}, job.calibration_file)
        job_file = Path(scratch) / "job.json"
        job_file.write_text(json.dumps(asdict(job)), encoding="utf-8")
        # GPTQModel sizes its CPU worker pools from this; unset on a 2-core machine it fails to start them.
        workers = os.environ.get("GPTQMODEL_CPU_WORKERS") or str(max(2, os.cpu_count() or 2))
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": workers}
        read_fd, write_fd = os.pipe()
        label = f"{'GPTQ' if job.method == 'gptq' else 'round-to-nearest'} {job.bits}-bit, layer by layer"
        progress(label, 0, layers)
        with open(log_path, "w", encoding="utf-8") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "diablo_cli.quantize.gptq", str(job_file), str(write_fd)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=scratch,  # GPTQModel writes a logs/ folder into its working directory
                env=env,
                pass_fds=(write_fd,),
                start_new_session=True,  # its own process group: an interrupt stops it and all it started
            )
            os.close(write_fd)
            try:
                with os.fdopen(read_fd, encoding="utf-8") as events:
                    for line in events:
                        done = json.loads(line).get("layers_done", 0)
                        progress(label, done, layers)
                code = child.wait()
            except BaseException:  # an interrupt: the child writes into a folder that is about to be removed
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise
    if code != 0:
        kept = ""
        if failure_log is not None:
            shutil.copyfile(log_path, failure_log)
            kept = f" (full log: {failure_log})"
        raise DiaBloError(f"GPTQModel failed (exit {code}): {_last_error(log_path)}{kept}")
    progress(label, layers, layers)
    return log_path


def _last_error(log_path: Path) -> str:
    """The most telling line of the child's log: the exception line of a traceback, else the last line."""
    lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _child(job_path: str, progress_fd: int) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import RTNConfig

    job = GPTQJob(**json.loads(Path(job_path).read_text(encoding="utf-8")))
    events = os.fdopen(progress_fd, "w", encoding="utf-8", buffering=1)
    if job.method == "rtn":
        config = RTNConfig(bits=job.bits, group_size=job.group_size, desc_act=False, sym=job.sym)
    else:
        config = QuantizeConfig(
            bits=job.bits,
            group_size=job.group_size,
            desc_act=job.desc_act,
            sym=job.sym,
            damp_percent=job.damp_percent,
            # GPTQModel's default group-aware ordering needs groups and excludes desc_act: on only where it applies.
            act_group_aware=job.group_size > 0 and not job.desc_act,
        )
    model = GPTQModel.load(
        job.source_dir,
        config,
        device=job.device,
        dtype=getattr(torch, job.dtype),  # GPTQModel's own default is bf16 on every CPU: the slow path on AVX2
        trust_remote_code=job.trust_remote_code,
    )
    finished: set[int] = set()

    def layer_done(layer_idx: int, submodule_finalized: bool) -> None:
        if submodule_finalized and layer_idx not in finished:
            finished.add(layer_idx)
            events.write(json.dumps({"layers_done": len(finished)}) + "\n")

    model.layer_callback = layer_done
    rows = None
    if job.calibration_file is not None:
        windows = load_file(job.calibration_file)["windows"]
        rows = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    model.quantize(rows, batch_size=job.batch_size)
    model.save(job.output_dir)
    del model
    if job.dequantized_file is not None:
        from .dequantize import dequantized_weights

        save_file(dequantized_weights(job.output_dir, job.trust_remote_code), job.dequantized_file)
    events.close()


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
