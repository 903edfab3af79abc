"""`diablo train --launcher accelerate`: run the same training under ``accelerate launch``, K processes.

A convenience over typing the launcher line: the recipe is checked here first (a mistake is one line, not K
tracebacks), then ``accelerate launch`` starts ``python -m diablo_cli train`` with the same arguments in every
process; the training loop itself is the one `accelerate launch -m diablo_cli train` runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .errors import DiaBloError
from .interrupts import Interrupted

LAUNCHERS = ("none", "accelerate")

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
"""The example accelerate configs of a source checkout (``configs/accelerate/*.yaml``)."""


def accelerate_command(train_arguments: list[str], *, num_processes: int | None, config_file: Path | None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``diablo train TRAIN_ARGUMENTS`` in every process."""
    return [*accelerate_launcher(num_processes, config_file), "-m", "diablo_cli", "train", *train_arguments]


def accelerate_launcher(num_processes: int | None, config_file: Path | None) -> list[str]:
    """``accelerate launch`` and its options, to be followed by a script or ``-m module``.

    Without a config file, K > 1 processes are data-parallel on all GPUs, or on CPU over gloo when there is
    no GPU (accelerate's ``--multi_gpu`` starts torchrun; each process then finds no GPU and joins a gloo group).
    """
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        command += ["--config_file", str(accelerate_config_path(config_file))]
    if num_processes is not None:
        if num_processes < 1:
            raise DiaBloError(f"--num-processes {num_processes}: give 1 or more processes")
        command += ["--num_processes", str(num_processes)]
    if config_file is None:
        # What accelerate would otherwise ask `accelerate config` for, and warn about when missing.
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if (num_processes or 1) > 1:
            command.append("--multi_gpu")
    return command


def launch_with_accelerate(train_arguments: list[str], *, num_processes: int | None, config_file: Path | None) -> int:
    """Run training under accelerate and return its exit status (a failing rank fails the launch)."""
    command = accelerate_command(train_arguments, num_processes=num_processes, config_file=config_file)
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, num_processes or 1))))
    process = subprocess.Popen(command, env=environment)
    while True:
        try:
            return process.wait()
        except Interrupted as stop:  # wait while every process writes its checkpoint and stops
            if stop.signal_name == "SIGTERM":  # a Ctrl-C reached them all already; a SIGTERM only this one
                process.terminate()


def accelerate_config_path(name: str | Path) -> Path:
    """An accelerate config file: a path as given, or a short name of ``configs/accelerate`` (ddp, fsdp,
    fsdp2, zero2, zero3) for ``--accelerate-config fsdp``."""
    path = Path(name)
    if path.is_file():
        return path
    aliases = {"zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3"}
    bundled = ACCELERATE_CONFIGS / f"{aliases.get(str(name), str(name))}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted([*(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")), *aliases])
    raise DiaBloError(f"accelerate config {name}: no such file; give a path or one of {', '.join(known)}")
