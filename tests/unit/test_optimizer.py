"""`train.make_optimizer`, the one place the AdamW kernel is chosen: the per-parameter loop on
CPU, torch's fused kernel on CUDA (checked with the device faked: no CUDA tensor is made)."""

from __future__ import annotations

import torch

from stable_megatron.config import config_from_dict
from stable_megatron.train import make_optimizer, param_groups


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def _cfg():
    return config_from_dict({"train": {"lr": 3e-3, "weight_decay": 0.05, "adam_beta1": 0.8,
                                       "adam_beta2": 0.9, "adam_eps": 1e-7}})


def test_cpu_keeps_the_per_parameter_loop():
    model, cfg = _model(), _cfg()
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["foreach"] is False
    assert not opt.defaults["fused"]
    assert opt.defaults["lr"] == 3e-3 and opt.defaults["betas"] == (0.8, 0.9)
    assert opt.defaults["eps"] == 1e-7
    expected = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for group, want in zip(opt.param_groups, expected, strict=True):
        assert [id(p) for p in group["params"]] == [id(p) for p in want["params"]]


def test_cuda_asks_for_the_fused_kernel():
    """With the device type cuda (faked: the parameters stay on the CPU, where torch's fused
    AdamW also exists), the fused kernel is requested and foreach is left alone."""
    model, cfg = _model(), _cfg()
    opt = make_optimizer(model, cfg, torch.device("cuda", 1))
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["fused"] is True
    assert not opt.defaults["foreach"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_fused_and_loop_take_the_same_step():
    """The two kernels compute the same AdamW update (here both on the CPU)."""
    cfg = _cfg()
    models = [_model(), _model()]
    opts = [make_optimizer(models[0], cfg, torch.device("cpu")),
            make_optimizer(models[1], cfg, torch.device("cuda"))]
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
