"""The largest attention logit against the training loss, per method of a sweep: does one
method's largest logit grow faster than another's at the same loss (Kimi K2's observation about
Muon), and does a method that bounds the logits (QK-clip, QK-norm) pay for it in loss?

For every ended run of a sweep (`<method>[/seed_<s>]/lr_<lr>`, its log or committed series):
- its **curve**: at each metric step, the trailing mean of the last `SMOOTH` logged training
  losses and the largest `attn_logit_max/layer_*` over the layers;
- at each LR, the **matched loss**: the lowest smoothed loss that every run of that LR which
  did not diverge reaches (the largest of their minima), so that every method is compared
  where all of them have trained to the same point;
- per (method, LR): the largest logit at the first metric step where the run's smoothed loss is
  at or below the matched loss, mean and range over seeds; a diverged run is counted apart.

`stable-megatron report --logit-growth SWEEP_DIR [--out DIR]` writes `logit_growth.md` (the
table) and `logit_growth.png` (the curves: loss decreasing to the right, logit on a log scale,
one colour per method, a thin line per seed) into DIR (default SWEEP_DIR).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from stable_megatron.analysis.runs import RunLogError, finite
from stable_megatron.analysis.warning_score import SMOOTH, ScoredRun, load_sweep, smoothed

LOGIT_PREFIX = "attn_logit_max/layer_"


@dataclass
class Curve:
    method: str
    lr: float
    seed: int | None
    diverged: bool
    points: list[tuple[int, float, float]]  # (step, smoothed loss, largest logit)

    @property
    def lowest_loss(self) -> float | None:
        return min((p[1] for p in self.points), default=None)

    def logit_at(self, level: float) -> float | None:
        """The largest logit at the first metric step whose smoothed loss is <= `level`."""
        return next((logit for _, loss, logit in self.points if loss <= level), None)


def curve_of(run: ScoredRun) -> Curve:
    smooth = smoothed(run.losses)
    points = []
    for record in run.records:
        logits = [v for k, v in record.items() if k.startswith(LOGIT_PREFIX) and finite(v)]
        step = record.get("step")
        if logits and step in smooth and math.isfinite(smooth[step]):
            points.append((int(step), smooth[step], max(logits)))
    return Curve(run.method, run.lr, run.seed, run.status == "diverged", points)


def curves(sweep_dir: str | Path) -> list[Curve]:
    return [curve_of(run) for run in load_sweep(sweep_dir)]


def matched_levels(all_curves: list[Curve]) -> dict[float, float]:
    """LR -> the lowest smoothed loss every run at that LR that did not diverge reaches."""
    levels: dict[float, float] = {}
    for lr in sorted({c.lr for c in all_curves}):
        lows = [c.lowest_loss for c in all_curves
                if c.lr == lr and not c.diverged and c.lowest_loss is not None]
        if lows:
            levels[lr] = max(lows)
    return levels


def _cell(values: list[float], diverged: int) -> str:
    if not values:
        return f"{diverged} div" if diverged else "-"
    mean = statistics.fmean(values)
    text = f"{mean:.3g}" if len(values) == 1 else \
        f"{mean:.3g} ({min(values):.3g}-{max(values):.3g})"
    return text + (f", {diverged} div" if diverged else "")


def table(all_curves: list[Curve], methods: list[str] | None = None) -> list[str]:
    """Markdown: per method (rows) and LR (columns), the largest logit at the matched loss."""
    levels = matched_levels(all_curves)
    methods = methods or list(dict.fromkeys(c.method for c in all_curves))
    lrs = sorted(levels)
    lines = ["| method | " + " | ".join(f"lr {lr:g} (loss {levels[lr]:.2f})" for lr in lrs)
             + " |", "|---" * (len(lrs) + 1) + "|"]
    for method in methods:
        cells = []
        for lr in lrs:
            runs = [c for c in all_curves if c.method == method and c.lr == lr]
            values = [v for c in runs if not c.diverged
                      for v in [c.logit_at(levels[lr])] if v is not None]
            cells.append(_cell(values, sum(c.diverged for c in runs)))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def plot(all_curves: list[Curve], out: Path, methods: list[str] | None = None) -> None:
    """One panel per LR: largest logit (log) against smoothed loss (decreasing to the right)."""
    from stable_megatron.analysis.plotting import _colors, _pyplot, _save

    plt = _pyplot()
    methods = methods or list(dict.fromkeys(c.method for c in all_curves))
    lrs = sorted({c.lr for c in all_curves})
    cols = min(3, len(lrs))
    rows = -(-len(lrs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.5 * rows), squeeze=False)
    colors = _colors(plt)
    levels = matched_levels(all_curves)
    for ax, lr in zip(axes.flat, lrs, strict=False):
        for i, method in enumerate(methods):
            for c in (c for c in all_curves if c.method == method and c.lr == lr):
                if not c.points:
                    continue
                ax.plot([p[1] for p in c.points], [p[2] for p in c.points],
                        color=colors[i % len(colors)], lw=0.9, alpha=0.8,
                        ls="--" if c.diverged else "-")
        if lr in levels:
            ax.axvline(levels[lr], color="gray", ls=":", lw=1)
        ax.set_title(f"lr {lr:g}", fontsize=9)
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("training loss (trailing mean)", fontsize=8)
        ax.set_ylabel("largest attention logit", fontsize=8)
    for ax in list(axes.flat)[len(lrs):]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[i % len(colors)], label=m)
               for i, m in enumerate(methods)]
    handles += [Line2D([], [], color="gray", ls="--", label="diverged run"),
                Line2D([], [], color="gray", ls=":", label="matched loss")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.11 if rows > 1 else 0.18, 1, 1))
    _save(plt, fig, out, dpi=80)


def write(sweep_dir: str | Path, out: Path | None = None,
          methods: list[str] | None = None) -> Path:
    """logit_growth.md and .png of the sweep's ended runs into `out` (default the sweep)."""
    all_curves = curves(sweep_dir)
    if not any(c.points for c in all_curves):
        raise RunLogError(f"{sweep_dir}: no run logged {LOGIT_PREFIX}* (metrics.attention)")
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({c.seed for c in all_curves if c.seed is not None})
    lines = ["# Largest attention logit at matched loss", "",
             f"`stable-megatron report --logit-growth {sweep_dir}`: {len(all_curves)} ended "
             f"runs" + (f", seeds {', '.join(map(str, seeds))}" if seeds else "") + ".", "",
             "Per LR, the matched loss is the lowest training loss (trailing mean of "
             f"{SMOOTH} logged steps) that every run of that LR which did not diverge reaches; "
             "each cell is the largest attention logit of a method's runs at the first metric "
             "step at or below it: mean (smallest-largest) over seeds; `k div`: k runs "
             "diverged.", "", *table(all_curves, methods), ""]
    try:
        plot(all_curves, out / "logit_growth.png", methods)
        lines += ["![largest attention logit against training loss](logit_growth.png)", ""]
    except ImportError as err:  # matplotlib is optional
        lines += [f"(no figure: {err})", ""]
    path = out / "logit_growth.md"
    path.write_text("\n".join(lines))
    return path
