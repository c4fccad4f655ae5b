"""Training throughput of stable_megatron, against the references a user would otherwise run.

Our step is the training loop's: `train.build_engine` (DeepSpeed's engine, ZeRO-1 by default),
`train.micro_batches`, and a `hooks.StepRunner` with the Trainer's hooks (throughput, early
warning, divergence rule, sigma-reparam's power step, spike guard; not the stability metrics,
whose cost `tools/bench_metrics.py` measures), followed by the loss and grad-norm reads of the
step's log record. Data: synthetic token windows (`--data builtin`: the built-in corpus).

Reported per arm after warm-up: median step time, tokens/s, model TFLOP/s (the FLOPs per token
of `model.size.flops_per_token`, the same for every arm of one shape), MFU, data-wait fraction
(time in `micro_batches` / step time) and peak memory. MFU is against the known GPU peak
(`model.size.PEAK_TFLOPS`) or, on CPU, against the matmul rate this tool measures at the run's
dtype and thread count (printed).

Arms (`--vs`, any number), alternated step by step in one process (order rotating each round,
so load drift on a shared machine hits all alike):
- `plain`: a single-process PyTorch GPT of identical shape and math, written below (tied
  embeddings, learned positions, LayerNorm, GELU MLP, causal SDPA, AdamW with the same
  hyper-parameters and parameter groups, gradient clipping, the LR schedule);
- `mcore`: megatron-core's `GPTModel` from its stock local layer spec
  (`get_gpt_layer_local_spec`) with one change: the core attention is causal SDPA (the stock
  `DotProductAttention` materialises the score matrix; our model runs SDPA); plain step
  (forward, loss, backward, torch AdamW, clipping);
- `mcore-stock`: the same with the stock `DotProductAttention`, unchanged;
- `bare`: our own model (`model.gpt.build_model`) with the plain step of the references, no
  DeepSpeed engine: ours / bare is the engine's share, bare / plain the model's.
`--methods`: our step with each stability method's overrides (stable_megatron.bench.METHODS),
or with an optimizer other than AdamW (`muon`, stable_megatron.bench.OPTIMIZERS).

ZeRO stages: `--methods zero0,zero2,zero3` adds each stage as an arm beside ours (the recipe's
stage, 1) and prints each against the references (`--vs mcore`): step time and peak memory at
DP1; `--zero` runs each stage at DP2 (2 processes of 1 thread, one launch per stage; `--zero-dp 4`:
4 processes sharing the 2 cores) and reports each rank's model-state memory (the bytes of the
tensors alive between steps).

Modes: `--parallel` (TP2, PP2, DP2 on 2 processes of 1 thread against world 1 with 2 threads,
each in its own launch), `--zero`, `--growth` (step time against sequence length and hidden
size beside the FLOPs), `--profile` (a torch.profiler table of one step of each arm).

    python tools/benchmark.py --shape tiny --vs plain --vs mcore
    python tools/benchmark.py --shape medium --vs plain --vs mcore --profile
    python tools/benchmark.py --shape medium --methods all
    python tools/benchmark.py --shape medium --parallel
    python tools/benchmark.py --shape medium --vs mcore --methods zero0,zero2,zero3
    python tools/benchmark.py --shape medium --zero
    python tools/benchmark.py --growth
    python tools/benchmark.py --shape tiny model.num_layers=2 train.micro_batch_size=8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stable_megatron.bench import (
    METHODS,
    OPTIMIZERS,
    RECIPE,
    ROOT,
    Bf16Master,
    Progress,
    SyntheticTokens,
    iqr,
    prepare,
)
from stable_megatron.bench import table as md_table
from stable_megatron.hooks import StepHook

SHAPES: dict[str, list[str]] = {
    "recipe": [],  # --recipe's own shape
    "tiny": [],  # the recipe: 4 layers, hidden 256, 4 heads, seq 128, 2 x 16 sequences
    "medium": [  # matmul-bound: 8 layers x 512, seq 512, 2 micro-batches of 2 sequences
        "model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8",
        "model.seq_length=512", "train.micro_batch_size=2", "train.global_batch_size=4",
    ],
}
REFERENCES = ("plain", "mcore", "mcore-stock", "bare")
TARGET_RATIO = 1.0  # ours / reference
TARGET_DATA_WAIT = 0.02
# --parallel: (label, tp, pp, processes); dp is what is left
LAYOUTS = (("TP2", 2, 1, 2), ("PP2", 1, 2, 2), ("DP2", 1, 1, 2))
# --growth: 4 layers, heads of 64; the sequence sweep at hidden 512 and 2048 tokens per step,
# the hidden sweep at seq 512 and 1024 tokens per step (one micro-batch each)
GROWTH_SEQ = (128, 256, 512, 1024)
GROWTH_HIDDEN = (128, 256, 512, 1024)
GROWTH_LAYERS = 4


def growth_points() -> list[tuple[str, int, list[str]]]:
    points = []
    for seq in GROWTH_SEQ:
        mbs = 2048 // seq
        points.append(("seq", seq, [
            f"model.num_layers={GROWTH_LAYERS}", "model.hidden_size=512",
            "model.num_attention_heads=8", f"model.seq_length={seq}",
            f"train.micro_batch_size={mbs}", f"train.global_batch_size={mbs}"]))
    for hidden in GROWTH_HIDDEN:
        points.append(("hidden", hidden, [
            f"model.num_layers={GROWTH_LAYERS}", f"model.hidden_size={hidden}",
            f"model.num_attention_heads={hidden // 64}", "model.seq_length=512",
            "train.micro_batch_size=2", "train.global_batch_size=2"]))
    return points


# --------------------------------------------------------------------------------------------
# Config, data, memory, matmul rate


def zero_stage_of(name: str) -> int | None:
    """The ZeRO stage of a `--methods` entry `zero0` .. `zero3`, else None."""
    if len(name) == 5 and name.startswith("zero") and name[4] in "0123":
        return int(name[4])
    return None


def method_overrides(method: str) -> list[str]:
    """bench_methods' `model` overrides of a method (or the `train` overrides of an optimizer
    of `OPTIMIZERS`, or `parallel.zero_stage` for `zero0` .. `zero3`) as dotted `key=value`
    strings."""
    if zero_stage_of(method) is not None:
        return [f"parallel.zero_stage={zero_stage_of(method)}"]
    if method in OPTIMIZERS:
        return [f"train.{k}={v}" for k, v in OPTIMIZERS[method].items()]
    if method not in METHODS:
        raise ValueError(f"unknown method {method}; valid: {', '.join(METHODS)}, all")

    def flat(prefix: str, value: Any) -> list[str]:
        if isinstance(value, dict):
            return [o for k, v in value.items() for o in flat(f"{prefix}.{k}", v)]
        return [f"{prefix}={json.dumps(value) if isinstance(value, list) else value}"]

    return flat("model", METHODS[method]) if METHODS[method] else []


def make_config(recipe: str | Path, shape: str, overrides: list[str], world: int = 1):
    from stable_megatron.config import load_config, validate

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape}; valid: {', '.join(SHAPES)}")
    cfg = load_config(recipe, [*SHAPES[shape], *overrides])
    validate(cfg, world)
    return cfg


def dataset_for(cfg, kind: str):
    if kind == "synthetic":
        return SyntheticTokens(cfg.model.vocab_size, cfg.model.seq_length)
    from stable_megatron.batches import resolve_data
    from stable_megatron.data.dataset import TokenWindowDataset

    sources = resolve_data(cfg)
    return TokenWindowDataset(sources.train_prefix, cfg.model.seq_length, seed=cfg.train.seed)


class TimedBatches:
    """An iterator over micro-batches that adds the time spent producing each to `seconds`."""

    def __init__(self, iterator) -> None:
        self.iterator, self.seconds = iterator, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - start


def _proc_status(field: str) -> int | None:
    """A `/proc/self/status` memory field in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a stretch of work, above what was in use when it started. CUDA:
    `max_memory_allocated`; CPU: the resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs), or `ru_maxrss` where the mark cannot be reset."""

    def __init__(self, device) -> None:
        self.device = device
        self.kind = ""

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda max_memory_allocated above the start"
            return
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.before = _proc_status("VmRSS")
            self.kind = "peak resident set (VmHWM) above the start"
            self.reset = True
        except OSError:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.kind = "ru_maxrss increase (process high-water mark)"
            self.reset = False

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.before
        if self.reset:
            return (_proc_status("VmHWM") or 0) - self.before
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.before


def matmul_rate(device, dtype, shapes: list[tuple[int, int, int]], seconds: float = 0.5
                ) -> dict[str, float]:
    """Best achieved FLOP/s of `a @ b` ([m, k] x [k, n]) per shape, at the current threads."""
    import torch

    out = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        best = math.inf
        deadline = time.perf_counter() + seconds
        reps = 0
        while reps < 3 or time.perf_counter() < deadline:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
            reps += 1
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    return out


def peak_flops(cfg, state, progress) -> dict[str, Any]:
    """{"kind", "tflops", "rates"}: the GPU's known peak or the measured CPU matmul rate."""
    import torch

    from stable_megatron.model.size import peak_tflops

    if state.device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(state.device))
        if peak is not None:
            return {"kind": "known GPU bf16 peak", "tflops": peak, "rates": {}}
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    m = cfg.model
    tokens = cfg.train.micro_batch_size * m.seq_length
    shapes = [(2048, 2048, 2048), (tokens, m.hidden_size, m.ffn_size)]
    progress("measuring the matmul rate")
    rates = matmul_rate(state.device, dtype, shapes)
    return {"kind": f"measured {str(dtype).removeprefix('torch.')} matmul rate "
                    f"(best of {', '.join(rates)}; {torch.get_num_threads()} threads)",
            "tflops": max(rates.values()) / 1e12, "rates": rates}


