"""The language-model loss without full-batch logits.

A causal LM's head turns every position's hidden state into one logit per vocabulary entry, and Hugging Face's
loss then takes a log-softmax over all of them: for SmolLM2 at 4 × 256 tokens that is 200 MB of fp32 logits and
as much again for their gradient, for Llama-3's 128k vocabulary at 4 × 4,096 tokens 8 GB each. Yet only the
positions whose next token is supervised contribute to the loss (a prompt-masked recipe supervises the answer
alone), and no position needs its logits once its share of the loss and its gradient are known.

``chunked`` (the default) therefore sends only the supervised positions through the head, a slice of rows at a
time, and computes each slice's gradient while its logits exist (the idea of Liger Kernel's fused linear
cross-entropy, in plain PyTorch, so on CPU and CUDA alike): the backward pass then only scales the stored
gradients, so nothing is recomputed and the head costs the same arithmetic as the dense path on fewer rows.
``dense`` is Hugging Face's own loss; ``cce`` (Apple's Cut Cross-Entropy) and ``liger`` (Liger Kernel, CUDA
only) hand the same rows to those packages.

The loss is computed inside the model's own forward pass (the output-embedding module's forward is replaced on
the instance), so DDP, FSDP, DeepSpeed, gradient checkpointing and mixed-precision autocast see an ordinary
forward. Whether a model may take the shortcut is probed, not assumed: a model that changes its logits after the
head (soft-capping, scaling), adds to its loss a term the shortcut does not reproduce, or has no plain linear head
keeps the dense path, and says why. A mixture-of-experts model asked for its router logits
(``output_router_logits``) adds its load-balancing loss to the token loss, as Hugging Face's own loss does.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DiaBloError

LOSS_KINDS = ("auto", "dense", "chunked", "cce", "liger")
IGNORE_INDEX = -100
SLICE_BYTES = 64 * 2**20
"""fp32 logits held at once (per slice); 64 MiB is ~340 rows of SmolLM2's 49,152-token head, and as fast as
larger slices on CPU (benchmarks/loss_path.py)."""

HeadJob = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class LossChoice:
    """The loss a run computes, and why (printed in the plan beside the dtype line)."""

    kind: str  # dense | chunked | cce | liger
    reason: str

    def describe(self) -> str:
        return f"loss: {self.kind} ({self.reason})"


class LossPath:
    """Computes the training loss of one model the chosen way; ``loss`` is what the loop calls per micro-batch.

    Where the weights are partitioned across processes (DeepSpeed ZeRO-3 loads them so), the probe cannot run on
    the bare model: it runs at the first ``loss`` call, through the engine, on every process alike, and an
    ``auto`` choice that fails it turns to dense and says so through ``announce``.
    """

    def __init__(
        self,
        choice: LossChoice,
        head: nn.Module | None,
        *,
        probe_first: bool = False,
        auto: bool = True,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.choice = choice
        self._head = head
        self._probe_first, self._auto, self._announce = probe_first, auto, announce

    @property
    def kind(self) -> str:
        return self.choice.kind

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int) -> torch.Tensor:
        """Sum of the token losses of ``batch`` / ``num_items`` (the supervised tokens of the whole window), plus
        the router's load-balancing loss where the model computes one (as Hugging Face adds it)."""
        if self._probe_first:
            self._probe_first = False
            self._settle(model)
        if self._head is None and "decoder_input_ids" in batch:
            return seq2seq_loss(model, batch, num_items)
        if self._head is None:
            return model(**batch, num_items_in_batch=num_items, use_cache=False).loss
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        job = _loss_job(self.kind, batch["labels"], 1.0 / num_items)
        with _head_runs(self._head, job) as ran:
            output = model(**inputs, use_cache=False)
        ran.check()
        try:  # the head returned the loss in place of the logits
            return _with_router_loss(output.logits, model, output)
        except LookupError:  # the probe finds it first; a model changed since would land here
            raise _cannot_run(self.kind, _UNKNOWN_ROUTER_WEIGHT) from None

    def _settle(self, model: nn.Module) -> None:
        obstacle = _probe(model, self._head, vocab=self._head.out_features, device=_input_device(model))
        if not obstacle:
            return
        if not self._auto:
            raise _cannot_run(self.kind, obstacle)
        self.choice, self._head = LossChoice("dense", f"auto: {obstacle}"), None
        if self._announce is not None:
            self._announce(self.choice.describe())


