"""Calibration statistics for layer-wise quantization: the Gram matrix of each linear layer's inputs.

A layer ``y = x Wᵀ`` only ever meets its weight through ``X W'ᵀ`` on the calibration inputs ``X``
(tokens × in), so everything MagR and GPTQ need to know about the data is ``H = XᵀX``. We store it divided by
the number of tokens, ``H = XᵀX / tokens`` (the mean outer product of the inputs): the overall scale cancels
in MagR (which measures its penalty against the largest eigenvalue of ``H``) and in
``relative_output_error`` (a ratio), and the mean keeps the numbers in float32's comfortable range whatever the
calibration set's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DiaBloError

BYTES_PER_ENTRY = 4  # Gram matrices accumulate in float32


class _ChunkDone(Exception):
    """Raised from a hook once every module of the chunk has seen the batch: the rest of the forward is wasted."""


@dataclass
class _Accumulator:
    """A running ``XᵀX`` and the number of tokens in it; modules sharing an input share one."""

    products: torch.Tensor | None = None
    tokens: int = 0


def collect_input_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, object]],
    module_names: Iterable[str],
    *,
    max_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """``H = XᵀX / tokens`` (float32, ``(in, in)``) of the inputs of each named linear-like module, in model order.

    ``batches`` are keyword inputs of ``model`` (``input_ids``, ``attention_mask``, …); tokens whose
    ``attention_mask`` is 0 are left out wherever a module's input has the mask's shape (inputs of another shape,
    such as a seq2seq decoder's, count every position). Modules that receive the very same input tensor (q/k/v,
    gate/up) get the very same matrix object. When the matrices would need more than ``max_bytes`` at once, the
    modules are taken in chunks in model order and the batches run once per chunk; each forward stops as soon as
    the chunk's modules have all had their input, so early chunks cost only part of a forward. This assumes each
    module runs once per forward, as the layers of a decoder do. ``progress(done, total)`` counts forwards.
    """
    modules = _named_linear_modules(model, module_names)
    if not modules:
        return {}
    batches = list(batches)
    if not batches:
        raise DiaBloError("collecting calibration statistics needs at least one batch")
    chunks = _chunks_within_budget(modules, max_bytes)
    device = next(model.parameters()).device
    total, done = len(chunks) * len(batches), 0
    grams: dict[str, torch.Tensor] = {}
    training_modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for chunk in chunks:
                collector = _ChunkCollector(chunk)
                with collector.hooked():
                    for batch in batches:
                        collector.run(model, _to_device(batch, device))
                        done += 1
                        if progress is not None:
                            progress(done, total)
                grams.update(collector.grams())
    finally:
        for module, training in training_modes.items():
            module.training = training
    return {name: grams[name] for name, _ in modules}


def relative_output_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖X(W − Ŵ)ᵀ‖_F / ‖XWᵀ‖_F`` on the calibration inputs, from ``H = XᵀX`` alone.

    ``‖XAᵀ‖²_F = tr(A H Aᵀ)``, so the ratio is the square root of two traces and never needs ``X``; any scale of
    ``H`` cancels. Products in float32, sums in float64: the difference is formed before the product, so there
    is no cancellation to fear.
    """
    original = weight.detach().float()
    difference = original - new_weight.detach().to(original)
    gram = gram.detach().to(device=original.device, dtype=torch.float32)
    error = _output_energy(difference, gram)
    signal = _output_energy(original, gram)
    if signal == 0:
        return 0.0 if error == 0 else math.inf
    return math.sqrt(max(error, 0.0) / signal)


