"""Worker for the tensor-parallel z-loss test: at TP=2 each rank takes its vocabulary columns
of one fixed set of logits, runs `model.loss.LMLoss` (z-loss on, output-logit capture on)
forward and backward, and saves the loss, its z-loss term, its gradient columns and its logit
statistics to OUT_DIR/rank<r>.pt. The test compares them with the whole logits in one process.

usage: torchrun --nproc_per_node 2 zloss_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SEQ, BATCH, VOCAB, REAL, COEF = 5, 3, 48, 45, 0.25  # columns REAL.. are padding


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=g) * 6.0
    labels = torch.randint(0, REAL, (BATCH, SEQ), generator=g)
    return logits, labels


def main() -> None:
    from stable_megatron import parallel
    from stable_megatron.model.loss import LMLoss

    out = Path(sys.argv[1])
    state = parallel.initialize(2, 1, "cpu")
    try:
        rank, width = state.layout.tp_rank, VOCAB // 2
        logits, labels = inputs()
        mine = logits[..., rank * width:(rank + 1) * width].clone().requires_grad_()
        loss_fn = LMLoss(COEF, vocab=REAL)
        loss_fn.start_capture()
        loss = loss_fn(mine, labels)
        loss.backward()
        (term,) = loss_fn.take_z_loss()
        peak, total, count = loss_fn.take_logit_stats()
        torch.save({"loss": loss.detach(), "z_loss": term, "grad": mine.grad,
                    "max": peak, "sum": total, "count": count}, out / f"rank{rank}.pt")
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()