# --------------------------------------------------------------------------------------------
# Arms


class Arm:
    """One model with its training step; `step()` runs one optimizer step on the next batch."""

    name = ""

    def __init__(self, cfg, state, data) -> None:
        self.cfg, self.state, self.data = cfg, state, data
        self.consumed = 0
        self.times: list[float] = []
        self.data_times: list[float] = []
        self.faults: list[int] = []  # minor page faults of the process during each timed step
        self.peak_bytes: int | None = None

    @property
    def accum(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.state.layout.dp)

    def batches(self) -> TimedBatches:
        from stable_megatron.batches import micro_batches

        return TimedBatches(micro_batches(self.data, self.consumed, self.cfg, self.state.layout,
                                          self.state.device, self.accum))

    def _sync(self) -> None:
        import torch

        if self.state.device.type == "cuda":
            torch.cuda.synchronize(self.state.device)

    def step(self) -> tuple[float, float]:
        """(wall seconds, seconds producing batches) of one optimizer step; its page faults
        go to `last_faults`."""
        self._sync()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        batches = self.batches()
        self.run_step(batches)
        self._sync()
        elapsed = time.perf_counter() - start
        self.last_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        self.consumed += self.cfg.train.global_batch_size
        return elapsed, batches.seconds

    def run_step(self, batches) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Ours(Arm):
    """The training loop's engine and step (see the module docstring)."""

    name = "ours"

    def __init__(self, cfg, state, data, name: str = "ours") -> None:
        super().__init__(cfg, state, data)
        from stable_megatron.engine import build_engine
        from stable_megatron.hooks import StepRunner, Throughput, model_hooks
        from stable_megatron.stability.divergence import DivergenceRule
        from stable_megatron.stability.guard import SpikeGuard
        from stable_megatron.stability.warning import EarlyWarning

        self.name = name
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its setup
            self.engine = build_engine(cfg, state)
        self.hooks = StepRunner(self.engine, [
            Throughput(cfg, state.layout.world, state.device),
            EarlyWarning(cfg.stability.warning),
            DivergenceRule(cfg.stability.divergence_patience),
            *model_hooks(cfg, self.engine.module),
            SpikeGuard(cfg, state, self.engine),
        ])
        self.number = 0

    @property
    def accum(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def run_step(self, batches) -> None:
        """As `Trainer.train_one_step`: the hooks' step, then the log record's reads."""
        self.number += 1
        lr = self.engine.get_lr()[0]
        loss = self.hooks.step(self.number, batches)
        record = {"step": self.number, "loss": loss.item(), "lr": lr,
                  "grad_norm": float(self.engine.get_global_grad_norm())}
        self.hooks.after_step(self.number, record)
        if not math.isfinite(record["loss"]):
            raise RuntimeError(f"{self.name}: non-finite loss")

    def close(self) -> None:
        self.hooks.remove()
        self.engine = self.hooks = None


class TorchStep(Arm):
    """A plain single-process step over `self.model` (`loss(tokens, labels)`): forward, loss,
    backward per micro-batch, clipping, AdamW (`train.make_optimizer`: our kernel,
    hyper-parameters and groups), LR schedule. With train.precision=bf16 the model is in bf16
    and AdamW runs over fp32 master weights (stable_megatron.bench.Bf16Master), as ours does."""

    def _optimizer(self) -> None:
        import torch

        from stable_megatron.engine import lr_at, make_optimizer

        t = self.cfg.train
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, self.cfg)  # ours: same kernel and groups
        self.bf16 = Bf16Master(self.model, self.optimizer) if t.precision == "bf16" else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_at(self.cfg, s) / t.lr)

    def run_step(self, batches) -> None:
        import torch

        accum = self.accum
        total = None
        for tokens, labels in batches:
            loss = self.loss(tokens, labels) / accum
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.bf16:
            norm = self.bf16.step(self.cfg.train.grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if not math.isfinite(total.item()) or not math.isfinite(float(norm)):
            raise RuntimeError(f"{self.name}: non-finite loss or gradient norm")

    def close(self) -> None:
        self.model = self.optimizer = self.scheduler = self.params = self.bf16 = None


def _plain_gpt_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int, heads: int, ffn: int, eps: float) -> None:
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, d = x.shape
            q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
                       for t in self.qkv(self.ln1(x)).split(d, dim=-1))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class PlainGPT(nn.Module):
        """nanoGPT-like: tied embeddings, learned positions, pre-LN blocks, [b, s, d]."""

        def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int, ffn: int,
                     eps: float, std: float) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
            self.blocks = nn.ModuleList(Block(d, heads, ffn, eps) for _ in range(layers))
            self.ln_f = nn.LayerNorm(d, eps=eps)
            for module in self.modules():
                if isinstance(module, nn.Linear | nn.Embedding):
                    nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)

        def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(tokens.size(1), device=tokens.device)
            x = self.wte(tokens) + self.wpe(positions)
            for block in self.blocks:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    return PlainGPT


