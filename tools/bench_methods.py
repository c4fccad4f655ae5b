"""Step time and peak memory of each stability method relative to the plain pre-LN baseline.

Every method is the same GPT with one config override (`METHODS`). A step is one optimizer step
on one process (TP = PP = 1): the model's step hooks (`hooks.model_hooks`: sigma-reparam's power
step, QK-clip's logit collection and clip) + forward + the model's loss function
(`model.loss.LMLoss`: cross entropy, plus z-loss where configured) + backward +
the AdamW step of `engine.make_optimizer` (no DeepSpeed engine, no gradient clipping); or,
for an optimizer of `OPTIMIZERS` (`--methods baseline,muon`), its step on the baseline model.

Timing: every model is built once, then the steps run round-robin over the methods (the order
rotates each round), warm-up rounds first, so load drift on a shared machine hits all methods
alike; the reported step time is the median of the timed rounds and every ratio is against the
baseline of the same run.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over building the model and two steps,
less what was allocated before (measured right after each model is built, before the timing
rounds). On CPU each method runs in a subprocess of its own (`--only METHOD --json`) and the
peak RSS increase over the post-import baseline (`ru_maxrss` before building the model vs after
the steps) is reported.

On CPU, softmax capping runs on the exact "math" attention path (it materialises the attention
matrix) while the baseline runs SDPA; a baseline on the math path (`baseline_math`) is then
measured too, so the cost of the cap itself is reported separately.

    python tools/bench_methods.py                      # default shape, every method
    python tools/bench_methods.py --steps 5 --methods baseline,sigma_reparam
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stable_megatron.bench import (  # noqa: F401  (METHODS etc. are this script's API too)
    METHODS,
    OPTIMIZERS,
    ROOT,
    Bf16Master,
    Progress,
    iqr,
    prepare,
    quiet_imports,
)
from stable_megatron.bench import table as md_table

BASELINE = "baseline"
# The baseline on the explicit-softmax attention path, to price the cap where it forces it.
MATH_BASELINE = "baseline_math"
# (an optimizer of OPTIMIZERS is timed like a method: the baseline model, its `train` keys)
ALL_METHODS = {**METHODS, MATH_BASELINE: {"attention_backend": "math"},
               **{name: {} for name in OPTIMIZERS}}
MEMORY_STEPS = 2  # steps of a memory measurement: the second one runs with AdamW state allocated

# (label, method, maximum step-time ratio vs the baseline)
TARGETS = (
    ("sigma-reparam", "sigma_reparam", 1.10),
    ("QK-norm + cap", "qk_norm_cap", 1.10),
    ("MLRA", "mlra", 1.00),
)


@dataclass(frozen=True)
class Shape:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    seq: int = 512
    batch: int = 4
    vocab: int = 8192
    precision: str = "fp32"  # bf16: bf16 model, fp32 master weights and AdamW (Bf16Master)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


# --------------------------------------------------------------------------------------------
# Progress (stderr)


# --------------------------------------------------------------------------------------------
# Models and steps


def setup(device: str = "auto"):
    """A world-1 process group and megatron-core's TP=1 groups on the selected device."""
    from stable_megatron import parallel

    prepare(device)
    return parallel.initialize(tp=1, pp=1, device=device)


def method_config(method: str, shape: Shape, device: str = "auto"):
    from stable_megatron.config import config_from_dict, validate

    model = {
        "hidden_size": shape.hidden,
        "num_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "seq_length": shape.seq,
        **ALL_METHODS[method],
    }
    cfg = config_from_dict({
        "data": {"vocab_size": shape.vocab},
        "model": model,
        "parallel": {"tp": 1, "pp": 1, "device": device},
        "train": {"micro_batch_size": shape.batch, "global_batch_size": shape.batch,
                  "precision": shape.precision, **OPTIMIZERS.get(method, {})},
    })
    validate(cfg, 1)
    return cfg


def attention_path(method: str, on_cuda: bool) -> str:
    from stable_megatron.model.spec import attention_kernel

    m = ALL_METHODS[method]
    return attention_kernel(m.get("attention_backend", "auto"), m.get("softmax_cap"), on_cuda)


