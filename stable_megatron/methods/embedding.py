"""Embedding options (the embedding block, model/gpt.py): a norm on the embedding output, after
the learned positions (`model.embedding_norm`, as BLOOM's), and the token embeddings multiplied
by sqrt(hidden_size) (`model.scale_embeddings`, "Spike No More", arXiv 2312.16903)."""

from __future__ import annotations

from stable_megatron.methods.base import Field, Method
from stable_megatron.methods.registry import register


class EmbeddingOptions(Method):
    name = "embedding"
    title = "embedding norm; scaled embeddings"
    source = "BLOOM; Takase et al. 2023, arXiv 2312.16903"
    fields = (Field("embedding_norm", bool, False), Field("scale_embeddings", bool, False))
    variants = {"embedding_norm": {"embedding_norm": True},
                "scaled_embeddings": {"scale_embeddings": True}}

    def enabled(self, cfg) -> bool:
        return cfg.model.embedding_norm or cfg.model.scale_embeddings

    def export_blockers(self, cfg, fmt: str) -> list[str]:
        m = cfg.model
        if fmt != "hf_gpt2":
            return ["model.embedding_norm / model.scale_embeddings (Llama has neither)"]
        out = []
        if m.embedding_norm:
            out.append("model.embedding_norm=true (GPT-2 has no LayerNorm after the embedding)")
        if m.scale_embeddings:
            out.append("model.scale_embeddings=true (GPT-2 does not scale its embeddings)")
        return out

    def describe(self, cfg) -> str | None:
        m = cfg.model
        words = [w for on, w in ((m.embedding_norm, "embedding norm"),
                                 (m.scale_embeddings, "scaled embeddings")) if on]
        return ", ".join(words) or None


register(EmbeddingOptions())
