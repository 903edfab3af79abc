"""Which floating-point type a base model runs in, chosen by what the hardware computes natively.

bf16 halves a base's memory and, where the hardware has bf16 units (CUDA since Ampere, x86 CPUs with
AVX512-BF16 or AMX, Arm with the BF16 extension), speeds it up. Where it has none, PyTorch falls back to a
generic path: on an AVX2-only CPU a bf16 matmul runs up to ~300× slower than fp32, and a 2-minute quickstart
takes hours. ``dtype: auto`` therefore asks the hardware, never the checkpoint. fp16 is picked only where it
is native and the checkpoint itself is stored in fp16 (so its activations are known to fit fp16's range:
models trained in bf16 can overflow it).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass

import torch

from .errors import DiaBloError

AUTO = "auto"
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_LONG = {short: long for long, short in _SHORT.items()} | {long: long for long in _SHORT}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MEMORY_HEADROOM = 0.9
"""The share of available memory a base's weights may take before we say it will not fit (activations, the
adapter and its optimizer state need the rest)."""


@dataclass(frozen=True)
class Hardware:
    """The device models run on and which half-precision types it computes natively."""

    device: str  # "cpu" or "cuda"
    name: str  # "AMD EPYC 9R14" / "NVIDIA A100-SXM4-80GB"
    capability: str  # "AVX2" / "AVX512" / "AMX" / "sm_80"
    bf16: bool
    fp16: bool

    def describe(self) -> str:
        return f"{self.name} ({self.capability})"

    @property
    def kind(self) -> str:
        return "GPU" if self.device == "cuda" else "CPU"


@functools.cache
def hardware(device: str | None = None) -> Hardware:
    """What ``device`` (default: the GPU when there is one, else the CPU) computes natively."""
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return Hardware(
            "cuda",
            torch.cuda.get_device_name(),
            f"sm_{major}{minor}",
            bf16=torch.cuda.is_bf16_supported(including_emulation=False),
            fp16=True,
        )
    # oneDNN's bf16/fp16 kernels are what PyTorch's CPU matmuls use for half types; where they are not
    # supported it falls back to a generic loop (the slow path).
    return Hardware(
        "cpu",
        cpu_model_name(),
        torch.backends.cpu.get_cpu_capability(),
        bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        fp16=bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
    )


def cpu_model_name() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else what the platform module knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def short_name(dtype: str | torch.dtype) -> str:
    """fp32 / bf16 / fp16 for any spelling of the three."""
    key = str(dtype).removeprefix("torch.").lower()
    return _SHORT.get(_LONG.get(key, key), key)


@dataclass(frozen=True)
class DtypeChoice:
    """The base's dtype (a torch name) and why; ``warning`` is set when an explicit request runs slowly here."""

    name: str
    requested: str
    reason: str
    warning: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.name)

    def describe(self) -> str:
        return f"dtype: {short_name(self.name)} ({self.reason})"

    def describe_with_warning(self) -> str:
        return self.describe() + (f"; warning: {self.warning}" if self.warning else "")


def choose_dtype(
    requested: str | torch.dtype | None, *, device: str | None = None, stored: str | torch.dtype | None = None
) -> DtypeChoice:
    """Resolve a requested dtype (None or ``auto``: by the hardware) for ``device``.

    ``stored`` is the checkpoint's own dtype (config.json's), which only decides whether fp16 is safe."""
    hw = hardware(device)
    if requested is None or str(requested) == AUTO:
        if hw.bf16:
            return DtypeChoice("bfloat16", AUTO, f"auto: {hw.describe()} computes bf16 natively")
        if hw.fp16 and stored is not None and short_name(stored) == "fp16":
            return DtypeChoice("float16", AUTO, f"auto: {hw.describe()} has native fp16, not bf16; the base is fp16")
        return DtypeChoice("float32", AUTO, f"auto: {hw.describe()} has no native bf16")
    name = _LONG.get(str(requested).removeprefix("torch.").lower())
    if name is None:
        raise DiaBloError(f"dtype {requested!r}: choose one of auto, fp32, bf16, fp16")
    warning = None
    short = short_name(name)
    if name != "float32" and not getattr(hw, short):
        factor = slowdown(short) if hw.device == "cpu" else None
        measured = f"a {short} matmul measured {factor:,.0f}× slower than fp32 here" if factor else "no fast path"
        instead = short_name(choose_dtype(AUTO, device=device, stored=stored).name)
        warning = f"{hw.describe()} has no native {short}: {measured}; dtype auto picks {instead} here"
    return DtypeChoice(name, short, "as requested", warning)


@functools.cache
def slowdown(short: str, size: int = 1024) -> float:
    """How many times slower the products of a ``short`` (bf16/fp16) linear layer's training step are than fp32
    on this CPU, timed on the spot: the forward x @ Wᵀ and the backward's ∂y @ W, which PyTorch may route to
    different kernels. A fraction of a second on the slow path; worth it before hours of training."""
    dtype = getattr(torch, _LONG[short])
    timings = {}
    for kind in (torch.float32, dtype):
        x, weight = torch.randn(64, size, dtype=kind), torch.randn(size, size, dtype=kind)

        def step(x=x, weight=weight):
            torch.nn.functional.linear(x, weight)  # forward
            x @ weight  # backward to the input

        step()  # warm-up: the first call chooses kernels
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - started)
        timings[kind] = max(best, 1e-7)
    return timings[dtype] / timings[torch.float32]


def available_memory(device: str | None = None) -> int | None:
    """Bytes a new model may use: free GPU memory, or the OS's MemAvailable; None when unknown."""
    hw = hardware(device)
    if hw.device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_weights_fit(
    what: str, parameters: int, choice: DtypeChoice, *, device: str | None = None, key: str = "model.dtype"
) -> None:
    """Refuse, with what would fit, a base whose weights at the auto-chosen dtype exceed the memory there is;
    a user who asked for a dtype explicitly gets what they asked for."""
    if choice.requested != AUTO:
        return
    available = available_memory(device)
    need = parameters * BYTES[choice.name]
    if available is None or need <= available * MEMORY_HEADROOM:
        return
    half = parameters * 2
    hw = hardware(device)
    options = [f"{key}: bf16 ({gib(half)}" + ("" if hw.bf16 else ", on this machine's slow bf16 path") + ")"]
    options += [f"a 4-bit base (model.quantization.method: bnb-4bit, ~{gib(parameters // 2)})", "a smaller model"]
    raise DiaBloError(
        f"{what}: {count(parameters)} parameters need {gib(need)} in {short_name(choice.name)} ({choice.reason}), "
        f"and {gib(available)} of memory is available; use {', or '.join(options)}"
    )


def gib(size: float) -> str:
    """A memory size in GiB (MiB below one GiB, so that a small model does not read as 0.0)."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def count(parameters: int) -> str:
    """6.7B / 134.5M / 155,072: a parameter count as people say it."""
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{suffix}"
    return f"{parameters:,}"


def describe_machine() -> str:
    """One line for benchmark output: which CPU (and GPU) the numbers come from."""
    cpu = hardware("cpu")
    line = f"CPU {cpu.name}, capability {cpu.capability}, native bf16 {'yes' if cpu.bf16 else 'no'}"
    line += f", {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        line += f"; GPU {hardware('cuda').describe()}"
    return line