class Bench:
    """One method's model, optimizer and step."""

    def __init__(self, method: str, shape: Shape, state) -> None:
        from stable_megatron.engine import make_muon, make_optimizer
        from stable_megatron.hooks import model_hooks
        from stable_megatron.model.gpt import build_model, count_parameters
        from stable_megatron.model.sigma_reparam import sigma_reparam_layers

        self.method, self.device = method, state.device
        cfg = method_config(method, shape, state.device.type)
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints the partitioning
            model = build_model(cfg, state.topology, state.device)
        self.model = model.to(state.device)
        self.model.train()
        make = make_muon if cfg.train.optimizer == "muon" else make_optimizer
        self.optimizer = make(self.model, cfg)  # as engine.build_engine
        self.params = count_parameters(self.model)
        self.reparam_linears = sum(1 for _ in sigma_reparam_layers(self.model))
        self.hooks = model_hooks(cfg, self.model)
        self.bf16 = Bf16Master(self.model, self.optimizer) if cfg.train.precision == "bf16" \
            else None
        self.times: list[float] = []

    def step(self, tokens, labels) -> float:
        """One optimizer step; returns its wall time in seconds."""
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        for hook in self.hooks:
            hook.before_step(0)
        loss = self.model.loss_fn(self.model(tokens), labels)  # the training loss (z-loss)
        loss.backward()
        if self.bf16:
            self.bf16.step()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for hook in reversed(self.hooks):
            hook.after_step(0, {})
        if cuda:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.method}: non-finite loss {loss.item()}")
        return elapsed


def batch_of(shape: Shape, device, seed: int = 0):
    """Random tokens [b, s] and the next-token labels [b, s] (fixed across methods)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=generator)
    data = data.to(device)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def _cuda_peak_bytes(method: str, shape: Shape, state, tokens, labels) -> tuple[Bench, int]:
    """Build `method` and run MEMORY_STEPS steps; peak CUDA bytes above what was there before."""
    import torch

    torch.cuda.synchronize(state.device)
    torch.cuda.reset_peak_memory_stats(state.device)
    before = torch.cuda.memory_allocated(state.device)
    bench = Bench(method, shape, state)
    for _ in range(MEMORY_STEPS):
        bench.step(tokens, labels)
    return bench, torch.cuda.max_memory_allocated(state.device) - before


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_one(method: str, shape: Shape, device: str = "auto") -> dict[str, Any]:
    """`--only`: this process measures one method's peak memory (and the time of its steps)."""
    state = setup(device)
    tokens, labels = batch_of(shape, state.device)
    gc.collect()
    if state.device.type == "cuda":
        bench, peak = _cuda_peak_bytes(method, shape, state, tokens, labels)
        kind = "cuda_max_allocated"
    else:
        before = _maxrss_bytes()
        bench = Bench(method, shape, state)
        for _ in range(MEMORY_STEPS):
            bench.times.append(bench.step(tokens, labels))
        peak = _maxrss_bytes() - before
        kind = "peak_rss_increase"
    return {
        "method": method,
        "params": bench.params,
        "peak_bytes": peak,
        "memory_kind": kind,
        "step_times": bench.times,
    }


def _memory_subprocess(method: str, shape: Shape, device: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", method, "--json",
           "--device", device, *_shape_flags(shape)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)  # this process's rendezvous port: the child picks its own
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory measurement of {method} failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def _shape_flags(shape: Shape) -> list[str]:
    return [f"--{name}={value}" for name, value in asdict(shape).items()]


# --------------------------------------------------------------------------------------------
# The benchmark


def resolve_methods(methods: list[str], on_cuda: bool) -> list[str]:
    """The requested methods, the baseline first, plus the math-path baseline when a capped
    method runs on the math path while the baseline does not."""
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}, "
                         f"{', '.join(OPTIMIZERS)}")
    ordered = [BASELINE] + [m for m in dict.fromkeys(methods) if m != BASELINE]
    if MATH_BASELINE not in ordered and attention_path(BASELINE, on_cuda) != "math" and any(
        ALL_METHODS[m].get("softmax_cap") is not None and attention_path(m, on_cuda) == "math"
        for m in ordered
    ):
        ordered.append(MATH_BASELINE)
    return ordered


