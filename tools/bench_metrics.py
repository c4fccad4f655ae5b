"""Cost of the stability metrics: step time with the metrics on vs off, in one run.

The model, DeepSpeed engine and steps are the training loop's (`stable_megatron.train`:
`build_engine`, `micro_batches`, and the `StabilityMetrics` step hook with sigma-reparam's
power step on a `hooks.StepRunner`, as the Trainer runs them), on synthetic tokens (the data
do not change the step time). One engine serves both arms: the metrics add nothing to the
steps between metric steps (no forward hooks, no capture), so "off" is the same engine with
no metric step.

Timing: after `--warmup` untimed rounds, every round runs one block of `interval` steps with
the metrics on (its last step is the metric step, as in training at `metrics.interval`) and
one block of `interval` steps with them off; the order of the two blocks alternates from round
to round, so load drift on a shared machine hits both alike. Reported, per shape:
- the median over rounds of each block's mean step time, on and off, and their ratio: the cost
  of the metrics at that interval (target: <= 3% at the default interval, 10);
- the metric step against a plain step (medians), the overhead that implies at the interval
  (a second, less noisy estimate of the same cost), and where the metric step's extra time
  goes: `before_step`, the weight/gradient metrics inside the optimizer step
  (`before_update`), `after_step`
  (attention statistics and the reductions), and the rest (the attention statistics pass and
  the output-norm hooks in the forwards).

    python tools/bench_metrics.py                            # tiny recipe + a larger shape
    python tools/bench_metrics.py --shapes tiny --rounds 20
    python tools/bench_metrics.py model.softmax_cap=50        # any config override
    torchrun --nproc_per_node 2 tools/bench_metrics.py parallel.tp=2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from stable_megatron.bench import (  # noqa: F401  (RECIPE, SyntheticTokens: the API too)
    RECIPE,
    ROOT,
    Progress,
    SyntheticTokens,
    iqr,
    prepare,
)
from stable_megatron.bench import table as md_table

TARGET = 0.03  # metrics on vs off, at the default interval
# Shapes: config overrides on top of the recipe (then the command line's overrides).
SHAPES: dict[str, list[str]] = {
    "recipe": [],  # --recipe's own shape
    "tiny": [],  # the recipe: 4 layers, hidden 256, 4 heads, seq 128, 2 x 16 sequences
    "medium": [  # longer sequences (the attention statistics grow with seq^2): 2 x 2 x 512
        "model.num_layers=6", "model.hidden_size=384", "model.num_attention_heads=6",
        "model.seq_length=512", "train.micro_batch_size=2", "train.global_batch_size=4",
    ],
}
PHASES = ("before_step", "before_update", "after_step")


def shape_config(recipe: str | Path, shape: str, overrides: list[str], world: int):
    from stable_megatron.config import load_config, validate

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape}; valid: {', '.join(SHAPES)}")
    cfg = load_config(recipe, [*SHAPES[shape], *overrides])
    if not cfg.metrics.interval:
        raise ValueError("metrics.interval=0: nothing to measure")
    validate(cfg, world)  # resolves model.vocab_size from the recipe's data vocabulary
    return cfg


class Runner:
    """One shape's engine, data and metrics; `step()` is one training-loop step."""

    def __init__(self, cfg, state) -> None:
        from stable_megatron.engine import build_engine
        from stable_megatron.hooks import StepRunner
        from stable_megatron.methods.sigma_reparam import PowerIteration
        from stable_megatron.metrics import StabilityMetrics

        self.cfg, self.state = cfg, state
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its setup
            self.engine = build_engine(cfg, state)
        self.metrics = StabilityMetrics(cfg, state, self.engine)
        self._wrap_phases()  # before the runner takes the hook's methods
        power = PowerIteration(self.engine.module)
        self.measured = StepRunner(self.engine, [power, self.metrics])
        self.plain = StepRunner(self.engine, [power])
        self.data = SyntheticTokens(cfg.model.vocab_size, cfg.model.seq_length)
        self.accum = self.engine.gradient_accumulation_steps()
        self.consumed = 0
        self.phases: dict[str, float] = {}

    def _wrap_phases(self) -> None:
        """Time the metric step's pieces: instance attributes over the hook's methods
        (`before_update` is called from inside the engine's optimizer step)."""
        for name, attr in zip(PHASES, PHASES, strict=True):
            method = getattr(self.metrics, attr)

            def timed(*args, _method=method, _name=name, **kwargs):
                self._sync()
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self._sync()
                    self.phases[_name] = time.perf_counter() - start

            setattr(self.metrics, attr, timed)

    def _sync(self) -> None:
        import torch

        if self.state.device.type == "cuda":
            torch.cuda.synchronize(self.state.device)

    def step(self, measure: bool) -> float:
        """One optimizer step (a metric step when `measure`), as `train.train` runs it,
        including the loss and grad-norm reads of its log record; returns the wall time."""
        from stable_megatron.batches import micro_batches

        cfg, layout = self.cfg, self.state.layout
        self.phases = {}
        self._sync()
        start = time.perf_counter()
        batches = micro_batches(self.data, self.consumed, cfg, layout, self.state.device,
                                self.accum)
        runner, number = (self.measured, cfg.metrics.interval) if measure else (self.plain, 0)
        loss = runner.step(number, batches)
        stats: dict = {}
        runner.after_step(number, stats)
        loss.item()
        float(self.engine.get_global_grad_norm())
        self._sync()
        elapsed = time.perf_counter() - start
        self.consumed += cfg.train.global_batch_size
        if measure and layout.rank == 0 and not stats:
            raise RuntimeError("the metric step logged no metrics")
        return elapsed

    def close(self) -> None:
        self.engine = self.metrics = None
        gc.collect()


