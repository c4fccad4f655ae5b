"""Multi-head low-rank attention (MLRA, Chung et al. 2024; methods.md section 2): drop-in
modules for the `linear_qkv` and `linear_proj` slots of our `SelfAttention`.

Factorisation (a project choice; the paper body was not available): for every head h and every
target t in `targets`, the per-head projection is a product of two factors

    q/k/v:  W_t,h = A_t,h @ B_t,h     A_t,h: d_model x r,   B_t,h: r x d_head
    o:      W_o,h = B_o,h @ A_o,h     B_o,h: d_head x r,    A_o,h: r x d_model

(`y = x W` convention). Targets not listed keep a full-rank per-head projection.

Tensor parallelism is by heads, like standard attention:
- `MLRAQKV`: the A's of all local heads and low-rank targets are ONE megatron-core
  `ColumnParallelLinear` (output H * n_lowrank * r, laid out per head, then per target, then
  rank), the B's a local batched per-head matmul with a parameter `lowrank_b` of shape
  [H_local, n_lowrank, r, d_head]; full-rank targets are one `ColumnParallelLinear` (output
  H * n_full * d_head, per head). The output has the standard per-head `[q_h; k_h; v_h]` layout.
  Both linears skip their own input-gradient all-reduce and the module all-reduces the input
  gradient once, as a single column-parallel QKV does.
- `MLRAProj` (target `o`): a local per-head `lowrank_b` [H_local, d_head, r] followed by the
  row-parallel A (this module IS that `RowParallelLinear`, input H * r, so its `weight` and
  `bias` keep the names, shapes and sharding of a standard `linear_proj`): one all-reduce of
  the output, as standard attention.

Initialisation: every factor is generated whole on the CPU from the current torch RNG (the
caller seeds per layer) and then split, in a fixed order (A linear, full-rank linear, then B),
so the weights are identical at every TP size (with `use_cpu_initialization=True`, which
megatron-core needs for the same property of its own linears).

Init std (project choice, `FACTOR_INIT`, config `model.mlra.factor_init`); `std` is read from
the slot's `init_method` (`config.init_method_std` for QKV, the depth-scaled output std for
Proj; or pass `init_std`), s_1 is the std of the factor applied first, s_2 of the second:
- "paper" (default): s_1 = s_2 = std, the setting of the paper's variance argument: a product
  of two such factors has per-entry std std^2 sqrt(r), so the initial sub-layer output variance
  is r std^2 times that of standard attention (d_in r std^4 instead of d_in std^2);
- "balanced": s_1 = s_2 = sqrt(std / sqrt(r)), so that s_1 s_2 sqrt(r) = std: the product has
  the per-entry std of the full-rank layer it replaces;
- "input_side": s_1 = std (the first factor's outputs have the full-rank layer's scale),
  s_2 = 1 / sqrt(r); the same product std as "balanced".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none
from torch import nn

from stable_megatron.methods.mlra import MLRAConfig
from stable_megatron.model.layers import per_head_rows, scale_like

QKV_TARGETS = ("q", "k", "v")
TARGETS = (*QKV_TARGETS, "o")
# The defaults (rank, targets, factor_init) are the config's (model.mlra), written only there.
DEFAULTS = MLRAConfig()
FACTOR_INIT = DEFAULTS.factor_init  # project choice, see the module docstring
FACTOR_INITS = ("paper", "balanced", "input_side")


def resolve_rank(rank: int | None, d_head: int) -> int:
    """`rank`, or the config's default (`MLRAConfig.resolved_rank`); must be >= 1."""
    r = MLRAConfig(rank=rank).resolved_rank(d_head)
    if r < 1:
        raise ValueError(f"MLRA rank={rank} (d_head={d_head}): must be >= 1")
    return r