class Plain(TorchStep):
    name = "plain"

    def __init__(self, cfg, state, data) -> None:
        super().__init__(cfg, state, data)
        import torch

        m = cfg.model
        torch.manual_seed(cfg.train.seed)
        self.model = _plain_gpt_class()(
            m.padded_vocab_size(1), m.seq_length, m.hidden_size, m.num_layers,
            m.num_attention_heads, m.ffn_size, m.layernorm_epsilon, m.init_std,
        ).to(state.device)
        self.loss = self.model
        self._optimizer()


def _sdpa_core_attention():
    """A drop-in for megatron-core's `DotProductAttention` (q, k, v [s, b, h, d] -> context
    [s, b, h * d]) that runs causal SDPA, like our model."""
    import torch.nn.functional as F
    from megatron.core.transformer.module import MegatronModule

    class SdpaCoreAttention(MegatronModule):
        def __init__(self, config, layer_number, attn_mask_type, attention_type,
                     attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                     pg_collection=None) -> None:
            super().__init__(config=config)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            s, b = query.size(0), query.size(1)
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    return SdpaCoreAttention


class Mcore(TorchStep):
    """megatron-core's GPTModel from `get_gpt_layer_local_spec()` (TP=1), our TransformerConfig
    (fusions off, GELU, CPU initialisation); `stock=False` swaps the core attention for SDPA."""

    def __init__(self, cfg, state, data, stock: bool = False) -> None:
        super().__init__(cfg, state, data)
        import torch
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.models.gpt.gpt_model import GPTModel

        from stable_megatron import compat
        from stable_megatron.model.spec import transformer_config

        self.name = "mcore-stock" if stock else "mcore"
        compat.apply_cpu_patches()
        m = cfg.model
        spec = gpt_layer_specs.get_gpt_layer_local_spec()
        if not stock:
            spec.submodules.self_attention.submodules.core_attention = _sdpa_core_attention()
        elif state.device.type == "cpu":
            # DotProductAttention takes its score buffer from megatron-core's global memory
            # buffer, which allocates on `torch.cuda.current_device()`: hand it a CPU buffer
            # of the size it asks for (no patch; the buffer reuses a large enough entry).
            from megatron.core import parallel_state

            dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
            size = cfg.train.micro_batch_size * m.num_attention_heads * m.seq_length ** 2
            buffers = parallel_state.get_global_memory_buffer().buffer
            buffers[("mpu", dtype)] = torch.empty(size, dtype=dtype)
        if stock:  # its attention dropout (p = 0) forks the model-parallel RNG state
            from megatron.core.tensor_parallel import random as mcore_random

            tracker = mcore_random.get_cuda_rng_tracker()
            if "model-parallel-rng" not in tracker.get_states():
                tracker.add("model-parallel-rng", cfg.train.seed + 2718)
        torch.manual_seed(cfg.train.seed)
        self.model = GPTModel(
            config=transformer_config(cfg), transformer_layer_spec=spec,
            vocab_size=m.padded_vocab_size(1), max_sequence_length=m.seq_length,
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type="learned_absolute",
        ).to(state.device)
        s = m.seq_length
        self.positions = torch.arange(s, device=state.device)[None]
        # True = masked (the stock kernel's default causal mask is CUDA-only)
        self.mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=state.device), 1)[
            None, None]
        self._optimizer()

    def loss(self, tokens, labels):
        positions = self.positions.expand(tokens.size(0), -1)
        return self.model(tokens, positions, self.mask, labels=labels).mean()


class Bare(TorchStep):
    """Our model (`build_model`: the PipelineModule of one stage) with the plain step."""

    name = "bare"

    def __init__(self, cfg, state, data) -> None:
        super().__init__(cfg, state, data)
        from stable_megatron.model.gpt import build_model, lm_loss

        with contextlib.redirect_stdout(io.StringIO()):
            self.model = build_model(cfg, state.topology, state.device).to(state.device)
        self._lm_loss = lm_loss
        self._optimizer()

    def loss(self, tokens, labels):
        return self._lm_loss(self.model(tokens), labels)


def build_arm(kind: str, cfg, state, data) -> Arm:
    if kind == "ours":
        return Ours(cfg, state, data)
    if kind == "plain":
        return Plain(cfg, state, data)
    if kind in ("mcore", "mcore-stock"):
        return Mcore(cfg, state, data, stock=kind == "mcore-stock")
    if kind == "bare":
        return Bare(cfg, state, data)
    raise ValueError(f"unknown reference {kind}; valid: {', '.join(REFERENCES)}")


# --------------------------------------------------------------------------------------------
# Measurements


def cpu_malloc(device) -> str:
    """Which glibc malloc settings the arms ran under (`parallel.keep_cpu_memory`)."""
    from stable_megatron.parallel import keep_cpu_memory

    if device.type != "cpu":
        return "-"
    if keep_cpu_memory():  # idempotent: applied already by parallel.initialize
        return "freed memory kept in the process (parallel.keep_cpu_memory)"
    return "the C library's defaults (STABLE_MEGATRON_MALLOC=default, or not glibc)"


