"""MagR, weight magnitude reduction before quantization (Zhang et al., NeurIPS 2024, arXiv 2406.00800).

A quantizer's step is set by the largest ``|w|`` of each output channel (or group), so a few outliers waste most
of the grid on everyone else. Calibration inputs ``X`` are close to rank-deficient, so many weights give nearly
the same outputs ``XWᵀ``, and MagR picks one whose largest magnitudes are small. Per output channel (a row ``w`` of
the torch ``(out, in)`` weight) it solves (paper §3)

    min_ŵ  ½‖X(ŵ − w)‖² + α‖ŵ‖_∞

by proximal gradient descent: a gradient step on the smooth part, ``(Ŵ − W)H`` for all rows at once with
``H = XᵀX``, then the prox of the ℓ∞ norm, computed through Moreau's decomposition as the residual of a projection
onto an ℓ1 ball (Duchi et al., 2008). The per-group variant puts the ℓ∞ penalty on each group of
``group_size`` consecutive input columns within a row, the groups a group-wise quantizer scales separately.

Scale of α (our choice, stated because a bare α means nothing until ``H``'s scale is fixed). The problem is stated
on ``XᵀX``, whose size grows with the number of calibration tokens and the square of the activation scale; an
absolute α would make MagR's strength depend on both. We measure the smooth part against the largest eigenvalue
``L`` of ``H``, i.e. minimise ``½ tr((Ŵ − W) H (Ŵ − W)ᵀ) / L + α Σ‖ŵ‖_∞``. Then the step size is 1, the prox of
each step removes exactly ℓ1 mass α from a row's largest entries, and the result does not change when ``H`` is
rescaled (more tokens, louder activations, ``XᵀX`` or ``XᵀX/tokens``). α is in the weight's own units: 200 steps
of 1e-3 can take at most 0.2 of ℓ1 mass off a row's largest entries, room enough for the "more than halved"
channel maxima of the paper's Figure 1 on Llama-2-7B; a model with larger weights needs a proportionally larger α
for the same relative effect. The defaults are the paper's experimental settings: α = 1e-3 per channel, 1e-4 per
group, 200 iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional

from .grams import relative_output_error

CHANNEL_ALPHA = 1e-3
GROUP_ALPHA = 1e-4
ITERATIONS = 200
POWER_ITERATIONS = 50
TOP_K_START = 16  # entries sorted first when projecting onto an ℓ1 ball (widened as needed)


@dataclass(frozen=True)
class MagRStats:
    """What MagR did to one layer: the ranges a quantizer sees before and after, and the output error it cost.

    A range is the largest ``|w|`` of one quantization unit (an output channel, or a group within one).
    """

    mean_range_before: float
    mean_range_after: float
    largest_before: float
    largest_after: float
    output_error: float

    @property
    def range_reduction(self) -> float:
        """The fraction by which the mean range shrank."""
        return 1.0 - self.mean_range_after / self.mean_range_before if self.mean_range_before else 0.0


def project_l1_ball(v: Tensor, radius: Tensor | float) -> Tensor:
    """Each row of ``v`` (its last dimension) projected onto the ℓ1 ball of ``radius`` (broadcast per row)."""
    radius = _row_radius(v, radius)
    threshold = _l1_projection_threshold(v.abs(), radius)
    return v.sign() * (v.abs() - threshold).clamp(min=0)


def prox_linf(v: Tensor, t: Tensor | float) -> Tensor:
    """Row-wise ``argmin_x ½‖x − v‖² + t‖x‖_∞``.

    Moreau: ``prox_{t‖·‖∞}(v) = v − Proj_{‖·‖₁ ≤ t}(v)``. The projection soft-thresholds at some θ, so the
    residual is ``v`` clipped to ``[−θ, θ]``; clipping keeps the untouched entries bit-exact.
    """
    radius = _row_radius(v, t)
    threshold = _l1_projection_threshold(v.abs(), radius)
    return torch.minimum(torch.maximum(v, -threshold), threshold)


def magr(
    weight: Tensor,
    gram: Tensor,
    *,
    alpha: float | None = None,
    iterations: int = ITERATIONS,
    group_size: int | None = None,
) -> Tensor:
    """The weight MagR gives an ``(out, in)`` linear layer whose inputs have Gram matrix ``gram`` ``(in, in)``.

    ``alpha`` defaults to the paper's 1e-3 per channel, or 1e-4 with ``group_size`` (see the module docstring for
    its scale). Runs in float32 on the weight's device; the result has the weight's dtype. Plain proximal
    gradient with a fixed iteration count, as in the paper: on ill-conditioned inputs 200 steps stop short of the
    optimum, which only makes MagR gentler.
    """
    if weight.dim() != 2 or tuple(gram.shape) != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and gram {tuple(gram.shape)} do not fit (out, in), (in, in)")
    if alpha is None:
        alpha = default_alpha(group_size)
    if alpha < 0 or iterations < 0:
        raise ValueError(f"alpha ({alpha}) and iterations ({iterations}) must not be negative")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    original = weight.detach().float()
    hessian = gram.detach().to(device=original.device, dtype=torch.float32)
    largest = largest_eigenvalue(hessian)
    if alpha == 0 or iterations == 0 or largest <= 0:
        return weight.detach().clone()
    normalized = hessian / largest
    current = original.clone()
    for _ in range(iterations):
        stepped = current - (current - original) @ normalized
        current = _prox_by_unit(stepped, alpha, group_size)
    return current.to(weight.dtype)


def default_alpha(group_size: int | None) -> float:
    """The paper's α: 1e-3 per output channel, 1e-4 per quantization group."""
    return CHANNEL_ALPHA if group_size is None else GROUP_ALPHA


