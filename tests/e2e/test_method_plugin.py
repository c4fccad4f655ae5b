"""A stability method added from outside the package, in one module registered at run time: it
appears in config validation, trains at TP2 with its layer change, logs its metric, and GPT-2
export refuses it, with no edit to stable_megatron (the registry, stable_megatron/methods/)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.seq_length=64", "data.vocab_size=1024", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.warmup_steps=1", "train.eval_interval=0",
         "logging.tensorboard=false", "logging.progress=false"]

# The whole method: config, validation, layer change, metric. It says nothing about export.
TOY = '''
"""A toy method: the attention output (after Proj) times a constant, `model.attn_scale`."""
from dataclasses import dataclass

import torch

from stable_megatron.methods import Field, Method, register


@dataclass
class AttnScaleConfig:
    enabled: bool = False
    factor: float = 0.5


class ScaledProj(torch.nn.Module):
    def __init__(self, input_size, output_size, *, linear, factor, config, **kwargs):
        from megatron.core.transformer.spec_utils import build_module

        super().__init__()
        self.linear = build_module(linear, input_size, output_size, config=config, **kwargs)
        self.factor, self.last_rms = factor, None

    def forward(self, x):
        out, bias = self.linear(x)
        out = (out if bias is None else out + bias) * self.factor
        self.last_rms = out.detach().square().mean().sqrt()
        return out, None


class AttnScale(Method):
    name = "attn_scale"
    fields = (Field("attn_scale", AttnScaleConfig),)
    variants = {"attn_scale": {"attn_scale": {"enabled": True}}}

    def enabled(self, cfg):
        return cfg.model.attn_scale.enabled

    def validate(self, cfg, world_size):
        from stable_megatron.config import ConfigError

        if not cfg.model.attn_scale.factor > 0:
            raise ConfigError(f"model.attn_scale.factor={cfg.model.attn_scale.factor}: must be > 0")

    def edit_layer(self, slots, cfg, layer_number):
        from megatron.core.transformer.spec_utils import ModuleSpec

        factor = cfg.model.attn_scale.factor
        slots.proj = ModuleSpec(module=ScaledProj, params={"linear": slots.proj, "factor": factor})

    def add_metrics(self, contrib, parts, cfg):
        for layer in parts.layers.values():
            contrib.max("attn_scale/out_rms_max", layer.self_attention.linear_proj.last_rms)


register(AttnScale())
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy module in a temporary package, importable here and in launched processes."""
    from stable_megatron import methods

    package = tmp_path / "toy_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "attn_scale.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(methods.PLUGINS_ENV, "toy_methods.attn_scale")
    methods.methods()  # the built-in ones first, so that the toy comes last as in a new process
    importlib.import_module("toy_methods.attn_scale")
    yield methods.get("attn_scale")
    methods.unregister("attn_scale")
    sys.modules.pop("toy_methods.attn_scale", None)
    sys.modules.pop("toy_methods", None)


def test_the_toy_method_is_validated(toy):
    from stable_megatron.config import ConfigError, load_config, validate

    cfg = load_config(TINY, ["model.attn_scale.enabled=true"])
    validate(cfg, 1)
    assert cfg.model.attn_scale.factor == 0.5 and cfg.to_dict()["model"]["attn_scale"] == {
        "enabled": True, "factor": 0.5}
    with pytest.raises(ConfigError, match=r"model.attn_scale.factor=-1.0: must be > 0"):
        validate(load_config(TINY, ["model.attn_scale.factor=-1"]), 1)
    with pytest.raises(ConfigError, match=r"unknown key model.attn_scale.scale"):
        load_config(TINY, ["model.attn_scale.scale=2"])
    with pytest.raises(ConfigError, match=r"unknown key model.attn_scal\b.*attn_scale"):
        load_config(TINY, ["model.attn_scal.factor=2"])


@pytest.mark.distributed
def test_the_toy_method_trains_at_tp2_logs_its_metric_and_is_refused_by_gpt2_export(
        toy, tmp_path, data_cache):
    from stable_megatron.checkpoint.export import NotExpressibleError, export_hf_gpt2
    from stable_megatron.checkpoint.view import open_checkpoint, read_tensors

    run_dir = tmp_path / "run"
    torchrun(ROOT / "stable_megatron" / "train.py", 2, [
        str(TINY), "parallel.tp=2", "train.steps=2", "metrics.interval=1",
        "model.attn_scale.enabled=true", "model.attn_scale.factor=0.25",
        f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}", *SMALL])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r and "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0 < r["attn_scale/out_rms_max"] < 10 for r in steps)

    ckpt = open_checkpoint(run_dir / "checkpoints")
    assert ckpt.config.model.attn_scale.factor == 0.25  # the config saved with the checkpoint
    infos, _ = read_tensors(ckpt, merge=False)
    assert any(t.name.endswith("linear_proj.linear.weight") for t in infos)  # the spec change
    with pytest.raises(NotExpressibleError, match=r"model.attn_scale"):
        export_hf_gpt2(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
