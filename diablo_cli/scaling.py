"""What training costs on K GPUs, on paper: per-GPU memory under a sharding strategy, FLOPs per token for a
frozen base with a small adapter, step time at an assumed MFU, and the collective traffic each step moves.

A first-order estimate, for sizing a run before booking GPUs. What it assumes, in one place:

- Data parallelism only: every GPU holds a whole micro batch (no tensor or pipeline parallelism).
- ``ddp`` replicates everything; ``zero2`` shards the trainable parameters' gradients and AdamW moments over
  the K GPUs (the frozen base stays replicated); ``zero3`` and ``fsdp`` (the same scheme under two names) also
  shard the frozen weights and the trainable parameters, and gather one block (a decoder layer, or the
  embedding if larger) at a time as working memory. Prefetching the next block would double that term.
- FLOPs: the frozen base costs 2·P forward and 2·P backward per token (only input gradients; no weight
  gradients for frozen weights), plus 2·P again when gradient checkpointing recomputes the layers. The
  adapter's own T trainable parameters cost 6·T (8·T recomputed). Attention's score and value products cost
  12·L·h·s per token (PaLM's convention: full s, not halved for the causal mask), +4·L·h·s recomputed.
- The GPU (``--gpu``, default the design card's A100 80 GB) sets the peak (bf16 dense, NVIDIA's sheet without
  2:4 sparsity), the memory that must hold it all and the links (GPUS below); each may be overridden alone.
- Time: compute = tokens × FLOPs / (peak × MFU); the MFU (0.4 by default) is an assumption, not a measurement.
  The FLOPs include checkpointing's recompute, so strictly it is hardware FLOPs utilisation there; one figure
  for both is part of the assumption.
  Communication is ring collectives, each GPU moving (K-1)/K of the payload per all-gather or reduce-scatter
  (twice that per all-reduce) at one bandwidth; a step adds compute and communication (no overlap), so it is
  an upper bound where frameworks overlap the two.
- Not counted: CUDA context, allocator fragmentation, NCCL buffers, dequantisation cost of quantized bases,
  the optimizer step's own time, data loading.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from .errors import DiaBloError

SHARDINGS = ("none", "ddp", "zero2", "zero3", "fsdp")
DEFAULT_MFU = 0.4
"""Model FLOPs utilisation assumed for a fine-tuning run: a typical figure for a well-tuned dense trainer."""
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class GpuSpec:
    """What the estimate needs of one GPU model: nominal memory, peak dense bf16 tensor throughput (the sparse
    figure of NVIDIA's sheets is twice it), and GB/s each way per GPU within a node and across nodes."""

    memory_gib: float
    bf16_tflops: float
    node_link_gbps: float  # NVLink where the card has it (SXM), else PCIe x16
    network_gbps: float  # one NIC per GPU, as in a DGX: 200 Gb/s HDR (A100 era), 400 Gb/s NDR (Hopper)


GPUS = {
    "a100-40gb": GpuSpec(40, 312, 300, 25),  # NVLink 3: 600 GB/s both ways
    "a100-80gb": GpuSpec(80, 312, 300, 25),
    "h100": GpuSpec(80, 989, 450, 50),  # SXM; NVLink 4: 900 GB/s both ways
    "h100-pcie": GpuSpec(80, 756, 64, 50),  # PCIe 5 x16
    "h200": GpuSpec(141, 989, 450, 50),
    "l40s": GpuSpec(48, 362, 32, 25),  # PCIe 4 x16
    "l4": GpuSpec(24, 121, 32, 25),
    "a10": GpuSpec(24, 125, 32, 25),
}
DEFAULT_GPU = "a100-80gb"
"""The design card's GPU: a 7B model fine-tuned on one A100 80 GB."""


def gpu_spec(name: str) -> GpuSpec:
    """The GPUS entry for ``--gpu NAME``; an unknown name is one line listing the known ones."""
    spec = GPUS.get(name.lower())
    if spec is None:
        raise DiaBloError(
            f"--gpu {name!r}: choose one of {', '.join(GPUS)} (or give --gpu-tflops and --gpu-memory yourself)"
        )
    return spec


GIB = 2**30


def default_interconnect_gbps(gpus: int, gpu: str = DEFAULT_GPU) -> float:
    """The node's own links while the K GPUs fit in one node of eight; beyond that a ring crosses nodes, and
    each GPU's share of it runs at its network link's speed."""
    spec = gpu_spec(gpu)
    return spec.node_link_gbps if gpus <= GPUS_PER_NODE else spec.network_gbps


def default_sharding(gpus: int) -> str:
    """``none`` on one GPU, ``ddp`` on several."""
    return "none" if gpus == 1 else "ddp"


@dataclass
class FlopsPerToken:
    """Training FLOPs for one token, by where they go."""

    base_forward: float
    base_backward: float  # input gradients only: the base is frozen
    recompute: float  # gradient checkpointing's second forward (base, adapter and attention)
    adapter: float  # forward, input gradient and weight gradient of the trainable blocks
    attention: float  # Q·Kᵀ and scores·V, forward and backward

    @property
    def total(self) -> float:
        return self.base_forward + self.base_backward + self.recompute + self.adapter + self.attention


def training_flops_per_token(
    *,
    linear_parameters: int,
    head_parameters: int,
    trainable_parameters: int,
    layers: int,
    attention_width: int,
    seq_len: int,
    gradient_checkpointing: bool,
) -> FlopsPerToken:
    """FLOPs to train on one token of a ``seq_len`` sequence. ``linear_parameters`` are every weight a token
    multiplies through (output head included; the embedding is a lookup), ``head_parameters`` the output head's
    share (never recomputed), ``attention_width`` is heads × head dimension."""
    base = 2.0 * linear_parameters
    attention = 4.0 * layers * attention_width * seq_len  # forward: 2·h·s for Q·Kᵀ, 2·h·s for scores·V
    adapter = 2.0 * trainable_parameters
    recompute = 0.0
    if gradient_checkpointing:
        recompute = 2.0 * (linear_parameters - head_parameters) + adapter + attention
    return FlopsPerToken(
        base_forward=base,
        base_backward=base,
        recompute=recompute,
        adapter=3 * adapter,
        attention=3 * attention,  # backward of attention costs twice its forward
    )


@dataclass
class GpuMemory:
    """Bytes one GPU holds while training, by part."""

    weights: float  # the frozen base: whole, or this GPU's shard
    gathered_weights: float  # zero3/fsdp: one block gathered for its forward or backward
    adapter_parameters: float
    adapter_gradients: float
    optimizer_states: float  # AdamW's two fp32 moments
    activations: float  # at the micro batch, the adapter's saved inputs included
    logits: float

    @property
    def adapter_and_optimizer(self) -> float:
        return self.adapter_parameters + self.adapter_gradients + self.optimizer_states

    @property
    def total(self) -> float:
        return self.weights + self.gathered_weights + self.adapter_and_optimizer + self.activations + self.logits


def per_gpu_memory(
    *,
    weights: float,
    block_weights: float,
    trainable_parameters: int,
    adapter_bytes: int,
    activations: float,
    logits: float,
    gpus: int,
    sharding: str,
) -> GpuMemory:
    """Split a single-GPU estimate over ``gpus`` as ``sharding`` does. ``weights`` and ``block_weights`` are the
    frozen base's bytes and its largest block's; activations and logits belong to each GPU's own micro batch and
    never shrink with K."""
    check_sharding(sharding, gpus)
    parameters = trainable_parameters * adapter_bytes
    gradients = trainable_parameters * adapter_bytes
    moments = trainable_parameters * 8.0
    gathered = 0.0
    if sharding in ("zero2", "zero3", "fsdp"):
        gradients /= gpus
        moments /= gpus
    if sharding in ("zero3", "fsdp"):
        weights /= gpus
        parameters /= gpus
        gathered = block_weights * (gpus - 1) / gpus  # the rest of one block, fetched from the other GPUs
    return GpuMemory(
        weights=weights,
        gathered_weights=gathered,
        adapter_parameters=parameters,
        adapter_gradients=gradients,
        optimizer_states=moments,
        activations=activations,
        logits=logits,
    )


@dataclass
class StepTraffic:
    """Bytes each GPU sends (and receives) per training step, by collective."""

    weight_all_gather: float  # zero3/fsdp: the frozen weights, once for forward and once for backward
    adapter_all_gather: float  # the trainable parameters: zero2 after the update, zero3/fsdp like the weights
    gradient_reduction: float  # the trainable gradients: all-reduce (ddp) or reduce-scatter (zero2/3, fsdp)

    @property
    def total(self) -> float:
        return self.weight_all_gather + self.adapter_all_gather + self.gradient_reduction


def step_traffic(
    *, weights: float, trainable_parameters: int, adapter_bytes: int, gpus: int, sharding: str
) -> StepTraffic:
    """Ring-collective traffic per GPU per step: an all-gather or a reduce-scatter moves (K-1)/K of its payload
    through each GPU, an all-reduce twice that. Only trainable gradients are reduced: the base has none."""
    check_sharding(sharding, gpus)
    share = (gpus - 1) / gpus
    adapter = trainable_parameters * adapter_bytes
    if sharding == "none":
        return StepTraffic(0.0, 0.0, 0.0)
    if sharding == "ddp":
        return StepTraffic(0.0, 0.0, 2 * share * adapter)
    if sharding == "zero2":
        return StepTraffic(0.0, share * adapter, share * adapter)
    return StepTraffic(2 * share * weights, 2 * share * adapter, share * adapter)


@dataclass
class ScalingEstimate:
    """Per-GPU memory, FLOPs, and step and run time of one training setup on ``gpus`` GPUs."""

    gpus: int
    sharding: str
    gpu: str
    batch: int
    seq_len: int
    gradient_checkpointing: bool
    gpu_tflops: float
    mfu: float
    interconnect_gbps: float
    gpu_memory_gib: float
    tokens: int
    memory: GpuMemory
    flops: FlopsPerToken
    traffic: StepTraffic

    @property
    def tokens_per_step(self) -> int:
        return self.gpus * self.batch * self.seq_len

    @property
    def compute_seconds(self) -> float:
        """One step's compute: each GPU trains on its own micro batch at ``mfu`` of its peak."""
        return self.batch * self.seq_len * self.flops.total / (self.gpu_tflops * 1e12 * self.mfu)

    @property
    def communication_seconds(self) -> float:
        return self.traffic.total / (self.interconnect_gbps * 1e9)

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.communication_seconds

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    @property
    def run_seconds(self) -> float:
        return self.steps * self.step_seconds

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        """Every input and result, derived ones included, for ``--json``."""
        data = asdict(self)
        data["memory"]["adapter_and_optimizer"] = self.memory.adapter_and_optimizer
        data["memory"]["total"] = self.memory.total
        data["flops"]["total"] = self.flops.total
        data["traffic"]["total"] = self.traffic.total
        for name in ("tokens_per_step", "compute_seconds", "communication_seconds", "step_seconds", "steps"):
            data[name] = getattr(self, name)
        data["run_seconds"] = self.run_seconds
        data["fits"] = self.fits
        return data


def estimate_scaling(
    *,
    weights: float,
    block_weights: float,
    linear_parameters: int,
    head_parameters: int,
    trainable_parameters: int,
    adapter_bytes: int,
    layers: int,
    attention_width: int,
    activations: float,
    logits: float,
    batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    gpus: int = 1,
    sharding: str | None = None,
    gpu: str = DEFAULT_GPU,
    gpu_tflops: float | None = None,
    mfu: float = DEFAULT_MFU,
    interconnect_gbps: float | None = None,
    gpu_memory_gib: float | None = None,
    tokens: int = 100_000_000,
) -> ScalingEstimate:
    """The whole estimate for one setup; ``activations`` (adapter inputs included) and ``logits`` are one GPU's
    micro batch as memory.py counts them, with or without checkpointing as ``gradient_checkpointing`` says.
    ``gpu`` names a GPUS entry; ``gpu_tflops`` and ``gpu_memory_gib`` override its figures."""
    spec = gpu_spec(gpu)
    gpu_tflops = spec.bf16_tflops if gpu_tflops is None else gpu_tflops
    gpu_memory_gib = spec.memory_gib if gpu_memory_gib is None else gpu_memory_gib
    sharding = sharding or default_sharding(gpus)
    check_settings(
        gpus=gpus,
        gpu_tflops=gpu_tflops,
        mfu=mfu,
        interconnect_gbps=interconnect_gbps,
        tokens=tokens,
        gpu_memory_gib=gpu_memory_gib,
    )
    check_sharding(sharding, gpus)
    return ScalingEstimate(
        gpus=gpus,
        sharding=sharding,
        gpu=gpu.lower(),
        batch=batch,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        gpu_tflops=gpu_tflops,
        mfu=mfu,
        interconnect_gbps=interconnect_gbps or default_interconnect_gbps(gpus, gpu),
        gpu_memory_gib=gpu_memory_gib,
        tokens=tokens,
        memory=per_gpu_memory(
            weights=weights,
            block_weights=block_weights,
            trainable_parameters=trainable_parameters,
            adapter_bytes=adapter_bytes,
            activations=activations,
            logits=logits,
            gpus=gpus,
            sharding=sharding,
        ),
        flops=training_flops_per_token(
            linear_parameters=linear_parameters,
            head_parameters=head_parameters,
            trainable_parameters=trainable_parameters,
            layers=layers,
            attention_width=attention_width,
            seq_len=seq_len,
            gradient_checkpointing=gradient_checkpointing,
        ),
        traffic=step_traffic(
            weights=weights,
            trainable_parameters=trainable_parameters,
            adapter_bytes=adapter_bytes,
            gpus=gpus,
            sharding=sharding,
        ),
    )


def check_sharding(sharding: str, gpus: int) -> None:
    if sharding not in SHARDINGS:
        raise DiaBloError(f"--sharding {sharding!r}: choose one of {', '.join(SHARDINGS)}")
    if sharding == "none" and gpus != 1:
        raise DiaBloError(f"--sharding none trains on one GPU; with --gpus {gpus} choose ddp, zero2, zero3 or fsdp")


def check_settings(
    *,
    gpus: int,
    gpu_tflops: float,
    mfu: float,
    interconnect_gbps: float | None,
    tokens: int,
    gpu_memory_gib: float,
) -> None:
    if gpus < 1:
        raise DiaBloError(f"--gpus {gpus}: give a positive whole number")
    if gpu_tflops <= 0:
        raise DiaBloError(f"--gpu-tflops {gpu_tflops:g}: give the GPU's peak TFLOP/s, e.g. 989 for an H100 SXM")
    if not 0 < mfu <= 1:
        raise DiaBloError(f"--mfu {mfu:g}: give a fraction of peak, above 0 and at most 1 (e.g. 0.4)")
    if interconnect_gbps is not None and interconnect_gbps <= 0:
        raise DiaBloError(f"--interconnect-gbps {interconnect_gbps:g}: give GB/s per GPU, e.g. 450 for NVLink")
    if tokens < 1:
        raise DiaBloError(f"--tokens {tokens}: give a positive count, e.g. 100M")
    if gpu_memory_gib <= 0:
        raise DiaBloError(f"--gpu-memory {gpu_memory_gib:g}: give GiB per GPU, e.g. 80 for an H100 80 GB")


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kKmMbBgGtT]?)\s*$")


def parse_tokens(text: str) -> int:
    """A token count: ``100M``, ``1.5B``, ``500k``, ``1e8``, ``123456``."""
    match = _COUNT.match(str(text))
    if not match:
        raise DiaBloError(f"--tokens {text!r}: give a count such as 100M, 1.5B, 500k or 100000000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)
