"""Norm metrics: sub-layer output norms, parameter and gradient norms, sigma-reparam's sigma
and gamma.

- `out_norm/layer_NN/{qkv,proj,fc1,fc2}`: mean over the step's tokens of the L2 norm of the
  linear layer's output vector (bias included; before the Proj/FC2 output norm when that
  placement is on). Column-parallel outputs (QKV, FC1) are split over TP ranks: the per-token
  sums of squares are all-reduced over the TP group before the square root.
- `grad_norm/{embedding,layer_NN,final_norm,output}` and `grad_norm/total`: L2 norms of the
  gradients the optimizer step receives (averaged over data-parallel ranks, before clipping).
- `param_norm`: L2 norm of all parameters, as used in the step's forward.
TP-sharded parameters add their shards' sums of squares; replicated ones are counted once (by
TP rank 0 and data-parallel rank 0; the tied embedding by the first pipeline stage).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stable_megatron import parallel
from stable_megatron.metrics.parts import SLOTS, ModelParts, is_tp_sharded, layer_name, output_slots
from stable_megatron.metrics.reduce import Contributions
from stable_megatron.model.sigma_reparam import sigma_reparam_layers


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
                sum_sq = full.square().sum(dim=-1)
                if sharded:
                    parallel.tp_all_reduce_(sum_sq)
                acc = self.sums[key]
                acc[0] = acc[0] + sum_sq.sqrt().double().sum()  # stays on the device
                acc[1] += sum_sq.numel()

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
    """Whether this rank adds `param`'s share to a norm over the whole model."""
    return layout.dp_rank == 0 and (is_tp_sharded(param) or layout.tp_rank == 0)


def add_norms(
    contrib: Contributions,
    groups: dict[str, nn.Module],
    tensor_of: Callable[[nn.Parameter], torch.Tensor | None],
    prefix: str,
    total_key: str,
    layout,
    per_group: bool = True,
) -> None:
    """`<prefix>/<group>` (when `per_group`) and `total_key`: L2 norms of `tensor_of(param)`."""
    total = 0.0
    for name, module in groups.items():
        sum_sq = 0.0
        for param in module.parameters():
            if owns(param, layout):
                value = tensor_of(param)
                if value is not None:
                    sum_sq = sum_sq + value.detach().double().square().sum()
        if per_group:
            contrib.norm(f"{prefix}/{name}", sum_sq)
        total = total + sum_sq
    contrib.norm(total_key, total)


def full_grads(module: nn.Module) -> dict[int, torch.Tensor | None]:
    """The data-parallel-averaged gradient of every parameter, by id, through DeepSpeed's
    `safe_get_full_grad` (a collective over the data-parallel group for ZeRO-sharded
    gradients: every rank calls it for every parameter, in module order). Call inside the
    engine's optimizer step, before the update."""
    from deepspeed.utils import safe_get_full_grad

    return {id(p): safe_get_full_grad(p) for p in module.parameters() if p.requires_grad}


def add_sigma_reparam(contrib: Contributions, parts: ModelParts, num_layers: int) -> None:
    """`sigma/layer_NN/<slot>` (the spectral-norm estimate of the step's forward) and
    `gamma/layer_NN/<slot>` of each sigma-reparam linear; both TP- and DP-replicated."""
    for number, layer in sorted(parts.layers.items()):
        slots = {id(m): slot for slot, m in output_slots(layer).items()}
        for _, module in sigma_reparam_layers(layer):
            slot = slots.get(id(module))
            if slot is None:
                continue
            name = f"{layer_name(number, num_layers)}/{slot}"
            contrib.replicated(f"sigma/{name}", module.sigma)
            contrib.replicated(f"gamma/{name}", module.gamma_value)
