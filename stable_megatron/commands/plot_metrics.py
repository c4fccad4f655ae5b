"""Plot the stability metrics of one or more runs, with the early warnings and the divergence.

    stable-megatron plot RUN_DIR [RUN_DIR ...] --out metrics.png [--labels a b ...]

Panels over steps: training loss, gradient norm, largest attention logit (maximum over
layers), lowest normalised attention entropy (minimum over layers and heads; 1 is uniform),
and TEV (`tev/mean`). Each run's records (`RUN_DIR/metrics.jsonl`) are replayed through the
early-warning rules (`stable_megatron/stability/warning.py`) with the run's own
`stability.warning` settings (from `RUN_DIR/config.yaml`, else the defaults), so any run's log
can be plotted, including runs logged before the rules existed. Dashed vertical lines mark the
steps where a rule fired; a dotted line marks where the loss diverged: the first step whose
loss is not finite, or from which it stays more than `--diverge-margin` nats (default 1) above
the lowest loss before it for `--patience` logged steps (default 10). The steps are printed.
The drawing is `stable_megatron.analysis.plotting.plot`; `stable-megatron report` draws every
stability metric of a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stable_megatron.analysis.plotting import plot
from stable_megatron.analysis.runs import RunLogError


def main(argv: list[str] | None = None, prog: str = "stable-megatron plot") -> int:
    """`prog`: the name in usage and error lines (tools/plot_metrics.py passes its own)."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: names)")
    parser.add_argument("--diverge-margin", type=float, default=1.0,
                        help="nats above the lowest loss so far that count as diverged")
    parser.add_argument("--patience", type=int, default=10,
                        help="logged steps the loss must stay above the margin")
    parser.add_argument("--max-step", type=int, help="plot (and replay) steps up to this one")
    parser.add_argument("--zoom", help="FIRST:LAST: a second column showing these steps")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.run_dirs):
        parser.error("--labels needs one label per run directory")
    zoom = None
    if args.zoom:
        try:
            first, last = (int(x) for x in args.zoom.split(":"))
        except ValueError:
            parser.error(f"--zoom {args.zoom}: expected FIRST:LAST, e.g. 1:30")
        zoom = (first, last)
    try:
        summary = plot(args.run_dirs, args.out, args.labels, args.diverge_margin, args.title,
                       args.patience, args.max_step, zoom)
    except RunLogError as err:
        raise SystemExit(f"error: {err}") from None
    for label, info in summary.items():
        print(f"{label}: loss diverged at step {info['diverged']}"
              if info["diverged"] is not None else f"{label}: loss did not diverge")
        for event in info["warnings"]:
            print(f"  warning ({event.rule}) {event.message}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
