#!/usr/bin/env python
"""Plot the stability metrics of one or more runs, with the early warnings and the divergence.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --out metrics.png [--labels a b ...]

Panels over steps: training loss, gradient norm, largest attention logit (maximum over
layers), lowest normalised attention entropy (minimum over layers and heads; 1 is uniform),
and TEV (`tev/mean`). Each run's records (`RUN_DIR/metrics.jsonl`) are replayed through the
early-warning rules (`stable_megatron/metrics/warning.py`) with the run's own
`stability.warning` settings (from `RUN_DIR/config.yaml`, else the defaults), so any run's log
can be plotted, including runs logged before the rules existed. Dashed vertical lines mark the
steps where a rule fired; a dotted line marks where the loss diverged: the first step whose
loss is not finite, or from which it stays more than `--diverge-margin` nats (default 1) above
the lowest loss before it for `--patience` logged steps (default 10). The steps are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

RULE_MARKS = {"logit_growth": "^", "entropy_collapse": "v", "tev_growth": "s"}


def load_warning_module():
    """`stable_megatron.metrics.warning` loaded from its file: the rules are plain Python, and
    importing them through the package would import `stable_megatron.metrics` (torch,
    megatron-core, DeepSpeed) only to draw a plot."""
    name = "_stable_megatron_warning_rules"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("stable_megatron")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the stable_megatron package is not importable")
    path = Path(list(spec.submodule_search_locations)[0]) / "metrics" / "warning.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The step records of `run_dir/metrics.jsonl` (event lines and torn lines skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if isinstance(record, dict) and "step" in record and "event" not in record:
            records.append(record)
    return records


def warning_config(run_dir: Path):
    """The run's `stability.warning` settings (config.yaml), else the defaults."""
    from stable_megatron.config import WarningConfig

    path = run_dir / "config.yaml"
    settings = {}
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        settings = ((data.get("stability") or {}).get("warning")) or {}
    known = WarningConfig.__dataclass_fields__
    return WarningConfig(**{k: v for k, v in settings.items() if k in known})


def divergence_step(records: list[dict[str, Any]], margin: float = 1.0,
                    patience: int = 10) -> int | None:
    """First step whose loss is not finite, or from which the loss stays more than `margin`
    nats above the lowest loss before it for `patience` logged steps in a row (a one-step
    spike that recovers at once is not a divergence)."""
    best = math.inf
    start, count = None, 0
    for record in records:
        loss = record.get("loss")
        if not isinstance(loss, (int, float)):
            continue
        if not math.isfinite(loss):
            return int(record["step"]) if start is None else start
        if loss > best + margin:
            if start is None:
                start, count = int(record["step"]), 0
            count += 1
            if count >= patience:
                return start
            continue  # the reference is the lowest loss before the excursion
        start, count = None, 0
        best = min(best, loss)
    return None


def series(records: list[dict[str, Any]], pick) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = pick(record)
        if value is not None:
            steps.append(record["step"])
            values.append(value)
    return steps, values


def _extreme(record: dict[str, Any], prefix: str, suffix: str, fn) -> float | None:
    values = [v for k, v in record.items()
              if k.startswith(prefix) and k.endswith(suffix) and isinstance(v, (int, float))]
    return fn(values) if values else None


PANELS = [
    ("loss", lambda r: r.get("loss"), "linear"),
    ("grad norm", lambda r: r.get("grad_norm"), "log"),
    ("max attention logit", lambda r: _extreme(r, "attn_logit_max/layer_", "", max), "log"),
    ("min attention entropy / log(keys)",
     lambda r: _extreme(r, "attn_entropy_norm/layer_", "/min", min), "linear"),
    ("TEV mean", lambda r: r.get("tev/mean"), "linear"),
]


def plot(run_dirs: list[Path], out: Path, labels: list[str] | None = None,
         margin: float = 1.0, title: str | None = None, patience: int = 10,
         max_step: int | None = None,
         zoom: tuple[int, int] | None = None) -> dict[str, dict[str, Any]]:
    """Draw the panels for `run_dirs` into `out` (steps up to `max_step`, if given; with
    `zoom=(first, last)` a second column shows those steps); returns, per run label, the
    warning events and the divergence step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rules = load_warning_module()
    labels = labels or [d.name for d in run_dirs]
    columns = 2 if zoom else 1
    fig, grid = plt.subplots(
        len(PANELS), columns, figsize=(9 + 4 * (columns - 1), 2.1 * len(PANELS)),
        sharex="col", squeeze=False, gridspec_kw={"width_ratios": [2, 1][:columns]},
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    summary: dict[str, dict[str, Any]] = {}
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        color = colors[i % len(colors)]
        records = read_records(run_dir)
        if max_step is not None:
            records = [r for r in records if r["step"] <= max_step]
        events = rules.replay(warning_config(run_dir), records)
        diverged = divergence_step(records, margin, patience)
        summary[label] = {"warnings": events, "diverged": diverged}
        loss_at = {r["step"]: r.get("loss") for r in records}
        for col in range(columns):
            shown_records = records
            if col == 1:
                shown_records = [r for r in records if zoom[0] <= r["step"] <= zoom[1]]
            for ax, (_, pick, scale) in zip(grid[:, col], PANELS, strict=True):
                steps, values = series(shown_records, pick)
                shown = [(s, v) for s, v in zip(steps, values, strict=True)
                         if math.isfinite(v) and (scale != "log" or v > 0)]
                if shown:
                    ax.plot(*zip(*shown, strict=True), color=color, lw=1.2, label=label,
                            marker="." if col == 1 else None, ms=3)
                for event in events:
                    ax.axvline(event.step, color=color, ls="--", lw=0.9, alpha=0.8)
                if diverged is not None:
                    ax.axvline(diverged, color=color, ls=":", lw=1.6)
            # rule markers on the loss panel, at the loss of the warning step
            for event in events:
                y = loss_at.get(event.step)
                if isinstance(y, (int, float)) and math.isfinite(y):
                    grid[0, col].plot(event.step, y, RULE_MARKS.get(event.rule, "o"),
                                      color=color, ms=7, mec="black", mew=0.6)
    for col in range(columns):
        for ax, (name, _, scale) in zip(grid[:, col], PANELS, strict=True):
            ax.set_yscale(scale)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
        grid[-1, col].set_xlabel("step")
    if zoom:
        grid[0, 1].set_xlim(zoom[0] - 0.5, zoom[1] + 0.5)
        grid[0, 1].set_title(f"steps {zoom[0]}-{zoom[1]}", fontsize=9)
    handles, run_labels = grid[0, 0].get_legend_handles_labels()
    keys = [
        Line2D([], [], color="gray", ls="--", label="early warning fired"),
        Line2D([], [], color="gray", ls=":", lw=1.6, label=f"loss diverged (+{margin:g} nats)"),
    ] + [Line2D([], [], color="gray", ls="", marker=m, mec="black", label=rule)
         for rule, m in RULE_MARKS.items()]
    grid[0, 0].legend(handles + keys, run_labels + [k.get_label() for k in keys], fontsize=7,
                      ncol=2, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    summary = plot(args.run_dirs, args.out, args.labels, args.diverge_margin, args.title,
                   args.patience, args.max_step, zoom)
    for label, info in summary.items():
        print(f"{label}: loss diverged at step {info['diverged']}"
              if info["diverged"] is not None else f"{label}: loss did not diverge")
        for event in info["warnings"]:
            print(f"  warning ({event.rule}) {event.message}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
