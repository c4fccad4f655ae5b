"""Norm metrics: sub-layer output norms, parameter and gradient norms (the sigma and gamma of
sigma-reparam's layers are its method's metrics, stable_megatron/methods/).

- `out_norm/layer_NN/{qkv,proj,fc1,fc2}`: mean over the step's tokens of the L2 norm of the
  linear layer's output vector (bias included; before the Proj/FC2 output norm when that
  placement is on). Column-parallel outputs (QKV, FC1) are split over TP ranks: the per-token
  sums of squares are all-reduced over the TP group before the square root.
- `grad_norm/{embedding,layer_NN,final_norm,output}` and `grad_norm/total`: L2 norms of the
  gradients the optimizer step receives (averaged over data-parallel ranks, before clipping).
- `param_norm`: L2 norm of all parameters, as used in the step's forward.
Sums of squares are accumulated in float64. TP-sharded parameters add their shards' sums of
squares; replicated ones are counted once (by TP rank 0 and data-parallel rank 0; the tied
embedding by the first pipeline stage). Gradients that ZeRO partitions over data-parallel
ranks, and ZeRO-3's partitioned weights, add each rank's fragment (`grad_shares`,
`ds_adapter.local_weights`): no collective beyond the one reduction of all metrics, and no
weight gathered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stable_megatron import ds_adapter, parallel
from stable_megatron.metrics.parts import SLOTS, ModelParts, is_tp_sharded, layer_name, output_slots
from stable_megatron.metrics.reduce import Contributions


class OutputNormHooks:
    """Forward hooks on the QKV, Proj, FC1, FC2 linears of this stage's layers, accumulating
    the sum of per-token output norms and the token count until `remove()`."""

    def __init__(self, parts: ModelParts, num_layers: int) -> None:
        self.sums: dict[str, list] = {}
        self._handles = []
        for number, layer in sorted(parts.layers.items()):
            for slot, module in output_slots(layer).items():
                key = f"out_norm/{layer_name(number, num_layers)}/{slot}"
                self.sums[key] = [0.0, 0]
                self._handles.append(module.register_forward_hook(self._hook(key, SLOTS[slot])))

    def _hook(self, key: str, sharded: bool) -> Callable:
        def hook(module, args, output):
            out, bias = output if isinstance(output, tuple) else (output, None)
            with torch.no_grad():
                full = out.float() if bias is None else out.float() + bias.float()
                if sharded:  # per-token sums of squares of this shard, summed over TP ranks
                    norm = parallel.tp_all_reduce_(torch.linalg.vecdot(full, full)).sqrt()
                else:  # one fused pass over the whole vector
                    norm = torch.linalg.vector_norm(full, dim=-1)
                acc = self.sums[key]
                acc[0] = acc[0] + norm.double().sum()  # stays on the device
                acc[1] += norm.numel()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def contribute(self, contrib: Contributions, tp_rank: int) -> None:
        """Per-token norms are the same on every TP rank: TP rank 0 contributes them;
        data-parallel ranks add their own tokens."""
        for key, (total, count) in self.sums.items():
            owner = tp_rank == 0
            contrib.mean(key, total if owner else 0.0, count if owner else 0)


def owns(param: torch.Tensor, layout) -> bool:
    """Whether this rank adds its entries of `param` (`ds_adapter.local_weights`) to a norm over
    the whole model: one data-parallel rank, or under ZeRO-3 each (their partitions are
    disjoint); of the tensor-parallel ranks, each for a TP-sharded parameter, else TP rank 0."""
    tp_owner = is_tp_sharded(param) or layout.tp_rank == 0
    return tp_owner and (layout.dp_rank == 0 or ds_adapter.partitioned(param))


_CHUNK = 1 << 24  # elements converted to float64 at a time (bounds the temporary buffer)


def sum_of_squares(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of the squared entries, accumulated in float64 (a 0-d tensor on the device):
    one float64 dot product per chunk of the flattened tensor, so the float64 copy is at most
    `_CHUNK` entries and no squared tensor is materialised."""
    flat = tensor.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK].double()
        total += torch.dot(part, part)
    return total


def add_norms(
    contrib: Contributions,
    groups: dict[str, nn.Module],
    share_of: Callable[[nn.Parameter], torch.Tensor | None],
    prefix: str,
    total_key: str,
    per_group: bool = True,
) -> None:
    """`<prefix>/<group>` (when `per_group`) and `total_key`: L2 norms from `share_of(param)`,
    this rank's part of the parameter's sum of squares (None: nothing). The parts of the ranks
    of a stage are summed by the reduction."""
    total = 0.0
    for name, module in groups.items():
        sum_sq = 0.0
        for param in module.parameters():
            share = share_of(param)
            if share is not None:
                sum_sq = sum_sq + share
        if per_group:
            contrib.norm(f"{prefix}/{name}", sum_sq)
        total = total + sum_sq
    contrib.norm(total_key, total)


def param_share(layout) -> Callable[[nn.Parameter], torch.Tensor | None]:
    """The weights as the step's forward used them: each entry counted once (`owns`)."""
    return lambda param: (sum_of_squares(ds_adapter.local_weights(param))
                          if owns(param, layout) else None)


def grad_shares(module: nn.Module, layout) -> dict[int, torch.Tensor | None]:
    """This rank's part of the sum of squares of every parameter's gradient as the optimizer
    step receives it (averaged over data-parallel ranks, before clipping), by parameter id.
    Call inside the engine's optimizer step, before the update; every rank calls it.

    The gradient is found where DeepSpeed's `safe_get_full_grad` finds it, without that
    function's per-parameter collective over the data-parallel group: with ZeRO (stages 1-3)
    and DeepSpeed's bf16 optimizer, every data-parallel rank holds a disjoint fragment of the
    averaged gradient and contributes the sum of squares of its own fragment (the reduction
    sums the parts: the same sum as over the assembled gradient, up to float64 rounding); a
    plain `.grad` is whole on every data-parallel rank and counted once (`owns`). A gradient
    replicated over tensor-parallel ranks is counted by TP rank 0 only."""
    shares: dict[int, torch.Tensor | None] = {}
    for param in module.parameters():
        if param.requires_grad:
            shares[id(param)] = _grad_share(param, layout)
    return shares


def _grad_share(param: nn.Parameter, layout) -> torch.Tensor | None:
    kind, grad = ds_adapter.grad_fragment(param)
    if grad is None:
        return None
    if kind == "fragment":  # every TP rank holds its own shard's fragment; replicas: TP rank 0
        return sum_of_squares(grad) if is_tp_sharded(param) or layout.tp_rank == 0 else None
    return sum_of_squares(grad) if owns(param, layout) else None