def bench_shape(cfg, state, rounds: int, warmup: int, progress: Progress,
                label: str = "") -> dict[str, Any]:
    """Interleaved on/off blocks of `metrics.interval` steps; see the module docstring."""
    if rounds < 1 or warmup < 0:
        raise ValueError("rounds must be >= 1 and warmup >= 0")
    interval = cfg.metrics.interval
    progress(f"{label}: building the engine")
    runner = Runner(cfg, state)
    blocks: dict[str, list[float]] = {"on": [], "off": []}
    metric_steps: list[float] = []
    plain_steps: list[float] = []
    phases: dict[str, list[float]] = {name: [] for name in PHASES}
    gc.collect()
    try:
        for r in range(warmup + rounds):
            timed = r >= warmup
            head = f"{label}: round {r + 1}/{warmup + rounds} ({'timed' if timed else 'warm-up'})"
            progress(head)
            for arm in (("on", "off") if r % 2 == 0 else ("off", "on")):
                times = []
                for i in range(1, interval + 1):
                    progress(f"{head}: metrics {arm}, step {i}/{interval}", detail=True)
                    measure = arm == "on" and runner.metrics.due(i)
                    times.append(runner.step(measure))
                    if timed and measure:
                        metric_steps.append(times[-1])
                        for name in PHASES:
                            phases[name].append(runner.phases.get(name, 0.0))
                    elif timed:
                        plain_steps.append(times[-1])
                if timed:
                    blocks[arm].append(sum(times) / len(times))
    finally:
        runner.close()
        progress.done()
    on, off = statistics.median(blocks["on"]), statistics.median(blocks["off"])
    metric, plain = statistics.median(metric_steps), statistics.median(plain_steps)
    phase_medians = {name: statistics.median(v) for name, v in phases.items()}
    m, p = cfg.model, cfg.parallel
    return {
        "shape": {"layers": m.num_layers, "hidden": m.hidden_size,
                  "heads": m.num_attention_heads, "seq": m.seq_length,
                  "micro_batch": cfg.train.micro_batch_size,
                  "global_batch": cfg.train.global_batch_size, "vocab": m.vocab_size,
                  "tp": p.tp, "pp": p.pp, "dp": state.layout.dp,
                  "accumulation": runner.accum},
        "interval": interval,
        "rounds": rounds,
        "warmup": warmup,
        "on_s": on,
        "off_s": off,
        "ratio": on / off,
        "overhead": on / off - 1,
        "paired_ratio": statistics.median(a / b for a, b in zip(blocks["on"], blocks["off"],
                                                                 strict=True)),
        "on_spread": iqr(blocks["on"]) / on,
        "off_spread": iqr(blocks["off"]) / off,
        "metric_step_s": metric,
        "plain_step_s": plain,
        "metric_step_ratio": metric / plain,
        "implied_overhead": (metric - plain) / (interval * plain),
        "phases_s": phase_medians,
        "blocks": blocks,
        "metric_steps": metric_steps,
        "plain_steps": plain_steps,
        "pass": on / off - 1 <= TARGET,
    }


