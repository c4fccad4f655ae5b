"""Activation recompute (`train.recompute`, model/recompute.py) on one process, fp32, CPU.

Losses and every parameter gradient with full and selective recompute are bitwise equal to no
recompute (torch.equal: the recompute runs the same ops on the same inputs with the same RNG
states, and the backward then consumes the same tensors in the same order), for the baseline,
the baseline on the exact attention path, and a model with the stability methods on; with
hidden dropout on, so that the recompute must draw the same masks. The counting tests fail if
nothing is recomputed; the engine test runs the pipeline engine with the stability metrics."""

from __future__ import annotations

import pytest
import torch

from stable_megatron.config import ConfigError, config_from_dict, validate
from tests.distributed.parity_worker import RandomTokens

VOCAB, LAYERS, HEADS, HIDDEN, SEQ = 200, 2, 4, 32, 16
MODELS = {
    "baseline": {},  # SDPA on CPU: selective leaves the fused kernel alone
    "baseline_math_dropout": {"attention_backend": "math", "hidden_dropout": 0.1},
    "methods": {
        "norm_placement": "qk_norm", "softmax_cap": 2.0, "attention": "mlra",
        "sigma_reparam": {"enabled": True, "targets": ["proj", "fc1", "fc2"],
                          "init_iters": 20},
        "position_embedding": "rope", "hidden_dropout": 0.1,
    },
}
MODES = ("none", "selective", "full")


def make_config(model: dict, recompute: str, **train):
    cfg = config_from_dict({
        "data": {"vocab_size": VOCAB},
        "model": {"num_layers": LAYERS, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
                  "seq_length": SEQ, "init_std": 0.2, **model},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 0,
                  "recompute": recompute, **train},
        "metrics": {"interval": 1},
    })
    validate(cfg, 1)
    return cfg


@pytest.fixture(scope="module")
def state(one_process):
    return one_process


def micro_batches(cfg, state, count: int = 2):
    from stable_megatron.train import micro_batches

    return list(micro_batches(RandomTokens(VOCAB, SEQ, seed=3), 0, cfg, state.layout,
                              state.device, count))


def forward_backward(cfg, state):
    """Losses, gradients (by name) and the CPU RNG state after 2 micro-batches of a fresh
    model, forward and backward with autograd (no engine)."""
    from stable_megatron.model.gpt import build_model, lm_loss

    model = build_model(cfg, state.topology, state.device)
    data = micro_batches(cfg, state)
    torch.manual_seed(99)  # the dropout masks
    losses = []
    for tokens, labels in data:
        loss = lm_loss(model(tokens), labels)
        (loss / len(data)).backward()
        losses.append(loss.detach())
    grads = {n: p.grad for n, p in model.named_parameters()}
    return model, losses, grads, torch.get_rng_state()


@pytest.fixture(scope="module", params=list(MODELS))
def runs(request, state):
    return request.param, {mode: forward_backward(make_config(MODELS[request.param], mode), state)
                           for mode in MODES}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_losses_and_gradients_equal_no_recompute(runs, mode):
    name, by_mode = runs
    _, losses, grads, rng = by_mode["none"]
    _, got_losses, got_grads, got_rng = by_mode[mode]
    assert all(torch.equal(a, b) for a, b in zip(losses, got_losses, strict=True))
    assert grads.keys() == got_grads.keys()
    for param, grad in grads.items():
        assert grad is not None and torch.count_nonzero(grad) > 0, param
        assert torch.equal(grad, got_grads[param]), (name, mode, param)
    assert torch.equal(rng, got_rng)  # the recompute leaves the generator where it was


def test_the_slot_holds_the_recomputed_kernel_only_where_it_materialises(runs):
    from stable_megatron.model.attention import MathAttention, SdpaAttention

    name, by_mode = runs
    for mode, (model, *_rest) in by_mode.items():
        kernels = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
        assert len(kernels) == LAYERS
        for kernel in kernels:
            recomputed = getattr(kernel, "recomputed", False)
            fused = isinstance(kernel, SdpaAttention)
            assert recomputed == (mode == "selective" and not fused), (name, mode)
            assert isinstance(kernel, SdpaAttention if name == "baseline" else MathAttention)


