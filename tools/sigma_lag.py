#!/usr/bin/env python
"""How far sigma-reparam's running estimate lags the converged spectral norm, per run.

    python tools/sigma_lag.py RUN_DIR [RUN_DIR ...] [--steps 10,20,50,100,200,300]

Reads the `sigma_lag/layer_NN/<slot>` metrics (1 - sigma / sigma_exact; logged with
`metrics.sigma_exact_iters` > 0) and prints a Markdown table: per run, the largest lag over the
layers at the chosen steps, and the mean and largest over all metric steps. A positive lag is an
estimate below the true norm, i.e. a weight scaled up by more than gamma / sigma(W).
`--scale` prints gamma / sigma_exact instead: the factor by which an optimizer step of W moves
the effective weight gamma / sigma(W) * W.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stable_megatron.analysis.runs import (
    RunLogError,
    is_number,
    print_table,
    read_run,
    step_list,
)


def lags(record: dict) -> list[float]:
    return [v for k, v in record.items() if k.startswith("sigma_lag/") and is_number(v)]


def scales(record: dict) -> list[float]:
    """gamma / sigma_exact of each layer: the factor by which a step of W moves W_hat."""
    return [record[f"gamma/{k[len('sigma_exact/'):]}"] / v for k, v in record.items()
            if k.startswith("sigma_exact/") and is_number(v)
            and is_number(record.get(f"gamma/{k[len('sigma_exact/'):]}"))]


def scale_table(run_dirs: list[Path], steps: list[int]) -> list[str]:
    """Per run, the smallest and largest gamma / sigma_exact over the layers at `steps`."""
    lines = ["| run | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for run_dir in run_dirs:
        by_step = {r["step"]: scales(r) for r in read_run(run_dir).records if scales(r)}
        if not by_step:
            raise RunLogError(f"{run_dir}: no sigma_exact metrics (metrics.sigma_exact_iters=0?)")
        cells = [f"{min(by_step[s]):.3f} to {max(by_step[s]):.3f}" if s in by_step else "-"
                 for s in steps]
        lines.append(f"| {run_dir} | " + " | ".join(cells) + " |")
    return lines


def table(run_dirs: list[Path], steps: list[int]) -> list[str]:
    lines = ["| run | " + " | ".join(f"step {s}" for s in steps) + " | mean | max |",
             "|---|" + "---|" * (len(steps) + 2)]
    for run_dir in run_dirs:
        by_step = {r["step"]: max(lags(r)) for r in read_run(run_dir).records if lags(r)}
        if not by_step:
            raise RunLogError(f"{run_dir}: no sigma_lag metrics (metrics.sigma_exact_iters=0?)")
        cells = [f"{by_step[s]:.1%}" if s in by_step else "-" for s in steps]
        values = list(by_step.values())
        lines.append(f"| {run_dir} | " + " | ".join(cells) +
                     f" | {sum(values) / len(values):.1%} | {max(values):.1%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--steps", default=[10, 20, 50, 100, 200, 300], type=step_list,
                        help="comma-separated steps for the table's columns")
    parser.add_argument("--scale", action="store_true",
                        help="print gamma / sigma_exact (smallest to largest over the layers) "
                             "instead of the lag")
    args = parser.parse_args(argv)
    return print_table(lambda: (scale_table if args.scale else table)(args.run_dirs, args.steps))


if __name__ == "__main__":
    sys.exit(main())
