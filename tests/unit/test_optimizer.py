"""`train.make_optimizer`, the one place the AdamW kernel is chosen: torch's fused kernel on
every device, which takes the same step as the per-parameter loop up to rounding."""

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


def test_the_fused_kernel_with_our_hyper_parameters_and_groups():
    model, cfg = _model(), _cfg()
    opt = make_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["fused"] is True
    assert not opt.defaults["foreach"]
    assert opt.defaults["lr"] == 3e-3 and opt.defaults["betas"] == (0.8, 0.9)
    assert opt.defaults["eps"] == 1e-7
    expected = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for group, want in zip(opt.param_groups, expected, strict=True):
        assert [id(p) for p in group["params"]] == [id(p) for p in want["params"]]


def test_fused_and_loop_take_the_same_steps():
    """Three steps of the fused kernel against torch's per-parameter loop (the CPU kernel
    before issue 13) from the same weights and gradients."""
    cfg = _cfg()
    models = [_model(), _model()]
    t = cfg.train
    loop = torch.optim.AdamW(param_groups(models[1], t.weight_decay), lr=t.lr,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, foreach=False)
    opts = [make_optimizer(models[0], cfg), loop]
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    moved = False
    for a, b, start in zip(models[0].parameters(), models[1].parameters(), _model().parameters(),
                           strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        moved |= not torch.equal(a, start)
    assert moved
