"""Loss and grad-norm spike detection: running mean / std over a window of accepted steps.

A step is a spike when its loss (or grad norm) is not finite, or once `min_history` steps are
known, when it exceeds mean + k * std of the last `window` accepted steps. Spiking steps do not
enter the history, so one spike does not raise the bar for the next. The spike score is
(value - mean) / std: how many standard deviations above the running mean.

Every rank feeds the detector the same (all-reduced) numbers, so every rank reaches the same
verdict without a further collective.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

STD_FLOOR = 1e-8  # relative to |mean|: a flat history still scores finitely


@dataclass
class SpikeVerdict:
    loss: float
    grad_norm: float | None = None
    loss_mean: float | None = None
    loss_std: float | None = None
    spike_score: float | None = None
    grad_norm_score: float | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def is_spike(self) -> bool:
        return bool(self.reasons)

    @property
    def non_finite(self) -> bool:
        """The step's loss or gradient norm was inf or NaN."""
        return not math.isfinite(self.loss) or (
            self.grad_norm is not None and not math.isfinite(self.grad_norm))

    def record(self) -> dict[str, float]:
        """The fields logged with the step."""
        out = {}
        for key in ("loss_mean", "loss_std", "spike_score", "grad_norm_score"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def _moments(values) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
    return mean, max(math.sqrt(var), STD_FLOOR * max(1.0, abs(mean)))


class SpikeDetector:
    def __init__(self, window: int, min_history: int, loss_k: float, grad_norm_k: float = 0.0):
        self.window, self.min_history = window, min_history
        self.loss_k, self.grad_norm_k = loss_k, grad_norm_k
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)

    @classmethod
    def from_config(cls, cfg) -> SpikeDetector:
        s = cfg.stability
        return cls(s.window, s.min_history, s.loss_k, s.grad_norm_k)

    def check_loss(self, loss: float) -> SpikeVerdict:
        verdict = SpikeVerdict(loss=loss)
        if not math.isfinite(loss):
            verdict.reasons.append(f"non-finite loss ({loss})")
            return verdict
        if len(self.losses) >= self.min_history:
            mean, std = _moments(self.losses)
            verdict.loss_mean, verdict.loss_std = mean, std
            verdict.spike_score = (loss - mean) / std
            if verdict.spike_score > self.loss_k:
                verdict.reasons.append(
                    f"loss {loss:.4g} is {verdict.spike_score:.1f} std above its running mean "
                    f"{mean:.4g} (threshold {self.loss_k:g})"
                )
        return verdict

    def check_grad_norm(self, verdict: SpikeVerdict, grad_norm: float) -> SpikeVerdict:
        verdict.grad_norm = grad_norm
        if not math.isfinite(grad_norm):
            verdict.reasons.append(f"non-finite grad norm ({grad_norm})")
            return verdict
        if len(self.grad_norms) >= self.min_history:
            mean, std = _moments(self.grad_norms)
            verdict.grad_norm_score = (grad_norm - mean) / std
            if self.grad_norm_k and verdict.grad_norm_score > self.grad_norm_k:
                verdict.reasons.append(
                    f"grad norm {grad_norm:.4g} is {verdict.grad_norm_score:.1f} std above its "
                    f"running mean {mean:.4g} (threshold {self.grad_norm_k:g})"
                )
        return verdict

    def accept(self, verdict: SpikeVerdict) -> None:
        """Add a step that was not a spike to the history."""
        if verdict.is_spike:
            return
        self.losses.append(verdict.loss)
        if verdict.grad_norm is not None:
            self.grad_norms.append(verdict.grad_norm)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.grad_norms = deque(state["grad_norms"], maxlen=self.window)
