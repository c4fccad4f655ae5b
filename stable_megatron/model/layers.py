"""Small building blocks shared by the layer spec: the model's norm (`norm`: LayerNorm or RMSNorm,
by `model.normalization`, for the norms outside megatron-core's slots), the Proj/FC2 output
norm and the per-head q/k/v norm; per-head multipliers of a QKV layer's rows
(`per_head_rows`, `scale_like`: QK-clip's scaling)."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


def norm(kind: str, size: int, eps: float) -> torch.nn.Module:
    """`model.normalization`'s norm over the last `size` features: LayerNorm (weight and bias)
    or RMSNorm (weight only)."""
    if kind == "rmsnorm":
        return torch.nn.RMSNorm(size, eps=eps)
    if kind == "layernorm":
        return torch.nn.LayerNorm(size, eps=eps)
    raise ValueError(f"unknown normalization {kind!r}")


def normalization_of(config) -> str:
    """Our name of a megatron-core config's `normalization`."""
    return {"LayerNorm": "layernorm", "RMSNorm": "rmsnorm"}[config.normalization]


class LinearWithOutputNorm(torch.nn.Module):
    """A linear layer (any spec with megatron-core's `(output, bias)` convention) followed by a
    LayerNorm on its full output, bias included: the Proj / FC2 norm of Rybakov et al., applied
    before the residual add. Used in the `linear_proj` and `linear_fc2` slots; the norm's
    parameters are replicated over tensor-parallel ranks (the row-parallel output is whole)."""

    def __init__(self, input_size: int, output_size: int, *, linear: ModuleSpec | type,
                 config, **kwargs) -> None:
        super().__init__()
        self.linear = build_module(linear, input_size, output_size, config=config, **kwargs)
        self.norm = norm(normalization_of(config), output_size, config.layernorm_epsilon)

    def forward(self, x: torch.Tensor):
        out, bias = self.linear(x)
        if bias is not None:
            out = out + bias
        return self.norm(out), None


class HeadLayerNorm(torch.nn.Module):
    """The model's norm (LayerNorm or RMSNorm, by the config's `normalization`) over d_head
    applied to every head, its parameters shared by the heads.

    The heads are split over tensor-parallel ranks while the parameters are replicated, so each
    rank's gradient covers only its own heads: the parameters enter the forward through
    megatron-core's `copy_to_tensor_model_parallel_region` (identity forward, all-reduce of the
    gradient over the TP group backward), which sums the heads' contributions on every rank.
    Parameters `weight` (and `bias` for LayerNorm), as the torch norm's.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_) -> None:
        super().__init__()
        self.rms = normalization_of(config) == "rmsnorm"
        self.normalized_shape, self.eps = (hidden_size,), eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tensor_model_parallel_region(self.weight)
        if self.rms:
            return torch.nn.functional.rms_norm(x, self.normalized_shape, weight, self.eps)
        bias = copy_to_tensor_model_parallel_region(self.bias)
        return torch.nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, {'rms' if self.rms else 'layer'}norm"


def per_head_rows(factors: torch.Tensor, targets: list[str], head_dim: int,
                   scaled: tuple[str, ...] = ("q", "k")) -> torch.Tensor:
    """[heads * len(targets) * head_dim]: per head, per target, the head's factor on the
    targets in `scaled`, 1 on the others."""
    heads = factors.numel()
    rows = torch.ones(heads, len(targets), head_dim, dtype=factors.dtype, device=factors.device)
    for i, target in enumerate(targets):
        if target in scaled:
            rows[:, i, :] = factors[:, None]
    return rows.reshape(-1)


def scale_like(param: torch.nn.Parameter, rows: torch.Tensor) -> torch.Tensor:
    """`rows` (one entry per row of `param`) broadcast to `param`'s shape, in fp32 (a bf16
    weight rounds the product; ZeRO's fp32 master copy takes the exact factor)."""
    shape = (-1,) + (1,) * (param.dim() - 1)
    return rows.float().reshape(shape).expand_as(param)