def choose_loss(
    model: nn.Module, requested: str = "auto", *, announce: Callable[[str], None] | None = None
) -> LossPath:
    """Decide and install the loss path for ``model`` (before ``accelerator.prepare``; idempotent).

    ``auto`` takes ``chunked`` wherever the model allows it; an explicit choice the model or machine cannot
    honour is refused in one line that names ``training.loss`` and what would work. ``announce`` hears a later
    change of mind (see LossPath).
    """
    if requested not in LOSS_KINDS:
        raise DiaBloError(f"training.loss: {requested!r} is not one of {', '.join(LOSS_KINDS)}")
    if requested == "dense":
        return LossPath(_DENSE_REQUESTED, None)
    obstacle = shortcut_obstacle(model, probe=not _partitioned(model))
    if obstacle:
        if requested != "auto":
            raise _cannot_run(requested, obstacle)
        return LossPath(LossChoice("dense", f"auto: {obstacle}"), None)
    head = model.get_output_embeddings()
    if requested == "cce":
        _require_cce(head)
    elif requested == "liger":
        _require_liger(head)
    choice = _shortcut_choice(requested, head.out_features, getattr(model, "config", None))
    return LossPath(choice, head, probe_first=obstacle is None, auto=requested == "auto", announce=announce)


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor], num_items: int) -> torch.Tensor:
    """An encoder-decoder's summed token losses / ``num_items``. Its logits line up with its labels (no shift),
    and Hugging Face's T5 loss is a mean over the micro-batch alone, which would weigh the micro-batches of an
    accumulation window by their size rather than by their tokens; so the labels stay out of the forward pass."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"].to(logits.device)
    summed = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / num_items


def _cannot_run(kind: str, obstacle: str) -> DiaBloError:
    return DiaBloError(f"training.loss: {kind} cannot run on this model: {obstacle}; use dense or auto")


def planned_loss(config, requested: str = "auto") -> LossChoice:
    """The loss a run of this model would take, decided from its config alone (the dry run's plan; the probe
    at load time has the last word)."""
    if requested == "dense":
        return _DENSE_REQUESTED
    if getattr(config, "is_encoder_decoder", False):
        return LossChoice("dense", f"{'auto: ' if requested == 'auto' else ''}{_ENCODER_DECODER}")
    return _shortcut_choice(requested, config.vocab_size, config)


_DENSE_REQUESTED = LossChoice("dense", "Hugging Face's loss over every position's logits, as requested")
_ENCODER_DECODER = "an encoder-decoder model's loss is on its decoder, which this path does not cover"


def _shortcut_choice(requested: str, vocab_size: int, config) -> LossChoice:
    if requested == "cce":
        how = "Cut Cross-Entropy on the supervised positions"
    elif requested == "liger":
        how = "Liger's fused linear cross-entropy on the supervised positions"
    else:
        how = f"supervised positions only, {slice_rows(vocab_size)} × {vocab_size:,} logits at a time"
        how = f"auto: {how}" if requested == "auto" else how
    coefficient = router_loss_coefficient(config) if getattr(config, "output_router_logits", False) else None
    if coefficient is not None:
        how += f"; plus {coefficient:g} × the router's load-balancing loss"
    return LossChoice("chunked" if requested in ("auto", "chunked") else requested, how)


def shortcut_obstacle(model: nn.Module, *, probe: bool = True) -> str | None:
    """Why ``model``'s loss cannot skip its full logits, or '' when it can (a probe forward decides the last
    question: do the logits the model returns equal what its head computed, bit for bit); None when that is
    left open (``probe=False``)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return _ENCODER_DECODER
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not nn.Linear:
        kind = "none" if head is None else type(head).__name__
        return f"its output layer is not a plain linear layer ({kind})"
    verdict = getattr(head, "_diablo_probe", None)
    if verdict is None and probe:
        verdict = _probe(model, head, vocab=head.out_features, device=weight_device(head))
        head._diablo_probe = verdict
    return verdict