def summarize(arm: Arm, cfg, peak: dict[str, Any], base: Arm | None = None) -> dict[str, Any]:
    from stable_megatron.model.size import flops_per_token

    t = statistics.median(arm.times)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    tps = tokens / t
    tflops = tps * flops_per_token(cfg) / arm.state.layout.world / 1e12
    out = {
        "time_s": t,
        "spread": iqr(arm.times) / t,
        "tokens_per_s": tps,
        "tflops": tflops,
        "mfu": tflops / peak["tflops"] if peak.get("tflops") else None,
        "data_wait": sum(arm.data_times) / sum(arm.times),
        "peak_bytes": arm.peak_bytes,
        "build_peak_bytes": getattr(arm, "build_peak_bytes", None),
        "state_bytes": getattr(arm, "state_bytes", None),
        "step_times": list(arm.times),
        "data_times": list(arm.data_times),
        "faults_per_step": statistics.median(arm.faults) if arm.faults else None,
        "flops_per_token": flops_per_token(cfg),
    }
    if base is not None:
        out["vs_ours"] = t / statistics.median(base.times)  # this arm / ours
        out["ours_over"] = statistics.median(b / a for a, b in zip(arm.times, base.times,
                                                                  strict=True))
    return out


def run_arms(arms: dict[str, Any], state, steps: int, warmup: int, progress: Progress,
             memory: PeakMemory, label: str = "") -> dict[str, Arm]:
    """Build every arm (peak memory over its build and warm-up steps), then alternate
    `steps` timed rounds, one step per arm, the order rotating."""
    built: dict[str, Arm] = {}
    for i, (name, make) in enumerate(arms.items(), 1):
        progress(f"{label}building {i}/{len(arms)}: {name}")
        live = live_tensor_bytes()
        memory.start()
        built[name] = make()
        built[name].build_peak_bytes = memory.peak()  # the build (and engine set-up) alone
        for w in range(warmup):
            progress(f"{label}{name}: warm-up step {w + 1}/{warmup}", detail=True)
            built[name].step()
        built[name].peak_bytes = memory.peak()
        built[name].state_bytes = live_tensor_bytes() - live
    gc.collect()
    names = list(built)
    for r in range(steps):
        head = f"{label}round {r + 1}/{steps}"
        progress(head)
        for name in names[r % len(names):] + names[: r % len(names)]:
            progress(f"{head}: {name}", detail=True)
            elapsed, data = built[name].step()
            built[name].times.append(elapsed)
            built[name].data_times.append(data)
            built[name].faults.append(built[name].last_faults)
    progress.done()
    return built


def profile_arm(arm: Arm, rows: int) -> dict[str, Any]:
    """One step of `arm` under torch.profiler: the top ops by self CPU time, the wall time and
    how much of it the ops account for."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if arm.state.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    arm.step()  # untimed, outside the profile
    with profile(activities=activities) as prof:
        wall, data = arm.step()
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    return {
        "wall_s": wall,
        "data_s": data,
        "ops_self_s": self_total,
        "table": events.table(sort_by="self_cpu_time_total", row_limit=rows,
                              max_name_column_width=48),
    }


def run_compare(cfg, refs: list[str], methods: list[str], recipe, shape: str,
                overrides: list[str], steps: int, warmup: int, data_kind: str,
                profile_rows: int, progress: Progress) -> dict[str, Any]:
    import torch

    from stable_megatron import parallel

    progress("setting up the process group")
    state = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.device)
    peak = peak_flops(cfg, state, progress)
    data = dataset_for(cfg, data_kind)
    arms: dict[str, Any] = {"ours": lambda: Ours(cfg, state, data)}
    for ref in refs:
        arms[ref] = lambda ref=ref: build_arm(ref, cfg, state, data)
    configs = {name: cfg for name in arms}
    for method in methods:  # "baseline": a second engine of ours, an A/A control
        mcfg = make_config(recipe, shape, [*overrides, *method_overrides(method)],
                           state.layout.world)
        configs[method] = mcfg
        arms[method] = lambda mcfg=mcfg, method=method: Ours(mcfg, state, data, name=method)
    memory = PeakMemory(state.device)
    built = run_arms(arms, state, steps, warmup, progress, memory)
    base = built["ours"]
    if state.device.type == "cpu":  # the rate again after the run; MFU against the better one
        after = peak_flops(cfg, state, progress)
        peak = {**peak, "before_tflops": peak["tflops"], "after_tflops": after["tflops"],
                "tflops": max(peak["tflops"], after["tflops"]),
                "rates": {k: max(v, after["rates"][k]) for k, v in peak["rates"].items()}}
    results = {name: summarize(arm, configs[name], peak, base) for name, arm in built.items()}
    profiles = {}
    if profile_rows:
        for name in ["ours", *refs]:
            progress(f"profiling {name}")
            profiles[name] = profile_arm(built[name], profile_rows)
        progress.done()
    accum = base.accum
    for arm in built.values():
        arm.close()
    return {
        "mode": "compare",
        "device": str(state.device),
        "threads": torch.get_num_threads(),
        "world": state.layout.world,
        "peak": peak,
        "memory_kind": memory.kind,
        "cpu_malloc": cpu_malloc(state.device),
        "process_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "arms": results,
        "profiles": profiles,
        **_shape_info(cfg, state.layout, accum),
    }


def _shape_info(cfg, layout, accum: int) -> dict[str, Any]:
    m, t = cfg.model, cfg.train
    return {"shape": {"layers": m.num_layers, "hidden": m.hidden_size,
                      "heads": m.num_attention_heads, "seq": m.seq_length,
                      "micro_batch": t.micro_batch_size, "global_batch": t.global_batch_size,
                      "accumulation": accum, "vocab": m.padded_vocab_size(1),
                      "precision": t.precision, "tp": layout.tp, "pp": layout.pp,
                      "dp": layout.dp}}


def run_worker(cfg, steps: int, warmup: int, data_kind: str) -> dict[str, Any] | None:
    """`--worker`: ours only, at the config's layout (one rank of a launch); rank 0 returns."""
    import torch

    from stable_megatron import parallel

    state = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.device)
    data = dataset_for(cfg, data_kind)
    memory = PeakMemory(state.device)
    built = run_arms({"ours": lambda: Ours(cfg, state, data)}, state, steps, warmup,
                     Progress(enabled=False), memory)
    arm = built["ours"]
    result = summarize(arm, cfg, {})
    between = live_tensor_bytes()
    # one more step, untimed, measured after each backward and inside its optimizer step
    probe, backward = StateAtUpdate(), StateAfterBackward(arm.engine)
    arm.hooks.add(probe)
    arm.step()
    backward.remove()
    result.update(threads=torch.get_num_threads(), world=state.layout.world,
                  model_state_bytes=between, update_state_bytes=probe.bytes,
                  backward_state_bytes=backward.bytes,
                  zero_stage=cfg.parallel.zero_stage, **_shape_info(cfg, state.layout, arm.accum))
    arm.close()
    return result if state.layout.rank == 0 else None


