"""sigma-reparam (Zhai et al. 2023) for megatron-core's tensor-parallel linear layers.

`SigmaReparamColumnParallelLinear` / `SigmaReparamRowParallelLinear` take the constructor of
`ColumnParallelLinear` / `RowParallelLinear` (plus `power_iters`, `init_iters`, `gamma_init`,
whose defaults are `SigmaReparamConfig`'s, and `seed`), so they drop into any `ModuleSpec` slot
that builds those. They compute

    y = s * (x W^T) + b,   s = gamma / sigma_hat,   sigma_hat = v^T W u  (with grad to W)

i.e. the weight `W_hat = gamma / sigma(W) * W` without materialising it; the bias is not
reparameterised and megatron-core's `(output, bias)` / `skip_bias_add` semantics are kept.
`gamma` is a learned TP-replicated scalar (shape [1]) initialised to sigma_hat(W_0)
(`gamma_init="sigma0"`: W_hat == W at init, bit for bit in fp32) or to 1 (`"one"`).

Where s is applied. The gradient of s must come out complete and identical on every TP rank
with no extra collective: column-parallel multiplies the (replicated) input by s, whose
gradient the layer's own backward all-reduce of the input gradient completes; row-parallel
multiplies the output after its all-reduce. (s applied to a sharded tensor, e.g. the
column-parallel output or the row-parallel output before its all-reduce, would leave each rank
with a partial gradient of s and need one more all-reduce in backward.)

Power iteration. Persistent fp32 buffers (in `state_dict`, hence in checkpoints; they stay
fp32 when the module is cast to bf16):
`u` in the input space of W, `v` in its output space. Column-parallel (rows of W split):
u full and replicated, v this rank's shard of the output rows. Row-parallel (columns split):
u this rank's shard, v full and replicated. One step, with the replicated vector r, the
sharded one q and the local block M (W_i for column-, W_i^T for row-parallel):
`q~ = M r` locally, then ONE all-reduce of the concatenation `[M^T q~ ; ||q~||^2]` gives
`q = q~ / ||q~||`, `r = normalize(sum_i M_i^T q~_i)` and, for free, the estimate ||M^T q||.
Column: v = normalize(W u), u = normalize(W^T v); row: u = normalize(W^T v), v = normalize(W u).
u starts from a full-size vector drawn from `torch.Generator().manual_seed(seed)` (the same at
every TP layout), this rank's shard taken where sharded, then `init_iters` steps; no SVD,
no gather of W. sigma_hat in forward is `sum_i (local bilinear term)` all-reduced with
forward-sum / backward-identity, so the gradient reaching W through sigma is `v u^T`.

Iterations run only in `refresh_spectral_norms(model)`, which the training loop calls once per
optimizer step before the step's forward passes; forward (training or eval) only reads u, v,
so results do not depend on the number of micro-batches.

Communication per layer, over the layer's tensor-parallel group, through
`stable_megatron.parallel` (at TP=1 the helpers are called but return without communicating):
- `refresh_spectral_norms`: `power_iters` all-reduces (default 1), each of
  `input_size + 1` fp32 values (column-parallel) or `output_size + 1` (row-parallel);
- every forward call (each micro-batch, each activation recompute, eval): 1 all-reduce of one
  fp32 value (sigma_hat);
- backward: none beyond megatron-core's own (column: the input-gradient all-reduce, which also
  carries the gradient of s; row: none).
Per optimizer step with k micro-batches: `power_iters + k` all-reduces (2 for the defaults and
k = 1), in addition to the layer's megatron-core collectives, which are unchanged.
On metric steps with `metrics.sigma_exact_iters` = n > 0 only: `converged_sigma(n)` adds n
all-reduces of the power-step size (on a copy of the vectors; u, v and `sigma` are unchanged).
Construction (once): `init_iters` all-reduces (column) or `init_iters + 1` (row: the first
v = normalize(W u0)), plus 1 for `gamma_init="sigma0"`. With `config.perform_initialization`
False nothing is iterated (the weights are not set yet): u is the seeded start, v zero, gamma 1,
until a checkpoint is loaded or `init_power_iteration()` / `init_gamma()` are called.

`sigma` and `gamma_value` are detached 0-d fp32 tensors for metrics, read without
communication: `sigma` is the sigma_hat of the latest forward or power step on this process
(NaN after `load_state_dict` until the next one).

Not supported (rejected at construction): sequence parallelism, expert-parallel communication,
`skip_weight_param_allocation`, `disable_grad_reduce`, `defer_embedding_wgrad_compute`, CPU
activation offloading. Checkpoint resharding: `v` (column) and `u` (row) are sharded like the
weight (dim 0 of the buffer), `u` (column), `v` (row) and `gamma` are replicated;
`sharded_state_dict` declares this for megatron-core's dist-checkpointing. Other resharding
tools must do the same, or call `init_power_iteration()` after a load at another TP size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from stable_megatron import parallel
from stable_megatron.methods.sigma_reparam import SigmaReparamConfig

EPS = 1e-12
GAMMA_INITS = ("sigma0", "one")
# power_iters, init_iters, gamma_init: the defaults of the config (model.sigma_reparam), the
# one place they are written
DEFAULTS = SigmaReparamConfig()


class _SigmaReparam:
    """State and power iteration shared by the column- and row-parallel layers.

    Subclasses set `_SHARDED` to the name of the TP-sharded vector ("v" for column-parallel,
    "u" for row-parallel) and call `_init_sigma_reparam` after the parent constructor."""

    _SHARDED: str
    weight: nn.Parameter

    def _init_sigma_reparam(
        self, config, power_iters: int, init_iters: int, gamma_init: str, seed: int,
        unsupported: dict[str, bool],
    ) -> None:
        name = type(self).__name__
        for option, present in unsupported.items():
            if present:
                raise NotImplementedError(f"{name} does not support {option}")
        if not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"{name}: power_iters must be an integer >= 1, got {power_iters!r}")
        if not isinstance(init_iters, int) or init_iters < 1:
            raise ValueError(f"{name}: init_iters must be an integer >= 1, got {init_iters!r}")
        if gamma_init not in GAMMA_INITS:
            raise ValueError(f"{name}: gamma_init must be one of {GAMMA_INITS}, got {gamma_init!r}")
        self.power_iters, self.init_iters = power_iters, init_iters
        self.gamma_init, self.seed = gamma_init, seed
        out_features, in_features = self.weight.shape  # this rank's block
        device = self.weight.device
        self.register_buffer("u", torch.zeros(in_features, dtype=torch.float32, device=device))
        self.register_buffer("v", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.gamma = nn.Parameter(torch.ones(1, dtype=config.params_dtype, device=device))
        self.gamma.allreduce = True  # TP-replicated, data-parallel reduced like the bias
        self._sigma_est = torch.full((), math.nan, device=device)
        self.register_load_state_dict_post_hook(_mark_sigma_stale)
        if device.type == "meta":  # a shape-only build (sizes, shard kinds): no values to use
            return
        if config.perform_initialization:
            self.init_power_iteration()
            self.init_gamma()
        else:
            self.u.copy_(self._seeded_start())

    def _apply(self, fn, recurse=True):
        """Module casts (`.bfloat16()`, `.to(dtype)`, as DeepSpeed's bf16 mode does) leave the
        power-iteration vectors fp32; device moves apply as usual."""
        result = super()._apply(fn, recurse)
        for name in ("u", "v"):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return result

    # ---------------------------------------------------------------- power iteration

    def _seeded_start(self) -> torch.Tensor:
        """This rank's part of a unit vector drawn whole from `seed`: the same at every TP size."""
        generator = torch.Generator().manual_seed(self.seed)
        full = torch.randn(self.input_size, generator=generator, dtype=torch.float32)
        full /= full.norm().clamp_min(EPS)
        if self._SHARDED != "u":
            return full
        # The input columns this rank holds, as megatron-core's CPU init splits them (strided).
        world = torch.distributed.get_world_size(self.tp_group)
        rank = torch.distributed.get_rank(self.tp_group)
        per_rank = self.weight.shape[1]
        pieces = full.split(per_rank // self._stride)
        return torch.cat(pieces[rank::world])

    def _local_operator(self) -> torch.Tensor:
        """M with `M @ replicated -> this rank's sharded vector`: W_i, or W_i^T for row-parallel."""
        w = self.weight.detach().float()
        return w if self._SHARDED == "v" else w.t()

    def _vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(replicated, sharded) buffers."""
        return (self.u, self.v) if self._SHARDED == "v" else (self.v, self.u)

    def _step(
        self, m: torch.Tensor, sharded_unnormalised: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One all-reduce of [M^T s~ ; ||s~||^2]; returns new tensors (r, s, sigma):
        r = normalize(M^T s~), s = s~ / ||s~|| and sigma = ||M^T s|| = v^T W u."""
        s = sharded_unnormalised
        buf = torch.cat([m.t() @ s, s.square().sum().reshape(1)])
        parallel.tp_all_reduce_(buf, group=self.tp_group)
        s_norm = buf[-1].sqrt().clamp_min(EPS)
        r_norm = buf[:-1].norm().clamp_min(EPS)
        return buf[:-1] / r_norm, s / s_norm, r_norm / s_norm

    def _finish_step(self, m: torch.Tensor, sharded_unnormalised: torch.Tensor) -> None:
        """`_step` into the buffers and `_sigma_est`."""
        r, s, sigma = self._step(m, sharded_unnormalised)
        replicated, sharded = self._vectors()
        sharded.copy_(s)
        replicated.copy_(r)
        self._sigma_est = sigma.detach()

    @torch.no_grad()
    def power_iteration(self, iters: int | None = None) -> None:
        """`iters` (default `power_iters`) power steps, one TP all-reduce each."""
        m = self._local_operator()
        for _ in range(self.power_iters if iters is None else iters):
            replicated, _ = self._vectors()
            self._finish_step(m, m @ replicated.float())

    @torch.no_grad()
    def converged_sigma(self, iters: int) -> torch.Tensor:
        """||M^T s|| (0-d fp32) after `iters` >= 1 power steps from a copy of the current
        vectors, one TP all-reduce each (every TP rank of the layer must call it alike);
        u, v and `sigma` are left unchanged. A converged reference for `sigma` (metrics)."""
        if iters < 1:
            raise ValueError(f"{type(self).__name__}.converged_sigma: iters must be >= 1, "
                             f"got {iters!r}")
        m = self._local_operator()
        r = self._vectors()[0].float().clone()
        for _ in range(iters):
            r, _, sigma = self._step(m, m @ r)
        return sigma

    @torch.no_grad()
    def init_power_iteration(self, iters: int | None = None) -> None:
        """Restart u from the seeded vector and run `iters` (default `init_iters`) steps;
        gamma is left alone."""
        start = self._seeded_start().to(self.u.device)
        m = self._local_operator()
        if self._SHARDED == "u":  # v = normalize(W u0): sum over the input shards
            self._finish_step(m, start)
        else:
            self.u.copy_(start)
        self.power_iteration(self.init_iters if iters is None else iters)

    @torch.no_grad()
    def init_gamma(self) -> None:
        """gamma = sigma_hat(W) (computed as forward does, so W_hat == W) or 1, per gamma_init."""
        self.gamma.fill_(self.spectral_norm().item() if self.gamma_init == "sigma0" else 1.0)

    # ---------------------------------------------------------------- forward pieces

    def spectral_norm(self) -> torch.Tensor:
        """sigma_hat = v^T W u in fp32 with grad to W (0-d): the local bilinear term v_i^T W_i u
        (column) or v^T W_i u_i (row), one autograd-aware TP all-reduce."""
        local = torch.dot(self.v.float(), torch.mv(self.weight.float(), self.u.float()))
        sigma = parallel.tp_reduce_sum(local.reshape(1), group=self.tp_group)[0]
        self._sigma_est = sigma.detach()
        return sigma

    def scale(self) -> torch.Tensor:
        """s = gamma / sigma_hat, fp32, shape [1]."""
        return self.gamma.float() / self.spectral_norm().clamp_min(EPS)

    @property
    def sigma(self) -> torch.Tensor:
        return self._sigma_est

    @property
    def gamma_value(self) -> torch.Tensor:
        return self.gamma.detach().float()[0]

    def _sharded_state_dict(self, prefix, sharded_offsets, metadata, axis_map: dict[str, int]):
        dp_cp_group = (metadata or {}).get("dp_cp_group")
        if dp_cp_group is None:
            dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis_map, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=dp_cp_group,
        )


def _mark_sigma_stale(module: _SigmaReparam, incompatible_keys) -> None:
    module._sigma_est = torch.full((), math.nan, device=module.u.device)


def _offloading(config) -> bool:
    return bool(getattr(config, "cpu_offloading", False))


class SigmaReparamColumnParallelLinear(_SigmaReparam, ColumnParallelLinear):
    """`ColumnParallelLinear` with W_hat = gamma / sigma(W) * W (see the module docstring)."""

    _SHARDED = "v"

    def __init__(
        self,
        input_size,
        output_size,
        *,
        config,
        init_method: Callable,
        bias=True,
        gather_output=False,
        stride=1,
        keep_master_weight_for_test=False,
        skip_bias_add=False,
        skip_weight_param_allocation: bool = False,
        embedding_activation_buffer: list[torch.Tensor] | None = None,
        grad_output_buffer: list[torch.Tensor] | None = None,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        disable_grad_reduce: bool = False,
        tp_group: torch.distributed.ProcessGroup | None = None,
        power_iters: int = DEFAULTS.power_iters,
        init_iters: int = DEFAULTS.init_iters,
        gamma_init: str = DEFAULTS.gamma_init,
        seed: int = 0,
    ) -> None:
        if skip_weight_param_allocation:
            raise NotImplementedError(
                f"{type(self).__name__} does not support skip_weight_param_allocation"
            )
        super().__init__(
            input_size, output_size, config=config, init_method=init_method, bias=bias,
            gather_output=gather_output, stride=stride,
            keep_master_weight_for_test=keep_master_weight_for_test,
            skip_bias_add=skip_bias_add, skip_weight_param_allocation=False,
            embedding_activation_buffer=embedding_activation_buffer,
            grad_output_buffer=grad_output_buffer, is_expert=is_expert,
            tp_comm_buffer_name=tp_comm_buffer_name, disable_grad_reduce=disable_grad_reduce,
            tp_group=tp_group,
        )
        self._stride = stride
        self._init_sigma_reparam(
            config, power_iters, init_iters, gamma_init, seed,
            unsupported={
                "sequence_parallel": self.sequence_parallel,
                "expert-parallel communication": self.explicit_expert_comm,
                "disable_grad_reduce": disable_grad_reduce,
                "defer_embedding_wgrad_compute": config.defer_embedding_wgrad_compute,
                "cpu_offloading": _offloading(config),
            },
        )

    def forward(
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if weight is not None and weight is not self.weight:
            raise ValueError(f"{type(self).__name__}: sigma is tied to self.weight; "
                             "an external weight cannot be passed")
        return super().forward(input_, runtime_gather_output=runtime_gather_output)

    def _forward_impl(self, input, weight, *args, **kwargs):
        # (s x) W^T + b: x is replicated over TP, and the layer's backward all-reduces the
        # gradient of s x, so the gradient of s is complete on every rank.
        return super()._forward_impl(input * self.scale().to(input.dtype), weight, *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Weight, bias and v sharded along dim 0; u and gamma replicated."""
        return self._sharded_state_dict(
            prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0, "v": 0}
        )


class SigmaReparamRowParallelLinear(_SigmaReparam, RowParallelLinear):
    """`RowParallelLinear` with W_hat = gamma / sigma(W) * W (see the module docstring)."""

    _SHARDED = "u"

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
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: torch.distributed.ProcessGroup | None = None,
        power_iters: int = DEFAULTS.power_iters,
        init_iters: int = DEFAULTS.init_iters,
        gamma_init: str = DEFAULTS.gamma_init,
        seed: int = 0,
    ) -> None:
        super().__init__(
            input_size, output_size, config=config, init_method=init_method, bias=bias,
            input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add, stride=stride,
            keep_master_weight_for_test=keep_master_weight_for_test, is_expert=is_expert,
            tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group,
        )
        self._stride = stride
        self._init_sigma_reparam(
            config, power_iters, init_iters, gamma_init, seed,
            unsupported={
                "sequence_parallel": self.sequence_parallel,
                "expert-parallel communication": self.explicit_expert_comm,
                "cpu_offloading": _offloading(config),
            },
        )

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RowParallelLinear.forward (without sequence parallelism) with s applied after the
        output all-reduce, where the output, and so the gradient of s, is replicated."""
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        scale = self.scale()
        output_parallel = self._forward_impl(
            input=input_parallel,
            weight=self.weight,
            bias=None,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            allreduce_dgrad=False,
            sequence_parallel=False,
            tp_group=None,
            grad_output_buffer=None,
        )
        output_ = reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        output_ = output_ * scale.to(output_.dtype)
        if not self.skip_bias_add:
            output = (output_ + self.bias) if self.bias is not None else output_
            output_bias = None
        else:
            output = output_
            output_bias = self.bias
        return output, output_bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Weight sharded along dim 1 and u along dim 0; bias, v and gamma replicated."""
        return self._sharded_state_dict(prefix, sharded_offsets, metadata, {"weight": 1, "u": 0})


def sigma_reparam_layers(model: nn.Module) -> Iterator[tuple[str, _SigmaReparam]]:
    """(qualified name, layer) of every sigma-reparam layer in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, _SigmaReparam):
            yield name, module


@torch.no_grad()
def refresh_spectral_norms(model: nn.Module, around=None) -> int:
    """Run each sigma-reparam layer's `power_iters` power steps; returns the number of layers.
    Call once per optimizer step, before the step's forward passes, on every rank. `around`
    (optional): a function of a list of weights returning the context each layer's steps run
    in (the training loop passes `ds_adapter.gathered`: under ZeRO-3 one weight whole at a
    time)."""
    count = 0
    for _, layer in sigma_reparam_layers(model):
        with around([layer.weight]) if around is not None else contextlib.nullcontext():
            layer.power_iteration()
        count += 1
    return count
