"""Update monitoring: how far one optimizer step moves the weights, per part of the model.

- `update_ratio/<group>` and `update_ratio/total`: ||W_after - W_before|| / ||W_before|| over
  the group's parameters (the update-to-weight ratio; groups as the gradient norms':
  `embedding`, `layer_NN`, `final_norm`, `output`);
- `update_rms/<group>`: the root mean square of (W_after - W_before) / lr over the group's
  entries: Adam's normalised update (m / (sqrt(v) + eps), about 1 in size when the gradients'
  signs are consistent), plus the decoupled weight decay `weight_decay * W` where it applies.
  Dividing by the step's LR takes the schedule (warmup, decay) out of the signal; under
  `train.optimizer=muon` each parameter is divided by its own group's LR (Muon's matrices by
  `muon_lr`'s, where the update's RMS is about 0.2 by construction).

On a metric step `UpdateSnapshot` copies this rank's owned entries of the weights
(`norms.owns`: each entry counted once over TP, DP and the tied copy; under ZeRO-3 each
data-parallel rank's own partition, never gathered) inside the optimizer step, before the
update, and `contribute` adds each group's sum of squared differences and weight sums of
squares after it, as parts of the one reduction of all metrics. Cost: a copy of this rank's
owned entries on metric steps only, and two passes over them. A step whose update was dropped
(spike guard) logs ratios of 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from stable_megatron.ds_adapter import local_weights
from stable_megatron.metrics.norms import owns, sum_of_squares
from stable_megatron.metrics.reduce import Contributions

_PREFIX = "_upd"  # the raw parts, replaced by the derived keys after the reduction


class UpdateSnapshot:
    """The weights before one optimizer step, for the groups of this rank's stage."""

    def __init__(self, groups: dict[str, nn.Module], layout, lr: float,
                 lr_of: Callable[[nn.Parameter], float] | None = None) -> None:
        self.lr, self.lr_of = lr, lr_of
        self.before: dict[str, list[tuple[nn.Parameter, torch.Tensor]]] = {
            name: [(p, local_weights(p).detach().clone())
                   for p in module.parameters() if owns(p, layout)]
            for name, module in groups.items()
        }

    def contribute(self, contrib: Contributions) -> None:
        """Per group: the sums of squares of the update and of the old weights (`norm`
        parts) and the update's mean square over the entries (`mean` parts)."""
        for name, pairs in self.before.items():
            delta_sq, weight_sq, scaled_sq, count = 0.0, 0.0, 0.0, 0
            for param, old in pairs:
                step_sq = sum_of_squares(local_weights(param).detach() - old)
                delta_sq = delta_sq + step_sq
                weight_sq = weight_sq + sum_of_squares(old)
                # in units of the LR `derive` divides by: a parameter with an LR of its own
                # (Muon's matrices) is brought to it
                scale = 1.0 if self.lr_of is None else self.lr / self.lr_of(param)
                scaled_sq = scaled_sq + step_sq * scale**2
                count += old.numel()
            contrib.norm(f"{_PREFIX}/delta/{name}", delta_sq)
            contrib.norm(f"{_PREFIX}/weight/{name}", weight_sq)
            contrib.mean(f"{_PREFIX}/delta_ms/{name}", scaled_sq, count)
        self.before.clear()


def derive(metrics: dict[str, float], lr: float) -> dict[str, float]:
    """Replace the reduced parts with `update_ratio/...` and `update_rms/...` (rank 0)."""
    parts = {k: metrics.pop(k) for k in [k for k in metrics if k.startswith(_PREFIX + "/")]}
    groups = sorted({k.rsplit("/", 1)[1] for k in parts})
    delta_total = weight_total = 0.0
    for group in groups:
        delta, weight = parts[f"{_PREFIX}/delta/{group}"], parts[f"{_PREFIX}/weight/{group}"]
        metrics[f"update_ratio/{group}"] = delta / weight if weight > 0 else math.nan
        mean_sq = parts[f"{_PREFIX}/delta_ms/{group}"]
        metrics[f"update_rms/{group}"] = math.sqrt(mean_sq) / lr if lr > 0 else math.nan
        delta_total += delta**2
        weight_total += weight**2
    if groups:
        metrics["update_ratio/total"] = (math.sqrt(delta_total / weight_total)
                                         if weight_total > 0 else math.nan)
    return metrics
