"""z-loss (PaLM; Wortsman et al. 2023; `model.z_loss`): loss += z_loss * mean over tokens of
logsumexp(output logits)^2, which keeps the output logits from drifting. The term is computed
over vocabulary-parallel logits in model/loss.py; its logged value (`z_loss`, every step) is
reduced in metrics/logits.py."""

from __future__ import annotations

import math

from stable_megatron.methods.base import Field, Method
from stable_megatron.methods.registry import register


class ZLoss(Method):
    name = "z_loss"
    title = "z-loss"
    source = "PaLM; Wortsman et al. 2023"
    fields = (Field("z_loss", float, 0.0),)  # the coefficient; 0: off; e.g. 1e-4
    variants = {"z_loss": {"z_loss": 1e-4}}
    series_metrics = r"z_loss"

    def enabled(self, cfg) -> bool:
        return cfg.model.z_loss > 0

    def validate(self, cfg, world_size: int) -> None:
        from stable_megatron.config import ConfigError

        z = cfg.model.z_loss
        if not (math.isfinite(z) and z >= 0):
            raise ConfigError(f"model.z_loss={z}: must be a finite number >= 0 (0: off)")

    def hooks(self, cfg, module, state=None, engine=None) -> list:
        if state is None or engine is None:  # a bare model: nothing reduces the logged term
            return []
        from stable_megatron.metrics.logits import ZLossLog

        return [ZLossLog(state, engine)]

    def export_blockers(self, cfg, fmt: str) -> list[str]:
        return []  # it changes training, not the model's function


register(ZLoss())