def _count_calls(cfg, state, monkeypatch):
    """Per step of 2 micro-batches: calls of a layer's forward, of the exact kernel's forward,
    of a forward hook on a linear inside the layer and of the attention capture hook."""
    from stable_megatron.model.attention import MathAttention
    from stable_megatron.model.gpt import TransformerLayerPipe, build_model, lm_loss

    counts = {"layer": 0, "kernel": 0, "hook": 0, "capture": 0}
    kernel_forward = MathAttention.forward

    def counting_kernel(self, q, k, v):
        counts["kernel"] += 1
        return kernel_forward(self, q, k, v)

    monkeypatch.setattr(MathAttention, "forward", counting_kernel)
    model = build_model(cfg, state.topology, state.device)
    pipe = next(m for m in model.modules() if isinstance(m, TransformerLayerPipe))
    layer = pipe.layer
    layer.register_forward_pre_hook(lambda *_: counts.__setitem__("layer", counts["layer"] + 1))
    layer.self_attention.linear_qkv.register_forward_hook(
        lambda *_: counts.__setitem__("hook", counts["hook"] + 1))
    layer.self_attention.set_capture_hook(
        "test", lambda _: counts.__setitem__("capture", counts["capture"] + 1))
    for tokens, labels in micro_batches(cfg, state):
        lm_loss(model(tokens), labels).backward()
    assert layer.self_attention.linear_qkv._forward_hooks  # restored after the recompute
    assert layer.self_attention.capture_hooks
    with torch.no_grad():  # evaluation: nothing recomputed
        before = dict(counts)
        model(micro_batches(cfg, state, 1)[0][0])
        assert counts["layer"] == before["layer"] + 1
    return before


@pytest.mark.parametrize("mode, layer, kernel", [
    ("none", 2, 2), ("selective", 2, 4), ("full", 4, 4)])
def test_recompute_runs_the_forward_again_and_observers_see_it_once(
        state, monkeypatch, mode, layer, kernel):
    cfg = make_config(MODELS["baseline_math_dropout"], mode)
    counts = _count_calls(cfg, state, monkeypatch)
    # 2 micro-batches; `kernel` counts the exact kernel of every layer
    assert counts == {"layer": layer, "kernel": kernel * LAYERS, "hook": 2, "capture": 2}


def test_engine_step_and_metrics_equal_no_recompute(state):
    """One training step of the pipeline engine with the stability metrics: the same loss,
    updated weights and logged metrics with every mode."""
    from stable_megatron.hooks import StepRunner
    from stable_megatron.methods.sigma_reparam import PowerIteration
    from stable_megatron.metrics import StabilityMetrics
    from stable_megatron.train import build_engine

    results = {}
    for mode in MODES:
        cfg = make_config(MODELS["methods"], mode)
        engine = build_engine(cfg, state)
        runner = StepRunner(engine, [PowerIteration(engine.module),
                                     StabilityMetrics(cfg, state, engine)])
        torch.manual_seed(5)
        loss = runner.step(1, iter(micro_batches(cfg, state)))
        record: dict = {}
        runner.after_step(1, record)
        runner.remove()
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        results[mode] = (torch.as_tensor(loss).clone(), weights, record)
    loss, weights, record = results["none"]
    assert any(key.startswith("out_norm/") for key in record)
    assert any(key.startswith("attn_entropy/") for key in record)
    for mode in ("selective", "full"):
        got_loss, got_weights, got_record = results[mode]
        assert torch.equal(loss, got_loss), mode
        assert all(torch.equal(w, got_weights[n]) for n, w in weights.items()), mode
        assert got_record == record, mode


@pytest.mark.parametrize("value", ["partial", "yes", True])
def test_invalid_mode_is_a_one_line_error(value):
    with pytest.raises(ConfigError, match="train.recompute") as err:
        make_config({}, value)
    assert "\n" not in str(err.value)
    assert all(mode in str(err.value) for mode in MODES)
