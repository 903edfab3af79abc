"""The divergence watch: when a run has gone wrong, and which checkpoint is still worth keeping.

The rule, with the thresholds of the recipe's ``training.divergence`` section. A step *strikes* when
- its loss is above ``loss_factor`` × the running average of the losses before it (an exponential average over
  about the last 10 steps, strikes left out) and above ``min_loss``; or
- the trainable weights' root mean square is above ``max_weight_rms``; or
- their norm is above ``norm_factor`` × their norm ``norm_window`` steps earlier (judged from step
  2 × ``norm_window`` on, so that zero-initialised adapters growing out of nothing never count).
``patience`` strikes in a row mean the run diverged; a non-finite loss or weight means so at once. The first
strike is a warning. A checkpoint is *good* when its weights are finite and it was not written during strikes.

Plain records and arithmetic only: the loop measures, this module judges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

AVERAGE_DECAY = 0.9  # the running loss average weighs the last ~10 steps


@dataclass(frozen=True)
class DivergenceRule:
    """The thresholds of the rule above (defaults live in the recipe's ``training.divergence``)."""

    loss_factor: float
    min_loss: float
    patience: int
    max_weight_rms: float
    norm_factor: float
    norm_window: int


@dataclass
class WatchState:
    """What the watch has seen; checkpoints keep it, so a resumed or rolled-back run judges as before."""

    loss_average: float | None = None
    strikes: int = 0
    norms: list[float] = field(default_factory=list)  # the weights' norm after each of the last steps, oldest first


@dataclass
class CheckpointHealth:
    """Written into each checkpoint's trainer state: can this checkpoint be trusted as a place to go back to?"""

    weights_finite: bool
    weights_norm: float | None  # the trainable weights' L2 norm; None when not finite
    losses_finite: bool  # every loss since the previous checkpoint was finite
    diverging: bool  # written while the watch had strikes against the run

    @property
    def good(self) -> bool:
        return self.weights_finite and self.losses_finite and not self.diverging

    def describe(self) -> str:
        if not self.weights_finite:
            return "its weights are not finite"
        if not self.losses_finite:
            return "a loss before it was not finite"
        if self.diverging:
            return "it was written while the run was diverging"
        return f"weights finite, norm {self.weights_norm:.3g}"


@dataclass(frozen=True)
class Strike:
    """A step the rule counts against the run. ``fatal``: the run diverged (patience used up, or not finite)."""

    step: int
    reason: str
    count: int
    fatal: bool


class Watchdog:
    """Judges each optimizer step by its loss and the weights' norm after it (see the module's rule)."""

    def __init__(self, rule: DivergenceRule, state: WatchState) -> None:
        self.rule, self.state = rule, state

    def observe(self, step: int, loss: float, norm: float | None, numel: int) -> Strike | None:
        """Step ``step`` ended with ``loss`` and trainable weights of L2 ``norm`` over ``numel`` values (``norm``
        None: not measured this step). Returns the strike, if the step is one."""
        if not math.isfinite(loss):
            return self._strike(step, f"loss became {loss}", fatal=True)
        if norm is not None and not math.isfinite(norm):
            return self._strike(step, "the trainable weights are no longer finite", fatal=True)
        reason = self._loss_reason(loss) or self._weights_reason(step, norm, numel)
        if norm is not None:
            self.state.norms = [*self.state.norms, norm][-self.rule.norm_window :]
        if reason is not None:
            self.state.strikes += 1
            return self._strike(step, reason, fatal=self.state.strikes >= self.rule.patience)
        self.state.strikes = 0
        average = self.state.loss_average
        self.state.loss_average = loss if average is None else AVERAGE_DECAY * average + (1 - AVERAGE_DECAY) * loss
        return None

    def _strike(self, step: int, reason: str, *, fatal: bool) -> Strike:
        return Strike(step, reason, max(self.state.strikes, 1), fatal)

    def _loss_reason(self, loss: float) -> str | None:
        average, rule = self.state.loss_average, self.rule
        if average is None or loss <= rule.min_loss or loss <= rule.loss_factor * average:
            return None
        ratio = loss / average
        return f"loss {loss:.4g} is {ratio:.3g}× its running average {average:.4g} (loss_factor {rule.loss_factor:g})"

    def _weights_reason(self, step: int, norm: float | None, numel: int) -> str | None:
        if norm is None or numel == 0:
            return None
        rule = self.rule
        rms = norm / math.sqrt(numel)
        if rms > rule.max_weight_rms:
            return f"the trainable weights' RMS is {rms:.4g} (max_weight_rms {rule.max_weight_rms:g})"
        norms, window = self.state.norms, rule.norm_window
        if step >= 2 * window and len(norms) >= window and norms[-window] > 0:
            earlier = norms[-window]
            if norm > rule.norm_factor * earlier:
                return (
                    f"the trainable weights' norm grew {norm / earlier:.3g}× in {window} steps "
                    f"(norm_factor {rule.norm_factor:g})"
                )
        return None
