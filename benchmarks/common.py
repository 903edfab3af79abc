"""What every benchmark here shares: interleaved timing with medians, peak memory, the machine, tables.

The machines are noisy in two ways, and the helpers answer both. Time drifts (other tenants): variants are
interleaved, in a rotating order, so drift hits all alike. Memory placement differs between copies of the
same model (one deep copy of SmolLM2 ran 7% slower than another, every time): each repetition builds its
variants afresh, so a median spans placements instead of freezing one lucky or unlucky copy.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import torch

Step = Callable[[], None]
Builder = Callable[[], Step]


def machine(device: str) -> str:
    """One line naming the hardware and software a table was measured on: the CPU's model, its capability and
    whether it computes bf16 natively (bf16 numbers mean nothing without it), the GPU when one ran."""
    from diablo_cli.precision import describe_machine

    return f"{device}: {describe_machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def default_dtypes() -> list[str]:
    """fp32, and bf16 where this machine computes it natively: on an AVX2-only CPU a bf16 run takes the slow
    path (up to ~300× slower) and measures PyTorch's fallback, not the method. Ask with --dtypes to force it."""
    from diablo_cli.precision import hardware

    native = hardware().bf16
    if not native:
        print("# bf16 left out: no native bf16 here (pass --dtypes fp32 bf16 to time the slow path anyway)")
    return ["fp32", "bf16"] if native else ["fp32"]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(
    builders: dict[str, Builder], *, repeats: int, runs: int = 1, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per run of each variant, one entry per repetition (the mean of ``runs`` timed runs after one
    warm-up run). Each repetition builds every variant anew, in an order rotated by one each time."""
    names = list(builders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            step = builders[name]()
            step()
            synchronize(device)
            started = time.perf_counter()
            for _ in range(runs):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - started) / runs)
            del step
            gc.collect()
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def table(header: list[str], rows: list[list[str]], *, markdown: bool) -> str:
    """A markdown table for RESULTS.md, or aligned columns for a terminal."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join(lines)


def give_back_freed_memory() -> None:
    """``malloc_trim(0)`` where glibc is the allocator: a process that builds model after model at new shapes keeps
    freed heap pages (glibc's raised mmap threshold), and a long benchmark grew from 3 to 24 GB that way until the
    kernel killed it; nothing leaked, the pages were only never returned."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and never give freed memory back to the kernel
    (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 64 GiB)``). By default a training step on this
    CPU maps and faults in fresh pages for every big tensor, every step (~200,000 minor faults per SmolLM2 step,
    a fifth of its time); with this, steady-state steps fault nothing. An experiment switch: it also raises
    peak RSS (the quickstart: 2.3 → 2.8 GB), so ``diablo train`` does not do it. False where not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 64 << 30))


def status_kib(pid: int | str, field: str) -> int:
    """A field of /proc/PID/status in KiB (Linux): RssAnon is what a process itself allocated, VmHWM its peak
    resident set including mapped file pages."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakAnon:
    """Samples this process's RssAnon every ``interval`` seconds while open; ``peak_mib`` is the largest seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib("self", "RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> PeakAnon:
        self.peak_kib = status_kib("self", "RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, status_kib("self", "RssAnon"))

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


def saved_activation_bytes(run: Callable[[], torch.Tensor], parameters: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Runs a forward and returns its output with the bytes autograd saved for the backward: distinct storages,
    not counting the model's own parameters (a frozen weight saved for the input gradient costs nothing)."""
    owned = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned and tensor.device.type != "meta":
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    return output, sum(storages.values())


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""
