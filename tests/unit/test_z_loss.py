"""z-loss (`model.z_loss`, stable_megatron/model/loss.py) and the output-logit statistics,
against independent computations on the whole logits in one process. The vocabulary-parallel
version is checked at TP2 in tests/distributed/test_z_loss.py, the training path at every
layout in tests/distributed/test_parity.py and test_metrics_parity.py."""

from __future__ import annotations

import pytest
import torch

from stable_megatron.config import ConfigError, config_from_dict, validate
from stable_megatron.model.loss import LMLoss, vocab_parallel_logsumexp

pytestmark = pytest.mark.usefixtures("one_process")  # megatron-core's TP group (of one)


def _batch(seed: int = 0, s: int = 6, b: int = 3, v: int = 40, scale: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(s, b, v, generator=g) * scale).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    return logits, labels


def _independent(logits, labels, coef):
    """On the untouched logits: call it before ours (megatron-core's cross entropy writes
    the softmax into its input)."""
    ce = torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), labels)
    return ce + coef * torch.logsumexp(logits, dim=-1).square().mean()


def test_logsumexp_and_its_gradient_equal_torch():
    logits, _ = _batch(scale=30.0)  # large logits: the shifted sum must not overflow
    ours = vocab_parallel_logsumexp(logits)
    torch.testing.assert_close(ours, torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-5)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (want,) = torch.autograd.grad((torch.logsumexp(logits, -1) * weights).sum(), logits)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coef", [0.0, 1e-4, 0.5])
def test_loss_and_gradient_are_cross_entropy_plus_z_loss(coef):
    logits, labels = _batch()
    want = _independent(logits, labels, coef)
    (want_grad,) = torch.autograd.grad(want, logits)
    lse = torch.logsumexp(logits.detach(), -1)
    plain = _independent(logits.detach(), labels, 0.0)
    logits, labels = _batch()  # fresh: the cross entropy overwrites its input
    loss_fn = LMLoss(coef)
    loss = loss_fn(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    terms = loss_fn.take_z_loss()
    if coef:
        assert len(terms) == 1
        torch.testing.assert_close(terms[0], coef * lse.square().mean())
        assert (loss - plain).abs() > 1e-6  # the term counts
    else:
        assert terms == []
    assert loss_fn.take_z_loss() == []  # taken once


def test_evaluation_is_cross_entropy_only():
    """Without gradients (DeepSpeed's eval_batch) the z term is left out, so validation
    losses of runs with and without z-loss measure the same thing."""
    logits, labels = _batch()
    want = _independent(logits.detach(), labels, 0.0)
    loss_fn = LMLoss(0.5)
    with torch.no_grad():
        loss = loss_fn(*_batch())
    torch.testing.assert_close(loss, want)
    assert loss_fn.take_z_loss() == []


def test_logit_statistics_cover_the_tokenizer_ids_while_captured():
    loss_fn = LMLoss(0.0, vocab=33)  # columns 33..39 are padding
    loss_fn(*_batch(v=40))
    assert loss_fn.take_logit_stats() == (None, None, 0)  # no capture: nothing kept
    both = torch.cat([_batch(seed=s, v=40)[0].detach()[..., :33] for s in (0, 1)])
    loss_fn.start_capture()
    for seed in (0, 1):  # two micro-batches
        loss_fn(*_batch(seed=seed, v=40))
    peak, total, count = loss_fn.take_logit_stats()
    assert peak == both.max() and count == both.numel()
    torch.testing.assert_close(total / count, both.double().mean())
    loss_fn(*_batch(v=40))
    assert loss_fn.take_logit_stats() == (None, None, 0)  # the capture ended


@pytest.mark.parametrize("value", [-1e-4, float("nan"), float("inf")])
def test_bad_coefficient_is_refused(value):
    cfg = config_from_dict({"model": {"z_loss": value}, "data": {"vocab_size": 200}})
    with pytest.raises(ConfigError, match="model.z_loss"):
        validate(cfg, 1)
