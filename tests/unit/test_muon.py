"""Muon (stable_megatron/muon.py): the Newton-Schulz iteration against an SVD, the update of
one matrix by hand, the fused QKV orthogonalised as Q, K and V, which parameters land in which
group, and the AdamW groups exactly torch's AdamW."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stable_megatron import muon
from stable_megatron.config import ConfigError, config_from_dict, validate

# The band the quintic coefficients (3.4445, -4.7750, 2.0315) leave the singular values in
# after five steps, for singular values down to 1e-2 of the largest (measured in
# test_newton_schulz_is_the_polar_factor_to_the_coefficients_band; Keller Jordan reports
# roughly U(0.5, 1.5), "which turns out not to hurt").
BAND = (0.6, 1.25)


def matrix_with_spectrum(rows: int, cols: int, spectrum: torch.Tensor, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    k = min(rows, cols)
    return (u[:, :k] * spectrum) @ v[:, :k].T


@pytest.mark.parametrize("rows,cols", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_is_the_polar_factor_to_the_coefficients_band(rows, cols):
    k = min(rows, cols)
    spectrum = torch.logspace(0, -2, k, dtype=torch.float64) * 7.0  # 1e-2 .. 1 of the largest
    g = matrix_with_spectrum(rows, cols, spectrum).float()
    x = muon.newton_schulz(g).double()
    assert x.dtype == torch.float64 and x.shape == g.shape
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    # the same singular vectors as g (U^T X V diagonal) ...
    inner = u.T @ x @ vh.T
    off = inner - torch.diag(torch.diagonal(inner))
    assert off.norm() < 1e-3 * inner.norm()
    # ... and singular values in the band, where the exact polar factor has all ones
    sv = torch.linalg.svdvals(x)
    assert BAND[0] < sv.min() and sv.max() < BAND[1], sv
    polar = u @ vh
    assert (x - polar).norm() / polar.norm() < 0.3
    assert 0.05 < muon.orthogonality_residual(x) < 0.5


def test_more_steps_of_an_exact_iteration_would_converge_but_the_quintic_does_not():
    """The band is the coefficients' (not too few steps): 20 steps leave it as wide."""
    g = matrix_with_spectrum(32, 32, torch.logspace(0, -2, 32, dtype=torch.float64)).float()
    sv5, sv20 = (torch.linalg.svdvals(muon.newton_schulz(g, n)) for n in (5, 20))
    assert sv20.max() - sv20.min() > 0.2 and sv5.max() - sv5.min() > 0.2


def test_newton_schulz_refuses_a_vector():
    with pytest.raises(ValueError, match="needs a matrix"):
        muon.newton_schulz(torch.ones(4))


def test_the_scale_gives_adamws_rms():
    x = muon.newton_schulz(torch.randn(96, 24, generator=torch.Generator().manual_seed(1)))
    exact = torch.linalg.svd(x, full_matrices=False)
    polar = exact.U @ exact.Vh
    rms = (polar * muon.update_scale(96, 24)).pow(2).mean().sqrt()
    assert rms.item() == pytest.approx(0.2, rel=1e-5)


def test_a_fused_qkv_is_orthogonalised_as_q_k_and_v():
    heads, head_dim, hidden = 3, 4, 12
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(heads, head_dim, hidden, generator=gen) for _ in range(3))
    fused = torch.stack([q, k, v], dim=1).reshape(heads * 3 * head_dim, hidden)  # [q_h; k_h; v_h]
    got = muon.orthogonal_update(fused, muon.Matrix(qkv_heads=heads)).reshape(
        heads, 3, head_dim, hidden)
    for i, part in enumerate((q, k, v)):
        want = muon.newton_schulz(part.reshape(-1, hidden)) * muon.update_scale(hidden, hidden)
        torch.testing.assert_close(got[:, i].reshape(-1, hidden), want)
    whole = muon.newton_schulz(fused) * muon.update_scale(*fused.shape)
    assert not torch.allclose(got.reshape(fused.shape), whole, atol=1e-3)


