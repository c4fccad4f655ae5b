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


def test_linear_lr_scale_gives_the_linear_matrices_their_own_lr():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 8),
                                torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    cfg = config_from_dict({"train": {"lr": 1e-2, "weight_decay": 0.1,
                                      "linear_lr_scale": 0.25}})
    opt = make_optimizer(model, cfg)
    decay, no_decay, linear = opt.param_groups
    assert [id(p) for p in decay["params"]] == [id(model[0].weight)]
    assert [id(p) for p in linear["params"]] == [id(model[1].weight), id(model[3].weight)]
    assert len(no_decay["params"]) == 4  # the biases and the norm's weight and bias
    assert (decay["lr"], no_decay["lr"], linear["lr"]) == (1e-2, 1e-2, 2.5e-3)
    assert linear["weight_decay"] == decay["weight_decay"] == 0.1
    # the schedule scales every group alike, so the ratio holds at every step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        opt.step()
        sched.step()
    assert linear["lr"] == 0.25 * decay["lr"] == 0.25 * 1e-2 * 0.5 ** 3
    # at 1 (the default) there is no third group
    assert len(make_optimizer(model, _cfg()).param_groups) == 2
