"""Small building blocks shared by the layer spec."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


class LinearWithOutputNorm(torch.nn.Module):
    """A linear layer (any spec with megatron-core's `(output, bias)` convention) followed by a
    LayerNorm on its full output, bias included: the Proj / FC2 norm of Rybakov et al., applied
    before the residual add. Used in the `linear_proj` and `linear_fc2` slots; the norm's
    parameters are replicated over tensor-parallel ranks (the row-parallel output is whole)."""

    def __init__(self, input_size: int, output_size: int, *, linear: ModuleSpec | type,
                 config, **kwargs) -> None:
        super().__init__()
        self.linear = build_module(linear, input_size, output_size, config=config, **kwargs)
        self.norm = torch.nn.LayerNorm(output_size, eps=config.layernorm_epsilon)

    def forward(self, x: torch.Tensor):
        out, bias = self.linear(x)
        if bias is not None:
            out = out + bias
        return self.norm(out), None


class HeadLayerNorm(torch.nn.LayerNorm):
    """LayerNorm over d_head applied to every head, its parameters shared by the heads.

    The heads are split over tensor-parallel ranks while the parameters are replicated, so each
    rank's gradient covers only its own heads: the parameters enter the forward through
    megatron-core's `copy_to_tensor_model_parallel_region` (identity forward, all-reduce of the
    gradient over the TP group backward), which sums the heads' contributions on every rank.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_) -> None:
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tensor_model_parallel_region(self.weight)
        bias = copy_to_tensor_model_parallel_region(self.bias)
        return torch.nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