def test_one_step_by_hand():
    """Momentum, Nesterov, decoupled weight decay, the scaled orthogonal update; two steps."""
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(8, 5))
    w0 = w.detach().clone()
    opt = muon.MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.1, "lr": 0.02}],
                         {id(w): muon.Matrix()}, lr=1.0, betas=(0.9, 0.95), eps=1e-8,
                         momentum=0.9)
    grads = [torch.randn(8, 5), torch.randn(8, 5)]
    buf, want = torch.zeros(8, 5), w0.clone()
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        u = g + 0.9 * buf
        want = want * (1 - 0.02 * 0.1) - 0.02 * muon.newton_schulz(u) * 0.2 * math.sqrt(8)
        torch.testing.assert_close(w.detach(), want)
    assert opt.state[w]["exp_avg"].equal(buf) and int(opt.state[w]["step"]) == 2


def _two_groups(seed: int):
    torch.manual_seed(seed)
    a, b = torch.nn.Linear(6, 4), torch.nn.LayerNorm(4)
    return a, b


@pytest.mark.parametrize("decay_here", [False, True])
def test_the_adamw_groups_are_torchs_adamw(decay_here):
    """AdamW's groups as torch steps them; with `decay_here`, one group whose weight decay
    MuonAdamW applies per parameter (`decay`), as torch does with two groups."""
    (a1, n1), (a2, n2) = _two_groups(4), _two_groups(4)
    if decay_here:
        groups = [{"params": [a1.bias, n1.weight, n1.bias], "muon": False, "weight_decay": 0.0}]
        decay = {id(a1.bias): 0.05, id(n1.weight): 0.05}
    else:
        groups = [{"params": [a1.bias, n1.weight], "muon": False, "weight_decay": 0.05},
                  {"params": [n1.bias], "muon": False, "weight_decay": 0.0}]
        decay = {}
    ours = muon.MuonAdamW([{"params": [a1.weight], "muon": True, "weight_decay": 0.1}, *groups],
                          {id(a1.weight): muon.Matrix()}, lr=1e-2, betas=(0.8, 0.9), eps=1e-7,
                          decay=decay)
    ref = torch.optim.AdamW([{"params": [a2.bias, n2.weight], "weight_decay": 0.05},
                             {"params": [n2.bias], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.8, 0.9), eps=1e-7, fused=True)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for params in ([a1.bias, n1.weight, n1.bias, a1.weight],
                       [a2.bias, n2.weight, n2.bias, a2.weight]):
            gen.manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
        ours.step()
        ref.step()
    for p, q in zip([a1.bias, n1.weight, n1.bias], [a2.bias, n2.weight, n2.bias], strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(a1.weight, a2.weight)  # Muon moved it; the reference did not


def test_a_loaded_state_continues_the_same_steps():
    def run(steps, state=None):
        torch.manual_seed(5)
        lin = torch.nn.Linear(6, 4)
        opt = muon.MuonAdamW([{"params": [lin.weight], "muon": True, "weight_decay": 0.1},
                              {"params": [lin.bias], "muon": False, "weight_decay": 0.0}],
                             {id(lin.weight): muon.Matrix()}, lr=1e-2, betas=(0.9, 0.95),
                             eps=1e-8)
        if state is not None:
            lin.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        for step in steps:
            gen = torch.Generator().manual_seed(step)
            for p in (lin.weight, lin.bias):
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return lin, opt

    straight, _ = run(range(4))
    half, opt = run(range(2))
    resumed, _ = run(range(2, 4), (half.state_dict(), opt.state_dict()))
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# --------------------------------------------------------------------------------------------
# Which parameter lands in which group


def _cfg(model=None, train=None):
    cfg = config_from_dict({
        "data": {"vocab_size": 100},
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "seq_length": 8, **(model or {})},
        "train": {"micro_batch_size": 2, "global_batch_size": 2, "optimizer": "muon",
                  "lr": 1e-3, "muon_lr": 0.02, "muon_weight_decay": 0.05, **(train or {})},
    })
    validate(cfg, 1)
    return cfg


def _split(cfg, state):
    from stable_megatron.engine import make_muon
    from stable_megatron.model.gpt import build_model

    model = build_model(cfg, state.topology, state.device)
    opt = make_muon(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_group = [g for g in opt.param_groups if g["muon"]]
    assert len(opt.param_groups) == 2  # the same two groups on every pipeline stage
    assert len(muon_group) == 1 and muon_group[0]["lr"] == 0.02
    assert muon_group[0]["weight_decay"] == 0.05
    # AdamW's decay (train.weight_decay, 0.1 by default) on its matrices: the embedding
    # tables (and MLRA's factors)
    decayed = {names[i] for i, wd in opt.decay.items() if wd == 0.1}
    assert decayed == {n for n, p in model.named_parameters()
                       if p.dim() >= 2 and id(p) not in opt.matrices}
    got = {names[id(p)] for p in muon_group[0]["params"]}
    adamw = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert not got & adamw and got | adamw == set(names.values())
    assert all(g["lr"] == 1e-3 for g in opt.param_groups if not g["muon"])
    return got, adamw, opt, model


@pytest.mark.parametrize("model,muon_suffixes,adamw_extra", [
    ({}, {"linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight"},
     set()),
    ({"sigma_reparam": {"enabled": True}},
     {"linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight"},
     {"gamma"}),
    ({"attention_gate": True},
     {"linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight",
      "linear_gate.weight"}, set()),
    ({"attention": "mlra", "mlra": {"targets": ["q", "k", "v", "o"], "rank": 4}},
     {"linear_fc1.weight", "linear_fc2.weight"}, {"lowrank_b"}),
])
def test_the_group_split(one_process, model, muon_suffixes, adamw_extra):
    got, adamw, opt, gpt = _split(_cfg(model), one_process)
    suffix = {".".join(n.split(".")[-2:]) if not n.endswith(("gamma", "lowrank_b"))
              else n.split(".")[-1] for n in got}
    assert suffix == muon_suffixes, sorted(got)
    assert len(got) == 2 * len(muon_suffixes)  # both layers
    assert all(n.startswith(("1.", "2.")) for n in got)  # the layers' (embedding is 0.)
    assert {n for n in adamw if "word_embeddings" in n} and not any("embedding" in n for n in got)
    for extra in adamw_extra:
        assert any(n.endswith(extra) for n in adamw), (extra, sorted(adamw))
    qkv = [p for n, p in gpt.named_parameters() if n.endswith("linear_qkv.weight")]
    for p in qkv:
        assert opt.matrices[id(p)] == muon.Matrix(partition_dim=0, qkv_heads=4)


def test_untied_output_layer_and_norms_take_adamw(one_process):
    got, adamw, _, _ = _split(_cfg({"tie_embeddings": False}), one_process)
    assert any("output_layer" in n for n in adamw)
    assert any("layernorm" in n.lower() or "norm" in n for n in adamw)
    assert not any("norm" in n or n.endswith("bias") for n in got)


@pytest.mark.parametrize("train,message", [
    ({"muon_momentum": 1.0}, "train.muon_momentum=1.0: must be in"),
    ({"muon_ns_steps": 0}, "train.muon_ns_steps=0: must be >= 1"),
    ({"muon_lr": 0.0}, "train.muon_lr=0.0: must be > 0"),
    ({"linear_lr_scale": 2.0}, "train.linear_lr_scale=2.0 with train.optimizer=muon"),
])
def test_bad_muon_settings_are_one_line(train, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("=", "=")):
        _cfg(train=train)


def test_bf16_steps_the_fp32_partitions_and_logs_the_residual(tmp_path, data_cache):
    """Under bf16 the optimizer steps ZeRO's fp32 master partitions (Newton-Schulz in fp32
    whatever the precision) and the Trainer logs Muon's residual on metric steps."""
    from stable_megatron import ds_adapter, parallel
    from stable_megatron.config import load_config
    from stable_megatron.train import Trainer

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "recipes" / "methods" / "muon.yaml", [
        "train.precision=bf16", "model.num_layers=2", "model.hidden_size=64",
        "model.num_attention_heads=4", "model.seq_length=32", "data.vocab_size=1024",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_interval=0",
        "metrics.interval=2", "logging.tensorboard=false", "logging.progress=false",
        f"data.cache_dir={data_cache}", f"train.run_dir={tmp_path / 'run'}"])
    validate(cfg, 1)
    try:
        trainer = Trainer(cfg)
        records = [trainer.train_one_step() for _ in range(2)]
        opt = ds_adapter.base_optimizer(trainer.engine)
        assert isinstance(opt, muon.MuonAdamW)
        assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
        assert next(trainer.engine.module.parameters()).dtype == torch.bfloat16
        assert all(math.isfinite(r["loss"]) for r in records)
        assert "muon/ns_residual" not in records[0]  # step 1 is not a metric step
        assert 0 < records[1]["muon/ns_residual"] <= records[1]["muon/ns_residual_max"] < 2
    finally:
        parallel.shutdown()
