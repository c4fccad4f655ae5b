"""The spike guard: a step hook that judges each step's loss and grad norm inside DeepSpeed's
optimizer step, before the update, and drops the update when asked to
(`stability.on_spike` skip/rollback/replay).

Replay: the Trainer re-runs a spiked step from the same state on the same batch with
`replaying` set to the first attempt's verdict; `before_update` then compares the new loss and
grad norm with it (`same_numbers`) and sets `replay_result`: *reproducible* drops the update
again (the data), *not reproducible* lets the recomputed step through unless it spikes too.

DeepSpeed's ZeRO optimizer already drops the update of a step whose gradients are not finite
("overflow": no optimizer step, no LR-scheduler step, `engine.skipped_steps += 1`) on every
rank together; `before_update` is called at that decision (`ds_adapter.UpdateGate`), after
the gradients are reduced, with the global grad norm (identical on every rank; inf on an
overflow). The guard all-reduces the step's loss (a scalar, from the last pipeline stage) over
the world and scores both; a spike drops the update exactly as an overflow does. Every rank
scores the same numbers with the same history, so every rank decides the same without
another collective. Costs one scalar all-reduce per step.
"""

from __future__ import annotations

import torch

from stable_megatron import ds_adapter, parallel
from stable_megatron.hooks import StepHook
from stable_megatron.stability.spikes import SpikeDetector, SpikeVerdict


class SpikeGuard(StepHook):
    state_key = "spike_detector"

    def __init__(self, cfg, state, engine) -> None:
        self.detector = SpikeDetector.from_config(cfg)
        self.enforce = cfg.stability.on_spike in ("skip", "rollback", "replay")
        self.replay_rtol = cfg.stability.replay_rtol
        self.replaying: SpikeVerdict | None = None  # the first attempt's, during a replay
        self.replay_result: str | None = None  # "reproducible" / "not_reproducible"
        self.replay_mode = cfg.stability.on_spike == "replay"
        # why this step's update was dropped by the guard (None: it was not): "replay" (a first
        # attempt, to be recomputed), "non_finite" or "spike"
        self.dropped_by: str | None = None
        self.engine, self.layout, self.device = engine, state.layout, state.device
        self._pending: SpikeVerdict | None = None
        self.verdict: SpikeVerdict | None = None  # the last step's, after `after_step`

    def _step_loss(self) -> float:
        """This step's loss averaged over micro-batches and data-parallel ranks, on every rank:
        what `train_batch` returns, known before the update."""
        local = ds_adapter.step_loss_sum(self.engine) if self.layout.tp_rank == 0 else 0.0
        buf = torch.tensor([local], dtype=torch.float64, device=self.device)
        parallel.all_reduce_(buf)
        return buf.item() / (self.layout.dp * self.engine.gradient_accumulation_steps())

    def before_update(self, step: int, grad_norm: float) -> bool:
        verdict = self.detector.check_loss(self._step_loss())
        self.detector.check_grad_norm(verdict, grad_norm)
        self._pending = verdict
        drop = verdict.is_spike and self.enforce
        if self.replaying is not None:
            first = self.replaying
            same = (same_numbers(verdict.loss, first.loss, self.replay_rtol)
                    and same_numbers(grad_norm, first.grad_norm, self.replay_rtol))
            self.replay_result = "reproducible" if same else "not_reproducible"
            drop = drop or same
        if not drop:
            self.dropped_by = None
        elif self.replay_mode and self.replaying is None:
            self.dropped_by = "replay"
        else:
            self.dropped_by = "non_finite" if verdict.non_finite else "spike"
        return drop

    def after_step(self, step: int, record: dict) -> None:
        """The verdict joins the record; a healthy step joins the history."""
        verdict, self._pending = self._pending, None
        if verdict is None:
            raise RuntimeError("spike guard: the optimizer step did not run")
        self.detector.accept(verdict)
        self.verdict = verdict
        record.update(verdict.record())

    def state_dict(self) -> dict:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state)


def same_numbers(a: float | None, b: float | None, rtol: float) -> bool:
    """Equal within `rtol` (relative), NaN equal to NaN and inf to the same inf."""
    import math

    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b))
