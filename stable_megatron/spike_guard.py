"""The spike guard: judges each step's loss and grad norm inside DeepSpeed's optimizer step,
before the update, and drops the update when asked to (`stability.on_spike` skip/rollback).

DeepSpeed's ZeRO optimizer already drops the update of a step whose gradients are not finite
("overflow": no optimizer step, no LR-scheduler step, `engine.skipped_steps += 1`) on every
rank together. The guard joins that path at its two decision points:

- `scaled_global_norm` (every rank, after the gradients are reduced): the guard all-reduces
  the step's loss (a scalar, from the last pipeline stage) over the world and scores it with
  the global grad norm, which is already identical on every rank;
- `check_overflow`, which runs first when DeepSpeed checks the gradients for inf/NaN itself
  (fp16; bf16, where we switch it on): on an overflow DeepSpeed skips the norm, so the step
  is judged there, with an infinite grad norm.

A spike sets the optimizer's `overflow` flag, so DeepSpeed itself skips the update. Every rank
scores the same numbers with the same history, so every rank decides the same without another
collective. Costs one scalar all-reduce per step.
"""

from __future__ import annotations

import torch

from stable_megatron import parallel
from stable_megatron.metrics.spikes import SpikeDetector, SpikeVerdict


class SpikeGuard:
    def __init__(self, cfg, state, engine) -> None:
        self.detector = SpikeDetector.from_config(cfg)
        self.enforce = cfg.stability.on_spike in ("skip", "rollback")
        self.engine, self.layout, self.device = engine, state.layout, state.device
        opt = engine.optimizer
        for name in ("check_overflow", "scaled_global_norm", "overflow"):
            if not hasattr(opt, name):
                raise RuntimeError(
                    f"spike guard: DeepSpeed optimizer {type(opt).__name__} has no {name} "
                    f"(ZeRO stage 1 expected)"
                )
        self._check_overflow, self._global_norm = opt.check_overflow, opt.scaled_global_norm
        opt.check_overflow = self._on_check_overflow
        opt.scaled_global_norm = self._on_global_norm
        self._verdict: SpikeVerdict | None = None

    def _step_loss(self) -> float:
        """This step's loss averaged over micro-batches and data-parallel ranks, on every rank:
        what `train_batch` returns, known before the update."""
        engine = self.engine
        local = 0.0
        if engine.is_last_stage() and self.layout.tp_rank == 0 and engine.total_loss is not None:
            local = float(engine.total_loss.detach().float().sum())
        buf = torch.tensor([local], dtype=torch.float64, device=self.device)
        parallel.all_reduce_(buf)
        return buf.item() / (self.layout.dp * engine.gradient_accumulation_steps())

    def _judge(self, grad_norm: float) -> None:
        verdict = self.detector.check_loss(self._step_loss())
        self.detector.check_grad_norm(verdict, grad_norm)
        self._verdict = verdict
        if verdict.is_spike and self.enforce:
            self.engine.optimizer.overflow = True

    def _on_check_overflow(self, *args, **kwargs):
        """Called when DeepSpeed checks gradients for inf/NaN itself (fp16, bf16 with
        check_grad_overflow); on overflow it skips the norm, so the step is judged here."""
        result = self._check_overflow(*args, **kwargs)
        if self.engine.optimizer.overflow:
            self._judge(float("inf"))
        return result

    def _on_global_norm(self, *args, **kwargs):
        norm = self._global_norm(*args, **kwargs)
        if self._verdict is None:
            self._judge(float(norm))
        return norm

    def finish(self) -> SpikeVerdict:
        """The verdict on the step just taken; a healthy step joins the history."""
        verdict, self._verdict = self._verdict, None
        if verdict is None:
            raise RuntimeError("spike guard: the optimizer step did not run")
        self.detector.accept(verdict)
        return verdict
