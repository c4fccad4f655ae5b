"""z-loss over vocabulary-parallel logits at TP=2 against the whole logits in one process: the
loss, the z-loss term, the gradient (each rank's columns of the full gradient) and the
output-logit statistics (padding columns left out)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.launch import torchrun
from tests.distributed.zloss_worker import COEF, REAL, VOCAB, inputs

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("zloss_worker.py")


def test_tp2_equals_the_gathered_logits(tmp_path):
    torchrun(WORKER, 2, [str(tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    logits, labels = inputs()
    logits.requires_grad_()
    lse = torch.logsumexp(logits, dim=-1)
    z_term = COEF * lse.square().mean()
    loss = torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), labels) + z_term
    (grad,) = torch.autograd.grad(loss, logits)
    for r in ranks:  # the same loss on both ranks
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["z_loss"], z_term.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks], dim=-1), grad,
                               rtol=1e-5, atol=1e-7)
    real = logits.detach()[..., :REAL]
    assert max(r["max"] for r in ranks) == real.max()
    assert sum(r["count"] for r in ranks) == real.numel()
    assert ranks[1]["count"] == (REAL - VOCAB // 2) * real[..., 0].numel()  # padding left out
    torch.testing.assert_close(sum(r["sum"] for r in ranks) / real.numel(),
                               real.double().mean())
