"""When a run has diverged, for `stability.stop_on_divergence` (the LR sweep's stop rule).

A run has diverged at the first step whose loss is not finite, or at the first of
`patience` consecutive steps whose loss is above the run's first-step loss (the loss at
initialisation: a model that is worse than untrained for that long is not coming back within a
sweep's budget). Every rank feeds the same all-reduced loss, so every rank stops at the same
step. Plain Python: the state is two numbers and goes into checkpoints.
"""

from __future__ import annotations

import math

from stable_megatron.hooks import StepHook


class DivergenceRule(StepHook):
    """As a step hook, `after_step` feeds it each step's loss and sets `reason` once the run
    has diverged."""

    state_key = "divergence"

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.initial_loss: float | None = None
        self.above_since: int | None = None  # first step of the current run above initial
        self.count = 0
        self.reason: str | None = None  # set by `after_step`

    def after_step(self, step: int, record: dict) -> None:
        self.reason = self.update(step, record["loss"])

    def update(self, step: int, loss: float) -> str | None:
        """Feed the loss of optimizer step `step`; the reason, once the run has diverged."""
        if not math.isfinite(loss):
            return f"loss is {loss} at step {step}"
        if self.initial_loss is None:
            self.initial_loss = loss
            return None
        if loss <= self.initial_loss:
            self.above_since, self.count = None, 0
            return None
        if self.above_since is None:
            self.above_since = step
        self.count += 1
        if self.count >= self.patience:
            return (f"loss above its first-step value {self.initial_loss:.4f} for "
                    f"{self.count} steps since step {self.above_since} (now {loss:.4f})")
        return None

    def state_dict(self) -> dict:
        return {"initial_loss": self.initial_loss, "above_since": self.above_since,
                "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.initial_loss = state.get("initial_loss")
        self.above_since = state.get("above_since")
        self.count = int(state.get("count", 0))
