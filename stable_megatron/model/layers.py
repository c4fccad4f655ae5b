"""Small building blocks shared by the layer spec."""

from __future__ import annotations

import torch
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