def run_benchmark(
    shapes: list[str],
    overrides: list[str] | None = None,
    recipe: str | Path = RECIPE,
    rounds: int = 8,
    warmup: int = 1,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """{"device", "threads", "world", "recipe", "overrides", "shapes": {shape: bench_shape()}}.
    Starts the process group (world from the launcher's environment) if none exists; the
    caller ends it."""
    import torch

    from stable_megatron import parallel

    overrides = list(overrides or [])
    progress = progress or Progress(enabled=False)
    world = parallel.env_world_size()
    configs = {name: shape_config(recipe, name, overrides, world) for name in shapes}
    first = next(iter(configs.values()))
    device = device if device != "auto" else first.parallel.device
    progress("setting up the process group")
    state = parallel.initialize(first.parallel.tp, first.parallel.pp, device)
    results = {}
    for name, cfg in configs.items():
        if (cfg.parallel.tp, cfg.parallel.pp) != (first.parallel.tp, first.parallel.pp):
            raise ValueError("every shape must use the same parallel layout")
        results[name] = bench_shape(cfg, state, rounds, warmup, progress, label=name)
    return {
        "device": str(state.device),
        "threads": torch.get_num_threads(),
        "world": state.layout.world,
        "recipe": str(recipe),
        "overrides": overrides,
        "shapes": results,
    }


# --------------------------------------------------------------------------------------------
# Report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def format_report(result: dict[str, Any]) -> str:
    shapes = result["shapes"]
    any_shape = next(iter(shapes.values()))
    out = [
        f"stability-metrics overhead on {result['device']} ({result['threads']} threads, "
        f"world {result['world']}), recipe {Path(result['recipe']).name}"
        + (f" + {' '.join(result['overrides'])}" if result["overrides"] else ""),
        f"one run: after {any_shape['warmup']} warm-up round(s), {any_shape['rounds']} rounds "
        f"of one block of `interval` steps with the metrics on (the last step is a metric step)"
        f" and one with them off, order alternating; synthetic tokens",
        "",
    ]
    header = ["shape", "layers", "hidden", "heads", "seq", "batch", "tp x pp x dp"]
    rows = []
    for name, r in shapes.items():
        s = r["shape"]
        rows.append([name, str(s["layers"]), str(s["hidden"]), str(s["heads"]), str(s["seq"]),
                     f"{s['global_batch'] // (s['micro_batch'] * s['dp'])} x {s['micro_batch']}"
                     f" x {s['dp']}", f"{s['tp']} x {s['pp']} x {s['dp']}"])
    out += md_table(header, rows)
    out.append("")
    header = ["shape", "interval", "off ms/step", "IQR", "on ms/step", "IQR", "on/off",
              "paired", "metric step ms", "plain step ms", "metric/plain", "implied"]
    rows = []
    for name, r in shapes.items():
        rows.append([
            name, str(r["interval"]), _ms(r["off_s"]), f"{r['off_spread']:.0%}", _ms(r["on_s"]),
            f"{r['on_spread']:.0%}", f"{r['ratio']:.3f}x", f"{r['paired_ratio']:.3f}x",
            _ms(r["metric_step_s"]),
            _ms(r["plain_step_s"]), f"{r['metric_step_ratio']:.3f}x",
            _pct(r["implied_overhead"]),
        ])
    out += md_table(header, rows)
    out += ["", "extra time of the metric step over a plain step (medians, ms):"]
    header = ["shape", "extra", "before_step", "grad/param/TEV", "after_step",
              "attention pass + hooks"]
    rows = []
    for name, r in shapes.items():
        extra = r["metric_step_s"] - r["plain_step_s"]
        ph = r["phases_s"]
        rest = extra - sum(ph.values())
        rows.append([name, _ms(extra), _ms(ph["before_step"]), _ms(ph["before_update"]),
                     _ms(ph["after_step"]), _ms(rest)])
    out += md_table(header, rows)
    out += [
        "",
        "notes:",
        "- on/off: median over rounds of each block's mean step time (on) over the same (off);"
        " IQR: interquartile range of the block means over their median (differences below it"
        " are not resolved); paired: median over rounds of on/off within the round",
        "- implied: (metric step - plain step) / (interval x plain step), from the step "
        "medians: the same overhead estimated from single steps",
        "- grad/param/TEV: the weight and gradient metrics inside the optimizer step; "
        "after_step: attention statistics, output norms and every reduction; the rest is "
        "the attention statistics pass and the output-norm hooks in the forwards",
    ]
    verdicts = [f"{name} {_pct(r['overhead'])} {'PASS' if r['pass'] else 'FAIL'}"
                for name, r in shapes.items()]
    out.append(f"target: metrics on vs off <= +{TARGET:.0%} of step time at the interval: "
               + "; ".join(verdicts))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Step time with the stability metrics on vs off (at metrics.interval), "
        "interleaved in one run; the training loop's engine and steps.",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every shape, e.g. parallel.tp=2 metrics.interval=5")
    p.add_argument("--recipe", default=str(RECIPE), help="base recipe (default: %(default)s)")
    p.add_argument("--shapes", default="tiny,medium",
                   help=f"comma-separated subset of: {', '.join(SHAPES)} (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (one on + one off block)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the recipe's parallel.device")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", metavar="PATH", help="also write the result (every block and "
                   "step time) as JSON to PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare(args.device)
    from stable_megatron import parallel
    from stable_megatron.config import ConfigError

    rank0 = int(os.environ.get("RANK", "0")) == 0
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    start = time.perf_counter()
    try:
        result = run_benchmark(shapes, args.overrides, args.recipe, args.rounds, args.warmup,
                               args.device, progress=Progress(enabled=rank0))
    except (ValueError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        parallel.shutdown()
    result["wall_s"] = time.perf_counter() - start
    if not rank0:
        return 0
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
