"""Muon for the transformer layers' matrices, AdamW for everything else (`train.optimizer=muon`).

Muon (Jordan et al. 2024; Kimi K2's "MuonClip" run, methods.md section 6) updates a weight
matrix W by the orthogonalised momentum of its gradient:

    m <- mu m + g                    (momentum, `train.muon_momentum`)
    u  = g + mu m  (Nesterov)  or m
    W <- W (1 - lr wd) - lr * s(W) * NS(u)

NS(u) approximates the polar factor U V^T of u = U S V^T by five steps of the quintic
Newton-Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T, on u / ||u||_F, with Keller
Jordan's coefficients (a, b, c) = (3.4445, -4.7750, 2.0315): they push every singular value
into roughly [0.7, 1.2] in five steps rather than converging to exactly 1 (tests/unit/test_muon.py
measures the band against an SVD). The iteration runs in fp32 here, whatever the training
precision. s(W) = 0.2 sqrt(max(rows, cols)) (Moonlight's scaling, Liu et al. 2025): a full-rank
orthogonal rows x cols matrix has RMS 1 / sqrt(max(rows, cols)), so the update's RMS is 0.2,
about AdamW's, and a learning rate tuned for AdamW carries over.

Which parameters (`muon_groups`): the 2-D weights of the transformer layers (QKV, Proj, FC1,
FC2, the attention gate, sigma-reparam's W) take Muon; the embeddings, the output layer, norms,
biases, sigma-reparam's gamma and MLRA's low-rank factors take AdamW (a factor's update being
orthogonal does not make the product's update orthogonal, and no published Muon recipe covers
factorised attention). The fused QKV weight is orthogonalised as three matrices, Q, K and V
(its rows are [q_h; k_h; v_h] per head): the update then does not depend on how the three
projections are stored, it is what a model with separate projections (Kimi K2's) gets, and
QK-clip's per-head scaling acts on the same Q and K that Muon updates.

Tensor parallelism: Newton-Schulz on each rank's shard alone would be a different optimizer
(block-wise). Every tensor-parallel rank gathers the whole momentum matrix, orthogonalises it
and keeps its own shard of the result, so TP2 computes what TP1 does (to fp32 rounding: the
iteration commutes with permutations of rows and columns, so the order the shards are gathered
in, SwiGLU's interleaved FC1 included, does not matter). Pipeline stages hold whole layers.

Under DeepSpeed's ZeRO-1 the optimizer sees one flat fp32 partition per parameter group and
data-parallel rank instead of the matrices. `attach_flat_layouts` hands it where every matrix
lies in its group's flat space (`ds_adapter.zero_flat_layouts`); a Muon group's step then
all-gathers the momentum partitions over the data-parallel ranks, orthogonalises every matrix
and applies this rank's partition of the result. The momentum is partitioned like Adam's
moments and stored under Adam's key `exp_avg` (with a zero `exp_avg_sq` beside it), the names
DeepSpeed's universal checkpoint converts when a checkpoint is reshaped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
RMS_MATCH = 0.2  # the update's RMS, about AdamW's


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The quintic Newton-Schulz approximation of the polar factor of the 2-D `g`, in fp32."""
    if g.dim() != 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    x = g.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if tall else x


def update_scale(rows: int, cols: int) -> float:
    """s(W): the factor that gives an orthogonal rows x cols update AdamW's RMS (0.2)."""
    return RMS_MATCH * math.sqrt(max(rows, cols))


def orthogonality_residual(x: torch.Tensor) -> float:
    """||X X^T - I||_F / sqrt(k) on the smaller side (k = min(rows, cols)) of an update X
    before scaling: the RMS distance of its squared singular values from 1. 0 for the exact
    polar factor of a full-rank matrix; the quintic leaves 0.1-0.4 on well-conditioned ones
    (tests/unit/test_muon.py) and more where the gradient is rank-deficient (a direction it
    lacks counts 1: ~0.5 on the tiny model's first steps)."""
    x = x.float()
    if x.size(0) > x.size(1):
        x = x.T
    eye = torch.eye(x.size(0), dtype=x.dtype, device=x.device)
    return float((x @ x.T - eye).norm() / math.sqrt(x.size(0)))


