"""Every dropped optimizer update is counted, with its reason, and a run that keeps dropping them
stops instead of silently not training.

An update is dropped by DeepSpeed itself when the gradients overflow (`overflow`: an inf or NaN
gradient norm under mixed precision) or by the spike guard (`stability.on_spike=skip` or
`rollback`): `non_finite` when the step's loss or gradient norm is not finite, `spike` otherwise;
with `replay`, the first attempt of a spiked step is dropped to be recomputed (`replay`), and
the recomputation counts again if it is dropped too.
`SkipCounter.fields()` are logged with every step (`skipped_steps`, the run's total, and
`skipped_steps/<reason>`); `too_many()` is the stop rule: more than
`stability.max_skipped_fraction` of the last `stability.window` steps dropped."""

from __future__ import annotations

import collections
from typing import Any

REASONS = ("overflow", "spike", "non_finite", "replay")


class SkipCounter:
    state_key = "dropped_updates"  # not "skipped_steps": DeepSpeed's own key in the same file

    def __init__(self, window: int, max_fraction: float) -> None:
        self.window, self.max_fraction = window, max_fraction
        self.totals = dict.fromkeys(REASONS, 0)
        self.recent: collections.deque[bool] = collections.deque(maxlen=window)

    def observe(self, reason: str | None) -> None:
        """One step: `reason` of its dropped update, or None when the update was applied."""
        if reason is not None:
            self.totals[reason] += 1
        self.recent.append(reason is not None)

    def fields(self) -> dict[str, int]:
        return {"skipped_steps": sum(self.totals.values()),
                **{f"skipped_steps/{r}": n for r, n in self.totals.items()}}

    def too_many(self) -> str | None:
        """Why the run should stop, or None."""
        dropped = sum(self.recent)
        if self.max_fraction >= 1 or dropped <= self.max_fraction * self.window:
            return None
        by = ", ".join(f"{r} {n}" for r, n in self.totals.items() if n)
        return (f"{dropped} of the last {len(self.recent)} optimizer updates were dropped "
                f"(run total by reason: {by}), more than stability.max_skipped_fraction="
                f"{self.max_fraction} of stability.window={self.window}: the run is not training")

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals), "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals.update(state.get("totals", {}))
        self.recent.clear()
        self.recent.extend(state.get("recent", []))