def magr_stats(weight: Tensor, new_weight: Tensor, gram: Tensor, *, group_size: int | None = None) -> MagRStats:
    """Ranges per quantization unit before and after, and the relative output error on the calibration data."""
    before = _unit_ranges(weight.detach().float(), group_size)
    after = _unit_ranges(new_weight.detach().float(), group_size)
    return MagRStats(
        mean_range_before=float(before.mean()),
        mean_range_after=float(after.mean()),
        largest_before=float(before.max()),
        largest_after=float(after.max()),
        output_error=relative_output_error(weight, new_weight, gram),
    )


def largest_eigenvalue(gram: Tensor) -> float:
    """λ_max of a symmetric positive semi-definite matrix by power iteration (Rayleigh quotient).

    Cheap next to an eigendecomposition of a 14k × 14k matrix, and float32 needs no second copy of it. The
    Rayleigh quotient can only fall short of λ_max; proximal gradient converges for any step below 2/λ_max, so an
    estimate within a factor of two is safe, and 50 iterations from a generic start land far closer than that.
    """
    matrix = gram.detach().float()
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(matrix.shape[0], generator=generator).to(matrix.device)
    for _ in range(POWER_ITERATIONS):
        vector = matrix @ vector
        norm = vector.norm()
        if norm == 0:
            return 0.0
        vector = vector / norm
    return float(vector @ (matrix @ vector))


def _prox_by_unit(weight: Tensor, alpha: float, group_size: int | None) -> Tensor:
    """The ℓ∞ prox on each row, or on each group of ``group_size`` columns within a row.

    A ragged last group is zero-padded: zeros change neither an ℓ∞ norm nor the ℓ1 projection's threshold.
    """
    if group_size is None:
        return prox_linf(weight, alpha)
    rows, columns = weight.shape
    groups = math.ceil(columns / group_size)
    padded = functional.pad(weight, (0, groups * group_size - columns))
    grouped = prox_linf(padded.view(rows, groups, group_size), alpha)
    return grouped.view(rows, groups * group_size)[:, :columns]


def _unit_ranges(weight: Tensor, group_size: int | None) -> Tensor:
    """``max |w|`` of every quantization unit: per row, or per group of ``group_size`` columns."""
    if group_size is None:
        return weight.abs().amax(dim=1)
    rows, columns = weight.shape
    groups = math.ceil(columns / group_size)
    padded = functional.pad(weight.abs(), (0, groups * group_size - columns))
    return padded.view(rows, groups, group_size).amax(dim=2).flatten()


def _row_radius(v: Tensor, radius: Tensor | float) -> Tensor:
    """The radius as a ``(..., 1)`` column broadcasting over ``v``'s rows."""
    negative = radius < 0 if not isinstance(radius, Tensor) else bool((radius < 0).any())  # floats: no device sync
    if negative:
        raise ValueError("an ℓ1 ball's radius must not be negative")
    radius = torch.as_tensor(radius, dtype=v.dtype, device=v.device)
    return radius.expand(v.shape[:-1]).unsqueeze(-1)


def _l1_projection_threshold(magnitudes: Tensor, radius: Tensor) -> Tensor:
    """θ ≥ 0 with ``Σ max(|v| − θ, 0) = radius`` (θ = 0 inside the ball): Duchi et al.'s sort-based rule.

    With ``u`` the magnitudes sorted in decreasing order and ``S_k`` their partial sums, the support size ρ is
    the largest ``k`` with ``u_k > (S_k − radius)/k``, and θ = ``(S_ρ − radius)/ρ``. At radius 0 no ``k``
    qualifies and ρ = 1 gives θ = max |v|, the right answer. The qualifying ``k`` are exactly 1..ρ, so only
    the largest few entries need sorting: MagR's small radii touch a handful per row, and a partial sort
    (top-k, widened while some row's k-th entry still qualifies) costs a fraction of a full one.
    """
    width = magnitudes.shape[-1]
    k = min(width, TOP_K_START)
    while True:
        ordered = magnitudes.topk(k, dim=-1).values if k < width else magnitudes.sort(dim=-1, descending=True).values
        partial_sums = ordered.cumsum(dim=-1)
        counts = torch.arange(1, k + 1, device=ordered.device)
        candidates = (partial_sums - radius) / counts.to(ordered.dtype)
        qualifies = ordered > candidates
        if k == width or not bool(qualifies[..., -1].any()):
            break
        k = min(width, 4 * k)
    support = torch.where(qualifies, counts, 1).amax(dim=-1, keepdim=True)
    return candidates.gather(-1, support - 1).clamp(min=0)