def live_tensor_bytes() -> int:
    """The bytes of every tensor alive in this process between two steps (each storage once):
    the weights, the gradient buffers, ZeRO's flat and fp32 master copies and the optimizer
    state; the activations are freed by then. The model state as the process holds it.
    Tensors are found through Python's garbage collector, which sees those with a Python
    object; a gradient that autograd accumulated and no Python code has read yet has none, so
    each leaf tensor's `.grad` is read here too."""
    import torch

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            grad = obj.grad if obj.is_leaf and obj.requires_grad else None
            tensors = (obj,) if grad is None else (obj, grad)
        except (RuntimeError, ReferenceError):
            continue
        for tensor in tensors:
            try:  # a fake tensor (left by a traced or compiled function) has no data
                storage = tensor.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
            except RuntimeError:
                continue
            if ptr in seen or size == 0:
                continue
            seen.add(ptr)
            total += size
    return total


class StateAtUpdate(StepHook):
    """`live_tensor_bytes()` once, inside an optimizer step after the backward and before the
    update: the weights, every gradient and the optimizer state alive together, the
    activations freed (the model state as the ZeRO paper counts it: weights + gradients +
    optimizer state). Between two steps some stages hold no gradients, others theirs."""

    def __init__(self) -> None:
        self.bytes: int | None = None

    def before_update(self, step: int, grad_norm: float) -> bool:
        if self.bytes is None:
            self.bytes = live_tensor_bytes()
        return False


class StateAfterBackward:
    """The most of `live_tensor_bytes()` at the end of each micro-batch's backward, as the
    engine's gradient reduction starts (`allreduce_gradients`, wrapped until `remove()`): the
    weights, the gradients as the backward left them and the optimizer state, the activations
    freed. Stages 0 and 1 hold every gradient whole there (accumulated over the step's
    micro-batches, reduced at its last) and stages 1-2 their reduce bucket, stage 3 the
    partitions of everything and a one-parameter bucket: with the update, the high point of the
    model state over a step (docs/performance.md#zero-stages)."""

    def __init__(self, engine) -> None:
        self.engine, self.bytes = engine, None
        self._own = "allreduce_gradients" in vars(engine)
        original = engine.allreduce_gradients

        def measured(*args, **kwargs):
            found = live_tensor_bytes()
            self.bytes = found if self.bytes is None else max(self.bytes, found)
            return original(*args, **kwargs)

        self._original = original
        engine.allreduce_gradients = measured

    def remove(self) -> None:
        if self._own:
            self.engine.allreduce_gradients = self._original
        else:
            del self.engine.allreduce_gradients


# --zero: (label, overrides), each at DP2 in a launch of its own
ZERO_RUNS = (("ZeRO-0", ["parallel.zero_stage=0"]), ("ZeRO-1", ["parallel.zero_stage=1"]),
             ("ZeRO-2", ["parallel.zero_stage=2"]), ("ZeRO-3", ["parallel.zero_stage=3"]),
             # the model built whole on every rank, then split when the engine starts
             ("ZeRO-3 built whole", ["parallel.zero_stage=3", "parallel.zero_init=false"]))


def run_zero(args, overrides: list[str], progress: Progress) -> dict[str, Any]:
    """Each ZeRO stage at DP `--zero-dp` (that many processes, 2 cores shared), one launch
    each, `--rounds` times in alternating order: step time, and each rank's model state
    (`live_tensor_bytes`)."""
    import tempfile

    import torch

    dp = args.zero_dp
    threads = max(1, 2 // dp)
    results: dict[str, list[dict]] = {label: [] for label, _ in ZERO_RUNS}
    rate = {"before": fp32_rate(torch)}  # the machine's speed, beside the absolute times
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ZERO_RUNS if r % 2 == 0 else ZERO_RUNS[::-1]
            for i, (label, settings) in enumerate(order):
                progress(f"round {r + 1}/{args.rounds}: {label} at DP{dp} ({dp} processes x "
                         f"{threads} thread(s))")
                out = Path(tmp) / f"run{i}_{r}.json"
                cmd = _worker_command(args, [*overrides, *settings], out)
                _launch(cmd, dp, threads, args.timeout)
                results[label].append(json.loads(out.read_text()))
    progress.done()
    merged = {label: {**merge_rounds(rs),
                      "model_state_bytes": max(r["model_state_bytes"] for r in rs),
                      "update_state_bytes": max(r["update_state_bytes"] for r in rs),
                      "backward_state_bytes": max(r["backward_state_bytes"] for r in rs),
                      # the model state's high point over a step
                      "step_state_bytes": max(max(r["update_state_bytes"],
                                                  r["backward_state_bytes"]) for r in rs)}
              for label, rs in results.items()}
    ref = merged["ZeRO-1"]
    for r in merged.values():
        r["time_vs_stage1"] = r["time_s"] / ref["time_s"]
        r["state_vs_stage1"] = r["model_state_bytes"] / ref["model_state_bytes"]
        r["update_vs_stage1"] = r["update_state_bytes"] / ref["update_state_bytes"]
        r["step_vs_stage1"] = r["step_state_bytes"] / ref["step_state_bytes"]
    rate["after"] = fp32_rate(torch)
    return {"mode": "zero", "layouts": merged, "rounds": args.rounds, "steps": args.steps,
            "warmup": args.warmup, "dp": dp, "threads": threads, "fp32_gflops": rate}


def fp32_rate(torch) -> float:
    """This process's fp32 2048^3 matmul rate (GFLOP/s) at 2 threads (the machine's speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return matmul_rate(torch.device("cpu"), torch.float32, [(2048, 2048, 2048)])[
            "2048x2048x2048"] / 1e9
    finally:
        torch.set_num_threads(threads)


def merge_rounds(rs: list[dict]) -> dict[str, Any]:
    """One layout's (or stage's) worker results over `--rounds` launches: the first's fields,
    with every round's step and data times and their median, spread and data wait."""
    times = [t for r in rs for t in r["step_times"]]
    data = [t for r in rs for t in r["data_times"]]
    return {**rs[0], "step_times": times, "data_times": data,
            "time_s": statistics.median(times), "spread": iqr(times) / statistics.median(times),
            "data_wait": sum(data) / sum(times)}


def _worker_command(args, overrides: list[str], out: Path) -> list[str]:
    return [str(Path(__file__).resolve()), "--worker", str(out), "--shape", args.shape,
            "--recipe", str(args.recipe), "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--data", args.data, *overrides]


def _launch(cmd: list[str], nproc: int, threads: int, timeout: float) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    for name in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "STABLE_MEGATRON_NO_LAUNCHER"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS=str(threads), DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
               PYTHONWARNINGS="ignore")
    if nproc == 1:
        full = [sys.executable, *cmd]
    else:
        full = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={port}", *cmd]
    try:
        proc = subprocess.run(full, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(full)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(full)}\n{proc.stderr[-3000:]}")


