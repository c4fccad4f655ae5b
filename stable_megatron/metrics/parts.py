"""Where the metrics look in the model: the pieces of this pipeline stage's part of the GPT,
found by type through the public module tree, with their global names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from stable_megatron.model.gpt import EmbeddingPipe, FinalNormPipe, LMHeadPipe
from stable_megatron.model.layers import LinearWithOutputNorm

# The linear layers whose outputs are measured, and whether their output is split over
# tensor-parallel ranks (column-parallel: QKV by heads, FC1 by columns) or whole on every rank
# (row-parallel Proj and FC2, after their all-reduce).
SLOTS = {"qkv": True, "proj": False, "fc1": True, "fc2": False}


def layer_name(number: int, num_layers: int) -> str:
    """`layer_03`: the global (1-based, megatron-core's `layer_number`) layer number, zero-padded
    to at least two digits."""
    return f"layer_{number:0{max(2, len(str(num_layers)))}d}"


def head_name(index: int, num_heads: int) -> str:
    """`head_02`: the global 0-based attention head index, zero-padded to two digits or more."""
    return f"head_{index:0{max(2, len(str(num_heads - 1)))}d}"


@dataclass
class ModelParts:
    """This stage's pieces. `embedding` is the input embedding, on the first stage only (the
    tied copy that serves as output layer on the last stage is left out: it is the same
    matrix); `head` is the untied output layer (None when tied or on another stage)."""

    embedding: EmbeddingPipe | None = None
    layers: dict[int, TransformerLayer] = field(default_factory=dict)
    final_norm: FinalNormPipe | None = None
    head: LMHeadPipe | None = None

    def groups(self, num_layers: int) -> dict[str, nn.Module]:
        """Parameter groups by name: `embedding`, `layer_NN`, `final_norm`, `output`."""
        out: dict[str, nn.Module] = {}
        if self.embedding is not None:
            out["embedding"] = self.embedding
        for number, layer in sorted(self.layers.items()):
            out[layer_name(number, num_layers)] = layer
        if self.final_norm is not None:
            out["final_norm"] = self.final_norm
        if self.head is not None:
            out["output"] = self.head
        return out

    def pieces(self) -> list[tuple[ModelParts, nn.Module]]:
        """Each piece of the stage on its own, as (a ModelParts holding only that piece, the
        piece's module): the embedding, each layer in order, the final norm, the head."""
        out = []
        if self.embedding is not None:
            out.append((ModelParts(embedding=self.embedding), self.embedding))
        for number, layer in sorted(self.layers.items()):
            out.append((ModelParts(layers={number: layer}), layer))
        if self.final_norm is not None:
            out.append((ModelParts(final_norm=self.final_norm), self.final_norm))
        if self.head is not None:
            out.append((ModelParts(head=self.head), self.head))
        return out


def model_parts(module: nn.Module, pp_rank: int) -> ModelParts:
    parts = ModelParts()
    for sub in module.modules():
        if isinstance(sub, EmbeddingPipe):
            if pp_rank == 0 and parts.embedding is None:
                parts.embedding = sub
        elif isinstance(sub, TransformerLayer):
            if sub.layer_number in parts.layers:
                raise RuntimeError(f"two transformer layers numbered {sub.layer_number}")
            parts.layers[sub.layer_number] = sub
        elif isinstance(sub, FinalNormPipe):
            parts.final_norm = sub
        elif isinstance(sub, LMHeadPipe):
            parts.head = sub
    return parts


def output_slots(layer: TransformerLayer) -> dict[str, nn.Module]:
    """The QKV, Proj, FC1, FC2 linears of a layer (inside the Proj/FC2 output norm when
    present: the linear's own output is measured, before that norm)."""
    attn, mlp = layer.self_attention, layer.mlp
    modules = {"qkv": attn.linear_qkv, "proj": attn.linear_proj,
               "fc1": mlp.linear_fc1, "fc2": mlp.linear_fc2}
    return {name: m.linear if isinstance(m, LinearWithOutputNorm) else m
            for name, m in modules.items()}


def is_tp_sharded(param: torch.Tensor) -> bool:
    """megatron-core marks parameters split over tensor-parallel ranks."""
    return bool(getattr(param, "tensor_model_parallel", False))
