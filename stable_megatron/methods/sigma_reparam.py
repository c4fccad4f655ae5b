"""sigma-reparam [C] (Zhai et al. 2023): every chosen linear layer's weight is used as
W_hat = gamma / sigma(W) * W, sigma estimated by one power-iteration step per optimizer step
(the layers: model/sigma_reparam.py; the distributed power iteration over TP shards is there).

This module: the config (`model.sigma_reparam`), its rules, the layer-spec change (the chosen
linears become their sigma-reparam counterparts, the power-iteration start vector seeded per
layer and slot so that every layout builds the same model), the power step as a step hook,
the sigma / gamma metrics, and what exports refuse."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stable_megatron.hooks import StepHook
from stable_megatron.methods.base import Field, LayerSlots, Method, check_choices
from stable_megatron.methods.registry import register

TARGETS = ("qkv", "proj", "fc1", "fc2")  # the linears of a layer, in their seed-index order


@dataclass
class SigmaReparamConfig:
    """sigma-reparam [C]: W_hat = gamma / sigma(W) * W on the chosen linear layers."""

    enabled: bool = False
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    power_iters: int = 1  # power-iteration steps per optimizer step
    init_iters: int = 300  # power-iteration steps at initialisation (from a seeded vector)
    gamma_init: Literal["sigma0", "one"] = "sigma0"


class PowerIteration(StepHook):
    """sigma-reparam's power step, once per optimizer step on every rank before the forwards,
    so that its result does not depend on the number of micro-batches."""

    def __init__(self, module) -> None:
        self.module = module

    def before_step(self, step: int) -> None:
        from stable_megatron import ds_adapter
        from stable_megatron.model.sigma_reparam import refresh_spectral_norms

        # under ZeRO-3 one weight gathered whole at a time, so that the step never holds the
        # whole model (a no-op context below stage 3)
        refresh_spectral_norms(self.module, around=ds_adapter.gathered)


def add_sigma_reparam(contrib, parts, num_layers: int, exact_iters: int = 0) -> None:
    """`sigma/layer_NN/<slot>` (the spectral-norm estimate of the step's forward) and
    `gamma/layer_NN/<slot>` of each sigma-reparam linear of this stage; with `exact_iters` > 0
    also `sigma_exact/...` (`converged_sigma(exact_iters)` of the current weights: call before
    the optimizer update, on every TP rank of the stage) and `sigma_lag/...` =
    1 - sigma / sigma_exact. All TP- and DP-replicated. `contrib`: metrics.reduce.Contributions;
    `parts`: metrics.parts.ModelParts."""
    from stable_megatron.metrics.parts import layer_name, output_slots
    from stable_megatron.model.sigma_reparam import sigma_reparam_layers

    for number, layer in sorted(parts.layers.items()):
        slots = {id(m): slot for slot, m in output_slots(layer).items()}
        for _, module in sigma_reparam_layers(layer):
            slot = slots.get(id(module))
            if slot is None:
                continue
            name = f"{layer_name(number, num_layers)}/{slot}"
            contrib.replicated(f"sigma/{name}", module.sigma)
            contrib.replicated(f"gamma/{name}", module.gamma_value)
            if exact_iters > 0:
                exact = module.converged_sigma(exact_iters)
                contrib.replicated(f"sigma_exact/{name}", exact)
                contrib.replicated(f"sigma_lag/{name}", 1 - module.sigma.double() / exact.double())


class SigmaReparam(Method):
    name = "sigma_reparam"
    title = "sigma-reparam"
    source = "[C] Zhai et al. 2023"
    order = 10  # replaces linears
    fields = (Field("sigma_reparam", SigmaReparamConfig),)
    variants = {"sigma_reparam": {"sigma_reparam": {"enabled": True}}}
    series_metrics = r"(sigma|gamma|sigma_exact|sigma_lag)/[\w./]+"

    def enabled(self, cfg) -> bool:
        return cfg.model.sigma_reparam.enabled

    def validate(self, cfg, world_size: int) -> None:
        from stable_megatron.config import ConfigError

        sr = cfg.model.sigma_reparam
        check_choices("model.sigma_reparam.targets", sr.targets, TARGETS)
        if sr.power_iters < 1 or sr.init_iters < 1:
            raise ConfigError("model.sigma_reparam.power_iters and init_iters must be >= 1")

    def edit_layer(self, slots: LayerSlots, cfg, layer_number: int) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.spec_utils import ModuleSpec

        from stable_megatron.model.sigma_reparam import (
            SigmaReparamColumnParallelLinear,
            SigmaReparamRowParallelLinear,
        )

        sr = cfg.model.sigma_reparam
        counterpart = {ColumnParallelLinear: SigmaReparamColumnParallelLinear,
                       RowParallelLinear: SigmaReparamRowParallelLinear}
        for index, slot in enumerate(TARGETS):
            if slot in sr.targets:
                params = {"power_iters": sr.power_iters, "init_iters": sr.init_iters,
                          "gamma_init": sr.gamma_init,
                          "seed": cfg.train.seed * 1000 + layer_number * 10 + index}
                module = counterpart[getattr(slots, slot)]
                setattr(slots, slot, ModuleSpec(module=module, params=params))

    def hooks(self, cfg, module, state=None, engine=None) -> list:
        return [PowerIteration(module)]

    def add_metrics(self, contrib, parts, cfg) -> None:
        add_sigma_reparam(contrib, parts, cfg.model.num_layers, cfg.metrics.sigma_exact_iters)

    def export_blockers(self, cfg, fmt: str) -> list[str]:
        if fmt == "hf_gpt2":
            return ["model.sigma_reparam.enabled=true (GPT-2 has plain linear weights; "
                    "export --format safetensors keeps gamma, u and v)"]
        return ["model.sigma_reparam.enabled=true (Llama has plain linear weights)"]

    def layer_params(self, cfg, tp: int) -> int:
        return len(cfg.model.sigma_reparam.targets)  # one gamma per linear, replicated

    def summary(self, cfg) -> dict[str, Any]:
        return {"sigma_reparam": cfg.model.sigma_reparam.enabled}

    def describe(self, cfg) -> str | None:
        return "sigma-reparam" if cfg.model.sigma_reparam.enabled else None


register(SigmaReparam())