# --------------------------------------------------------------------------------------------
# Which parameters, and how a shard becomes whole matrices


@dataclass(frozen=True)
class Matrix:
    """How a Muon parameter's (tensor-parallel shard of a) weight becomes whole matrices:
    `partition_dim` the dimension split over tensor-parallel ranks (None: replicated), and
    `qkv_heads` > 0 for a fused QKV weight whose rows are [q_h; k_h; v_h] for each of this
    rank's `qkv_heads` heads (Q, K and V orthogonalised apart)."""

    partition_dim: int | None = None
    qkv_heads: int = 0


def _is_layer(module: torch.nn.Module) -> bool:
    from stable_megatron.model.gpt import TransformerLayerPipe

    return isinstance(module, TransformerLayerPipe)


def muon_matrices(model: torch.nn.Module) -> dict[int, Matrix]:
    """id(param) -> Matrix for the parameters Muon updates: the 2-D weights of the transformer
    layers, except those of modules marked `factorised` (low-rank factors)."""
    from stable_megatron.model.attention import SelfAttention

    out: dict[int, Matrix] = {}
    for layer in (m for m in model.modules() if _is_layer(m)):
        factors = {id(p) for m in layer.modules() if getattr(m, "factorised", False)
                   for p in m.parameters()}
        fused_qkv = {}
        for attention in (m for m in layer.modules() if isinstance(m, SelfAttention)):
            weight = getattr(attention.linear_qkv, "weight", None)
            if weight is not None and id(weight) not in factors:
                fused_qkv[id(weight)] = attention.heads_local
        for param in layer.parameters():
            if not param.requires_grad or param.dim() != 2 or id(param) in factors:
                continue
            parallel = getattr(param, "tensor_model_parallel", False)
            out[id(param)] = Matrix(param.partition_dim if parallel else None,
                                    fused_qkv.get(id(param), 0))
    return out


# --------------------------------------------------------------------------------------------
# The orthogonalised update of one matrix, exact under tensor parallelism


