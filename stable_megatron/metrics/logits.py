"""The output layer's logits as stability signals: the z-loss term on every step, the largest
and the mean output logit on metric steps (the output-logit divergence signal of Wortsman et
al. 2023). The loss function (`model.loss.LMLoss`, the pipeline module's `loss_fn`) keeps this
rank's parts; they are reduced here like every other metric (`metrics.reduce`), so the logged
values are the same at any TP x PP x DP layout.

- `z_loss`: the mean over micro-batches and data-parallel ranks of the z-loss term
  (`model.z_loss * mean(logsumexp^2)`), which is part of the logged `loss`; only with
  `model.z_loss` > 0 (`ZLossLog`, a step hook);
- `output_logit/max`, `output_logit/mean`: over every token of the step and every id of the
  tokenizer's vocabulary (`add_logit_stats`, called by `StabilityMetrics`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stable_megatron.hooks import StepHook
from stable_megatron.metrics.reduce import Contributions, reduce_metrics


def loss_function(engine):
    """The engine's `model.loss.LMLoss` (None for a module without one)."""
    loss_fn = getattr(engine.module, "loss_fn", None)
    return loss_fn if hasattr(loss_fn, "take_logit_stats") else None


def _is_last_stage(layout) -> bool:
    return layout.pp_rank == layout.pp - 1


def add_logit_stats(contrib: Contributions, loss_fn, layout) -> None:
    """This rank's share of `output_logit/max` and `/mean` since `loss_fn.start_capture()`:
    tensor-parallel ranks hold disjoint vocabulary columns and data-parallel ranks their own
    tokens, so every rank of the last stage contributes what it saw."""
    if loss_fn is None or not _is_last_stage(layout):
        return
    peak, total, count = loss_fn.take_logit_stats()
    contrib.max("output_logit/max", -math.inf if peak is None else peak)
    contrib.mean("output_logit/mean", 0.0 if total is None else total, count)


class ZLossLog(StepHook):
    """Adds `z_loss` to every step's record (rank 0): the term's mean over the step's
    micro-batches and the data-parallel ranks. Every rank calls the reduction."""

    def __init__(self, state, engine) -> None:
        self.state, self.loss_fn = state, loss_function(engine)

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        layout = self.state.layout
        terms = self.loss_fn.take_z_loss() if self.loss_fn is not None else []
        contrib = Contributions()
        if _is_last_stage(layout):
            # the term is the same on every tensor-parallel rank (its logsumexp is reduced):
            # rank 0 of the group owns it
            owner = layout.tp_rank == 0
            total = torch.stack(terms).sum() if terms and owner else 0.0
            contrib.mean("z_loss", total, len(terms) if owner else 0)
        record.update(reduce_metrics(contrib, self.state))