def check_targets(targets: Sequence[str]) -> list[str]:
    targets = list(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or len(set(targets)) != len(targets):
        raise ValueError(f"MLRA targets={targets}: each of {', '.join(TARGETS)} at most once")
    return targets


def factor_stds(std: float, rank: int, mode: str = FACTOR_INIT) -> tuple[float, float]:
    """(s_1, s_2): stds of the factor applied first and second (see the module docstring)."""
    if mode == "paper":
        return std, std
    if mode == "balanced":
        s = math.sqrt(std / math.sqrt(rank))
        return s, s
    if mode == "input_side":
        return std, 1.0 / math.sqrt(rank)
    raise ValueError(f"MLRA factor_init={mode!r}: expected one of {', '.join(FACTOR_INITS)}")


def init_std_of(init_method: Callable) -> float:
    """The std of a megatron-core normal init method (`init_method_normal` and
    `scaled_init_method_normal` are partials of `torch.nn.init.normal_`)."""
    if (
        isinstance(init_method, functools.partial)
        and init_method.func is torch.nn.init.normal_
        and "std" in init_method.keywords
    ):
        return float(init_method.keywords["std"])
    raise ValueError(
        f"MLRA cannot read the std of init_method={init_method!r}; pass init_std explicitly"
    )


def _normal(std: float) -> Callable:
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std)


def _device(config) -> torch.device | int | str:
    if torch.get_default_device().type == "meta":  # a shape-only build (model/size.py)
        return "meta"
    return "cpu" if config.use_cpu_initialization else torch.cuda.current_device()


def _sharded_factor(
    full_shape: tuple[int, ...], std: float, tp_rank: int, tp_size: int, config
) -> nn.Parameter:
    """A parameter split over dim 0 (heads): generated whole on the CPU from the current RNG
    (whatever the TP size), then this rank's contiguous block is kept."""
    local = full_shape[0] // tp_size
    master = torch.empty(full_shape, dtype=torch.float32)
    if config.perform_initialization:
        torch.nn.init.normal_(master, mean=0.0, std=std)
    shard = master[tp_rank * local : (tp_rank + 1) * local]
    param = nn.Parameter(shard.to(device=_device(config), dtype=config.params_dtype).contiguous())
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
    param.allreduce = True
    return param


def _check_attention_shape(config, width: int, name: str, value: int) -> tuple[int, int]:
    heads, d_head = config.num_attention_heads, config.kv_channels
    if config.num_query_groups not in (None, heads):
        raise ValueError("MLRA supports multi-head attention only (num_query_groups == heads)")
    if value != width * heads * d_head:
        raise ValueError(
            f"MLRA {name}={value}: expected {width} * heads * d_head = {width * heads * d_head}"
        )
    if config.sequence_parallel:
        raise ValueError("MLRA does not support sequence parallelism")
    return heads, d_head