def _gather(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def orthogonal_update(u: torch.Tensor, matrix: Matrix, tp_group=None, steps: int = NS_STEPS,
                      residuals: list[float] | None = None) -> torch.Tensor:
    """s(W) NS(u) for this rank's shard `u` of a Muon matrix: gathered over `tp_group` along
    its partition dim (when split), orthogonalised whole (Q, K and V apart for a fused QKV),
    this rank's shard of the result returned. With `residuals`, each orthogonalised matrix's
    `orthogonality_residual` is appended."""
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    split = matrix.partition_dim is not None and tp > 1
    whole = _gather(u, matrix.partition_dim, tp_group) if split else u
    if matrix.qkv_heads:
        heads = matrix.qkv_heads * (tp if split else 1)
        cols = whole.size(1)
        per_head = whole.reshape(heads, 3, -1, cols)
        parts = [_orthogonalise(per_head[:, i].reshape(-1, cols), steps, residuals)
                 for i in range(3)]
        out = torch.stack([p.reshape(heads, -1, cols) for p in parts], dim=1).reshape(whole.shape)
    else:
        out = _orthogonalise(whole, steps, residuals)
    if split:
        rank = dist.get_rank(tp_group)
        out = out.chunk(tp, dim=matrix.partition_dim)[rank]
    return out.to(u.dtype)


def _orthogonalise(u: torch.Tensor, steps: int, residuals: list[float] | None) -> torch.Tensor:
    x = newton_schulz(u, steps)
    if residuals is not None:
        residuals.append(orthogonality_residual(x))
    return x * update_scale(*u.shape)


# --------------------------------------------------------------------------------------------
# The optimizer


@dataclass
class FlatLayout:
    """Where a parameter group's matrices lie in ZeRO's flat space (see ds_adapter): the
    parameters in flat order with their offsets, the partition size per data-parallel rank
    and the data-parallel group the partitions are spread over."""

    params: list[torch.Tensor]
    offsets: list[int]
    partition_size: int
    group: object

    def dp_rank(self) -> tuple[int, int]:
        """(data-parallel size, this rank's index in it)."""
        dp = dist.get_world_size(self.group)
        return dp, dist.get_rank(self.group) if dp > 1 else 0


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the parameter groups marked `"muon": True`, torch's AdamW (fused) on the others.

    Each group has its own `lr` and `weight_decay`; Muon groups read `momentum`, `nesterov`
    and `ns_steps`, AdamW groups `betas` and `eps`. `matrices` (from `muon_matrices`) says how
    each Muon parameter is laid out; `tp_group` is the tensor-parallel group. The AdamW groups
    are stepped by an inner `torch.optim.AdamW` that shares their dicts and this optimizer's
    state, so that they are exactly the AdamW of `train.optimizer=adamw`. `decay` (id(param) ->
    weight decay) is AdamW's decoupled decay for parameters of an AdamW group whose own
    `weight_decay` is 0, applied here first as torch's AdamW applies it (`p *= 1 - lr wd`, then
    the Adam update): decayed and undecayed parameters then share one group (`muon_groups`).
    """

    def __init__(self, groups: Iterable[dict], matrices: dict[int, Matrix], *, lr: float,
                 betas: tuple[float, float], eps: float, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = NS_STEPS, tp_group=None,
                 decay: dict[int, float] | None = None) -> None:
        defaults = {"lr": lr, "weight_decay": 0.0, "muon": False, "momentum": momentum,
                    "nesterov": nesterov, "ns_steps": ns_steps}
        super().__init__(list(groups), defaults)
        self.matrices = dict(matrices)
        self.decay = dict(decay or {})  # id(param) -> weight decay, applied here (see step)
        self._decay_masks: dict[int, torch.Tensor] = {}
        self.tp_group = tp_group
        self.flat_layouts: dict[int, FlatLayout] = {}
        # with `record_residuals`, every orthogonalised matrix's residual is appended to
        # `residuals` (ZeRO calls `step` once per group); the metrics take and clear them
        self.residuals: list[float] = []
        self.record_residuals = False
        # (a placeholder group when every parameter takes Muon: torch wants one group)
        self._adamw = torch.optim.AdamW(self._adamw_groups() or [{"params": []}], lr=lr,
                                        betas=betas, eps=eps, fused=True)
        self._adamw.state = self.state

    def _adamw_groups(self) -> list[dict]:
        return [g for g in self.param_groups if not g["muon"]]

    def attach_flat_layouts(self, layouts: dict[int, FlatLayout]) -> None:
        """id(flat fp32 partition) -> its group's layout, once ZeRO has flattened the groups."""
        self.flat_layouts = dict(layouts)

    def record_next_step(self) -> None:
        """Keep the orthogonality residual of every matrix the next step orthogonalises."""
        self.residuals, self.record_residuals = [], True

    def take_residuals(self) -> list[float]:
        """The residuals recorded since `record_next_step` (none if the update was dropped);
        recording stops."""
        residuals, self.residuals, self.record_residuals = self.residuals, [], False
        return residuals

    def lr_of(self, param: torch.Tensor) -> float:
        """The current LR of a model parameter: its Muon group's or its AdamW group's."""
        muon = id(param) in self.matrices
        return next(g["lr"] for g in self.param_groups if g["muon"] == muon)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._adamw.param_groups = self._adamw_groups()
        self._adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        adamw = [g for g in self.param_groups if not g["muon"]]
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        if adamw:  # ZeRO steps one group at a time, through `param_groups`
            for group in adamw:
                self._decoupled_decay(group)
            self._adamw.param_groups = adamw
            self._adamw.state = self.state
            self._adamw.step()
            self._adamw.param_groups = self._adamw_groups()
        return loss

    def _decoupled_decay(self, group: dict) -> None:
        """`p *= 1 - lr wd` for the parameters of `decay` in an AdamW group (on a flat ZeRO
        partition, for the entries that belong to them)."""
        if not self.decay:
            return
        for param in group["params"]:
            if param.grad is None:
                continue
            layout = self.flat_layouts.get(id(param))
            if layout is None:
                wd = self.decay.get(id(param), 0.0)
                if wd:
                    param.mul_(1 - group["lr"] * wd)
                continue
            if id(param) not in self._decay_masks:
                self._decay_masks[id(param)] = self._flat_decay(param, layout)
            mask = self._decay_masks[id(param)]
            if mask is not None:
                param.mul_(1 - group["lr"] * mask)

    def _flat_decay(self, flat: torch.Tensor, layout: FlatLayout) -> torch.Tensor | None:
        """Per entry of this rank's partition `flat`, the weight decay of the parameter it
        belongs to (0 for padding and undecayed parameters); None when all are 0."""
        dp, rank = layout.dp_rank()
        whole = torch.zeros(layout.partition_size * dp, dtype=flat.dtype, device=flat.device)
        for param, offset in zip(layout.params, layout.offsets, strict=True):
            wd = self.decay.get(id(param), 0.0)
            if wd:
                whole.narrow(0, offset, param.numel()).fill_(wd)
        mine = whole.narrow(0, rank * layout.partition_size, layout.partition_size).clone()
        return mine if bool(mine.any()) else None

    def _momentum(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[param]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        buf = state["exp_avg"]
        buf.mul_(group["momentum"]).add_(grad)
        return grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf.clone()

    def _muon_step(self, group: dict) -> None:
        residuals = self.residuals if self.record_residuals else None
        for param in group["params"]:
            if param.grad is None:
                continue
            u = self._momentum(param, param.grad, group)
            layout = self.flat_layouts.get(id(param))
            if layout is None:
                update = orthogonal_update(u, self.matrices[id(param)], self.tp_group,
                                           group["ns_steps"], residuals)
            else:
                update = self._flat_update(u, layout, group["ns_steps"], residuals)
            param.mul_(1 - group["lr"] * group["weight_decay"])
            param.add_(update, alpha=-group["lr"])

    def _flat_update(self, u: torch.Tensor, layout: FlatLayout, steps: int,
                     residuals: list[float] | None) -> torch.Tensor:
        """This data-parallel rank's partition of the orthogonalised update of a flat group."""
        dp, rank = layout.dp_rank()
        whole = _gather(u, 0, layout.group) if dp > 1 else u
        out = torch.zeros_like(whole)
        for param, offset in zip(layout.params, layout.offsets, strict=True):
            n = param.numel()
            piece = whole.narrow(0, offset, n).view(param.shape)
            update = orthogonal_update(piece, self.matrices[id(param)], self.tp_group, steps,
                                       residuals)
            out.narrow(0, offset, n).copy_(update.reshape(-1))
        return out.narrow(0, rank * layout.partition_size, layout.partition_size)


def muon_groups(model: torch.nn.Module, adamw_groups: list[dict], muon_lr: float,
                muon_weight_decay: float
                ) -> tuple[list[dict], dict[int, Matrix], dict[int, float]]:
    """Two groups, the same on every pipeline stage: Muon (every parameter of
    `muon_matrices`) and AdamW (the parameters of `adamw_groups` left, their group weight
    decay moved to the returned `decay` map, which `MuonAdamW` applies). One AdamW group
    rather than `adamw_groups`' decayed and undecayed ones: the decayed one would hold only the
    embedding tables, which a middle pipeline stage lacks, and DeepSpeed drops an empty group
    while ZeRO reduces each group's gradient norm across the stages, so that every stage needs
    the same groups. Returns the groups, the matrices and the decay map."""
    matrices = muon_matrices(model)
    muon = [p for p in model.parameters() if id(p) in matrices]
    rest = [p for g in adamw_groups for p in g["params"] if id(p) not in matrices]
    decay = {id(p): g["weight_decay"] for g in adamw_groups for p in g["params"]
             if id(p) not in matrices and g["weight_decay"]}
    return ([{"params": muon, "weight_decay": muon_weight_decay, "lr": muon_lr, "muon": True},
             {"params": rest, "weight_decay": 0.0, "muon": False}], matrices, decay)
