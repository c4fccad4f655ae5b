"""Helpers shared by the benchmark scripts of tools/ (benchmark.py, bench_methods.py,
bench_metrics.py): each method's config overrides, a progress line, mixed precision for a
plain step, synthetic tokens, and the statistics and tables of their reports. Nothing in the
training code imports this module."""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.yaml"  # the scripts' default recipe



def method_overrides() -> dict[str, dict[str, Any]]:
    """Each benchmarked method's config overrides (the `model` section): the baseline, then
    every registered method's variants (`Method.variants`)."""
    from stable_megatron import methods

    return {"baseline": {}, **methods.variants()}


METHODS: dict[str, dict[str, Any]] = method_overrides()
# The optimizers other than AdamW, timed like a method (their overrides are `train` keys)
OPTIMIZERS: dict[str, dict[str, Any]] = {"muon": {"optimizer": "muon"}}

class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per update else."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.width = 0
        self.start = time.perf_counter()

    def __call__(self, message: str, detail: bool = False) -> None:
        """Show `message`; a `detail` message only where it can be overwritten (a terminal)."""
        if not self.enabled or (detail and not self.tty):
            return
        message = f"[bench {time.perf_counter() - self.start:4.0f}s] {message}"
        if self.tty:
            sys.stderr.write("\r" + message.ljust(self.width))
            self.width = len(message)
        else:
            sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
        self.width = 0


def quiet_imports() -> None:
    """Import-time notices from megatron-core/torch about GPU packages we do not use."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def prepare(device: str) -> None:
    """Before DeepSpeed is imported: name its accelerator on CPU (it guesses, noisily)."""
    from stable_megatron import parallel

    quiet_imports()
    if parallel.select_device(device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class Bf16Master:
    """Mixed precision for a plain step, as megatron-core's Float16Module with its fp32-master
    optimizer (and DeepSpeed's bf16 engine) do it: the model's parameters in bf16, `optimizer`
    over fp32 copies of them. `step()` moves the bf16 gradients onto the copies, clips them,
    steps and copies the weights back. (torch.autocast is no substitute: megatron-core's
    linear layers run their backward outside the CPU autocast state.)"""

    def __init__(self, model, optimizer) -> None:
        import torch

        self.optimizer, self.pairs = optimizer, []
        for group in optimizer.param_groups:  # before any step: the optimizer has no state yet
            masters = [p.detach().clone().float() for p in group["params"]]
            self.pairs += list(zip(group["params"], masters, strict=True))
            group["params"] = masters
        model.to(torch.bfloat16)  # in place: the model's Parameter objects stay the same
        self.masters = [m for _, m in self.pairs]

    def step(self, clip: float | None = None):
        """The optimizer step over the fp32 copies; the gradient norm if `clip`, else None."""
        import torch

        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        norm = torch.nn.utils.clip_grad_norm_(self.masters, clip) if clip else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in self.pairs:
                p.copy_(m)
        return norm


class SyntheticTokens:
    """Deterministic random token windows of `seq + 1` tokens (sample i depends on i only)."""

    def __init__(self, vocab: int, seq: int, seed: int = 0) -> None:
        self.vocab, self.seq, self.seed = vocab, seq, seed

    def __getitem__(self, i: int):
        import numpy as np

        return np.random.default_rng(self.seed + i).integers(0, self.vocab, self.seq + 1)


def iqr(values: list[float]) -> float:
    """Interquartile range (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows]]