def slice_rows(vocab_size: int) -> int:
    """Rows of logits per slice: what SLICE_BYTES hold in fp32 (their exponentials reuse the same memory)."""
    return max(16, SLICE_BYTES // (4 * vocab_size))


def held_logit_rows(config, requested: str = "auto") -> int | None:
    """Rows of logits a run of this model holds at once, for memory estimates made before any weight loads
    (None: every token's, under the dense loss). The probe may still send a model to dense at run time."""
    if requested == "dense" or getattr(config, "is_encoder_decoder", False):
        return None
    return slice_rows(config.vocab_size)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Per row, the summed log-probability of the tokens ``labels`` marks (others IGNORE_INDEX), each predicted
    from the position before it: scoring without full logits. Falls back to the dense log-softmax on models the
    shortcut does not fit."""
    if shortcut_obstacle(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        targets = labels[:, 1:]
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        mask = targets != IGNORE_INDEX
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(dim=1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand(-1, labels.shape[1] - 1)
    selected_rows = rows[labels[:, 1:] != IGNORE_INDEX]

    def job(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        chosen, targets = _supervised(hidden, labels)
        nll = _token_nll(chosen, weight, bias, targets, slice_rows(weight.shape[0]))
        return torch.zeros(labels.shape[0], device=nll.device).index_add_(0, selected_rows.to(nll.device), -nll)

    with _head_runs(model.get_output_embeddings(), job) as ran:
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    ran.check()
    return output.logits


# --- the head's replacement forward ---------------------------------------------------------------------------


class _Run:
    def __init__(self) -> None:
        self.count = 0

    def check(self) -> None:
        if self.count != 1:
            raise DiaBloError(
                f"the model called its output layer {self.count} times in one forward pass; the loss path assumes "
                "once: set training.loss: dense"
            )


@contextmanager
def _head_runs(head: nn.Module, job: HeadJob) -> Iterator[_Run]:
    """While open, ``head``'s forward computes ``job`` (from its input and its own weights) instead of logits."""
    _patch(head)
    ran = _Run()

    def run(hidden: torch.Tensor) -> torch.Tensor:
        ran.count += 1
        return job(hidden, head.weight, head.bias)

    head._diablo_job = run
    try:
        yield ran
    finally:
        head._diablo_job = None


def _patch(head: nn.Module) -> None:
    """Give ``head`` an instance-level forward that runs the pending job, if any, else the class's own forward
    (looked up on each call: FSDP and DeepSpeed change a module's class, and their hooks stay in ``__call__``).
    A bound method, so that a deep copy of the model gets a head bound to its own weights."""
    if getattr(head, "_diablo_patched", False):
        return
    head._diablo_job = None
    head.forward = types.MethodType(_forward_or_job, head)
    head._diablo_patched = True


def _forward_or_job(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    job = head._diablo_job
    return job(hidden) if job is not None else type(head).forward(head, hidden)


def _probe(model: nn.Module, head: nn.Module, *, vocab: int, device: torch.device) -> str:
    """'' when the model returns its head's output untouched on a small input and its own loss there is what the
    shortcut computes, else the reason it does not.
    ``model`` may be wrapped by an engine (the deferred probe); every process must then probe together."""
    captured: list[torch.Tensor] = []

    def job(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        captured.append(F.linear(hidden, weight, bias))
        return captured[-1]

    ids = (torch.arange(16, device=device).reshape(2, 8) * 7919 + 11) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _head_runs(head, job) as ran:
            try:
                output = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
            except TypeError as err:  # a forward without labels: no loss of its own to check against
                if "labels" not in str(err):
                    raise
                captured.clear()
                ran.count = 0
                output = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        model.train(was_training)
    if ran.count != 1:
        return f"its forward pass calls the output layer {ran.count} times"
    logits = getattr(output, "logits", None)
    if logits is None or logits.shape != captured[0].shape or not torch.equal(logits.float(), captured[0].float()):
        return "it changes its logits after the output layer (soft-capping or scaling)"
    return _loss_obstacle(model, output, logits, ids)


def _loss_obstacle(model: nn.Module, output, logits: torch.Tensor, ids: torch.Tensor) -> str:
    """'' when the model's own loss on the probe is the token cross-entropy plus, for a router, its coefficient
    times the load-balancing loss it returns: exactly what the shortcut computes; else what differs."""
    own = getattr(output, "loss", None)
    if own is None:  # nothing to check against: the token cross-entropy is the loss
        return ""
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device))
    try:
        expected = _with_router_loss(expected, model, output)
    except LookupError as err:
        return str(err)
    if (own.float().to(expected.device) - expected).abs() > 1e-5 * max(1.0, expected.abs().item()):
        return "its loss adds a term to the token cross-entropy that the shortcut would drop"
    return ""


_UNKNOWN_ROUTER_WEIGHT = "it adds a router load-balancing loss whose weight diablo cannot find"
ROUTER_COEFFICIENTS = ("router_aux_loss_coef", "aux_loss_coef")
"""Where Hugging Face's mixture-of-experts causal LMs keep the load-balancing loss's weight (JetMoE: the second)."""


def _with_router_loss(loss: torch.Tensor, model, output) -> torch.Tensor:
    """``loss`` plus what Hugging Face adds to it for a router: the coefficient × the load-balancing loss the
    forward returned (nothing when it returned none). LookupError when the coefficient has a name diablo does not
    know. The training loss and the probe's check both go through here, so they cannot drift apart."""
    router_loss = getattr(output, "aux_loss", None)
    if router_loss is None:
        return loss
    coefficient = router_loss_coefficient(model)
    if coefficient is None:
        raise LookupError(_UNKNOWN_ROUTER_WEIGHT)
    return loss + coefficient * router_loss.to(loss.device)


def router_loss_coefficient(model) -> float | None:
    """The weight the model gives its router's load-balancing loss (on the model, the module an engine wraps, or
    the config they copy it from), or None when it keeps it under another name."""
    for holder in (model, getattr(model, "module", None)):
        for name in ROUTER_COEFFICIENTS:
            value = getattr(holder, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def weight_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds the weights as partitions (a forward outside its engine cannot run)."""
    return any(hasattr(parameter, "ds_id") for parameter in model.parameters())


def _input_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else weight_device(model)


# --- the loss jobs ---------------------------------------------------------------------------------------------


def _supervised(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states whose next token is supervised, and those tokens (the causal shift by one)."""
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def _loss_job(kind: str, labels: torch.Tensor, scale: float) -> HeadJob:
    def job(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        chosen, targets = _supervised(hidden, labels)
        if kind == "cce":
            return _cce_sum(chosen, weight, targets) * scale
        if kind == "liger":
            return _liger_sum(chosen, weight, bias, targets) * scale
        rows = slice_rows(weight.shape[0])
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (chosen, weight, bias)):
            return _LinearCrossEntropy.apply(chosen, weight, bias, targets, scale, rows)
        return _token_nll(chosen, weight, bias, targets, rows).sum() * scale

    return job


def _token_nll(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, rows: int
) -> torch.Tensor:
    """Each row's negative log-likelihood of its target, a slice of rows at a time, in fp32 (no gradient)."""
    out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start : start + rows], weight, bias).float()
        target = targets[start : start + rows]
        out[start : start + rows] = torch.logsumexp(logits, dim=-1) - logits.gather(1, target[:, None]).squeeze(1)
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    """``scale * Σ cross_entropy(hidden @ weightᵀ + bias, targets)`` with the gradients made slice by slice in the
    forward pass, where each slice's logits already exist; the backward only multiplies by the incoming grad.

    The arithmetic per slice is the dense path's: logits in the compute dtype, upcast to fp32 for the softmax,
    the logits' gradient cast back to the compute dtype before the two products, as autograd does there.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float, rows: int):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_bias else None
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        weight_as_hidden = weight.to(hidden.dtype) if need_hidden else None  # once, not per slice (autocast)
        for start in range(0, hidden.shape[0], rows):
            stop = start + rows
            part, target = hidden[start:stop], targets[start:stop]
            logits = F.linear(part, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' own memory
            grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
            grad = grad.mul_(scale).to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:stop] = grad @ weight_as_hidden
            if need_weight:
                grad_weight += (grad.t() @ part).float()
            if need_bias:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias)))
        ctx.present = (need_hidden, need_weight, need_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.present
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype) if need_hidden else None,
            (grad_weight * grad_output).to(ctx.dtypes[0]) if need_weight else None,
            (grad_bias * grad_output).to(ctx.dtypes[1]) if need_bias else None,
            None,
            None,
            None,
        )


# --- the optional packages -------------------------------------------------------------------------------------


def _require_cce(head: nn.Linear) -> None:
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        raise DiaBloError(
            "training.loss: cce needs the cut-cross-entropy package (pip install 'diablo-cli[cce]'); "
            "chunked (the default) needs nothing"
        ) from None
    if head.bias is not None:
        raise DiaBloError("training.loss: cce takes no output-layer bias and this model's has one; use chunked")


def _cce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"  # its Triton kernel is CUDA's; the compiled one runs anywhere
    return linear_cross_entropy(hidden, weight.to(hidden.dtype), targets, reduction="sum", impl=impl)


def _require_liger(head: nn.Linear) -> None:
    if weight_device(head).type != "cuda":
        raise DiaBloError(
            f"training.loss: liger runs Triton kernels on CUDA GPUs and this model is on {weight_device(head).type}; "
            "chunked (the default) computes the same loss without full logits on any device"
        )
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        raise DiaBloError(
            "training.loss: liger needs the liger-kernel package (pip install 'diablo-cli[liger]'); "
            "chunked (the default) needs nothing"
        ) from None


def _liger_sum(hidden, weight, bias, targets) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)
