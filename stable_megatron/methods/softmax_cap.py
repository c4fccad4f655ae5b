"""Softmax capping [B] (`model.softmax_cap`): the attention logits s become c * tanh(s / c)
before the softmax (Gemma 2's attention soft-capping), so no logit exceeds c. The attention
kernels apply it (model/attention.py: the math kernel exactly, FlexAttention as a score mod;
SDPA cannot). Its `qk_norm_cap` variant is [B]'s QK-norm with the cap
(`model.norm_placement=qk_norm` with `model.softmax_cap`)."""

from __future__ import annotations

from typing import Any

from stable_megatron.methods.base import Field, Method
from stable_megatron.methods.registry import register


class SoftmaxCap(Method):
    name = "softmax_cap"
    title = "softmax capping"
    source = "[B] Rybakov et al. 2024; Gemma 2"
    fields = (Field("softmax_cap", float | None, None),)  # c in c * tanh(s / c); e.g. 50
    variants = {
        "soft_cap": {"softmax_cap": 50.0},
        "qk_norm_cap": {"norm_placement": "qk_norm", "softmax_cap": 50.0},
    }

    def enabled(self, cfg) -> bool:
        return cfg.model.softmax_cap is not None

    def validate(self, cfg, world_size: int) -> None:
        from stable_megatron.config import ConfigError

        m = cfg.model
        if m.softmax_cap is not None and m.softmax_cap <= 0:
            raise ConfigError(f"model.softmax_cap={m.softmax_cap}: must be > 0 (or null for off)")
        if m.softmax_cap is not None and m.attention_backend == "sdpa":
            raise ConfigError("model.softmax_cap needs model.attention_backend auto, flex or "
                              "math (sdpa cannot cap)")

    def attention_params(self, cfg) -> dict[str, Any]:
        return {"softmax_cap": cfg.model.softmax_cap}

    def export_blockers(self, cfg, fmt: str) -> list[str]:
        model = "GPT-2" if fmt == "hf_gpt2" else "Llama"
        return [f"model.softmax_cap={cfg.model.softmax_cap} ({model} has no attention logit cap)"]

    def summary(self, cfg) -> dict[str, Any]:
        return {"softmax_cap": cfg.model.softmax_cap}

    def describe(self, cfg) -> str | None:
        return None if cfg.model.softmax_cap is None else f"softmax cap {cfg.model.softmax_cap}"


register(SoftmaxCap())