def run_benchmark(
    methods: list[str],
    shape: Shape | None = None,
    steps: int = 10,
    warmup: int = 2,
    device: str = "auto",
    memory: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure `methods` (the baseline is always included) and return

    {"device", "shape", "steps", "warmup", "memory_kind", "attention_paths": {method: kernel},
     "methods": {method: {"params", "param_ratio", "time_s", "time_ratio", "tokens_per_s",
                          "step_times", "peak_bytes", "mem_ratio", "reparam_linears"}},
     "vs_math_baseline": {method: {"time_ratio", "mem_ratio"}}}   (capped methods on math)

    Ratios are against the baseline of this run; peak_bytes / mem_ratio are None without
    `memory`."""
    shape = shape or Shape()
    progress = progress or Progress(enabled=False)
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    resolve_methods(methods, on_cuda=False)  # unknown names fail before any setup
    progress("setting up the process group")
    state = setup(device)
    on_cuda = state.device.type == "cuda"
    names = resolve_methods(methods, on_cuda)
    tokens, labels = batch_of(shape, state.device)

    # Peak memory first on CPU, one subprocess per method, before this process grows.
    peaks: dict[str, int | None] = dict.fromkeys(names)
    memory_kind = None
    if memory and not on_cuda:
        memory_kind = "peak RSS increase (own subprocess per method)"
        for i, name in enumerate(names, 1):
            progress(f"memory {i}/{len(names)}: {name} (subprocess)")
            peaks[name] = _memory_subprocess(name, shape, state.device.type)["peak_bytes"]

    benches: dict[str, Bench] = {}
    for i, name in enumerate(names, 1):
        progress(f"building {i}/{len(names)}: {name}")
        if memory and on_cuda:
            memory_kind = "torch.cuda.max_memory_allocated (build + 2 steps)"
            benches[name], peaks[name] = _cuda_peak_bytes(name, shape, state, tokens, labels)
        else:
            benches[name] = Bench(name, shape, state)

    gc.collect()
    rounds = warmup + steps
    for r in range(rounds):
        phase = "warm-up" if r < warmup else "timed"
        head = f"round {r + 1}/{rounds} ({phase})"
        progress(head)
        order = names[r % len(names):] + names[: r % len(names)]  # rotate the start
        for name in order:
            progress(f"{head}: {name}", detail=True)
            elapsed = benches[name].step(tokens, labels)
            if r >= warmup:
                benches[name].times.append(elapsed)
    progress.done()

    base = benches[BASELINE]
    base_time = statistics.median(base.times)
    results: dict[str, dict[str, Any]] = {}
    for name, bench in benches.items():
        t = statistics.median(bench.times)
        peak = peaks[name]
        results[name] = {
            "params": bench.params,
            "param_ratio": bench.params / base.params,
            "time_s": t,
            "spread": iqr(bench.times) / t,
            "time_ratio": t / base_time,
            "tokens_per_s": shape.tokens / t,
            "step_times": list(bench.times),
            "peak_bytes": peak,
            "mem_ratio": None if peak is None or not peaks[BASELINE] else peak / peaks[BASELINE],
            "reparam_linears": bench.reparam_linears,
        }
    paths = {name: attention_path(name, on_cuda) for name in names}
    vs_math = {}
    if MATH_BASELINE in results:
        ref = results[MATH_BASELINE]
        for name in names:
            if ALL_METHODS[name].get("softmax_cap") is not None and paths[name] == "math":
                mem = results[name]["peak_bytes"]
                vs_math[name] = {
                    "time_ratio": results[name]["time_s"] / ref["time_s"],
                    "mem_ratio": None if mem is None or not ref["peak_bytes"]
                    else mem / ref["peak_bytes"],
                }
    for bench in benches.values():  # free the models before returning
        bench.model = bench.optimizer = None
    return {
        "device": str(state.device),
        "threads": _threads(),
        "shape": asdict(shape),
        "steps": steps,
        "warmup": warmup,
        "memory_kind": memory_kind,
        "attention_paths": paths,
        "methods": results,
        "vs_math_baseline": vs_math,
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
# Report


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}x"


def format_report(result: dict[str, Any]) -> str:
    s, res, paths = result["shape"], result["methods"], result["attention_paths"]
    out = [
        f"stability-method benchmark on {result['device']} ({result['threads']} threads): "
        f"hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, seq {s['seq']}, "
        f"micro-batch {s['batch']}, vocab {s['vocab']}",
        f"step = model hooks (power step, QK-clip) + forward + loss (LMLoss) + backward + AdamW; "
        f"median of {result['steps']} timed steps after {result['warmup']} warm-up, "
        f"methods interleaved round-robin",
        "",
    ]
    header = ["method", "attn", "step ms", "IQR", "time", "tokens/s", "params", "params x",
              "peak MiB", "mem x"]
    rows = []
    for name, r in res.items():
        if name == MATH_BASELINE:
            continue
        rows.append([
            name, paths[name], f"{r['time_s'] * 1e3:.0f}", f"{r['spread']:.0%}",
            _ratio(r["time_ratio"]),
            f"{r['tokens_per_s']:.0f}", f"{r['params']:,}", _ratio(r["param_ratio"]),
            _mib(r["peak_bytes"]), _ratio(r["mem_ratio"]),
        ])
    out += md_table(header, rows)
    if result["vs_math_baseline"]:
        ref = res[MATH_BASELINE]
        out += [
            "",
            f"capped methods vs a baseline on the same math attention path "
            f"({MATH_BASELINE}: model.attention_backend=math, "
            f"{_ratio(ref['time_ratio'])} time, {_ratio(ref['mem_ratio'])} memory "
            f"of the SDPA baseline):",
        ]
        rows = [[MATH_BASELINE, f"{ref['time_s'] * 1e3:.0f}", f"{ref['spread']:.0%}", "1.000x",
                 _mib(ref["peak_bytes"]), "1.000x" if ref["peak_bytes"] else "-"]]
        for name, v in result["vs_math_baseline"].items():
            r = res[name]
            rows.append([name, f"{r['time_s'] * 1e3:.0f}", f"{r['spread']:.0%}",
                         _ratio(v["time_ratio"]), _mib(r["peak_bytes"]), _ratio(v["mem_ratio"])])
        out += md_table(["method", "step ms", "IQR", "time", "peak MiB", "mem x"], rows)
    out += ["", "notes:"]
    out.append("- ratios are against the baseline measured in this run (pre-LN, SDPA attention"
               " unless noted); params x counts trainable parameters")
    out.append("- IQR: interquartile range of a method's timed steps over their median; time "
               "ratios that differ by less than about the IQRs are not resolved by this run")
    if result["memory_kind"]:
        out.append(f"- peak memory: {result['memory_kind']}")
    if result["vs_math_baseline"]:
        out.append(
            f"- on {result['device']} softmax capping runs the exact math attention path, which "
            "materialises the [b, h, s, s] attention matrix, while the baseline runs SDPA: the "
            "first table prices cap + path, the second the cap alone"
        )
    out.append("- " + target_summary(result))
    return "\n".join(out)


def target_summary(result: dict[str, Any]) -> str:
    """One line: PASS/MISS per target on the step-time ratio vs the baseline."""
    res, parts = result["methods"], []
    for label, method, limit in TARGETS:
        if method not in res:
            parts.append(f"{label} <= {limit:.2f}x: not measured")
            continue
        ratio = res[method]["time_ratio"]
        verdict = "PASS" if ratio <= limit else "MISS"
        extra = ""
        if method in result["vs_math_baseline"]:
            extra = f" (cap alone {result['vs_math_baseline'][method]['time_ratio']:.3f}x)"
        parts.append(f"{label} {ratio:.3f}x <= {limit:.2f}x {verdict}{extra}")
    return "targets (step time vs baseline): " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Shape()
    p = argparse.ArgumentParser(
        description="Step time and peak memory of each stability method relative to the "
        "baseline, measured in one interleaved run on one process.",
    )
    p.add_argument("--hidden", type=int, default=defaults.hidden)
    p.add_argument("--layers", type=int, default=defaults.layers)
    p.add_argument("--heads", type=int, default=defaults.heads)
    p.add_argument("--seq", type=int, default=defaults.seq)
    p.add_argument("--batch", type=int, default=defaults.batch, help="micro-batch size")
    p.add_argument("--vocab", type=int, default=defaults.vocab)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=defaults.precision,
                   help="bf16: the model in bf16, AdamW over fp32 master weights")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of: {', '.join(METHODS)} (baseline is always "
                   f"measured; {MATH_BASELINE} is added when a cap forces the math path)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (stable_megatron.parallel.select_device)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--only", metavar="METHOD", choices=sorted(ALL_METHODS),
                   help="measure the peak memory of METHOD in this process (used internally)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", metavar="PATH", help="also write the result (with every step "
                   "time) as JSON to PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare(args.device)
    shape = Shape(args.hidden, args.layers, args.heads, args.seq, args.batch, args.vocab,
                  args.precision)
    if args.only:
        result = measure_one(args.only, shape, args.device)
        print(json.dumps(result))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    start = time.perf_counter()
    try:
        result = run_benchmark(methods, shape, args.steps, args.warmup, args.device,
                               memory=not args.no_memory, progress=Progress())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result["wall_s"] = time.perf_counter() - start
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_report(result))
        print(f"(wall time {result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