def _output_energy(weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(W H Wᵀ) = ‖XWᵀ‖²_F``."""
    return float(((weight @ gram) * weight).sum(dtype=torch.float64))


def _named_linear_modules(model: nn.Module, module_names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The wanted modules in the order the model registers them (its execution order for decoders)."""
    wanted = set(module_names)
    named = dict(model.named_modules())
    for name in sorted(wanted):
        if name not in named:
            raise DiaBloError(f"the model has no module named {name!r}")
        if not hasattr(named[name], "in_features"):
            raise DiaBloError(f"{name!r} is a {type(named[name]).__name__}, not a linear layer (no in_features)")
    return [(name, module) for name, module in named.items() if name in wanted]


def _chunks_within_budget(
    modules: list[tuple[str, nn.Module]], max_bytes: int | None
) -> list[list[tuple[str, nn.Module]]]:
    """Consecutive modules whose matrices fit in ``max_bytes`` together (a module too big alone gets its own).

    The budget counts one matrix per module, before sharing is known: sharing only ever makes a chunk smaller.
    """
    if max_bytes is None:
        return [modules]
    chunks: list[list[tuple[str, nn.Module]]] = []
    chunk_bytes = 0
    for name, module in modules:
        size = module.in_features**2 * BYTES_PER_ENTRY
        if not chunks or chunk_bytes + size > max_bytes:
            chunks.append([])
            chunk_bytes = 0
        chunks[-1].append((name, module))
        chunk_bytes += size
    return chunks


def _to_device(batch: Mapping[str, object], device: torch.device) -> dict[str, object]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


class _ChunkCollector:
    """Forward pre-hooks that add each batch's ``XᵀX`` of one chunk of modules into their accumulators."""

    def __init__(self, chunk: list[tuple[str, nn.Module]]) -> None:
        self.chunk = chunk
        self.accumulators = {name: _Accumulator() for name, _ in chunk}
        self.leaders: dict[str, str] = {}  # module → the module whose accumulator it shares (fixed on batch one)
        self.first_batch = True
        self.inputs: dict[str, torch.Tensor] = {}  # this batch's input of each module that has run
        self.mask: torch.Tensor | None = None

    @contextmanager
    def hooked(self) -> Iterator[None]:
        """The chunk's hooks, taken off however the forwards end."""
        handles = [module.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, module in self.chunk]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def run(self, model: nn.Module, batch: dict[str, object]) -> None:
        mask = batch.get("attention_mask")
        self.mask = mask.bool() if isinstance(mask, torch.Tensor) else None
        self.inputs = {}
        try:
            model(**batch)
        except _ChunkDone:
            pass
        finally:
            self.inputs, self.mask = {}, None
        self.first_batch = False

    def grams(self) -> dict[str, torch.Tensor]:
        """``XᵀX / tokens`` per module; modules that shared an accumulator share the result."""
        results: dict[int, torch.Tensor] = {}
        grams = {}
        for name, _ in self.chunk:
            accumulator = self.accumulators[name]
            if accumulator.products is None or accumulator.tokens == 0:
                raise DiaBloError(f"{name!r} saw no unmasked token during the calibration forwards; does it run?")
            key = id(accumulator)
            if key not in results:
                results[key] = accumulator.products.div_(accumulator.tokens)
            grams[name] = results[key]
        return grams

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else next(iter(kwargs.values()))
            if inputs.shape[-1] != module.in_features:
                raise DiaBloError(f"{name!r} got inputs of width {inputs.shape[-1]}, expected {module.in_features}")
            self._record(name, inputs)
            if len(self.inputs) == len(self.chunk):
                raise _ChunkDone

        return hook

    def _record(self, name: str, inputs: torch.Tensor) -> None:
        shared_with = self._sharing(name, inputs)
        self.inputs[name] = inputs
        if shared_with is not None:
            return
        rows = inputs.reshape(-1, inputs.shape[-1])
        if self.mask is not None and tuple(inputs.shape[:-1]) == tuple(self.mask.shape):
            rows = rows[self.mask.to(rows.device).reshape(-1)]
        rows = rows.float()
        accumulator = self.accumulators[name]
        if accumulator.products is None:
            accumulator.products = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
        accumulator.products.addmm_(rows.T, rows)
        accumulator.tokens += rows.shape[0]

    def _sharing(self, name: str, inputs: torch.Tensor) -> str | None:
        """The module whose accumulator already holds this very input, if any.

        Sharing is decided on the first batch by tensor identity and checked on every later one, so two modules
        never share a matrix unless they really saw the same inputs.
        """
        if self.first_batch:
            leader = next((other for other, seen in self.inputs.items() if seen is inputs), None)
            if leader is not None:
                self.leaders[name] = leader  # the first module with this input: a leader, never a follower
                self.accumulators[name] = self.accumulators[leader]
            return leader
        leader = self.leaders.get(name)
        if leader is not None and self.inputs.get(leader) is not inputs:
            raise DiaBloError(f"{name!r} shared its input with {leader!r} on the first batch but not on a later one")
        return leader
