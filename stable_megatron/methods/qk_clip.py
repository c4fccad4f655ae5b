"""QK-clip (MuonClip, Kimi K2, arXiv 2507.20534; `model.qk_clip`): after each optimizer step,
every head whose largest attention logit in the step exceeded `tau` has its query and key
weights scaled by sqrt(tau / max logit). The per-head maxima and the scaling of the weights are
in model/qk_clip.py; this module holds the config, its rules and the step hook."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stable_megatron.hooks import StepHook
from stable_megatron.methods.base import Field, Method
from stable_megatron.methods.registry import register


@dataclass
class QKClipConfig:
    """QK-clip (MuonClip, arXiv 2507.20534): after each optimizer step, every head whose largest
    attention logit in the step exceeded `tau` has its query and key weights scaled by
    sqrt(tau / max logit) (model/qk_clip.py)."""

    enabled: bool = False
    tau: float = 100.0  # the logit bound; Kimi K2 used 100


class QKClipHook(StepHook):
    """QK-clip after every optimizer step.

    `before_step` sets a `MaxLogitCollector` on every attention module of this rank;
    `after_step`, once the optimizer has updated the weights, puts each head's maximum into a
    [layers, heads] table (-inf where this rank holds no such head) and all-reduces it with
    MAX over all ranks: data-parallel ranks of the same heads combine their batches, the
    tensor- and pipeline-parallel ranks fill in the heads and layers they hold, and every rank
    then knows every head's maximum. Each rank scales its own heads' q and k parameters and,
    entry for entry, its part of ZeRO's fp32 master copy (`ds_adapter.scale_master_weights`:
    scaling the module's weights alone would be undone by the next step, which writes the
    master weights back into the module).
    Cost per step: the collectors' q k^T (model/qk_clip.py) and one all-reduce of
    layers x heads floats.

    Logged every step: `qk_clip/max_logit`, the step's largest attention logit (before the
    clip, over all layers and heads) and `qk_clip/clipped_heads`, how many heads were scaled.
    A step whose update was dropped (`update_skipped`: an overflow, the spike guard) clips
    nothing: it left the weights as they were.
    """

    def __init__(self, module, tau: float, num_layers: int, num_heads: int) -> None:
        from stable_megatron.model.attention import SelfAttention

        self.tau, self.shape = tau, (num_layers, num_heads)
        self.device = next(module.parameters()).device
        self.modules = {m.layer_number: m for m in module.modules()
                        if isinstance(m, SelfAttention)}
        self.collectors: dict = {}
        self.last_max_logits = None  # the last step's [layers, heads] table, on every rank

    def before_step(self, step: int) -> None:
        from stable_megatron.model.qk_clip import CAPTURE_OWNER, MaxLogitCollector

        for number, module in self.modules.items():
            self.collectors[number] = MaxLogitCollector()
            module.set_capture_hook(CAPTURE_OWNER, self.collectors[number])

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        import torch
        import torch.distributed as dist

        from stable_megatron import ds_adapter, parallel
        from stable_megatron.model.qk_clip import CAPTURE_OWNER, clip_factors, query_key_scales

        table = torch.full(self.shape, -torch.inf, dtype=torch.float32, device=self.device)
        for number, module in self.modules.items():
            module.set_capture_hook(CAPTURE_OWNER, None)
            found = self.collectors.pop(number).max_logits
            if found is not None:
                table[number - 1, module.first_head:module.first_head + found.numel()] = found
        parallel.all_reduce_(table, op=dist.ReduceOp.MAX)
        self.last_max_logits = table
        if record.get("update_skipped"):  # no update, no clip: the step left the weights as
            record["qk_clip/max_logit"] = float(table.max())  # they were (a replay needs that)
            record["qk_clip/clipped_heads"] = 0
            return
        with torch.no_grad():
            for number, module in self.modules.items():
                first = module.first_head
                factors = clip_factors(table[number - 1, first:first + module.heads_local],
                                       self.tau)
                if bool((factors != 1).any()):  # the same on every data-parallel rank
                    with ds_adapter.gathered(module.parameters(), modify=True):  # ZeRO-3
                        for param, scale in query_key_scales(module, factors):
                            param.mul_(scale)
                            ds_adapter.scale_master_weights(param, scale)
        record["qk_clip/max_logit"] = float(table.max())
        record["qk_clip/clipped_heads"] = int((table > self.tau).sum())


class QKClip(Method):
    name = "qk_clip"
    title = "QK-clip"
    source = "Kimi K2 (MuonClip), arXiv 2507.20534"
    fields = (Field("qk_clip", QKClipConfig),)
    variants = {"qk_clip": {"qk_clip": {"enabled": True}}}
    series_metrics = r"qk_clip/(max_logit|clipped_heads)"

    def enabled(self, cfg) -> bool:
        return cfg.model.qk_clip.enabled

    def validate(self, cfg, world_size: int) -> None:
        from stable_megatron.config import ConfigError

        m = cfg.model
        clip = m.qk_clip
        if not (math.isfinite(clip.tau) and clip.tau > 0):
            raise ConfigError(f"model.qk_clip.tau={clip.tau}: must be a finite number > 0")

    def hooks(self, cfg, module, state=None, engine=None) -> list:
        m = cfg.model
        return [QKClipHook(module, m.qk_clip.tau, m.num_layers, m.num_attention_heads)]

    def export_blockers(self, cfg, fmt: str) -> list[str]:
        return []  # it changes training, not the model's function


register(QKClip())