class MLRAQKV(nn.Module):
    """Low-rank per-head q/k/v projections in the `linear_qkv` slot (ColumnParallelLinear's
    calling convention). forward(x [s, b, d_model]) -> (out [s, b, H_local * 3 * d_head] laid
    out per head as [q_h; k_h; v_h], bias if skip_bias_add else None).

    Parameters: `lowrank_a.weight` [H_local * n_lowrank * r, d_model] (column-parallel),
    `lowrank_b` [H_local, n_lowrank, r, d_head], `full.weight` [H_local * n_full * d_head,
    d_model] (column-parallel; only if some of q, k, v is full rank), `bias` [H_local * 3 *
    d_head]; all split over TP on dim 0. `targets` may contain "o" (ignored here).
    """

    # its weights are factors of the per-head projections: an optimizer that updates each
    # weight as a whole matrix (Muon, stable_megatron/muon.py) leaves them to AdamW
    factorised = True

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method: Callable,
        gather_output: bool = False,
        bias: bool = True,
        skip_bias_add: bool = False,
        is_expert: bool = False,
        rank: int | None = None,
        targets: Sequence[str] = tuple(DEFAULTS.targets),
        factor_init: str = FACTOR_INIT,
        init_std: float | None = None,
        tp_group=None,
        **_unused,
    ) -> None:
        super().__init__()
        heads, d_head = _check_attention_shape(config, 3, "output_size", output_size)
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        self.tp_size, tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        if heads % self.tp_size:
            raise ValueError(f"MLRA: {heads} heads are not divisible by TP size {self.tp_size}")
        targets = check_targets(targets)
        self.rank = resolve_rank(rank, d_head)
        self.lowrank_targets = [t for t in QKV_TARGETS if t in targets]
        self.full_targets = [t for t in QKV_TARGETS if t not in targets]
        self.heads_local, self.head_dim = heads // self.tp_size, d_head
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        std = init_std if init_std is not None else init_std_of(init_method)
        std_a, std_b = factor_stds(std, self.rank, factor_init)
        n_low, n_full = len(self.lowrank_targets), len(self.full_targets)
        common = dict(
            config=config,
            bias=False,
            gather_output=False,
            skip_bias_add=False,
            is_expert=is_expert,
            # The module all-reduces the input gradient once for both linears (see forward).
            disable_grad_reduce=True,
            tp_group=self.tp_group,
        )
        self.lowrank_a = self.full = self.lowrank_b = None
        if n_low:
            self.lowrank_a = ColumnParallelLinear(
                input_size, heads * n_low * self.rank, init_method=_normal(std_a), **common
            )
        if n_full:
            self.full = ColumnParallelLinear(
                input_size, heads * n_full * d_head, init_method=init_method, **common
            )
        if n_low:
            self.lowrank_b = _sharded_factor(
                (heads, n_low, self.rank, d_head), std_b, tp_rank, self.tp_size, config
            )
        if bias:  # zero, like megatron-core's biases (draws nothing from the RNG)
            self.bias = nn.Parameter(
                torch.zeros(
                    self.heads_local * 3 * d_head, dtype=config.params_dtype, device=_device(config)
                )
            )
            set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=1)
            self.bias.allreduce = True
        else:
            self.register_parameter("bias", None)

    def head_scales(self, factors: torch.Tensor, scaled: tuple[str, ...]
                    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, fp32 multiplier of its shape) that scale the outputs `scaled` (of q, k,
        v) of each local head h by `factors[h]` (the bias aside, laid out as the standard
        layer's): for a low-rank target the head's second factor `lowrank_b[h, t]` (which
        scales the product A B; A is left as it is), for a full-rank one the head's rows of
        `full.weight`."""
        out: list[tuple[nn.Parameter, torch.Tensor]] = []
        if self.lowrank_b is not None:  # [heads, n_low, r, d_head]
            per = torch.ones(self.lowrank_b.shape[:2], dtype=factors.dtype,
                             device=factors.device)
            for i, target in enumerate(self.lowrank_targets):
                if target in scaled:
                    per[:, i] = factors
            out.append((self.lowrank_b, per.float()[:, :, None, None].expand_as(self.lowrank_b)))
        if self.full is not None:
            rows = per_head_rows(factors, self.full_targets, self.head_dim, scaled)
            out.append((self.full.weight, scale_like(self.full.weight, rows)))
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.tp_size > 1:  # identity forward, input-gradient all-reduce backward
            x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        seq, batch = x.shape[:2]
        heads, d_head = self.heads_local, self.head_dim
        per_target: dict[str, torch.Tensor] = {}
        if self.lowrank_a is not None:
            a, _ = self.lowrank_a(x)
            a = a.view(seq, batch, heads, len(self.lowrank_targets), self.rank)
            low = torch.einsum("sbhtr,htrd->sbhtd", a, self.lowrank_b)
            per_target.update(zip(self.lowrank_targets, low.unbind(dim=3), strict=True))
        if self.full is not None:
            full, _ = self.full(x)
            full = full.view(seq, batch, heads, len(self.full_targets), d_head)
            per_target.update(zip(self.full_targets, full.unbind(dim=3), strict=True))
        if self.full is None:  # already in q, k, v order
            out = low.reshape(seq, batch, heads * 3 * d_head)
        else:
            out = torch.stack([per_target[t] for t in QKV_TARGETS], dim=3)
            out = out.reshape(seq, batch, heads * 3 * d_head)
        bias = self.bias
        if bias is not None and not self.skip_bias_add:
            out, bias = out + bias, None
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, bias


class MLRAProj(RowParallelLinear):
    """Low-rank per-head output projection in the `linear_proj` slot (RowParallelLinear's
    calling convention, `input_size` = H * d_head). forward(context [s, b, H_local * d_head])
    -> (out [s, b, d_model], bias if skip_bias_add else None).

    Per head: `context_h @ lowrank_b[h]` (d_head -> r, local), then this module's row-parallel
    `weight` [d_model, H_local * r] (the A's, split on dim 1 like a standard proj) and `bias`.
    """

    # its weights are factors of the per-head projections: an optimizer that updates each
    # weight as a whole matrix (Muon, stable_megatron/muon.py) leaves them to AdamW
    factorised = True

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method: Callable,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        is_expert: bool = False,
        rank: int | None = None,
        factor_init: str = FACTOR_INIT,
        init_std: float | None = None,
        tp_group=None,
        **_unused,
    ) -> None:
        heads, d_head = _check_attention_shape(config, 1, "input_size", input_size)
        tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        tp_size, tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
        if heads % tp_size:
            raise ValueError(f"MLRA: {heads} heads are not divisible by TP size {tp_size}")
        r = resolve_rank(rank, d_head)
        std = init_std if init_std is not None else init_std_of(init_method)
        std_b, std_a = factor_stds(std, r, factor_init)  # B is applied first here
        super().__init__(
            heads * r,
            output_size,
            config=config,
            init_method=_normal(std_a),
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            tp_group=tp_group,
        )
        self.rank, self.head_dim, self.heads_local = r, d_head, heads // tp_size
        self.context_is_parallel = input_is_parallel
        self.lowrank_b = _sharded_factor((heads, d_head, r), std_b, tp_rank, tp_size, config)

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.context_is_parallel:
            context = scatter_to_tensor_model_parallel_region(context, group=self.tp_group)
        seq, batch = context.shape[:2]
        per_head = context.view(seq, batch, self.heads_local, self.head_dim)
        low = torch.einsum("sbhd,hdr->sbhr", per_head, self.lowrank_b)
        return super().forward(low.reshape(seq, batch, self.heads_local * self.rank))


def mlra_linear_specs(
    rank: int | None, targets: Sequence[str], factor_init: str = FACTOR_INIT
) -> tuple[ModuleSpec | type, ModuleSpec | type]:
    """(linear_qkv, linear_proj) for `SelfAttentionSubmodules`: MLRA modules for the slots
    with a low-rank target, megatron-core's standard linears for the others."""
    targets = check_targets(targets)
    params = {"rank": rank, "factor_init": factor_init}
    qkv: ModuleSpec | type = ColumnParallelLinear
    if any(t in targets for t in QKV_TARGETS):
        qkv = ModuleSpec(module=MLRAQKV, params={**params, "targets": targets})
    proj: ModuleSpec | type = RowParallelLinear
    if "o" in targets:
        proj = ModuleSpec(module=MLRAProj, params=params)
    return qkv, proj


def standard_attention_parameter_count(
    d_model: int, n_heads: int, d_head: int, bias: bool = True
) -> int:
    """Parameters of one layer's standard QKV + Proj."""
    width = n_heads * d_head
    return 4 * width * d_model + ((3 * width + d_model) if bias else 0)


def mlra_parameter_count(
    d_model: int,
    n_heads: int,
    d_head: int,
    rank: int | None,
    targets: Sequence[str],
    bias: bool = True,
) -> int:
    """Parameters of one layer's MLRA QKV + Proj: per head, r (d_model + d_head) for each
    low-rank target instead of d_model d_head; the biases are those of standard attention."""
    r = resolve_rank(rank, d_head)
    targets = check_targets(targets)
    per_head = sum(r * (d_model + d_head) if t in targets else d_model * d_head for t in TARGETS)
    return n_heads * per_head + ((3 * n_heads * d_head + d_model) if bias else 0)