def run_parallel(args, overrides: list[str], progress: Progress) -> dict[str, Any]:
    """World 1 (2 threads) and TP2 / PP2 / DP2 (2 processes x 1 thread), one launch each,
    `--rounds` times in alternating order."""
    import tempfile

    cores = 2
    runs = [("world 1", 1, 1, 1)] + list(LAYOUTS)
    results: dict[str, list[dict]] = {label: [] for label, *_ in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = runs if r % 2 == 0 else runs[::-1]
            for label, tp, pp, nproc in order:
                progress(f"round {r + 1}/{args.rounds}: {label} ({nproc} process(es) x "
                         f"{cores // nproc} thread(s))")
                out = Path(tmp) / f"{label.replace(' ', '_')}_{r}.json"
                cmd = _worker_command(args, [*overrides, f"parallel.tp={tp}",
                                             f"parallel.pp={pp}"], out)
                _launch(cmd, nproc, cores // nproc, args.timeout)
                results[label].append(json.loads(out.read_text()))
    progress.done()
    merged = {label: merge_rounds(rs) for label, rs in results.items()}
    ref = merged["world 1"]["time_s"]
    for r in merged.values():
        r["efficiency"] = ref / r["time_s"]
    return {"mode": "parallel", "cores": cores, "layouts": merged, "rounds": args.rounds,
            "steps": args.steps, "warmup": args.warmup}


def run_growth(args, overrides: list[str], progress: Progress) -> dict[str, Any]:
    import torch

    from stable_megatron import parallel
    from stable_megatron.model.size import flops_per_token

    state = None
    points = []
    for i, (axis, value, point) in enumerate(growth_points(), 1):
        cfg = make_config(args.recipe, "tiny", [*point, *overrides])
        if state is None:
            state = parallel.initialize(1, 1, cfg.parallel.device)
        data = dataset_for(cfg, args.data)
        label = f"[{i}/{len(GROWTH_SEQ) + len(GROWTH_HIDDEN)}] {axis} {value}: "
        make = lambda cfg=cfg, data=data, st=state: Ours(cfg, st, data)  # noqa: E731
        built = run_arms({"ours": make}, state, args.steps, args.warmup, progress,
                         PeakMemory(state.device), label)
        arm = built["ours"]
        t = statistics.median(arm.times)
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        flops = flops_per_token(cfg) * tokens
        points.append({"axis": axis, "value": value, "time_s": t,
                       "spread": iqr(arm.times) / t, "flops": flops, "tokens": tokens,
                       "step_times": list(arm.times), "tflops": flops / t / 1e12,
                       "params": sum(p.numel() for p in arm.engine.module.parameters())})
        arm.close()
        del built, arm
        gc.collect()
    for axis in ("seq", "hidden"):
        pts = [p for p in points if p["axis"] == axis]
        for p in pts:
            p["time_ratio"] = p["time_s"] / pts[0]["time_s"]
            p["flop_ratio"] = p["flops"] / pts[0]["flops"]
            p["time_per_flop"] = p["time_ratio"] / p["flop_ratio"]
    return {"mode": "growth", "device": str(state.device), "threads": torch.get_num_threads(),
            "layers": GROWTH_LAYERS, "points": points, "steps": args.steps,
            "warmup": args.warmup}


# --------------------------------------------------------------------------------------------
# Report


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _shape_line(s: dict[str, Any]) -> str:
    return (f"{s['layers']} layers x hidden {s['hidden']}, {s['heads']} heads, seq {s['seq']}, "
            f"vocab {s['vocab']}, {s['precision']}; a step = {s['accumulation']} micro-batch(es)"
            f" of {s['micro_batch']} x {s['dp']} data-parallel = {s['global_batch']} sequences;"
            f" tp {s['tp']} x pp {s['pp']} x dp {s['dp']}")


ARM_NOTES = {
    "ours": "training loop: DeepSpeed engine at the recipe's ZeRO stage (1) + the Trainer's hooks",
    "plain": "plain PyTorch GPT written in this tool (SDPA, F.cross_entropy, torch AdamW)",
    "mcore": "megatron-core GPTModel, stock local spec with causal SDPA as core attention",
    "mcore-stock": "megatron-core GPTModel, stock local spec (DotProductAttention: explicit "
                   "softmax over the [b, h, s, s] scores)",
    "bare": "our model (build_model) with the plain step: no DeepSpeed engine, no hooks",
}


def format_compare(result: dict[str, Any]) -> str:
    peak, arms = result["peak"], result["arms"]
    out = [
        f"throughput on {result['device']} ({result['threads']} threads, world "
        f"{result['world']}): {_shape_line(result['shape'])}",
        f"median of {len(arms['ours']['step_times'])} timed steps per arm after warm-up, arms "
        "alternated step by step (rotating order) in one process",
        f"MFU against: {peak['kind']} = {peak['tflops'] * 1e3:.1f} GFLOP/s"
        + (f" ({', '.join(f'{k}: {v / 1e9:.1f}' for k, v in peak['rates'].items())} GFLOP/s;"
           f" the better of before the run, {peak['before_tflops'] * 1e3:.1f}, and after it, "
           f"{peak['after_tflops'] * 1e3:.1f})" if peak["rates"] else ""),
        "",
    ]
    header = ["arm", "step ms", "IQR", "tokens/s", "GFLOP/s", "MFU", "data wait", "peak MiB",
              "state MiB", "faults/step", "vs ours", "ours/arm"]
    rows = []
    for name, r in arms.items():
        rows.append([
            name, f"{r['time_s'] * 1e3:.0f}", f"{r['spread']:.0%}", f"{r['tokens_per_s']:.0f}",
            f"{r['tflops'] * 1e3:.1f}", "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
            f"{r['data_wait']:.2%}", _mib(r["peak_bytes"]), _mib(r.get("state_bytes")),
            "-" if r.get("faults_per_step") is None else f"{r['faults_per_step']:.0f}",
            f"{r['vs_ours']:.3f}x", f"{r['ours_over']:.3f}x"])
    out += md_table(header, rows)
    out.append("")
    refs = [n for n in arms if n in REFERENCES]
    for ref in refs:
        ratio = arms["ours"]["time_s"] / arms[ref]["time_s"]
        verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
        out.append(f"ours / {ref} = {ratio:.3f}x step time (paired {arms[ref]['ours_over']:.3f}x;"
                   f" target <= {TARGET_RATIO:.1f}x {verdict})")
    methods = [n for n in arms if n != "ours" and n not in REFERENCES]
    for m in methods:
        label = "baseline (a second engine of ours) / ours" if m == "baseline" else \
            f"{m} / baseline"
        out.append(f"{label} = {arms[m]['vs_ours']:.3f}x step time "
                   f"(paired {1 / arms[m]['ours_over']:.3f}x)")
    for m in [m for m in methods if zero_stage_of(m) is not None]:
        for ref in refs:
            time_ratio = arms[m]["time_s"] / arms[ref]["time_s"]
            state = ("-" if not arms[ref].get("state_bytes") else
                     f"{arms[m]['state_bytes'] / arms[ref]['state_bytes']:.2f}x")
            # paired: (ours / ref) / (ours / m), each the median over rounds
            out.append(f"{m} / {ref} = {time_ratio:.3f}x step time (paired "
                       f"{arms[ref]['ours_over'] / arms[m]['ours_over']:.3f}x), {state} "
                       f"state memory")
    ours = arms["ours"]
    if ours["mfu"] is not None:
        out.append(f"ours: {ours['mfu']:.1%} of the {peak['kind'].split(' (')[0]} "
                   f"(target >= 50% on CPU)")
    out.append(f"ours: data wait {ours['data_wait']:.2%} of the step time (target < "
               f"{TARGET_DATA_WAIT:.0%})")
    out += ["", "notes:"]
    for name in ["ours", *refs]:
        out.append(f"- {name}: {ARM_NOTES[name]}")
    if methods:
        out.append(f"- {', '.join(methods)}: ours with the method's overrides "
                   "(stable_megatron.bench.METHODS, or OPTIMIZERS' train keys); baseline: a "
                   "second engine of ours, built after it (an A/A control: its ratio to ours "
                   "is this run's bias)")
    out += [
        "- vs ours: arm step time / ours (median / median); ours/arm: median over rounds of ours"
        " / arm within the round (paired); IQR: interquartile range of the timed steps over their"
        " median",
        "- GFLOP/s and MFU: model FLOPs (model.size.flops_per_token, no recompute) per second; "
        "the same FLOPs per token for every arm of the shape",
        f"- data wait: time in micro_batches (building the batches) / step time; peak: "
        f"{result['memory_kind']} of each arm's build and warm-up steps, in build order (arms "
        f"built later may reuse memory freed by earlier ones); process peak RSS "
        f"{_mib(result['process_maxrss_bytes'])} MiB",
        "- state: the bytes of the tensors an arm keeps alive between steps (weights, "
        "gradient buffers, master copies, optimizer state; live_tensor_bytes after its warm-up "
        "less before its build): unlike the peak, independent of the build order",
        f"- faults/step: minor page faults of the process during the arm's timed steps (median);"
        f" CPU allocator: {result.get('cpu_malloc', '-')}",
    ]
    for name, p in result["profiles"].items():
        out += ["", f"profile of one step of {name}: wall {p['wall_s'] * 1e3:.0f} ms, torch ops "
                f"(self CPU time, summed) {p['ops_self_s'] * 1e3:.0f} ms, outside the ops "
                f"{(p['wall_s'] - p['ops_self_s']) * 1e3:.0f} ms "
                f"({(p['wall_s'] - p['ops_self_s']) / p['wall_s']:.0%}); top ops by self CPU "
                "time:", p["table"].rstrip()]
    return "\n".join(out)


def format_parallel(result: dict[str, Any]) -> str:
    lay = result["layouts"]
    first = next(iter(lay.values()))
    out = [
        f"parallel efficiency on {result['cores']} cores: "
        f"{_shape_line(first['shape'])} (at world 1)",
        f"{result['rounds']} round(s) of one launch per layout (order alternating), "
        f"{result['warmup']} warm-up + {result['steps']} timed steps each; median step time",
        "",
    ]
    header = ["layout", "processes x threads", "accumulation", "step ms", "IQR", "tokens/s",
              "data wait", "peak MiB (rank 0)", "efficiency"]
    rows = []
    for label, r in lay.items():
        s = r["shape"]
        rows.append([label, f"{r['world']} x {r['threads']}", str(s["accumulation"]),
                     f"{r['time_s'] * 1e3:.0f}", f"{r['spread']:.0%}",
                     f"{r['tokens_per_s']:.0f}",
                     f"{r['data_wait']:.2%}", _mib(r["peak_bytes"]), f"{r['efficiency']:.2f}"])
    out += md_table(header, rows)
    out += ["", "efficiency: world-1 step time (2 threads) / the layout's step time (2 processes "
            "x 1 thread): 1.00 = the same 2 cores used as well as by one process"]
    return "\n".join(out)


def format_zero(result: dict[str, Any]) -> str:
    lay = result["layouts"]
    first = next(iter(lay.values()))
    out = [
        f"ZeRO stages at DP{result.get('dp', 2)} ({result.get('dp', 2)} processes x "
        f"{result.get('threads', 1)} thread(s)): {_shape_line(first['shape'])}",
        f"{result['rounds']} round(s) of one launch per stage (order alternating), "
        f"{result['warmup']} warm-up + {result['steps']} timed steps each; median step time",
        *([f"fp32 matmul rate (2048^3, 2 threads): {result['fp32_gflops']['before']:.0f} "
           f"GFLOP/s before the launches, {result['fp32_gflops']['after']:.0f} after"]
          if "fp32_gflops" in result else []),
        "",
    ]
    header = ["stage", "step ms", "IQR", "tokens/s", "vs ZeRO-1 (time)",
              "state after backward MiB", "state at the update MiB", "step's high MiB",
              "vs ZeRO-1", "at the update vs ZeRO-1", "state between steps MiB", "vs ZeRO-1",
              "build peak MiB", "peak MiB"]
    rows = [[label, f"{r['time_s'] * 1e3:.0f}", f"{r['spread']:.0%}", f"{r['tokens_per_s']:.0f}",
             f"{r['time_vs_stage1']:.2f}x", _mib(r.get("backward_state_bytes")),
             _mib(r["update_state_bytes"]), _mib(r.get("step_state_bytes")),
             f"{r['step_vs_stage1']:.2f}x" if "step_vs_stage1" in r else "-",
             f"{r['update_vs_stage1']:.2f}x", _mib(r["model_state_bytes"]),
             f"{r['state_vs_stage1']:.2f}x", _mib(r.get("build_peak_bytes")),
             _mib(r["peak_bytes"])] for label, r in lay.items()]
    out += md_table(header, rows)
    out += ["", "model state (rank 0's process; the bytes of every live tensor, each storage "
            "once: weights, gradients, ZeRO's flat and fp32 master copies, optimizer state): "
            "after backward = the most at the end of a micro-batch's backward, before the "
            "gradient reduction (stages 0-1 hold every gradient whole there); at the update = "
            "inside an optimizer step, after the reduction and before the weights change "
            "(weights + gradients + optimizer state, activations freed); step's high = the "
            "larger of the two; between steps = after a step. build peak: the resident-set "
            "high-water mark of building the model and the engine, above the process's memory "
            "before; peak: of the build and the warm-up steps"]
    return "\n".join(out)


def format_growth(result: dict[str, Any]) -> str:
    out = [f"cost growth on {result['device']} ({result['threads']} threads), ours, "
           f"{result['layers']} layers, heads of 64; median of {result['steps']} steps after "
           f"{result['warmup']} warm-up", ""]
    for axis, fixed in (("seq", "hidden 512, 2048 tokens per step"),
                        ("hidden", "seq 512, 1024 tokens per step")):
        pts = [p for p in result["points"] if p["axis"] == axis]
        out.append(f"{'sequence length' if axis == 'seq' else 'hidden size'} ({fixed}):")
        header = [axis, "GFLOP/step", "step ms", "IQR", "GFLOP/s", "FLOPs x", "time x",
                  "time/FLOP x"]
        rows = [[str(p["value"]), f"{p['flops'] / 1e9:.1f}", f"{p['time_s'] * 1e3:.0f}",
                 f"{p['spread']:.0%}", f"{p['tflops'] * 1e3:.1f}", f"{p['flop_ratio']:.2f}",
                 f"{p['time_ratio']:.2f}", f"{p['time_per_flop']:.2f}"] for p in pts]
        out += md_table(header, rows) + [""]
    out.append("FLOPs x / time x: against the smallest point of the sweep; time/FLOP x > 1: the "
               "step grows faster than its model FLOPs (model.size.flops_per_token)")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description="Step time, tokens/s, TFLOP/s, MFU, data wait and peak memory of "
                "the training loop, against a plain PyTorch GPT and megatron-core's GPTModel.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--recipe", default=str(RECIPE), help="base recipe (default: %(default)s)")
    p.add_argument("--shape", default="tiny", help=f"one of: {', '.join(SHAPES)}")
    p.add_argument("--vs", action="append", default=[], metavar="REF",
                   help=f"a reference to alternate with (repeatable): {', '.join(REFERENCES)}")
    p.add_argument("--methods", default="", help="comma-separated stability methods to time "
                   f"against the baseline, or 'all': {', '.join(METHODS)}; or an optimizer "
                   f"other than AdamW: {', '.join(OPTIMIZERS)}; or a ZeRO stage other than "
                   "the recipe's: zero0 .. zero3")
    p.add_argument("--steps", type=int, default=10, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    p.add_argument("--data", choices=("synthetic", "builtin"), default="synthetic")
    p.add_argument("--profile", nargs="?", const=15, type=int, default=0, metavar="ROWS",
                   help="print a torch.profiler table (ROWS top ops, default 15) of one step of"
                   " ours and of each reference")
    p.add_argument("--parallel", action="store_true",
                   help="TP2, PP2, DP2 (2 processes x 1 thread) against world 1 (2 threads)")
    p.add_argument("--zero", action="store_true",
                   help="ZeRO stages 0-3 at DP2 (2 processes x 1 thread): step time and each "
                   "rank's model-state memory")
    p.add_argument("--zero-dp", type=int, default=2, metavar="DP",
                   help="--zero: the data-parallel size (processes; default %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="--parallel, --zero: launches per layout or stage")
    p.add_argument("--timeout", type=float, default=900,
                   help="--parallel, --zero: per launch (s)")
    p.add_argument("--growth", action="store_true",
                   help="step time against sequence length and hidden size, beside FLOPs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--worker", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.shape not in SHAPES:
        p.error(f"unknown shape {args.shape}; valid: {', '.join(SHAPES)}")
    bad = [r for r in args.vs if r not in REFERENCES]
    if bad:
        p.error(f"unknown reference {bad[0]}; valid --vs: {', '.join(REFERENCES)}")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.method_list = list(METHODS) if names == ["all"] else names
    bad = [m for m in args.method_list
           if m not in METHODS and m not in OPTIMIZERS and zero_stage_of(m) is None]
    if bad:
        p.error(f"unknown method {bad[0]}; valid --methods: {', '.join(METHODS)}, all, "
                f"{', '.join(OPTIMIZERS)}, zero0 .. zero3")
    if sum(map(bool, (args.parallel, args.growth, args.zero))) > 1:
        p.error("--parallel, --growth and --zero are separate runs")
    if (args.parallel or args.growth or args.zero) and (args.vs or args.method_list
                                                        or args.profile):
        p.error("--vs, --methods and --profile go with a comparison run, not --parallel, "
                "--growth or --zero")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"expected key=value, got {bad[0]!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare("auto")
    from stable_megatron import parallel
    from stable_megatron.config import ConfigError
    from stable_megatron.data import DataError

    rank0 = int(os.environ.get("RANK", "0")) == 0
    progress = Progress(enabled=rank0 and not args.worker)
    start = time.perf_counter()
    try:
        if args.worker:
            cfg = make_config(args.recipe, args.shape, args.overrides, parallel.env_world_size())
            result = run_worker(cfg, args.steps, args.warmup, args.data)
            if result is not None:
                Path(args.worker).write_text(json.dumps(result))
            return 0
        if args.parallel:
            for _, tp, pp, nproc in (("world 1", 1, 1, 1), *LAYOUTS):  # fail before launching
                make_config(args.recipe, args.shape,
                            [*args.overrides, f"parallel.tp={tp}", f"parallel.pp={pp}"], nproc)
            result = run_parallel(args, args.overrides, progress)
            text = format_parallel(result)
        elif args.zero:
            for _, settings in ZERO_RUNS:  # fail before launching
                make_config(args.recipe, args.shape, [*args.overrides, *settings], args.zero_dp)
            result = run_zero(args, args.overrides, progress)
            text = format_zero(result)
        elif args.growth:
            result = run_growth(args, args.overrides, progress)
            text = format_growth(result)
        else:
            cfg = make_config(args.recipe, args.shape, args.overrides, 1)
            for m in args.method_list:  # bad method configs fail before any model is built
                make_config(args.recipe, args.shape, [*args.overrides, *method_overrides(m)], 1)
            result = run_compare(cfg, args.vs, args.method_list, args.recipe, args.shape,
                                 args.overrides, args.steps, args.warmup, args.data,
                                 args.profile, progress)
            text = format_compare(result)
    except (ValueError, ConfigError, DataError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {first}", file=sys.stderr)
        if "\n" in str(err):
            print(str(err).split("\n", 1)[1], file=sys.stderr)
        return 2
    finally:
        parallel.shutdown()
    result["wall_s"] = time.perf_counter() - start
    result["command"] = " ".join(["python", "tools/benchmark.py", *(argv if argv is not None
                                                                     else sys.argv[1:])])
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(text)
        print(f"(wall time {result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
