#!/usr/bin/env python
"""Print logged metrics of runs at chosen steps, as a Markdown table.

    python tools/metric_at.py RUN_DIR [RUN_DIR ...] --keys tev/mean,val_loss --steps 100,300

One row per run and key; a key may end in `*` to take every matching key (e.g.
`attn_logit_max/layer_*`), each its own row. `-` where a run did not log the key at that step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stable_megatron.analysis.runs import (
    is_number,
    print_table,
    read_run,
    step_list,
)


def table(run_dirs: list[Path], keys: list[str], steps: list[int]) -> list[str]:
    lines = ["| run | key | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for run_dir in run_dirs:
        by_step = {r["step"]: r for r in read_run(run_dir).records}
        logged = sorted({k for r in by_step.values() for k in r})
        for pattern in keys:
            names = ([k for k in logged if k.startswith(pattern[:-1])] if pattern.endswith("*")
                     else [pattern])
            for name in names:
                cells = [by_step.get(s, {}).get(name) for s in steps]
                lines.append(f"| {run_dir} | {name} | " + " | ".join(
                    f"{v:.4g}" if is_number(v) else "-" for v in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--keys", required=True, help="comma-separated metric keys")
    parser.add_argument("--steps", required=True, type=step_list,
                        help="comma-separated steps")
    args = parser.parse_args(argv)
    return print_table(lambda: table(args.run_dirs, args.keys.split(","), args.steps))


if __name__ == "__main__":
    sys.exit(main())
