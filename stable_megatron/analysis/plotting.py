"""Plots of runs' logs: the stability-metric panels of `stable-megatron plot` (`plot`), the LR
sweep (`plot_sweep`) and the figures of `stable-megatron report` (`report_figures`).

Early warnings are replayed from the records through the rules of
`stable_megatron/stability/warning.py` (plain Python: importing it imports no torch). matplotlib
is imported inside the functions that draw, so reading logs works without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stable_megatron.analysis.runs import RunLog, finite, read_records, read_run, run_config
from stable_megatron.stability import warning as warning_rules

RULE_MARKS = {"logit_growth": "^", "entropy_collapse": "v", "tev_growth": "s"}
SLOTS = ("qkv", "proj", "fc1", "fc2")
# Vertical marks drawn on every panel of `report_figures`, in the run's colour.
MARK_STYLES = {"spike": "-.", "warning": "--", "diverged": ":"}
MAX_LAYER_PANELS = 4  # more layers than this share one panel (a line style per layer)
# Series sharing a panel (the layers) differ by marker, then line style: the dashed and dotted
# styles of MARK_STYLES stay for the vertical marks.
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")
_LINESTYLES = ("-", (0, (6, 2)))
_MARKS_PER_LINE = 12


def warning_config(run_dir: str | Path):
    """The run's `stability.warning` settings (config.yaml), else the defaults."""
    from stable_megatron.config import WarningConfig

    stability = run_config(run_dir).get("stability")
    settings = stability.get("warning") if isinstance(stability, dict) else None
    if not isinstance(settings, dict):
        settings = {}
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


def series(records: list[dict[str, Any]],
           pick: Callable[[dict[str, Any]], Any]) -> tuple[list[int], list[float]]:
    """The steps and values of the records where `pick` gives a value."""
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(plt) -> list[str]:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


# ------------------------------------------------------------------------------------------
# stable-megatron plot: the five stability panels of one or more runs
# ------------------------------------------------------------------------------------------


def plot(run_dirs: list[Path], out: Path, labels: list[str] | None = None,
         margin: float = 1.0, title: str | None = None, patience: int = 10,
         max_step: int | None = None,
         zoom: tuple[int, int] | None = None) -> dict[str, dict[str, Any]]:
    """Draw the panels for `run_dirs` into `out` (steps up to `max_step`, if given; with
    `zoom=(first, last)` a second column shows those steps); returns, per run label, the
    warning events and the divergence step. A run without a log raises `RunLogError`."""
    plt = _pyplot()
    rules = warning_rules
    labels = labels or [Path(d).name for d in run_dirs]
    columns = 2 if zoom else 1
    fig, grid = plt.subplots(
        len(PANELS), columns, figsize=(9 + 4 * (columns - 1), 2.1 * len(PANELS)),
        sharex="col", squeeze=False, gridspec_kw={"width_ratios": [2, 1][:columns]},
    )
    colors = _colors(plt)
    summary: dict[str, dict[str, Any]] = {}
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        records = read_records(run_dir)
        if max_step is not None:
            records = [r for r in records if r["step"] <= max_step]
        events = rules.replay(warning_config(run_dir), records)
        diverged = divergence_step(records, margin, patience)
        summary[label] = {"warnings": events, "diverged": diverged}
        _plot_run(grid, records, events, diverged, colors[i % len(colors)], label, zoom)
    _finish_panels(grid, columns, zoom, margin)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(plt, fig, out, dpi=80)
    return summary


def _save(plt, fig, out: Path, dpi: int) -> None:
    """Lay out (tight), write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def _plot_run(grid, records, events, diverged, color, label, zoom) -> None:
    loss_at = {r["step"]: r.get("loss") for r in records}
    for col in range(grid.shape[1]):
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


def _finish_panels(grid, columns: int, zoom, margin: float) -> None:
    from matplotlib.lines import Line2D

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


# ------------------------------------------------------------------------------------------
# LR sweep: final loss against learning rate
# ------------------------------------------------------------------------------------------


def plot_sweep(rows: list[dict[str, Any]], out: Path, title: str | None = None) -> None:
    """Final loss against LR (log x), a line per method. `rows`: dicts with `method`, `lr`,
    `loss` (final loss, or None), `diverged`, `initial_loss` and optionally `seed`; a diverged
    run is drawn at its initial loss with an 'x'; a run neither diverged nor with a loss is
    left out. With several seeds the line is the mean over seeds, the band spans the smallest
    to the largest seed, and each seed is a small dot."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = _colors(plt)
    methods = list(dict.fromkeys(row["method"] for row in rows))
    seeded = len({row.get("seed") for row in rows}) > 1
    for i, method in enumerate(methods):
        points = _sweep_points([r for r in rows if r["method"] == method])
        if not points:
            continue
        color = colors[i % len(colors)]
        if not seeded:
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, lw=1.2,
                    label=method)
            for lr, loss, diverged in points:
                ax.plot(lr, loss, "x" if diverged else "o", color=color,
                        ms=8 if diverged else 5, mew=2 if diverged else 1)
            continue
        lrs = sorted({p[0] for p in points})
        at = {lr: [p for p in points if p[0] == lr] for lr in lrs}
        means = [sum(p[1] for p in at[lr]) / len(at[lr]) for lr in lrs]
        ax.plot(lrs, means, color=color, lw=1.2, label=method)
        ax.fill_between(lrs, [min(p[1] for p in at[lr]) for lr in lrs],
                        [max(p[1] for p in at[lr]) for lr in lrs], color=color, alpha=0.15,
                        lw=0)
        for lr, loss, diverged in points:
            ax.plot(lr, loss, "x" if diverged else ".", color=color, ms=6 if diverged else 3,
                    mew=1.5 if diverged else 1)
    initial = [r["initial_loss"] for r in rows if finite(r.get("initial_loss"))]
    handles = ax.get_legend_handles_labels()[0]
    if initial:
        level = sorted(initial)[len(initial) // 2]
        ax.axhline(level, color="gray", ls=":", lw=1.2)
        handles.append(Line2D([], [], color="gray", ls=":", label=f"initial loss ({level:.2f})"))
    handles.append(Line2D([], [], color="gray", ls="", marker="x", mew=2,
                          label="diverged (drawn at its initial loss)"))
    if seeded:
        seeds = len({row.get("seed") for row in rows})
        handles.append(Line2D([], [], color="gray", lw=6, alpha=0.3,
                              label=f"mean over {seeds} seeds; band: min-max, dots: seeds"))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=7 if seeded else 8, ncol=2 if len(methods) > 6 else 1)
    if title:
        ax.set_title(title, fontsize=10)
    _save(plt, fig, out, dpi=90)


def _sweep_points(rows: list[dict[str, Any]]) -> list[tuple[float, float, bool]]:
    """(lr, loss to draw, diverged), by LR."""
    points = []
    for row in rows:
        diverged = bool(row.get("diverged"))
        loss = row.get("initial_loss") if diverged else row.get("loss")
        if finite(loss) and finite(row.get("lr")) and row["lr"] > 0:
            points.append((float(row["lr"]), float(loss), diverged))
    return sorted(points)


# ------------------------------------------------------------------------------------------
# stable-megatron report: one figure per group of metrics, runs overlaid
# ------------------------------------------------------------------------------------------


@dataclass
class MarkedRun:
    """A run's log with the steps to mark: spikes (logged events), early warnings (replayed
    from the records, and logged) and divergence (logged event, else `divergence_step`)."""

    label: str
    log: RunLog
    spikes: list[int] = field(default_factory=list)
    warnings: list[tuple[int, str]] = field(default_factory=list)  # (step, rule), by step
    diverged: int | None = None

    @property
    def keys(self) -> set[str]:
        """The keys with a finite value in some record."""
        return {k for r in self.log.records for k, v in r.items() if finite(v)}


def mark_run(run_dir: str | Path, label: str) -> MarkedRun:
    """Read a run (`RunLogError` without a log) and find the steps to mark."""
    log = read_run(run_dir)
    replayed = warning_rules.replay(warning_config(run_dir), log.records)
    warnings = {(int(e.step), str(e.rule)) for e in replayed}
    replayed_steps = {step for step, _ in warnings}
    for event in log.events_of("warning"):
        rule = event.get("rule")
        if rule is None and int(event["step"]) in replayed_steps:
            continue  # the same firing, logged without its rule
        warnings.add((int(event["step"]), str(rule or "warning")))
    logged_divergence = [int(e["step"]) for e in log.events_of("diverged")]
    diverged = min(logged_divergence) if logged_divergence else divergence_step(log.records)
    spikes = sorted({int(e["step"]) for e in log.events_of("spike")})
    return MarkedRun(label, log, spikes, sorted(warnings), diverged)


@dataclass
class PanelSpec:
    title: str
    keys: list[str]  # the series drawn in the panel
    yscale: str = "linear"


@dataclass(frozen=True)
class FigureSpec:
    file: str
    heading: str
    caption: str  # what to look for
    needs: str  # the series it draws, for the "skipped" line
    layout: Callable[[set[str]], list[list[PanelSpec]]]  # rows of panels, from the keys logged


def _matching(keys: set[str], pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return sorted(k for k in keys if regex.fullmatch(k))


def _per_layer(keys: set[str], pattern: str, title: str, yscale: str) -> list[list[PanelSpec]]:
    """A panel per layer, or all layers in one panel when there are many."""
    layer_keys = _matching(keys, pattern)
    if len(layer_keys) > MAX_LAYER_PANELS:
        return [[PanelSpec(title, layer_keys, yscale)]]
    return [[PanelSpec(f"{title}, {_layer(k)}", [k], yscale)] for k in layer_keys]


def _layer(key: str) -> str:
    match = re.search(r"layer_\d+", key)
    return match.group(0) if match else key


def _loss_layout(keys: set[str]) -> list[list[PanelSpec]]:
    return [[PanelSpec("training loss", ["loss"])],
            [PanelSpec("validation perplexity", ["val_ppl"], "log")]]


def _tev_layout(keys: set[str]) -> list[list[PanelSpec]]:
    return [[PanelSpec("TEV (mean over tokens)", ["tev/mean", "tev_out/mean"])]]


def _entropy_layout(keys: set[str]) -> list[list[PanelSpec]]:
    return _per_layer(keys, r"attn_entropy_norm/layer_\d+/min", "min entropy / log(keys)",
                      "linear")


def _logit_layout(keys: set[str]) -> list[list[PanelSpec]]:
    return _per_layer(keys, r"attn_logit_max/layer_\d+", "max attention logit", "log")


def _out_norm_layout(keys: set[str]) -> list[list[PanelSpec]]:
    panels = [PanelSpec(f"output norm, {slot}", _matching(keys, rf"out_norm/layer_\d+/{slot}"),
                        "log") for slot in SLOTS]
    return [panels[:2], panels[2:]]


def _grad_norm_layout(keys: set[str]) -> list[list[PanelSpec]]:
    return [[PanelSpec("grad norm, total", ["grad_norm/total"], "log")],
            [PanelSpec("grad norm per layer", _matching(keys, r"grad_norm/layer_\d+"), "log")]]


def _sigma_gamma_layout(keys: set[str]) -> list[list[PanelSpec]]:
    """A row per slot: sigma, gamma and (if logged) sigma_exact."""
    return [[PanelSpec(f"{name}, {slot}", _matching(keys, rf"{name}/layer_\d+/{slot}"))
             for name in ("sigma", "gamma", "sigma_exact")]
            for slot in SLOTS]


REPORT_FIGURES = [
    FigureSpec("loss.png", "Loss", "Training loss and validation perplexity: a loss that leaves "
               "its trend and stays up has diverged; marked spikes are single bad steps.",
               "`loss`, `val_ppl`", _loss_layout),
    FigureSpec("tev.png", "Token embedding variability",
               "Steady growth of TEV goes with loss spikes and divergence [A].",
               "`tev/mean`, `tev_out/mean`", _tev_layout),
    FigureSpec("attn_entropy.png", "Attention entropy",
               "Lowest normalised head entropy per layer: a fall toward 0 is entropy collapse, "
               "which precedes divergence [C].", "`attn_entropy_norm/layer_NN/min`",
               _entropy_layout),
    FigureSpec("attn_logit.png", "Attention logits",
               "Largest attention logit per layer: attention-logit growth precedes divergence "
               "[B].", "`attn_logit_max/layer_NN`", _logit_layout),
    FigureSpec("out_norms.png", "Output norms",
               "Mean output norm of each linear per layer: growing QKV, Proj and FC2 outputs go "
               "with divergence [B].",
               "`out_norm/layer_NN/{qkv,proj,fc1,fc2}`", _out_norm_layout),
    FigureSpec("grad_norms.png", "Gradient norms",
               "Global and per-layer gradient norms: look for jumps and steady growth, and for "
               "the layer they start in.", "`grad_norm/total`, `grad_norm/layer_NN`",
               _grad_norm_layout),
    FigureSpec("sigma_gamma.png", "sigma-reparam",
               "sigma-reparam's spectral-norm estimate sigma and learned scale gamma per linear "
               "[C]: gamma / sigma is the effective scale of the weight; `sigma_exact`, when "
               "logged, is the converged reference for sigma.", "`sigma/...`, `gamma/...`",
               _sigma_gamma_layout),
]


@dataclass
class _Line:
    run: int
    key: str
    steps: list[int]
    values: list[float]


def _lines(panel: PanelSpec, runs: list[MarkedRun]) -> list[_Line]:
    lines = []
    for i, run in enumerate(runs):
        for key in panel.keys:
            steps, values = series(run.log.records, lambda r, k=key: r.get(k))
            points = [(s, v) for s, v in zip(steps, values, strict=True)
                      if finite(v) and (panel.yscale != "log" or v > 0)]
            if points:
                lines.append(_Line(i, key, [p[0] for p in points], [p[1] for p in points]))
    return lines


def report_figures(runs: list[MarkedRun], out_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Write each figure of `REPORT_FIGURES` that has data into `out_dir`; returns, per figure
    file, the (run label, series key) pairs drawn, [] for a figure skipped (no run has its
    series)."""
    plt = _pyplot()
    keys = set().union(*(run.keys for run in runs))
    drawn: dict[str, list[tuple[str, str]]] = {}
    for spec in REPORT_FIGURES:
        rows = [[(p, _lines(p, runs)) for p in row] for row in spec.layout(keys)]
        rows = [[(p, lines) for p, lines in row if lines] for row in rows]
        rows = [row for row in rows if row]
        drawn[spec.file] = [(runs[ln.run].label, ln.key)
                            for row in rows for _, lines in row for ln in lines]
        if rows:
            _draw_figure(plt, spec, rows, runs, Path(out_dir) / spec.file)
    return drawn


def _line_styles(rows) -> dict[str, dict[str, Any]]:
    """Short series name -> line style, for the series that share a panel with others (the
    layers of a per-layer panel, `tev/mean` and `tev_out/mean`); the rest are solid."""
    shared = sorted({_layer(line.key) for row in rows for _, lines in row
                     if len({line.key for line in lines}) > 1 for line in lines})
    return {name: {"marker": _MARKERS[i % len(_MARKERS)], "ms": 3.5,
                   "ls": _LINESTYLES[(i // len(_MARKERS)) % len(_LINESTYLES)]}
            for i, name in enumerate(shared)}


def _draw_figure(plt, spec: FigureSpec, rows, runs: list[MarkedRun], out: Path) -> None:
    columns = max(len(row) for row in rows)
    width, height = 4.4 * columns + 2.4, 2.2 * len(rows) + 0.9
    fig, grid = plt.subplots(len(rows), columns, figsize=(width, height), sharex=True,
                             squeeze=False)
    # fixed margins in inches (no tight_layout: measuring every label costs seconds a figure)
    fig.subplots_adjust(left=0.8 / width, right=1 - 2.0 / width, bottom=0.5 / height,
                        top=1 - 0.55 / height, hspace=0.45, wspace=0.28)
    colors = _colors(plt)
    styles = _line_styles(rows)
    for r, row in enumerate(rows):
        for c in range(columns):
            if c >= len(row):
                grid[r, c].set_visible(False)
                continue
            panel, lines = row[c]
            _draw_panel(grid[r, c], panel, lines, runs, colors, styles)
    for c in range(columns):
        bottom = max(r for r, row in enumerate(rows) if c < len(row))
        grid[bottom, c].xaxis.set_tick_params(labelbottom=True)
        grid[bottom, c].set_xlabel("step", fontsize=8)
    _figure_legend(fig, runs, colors, styles)
    fig.suptitle(spec.heading, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def _draw_panel(ax, panel: PanelSpec, lines: list[_Line], runs: list[MarkedRun],
                colors: list[str], styles: dict[str, dict[str, Any]]) -> None:
    from matplotlib.ticker import MaxNLocator

    for line in lines:
        style = styles.get(_layer(line.key), {})
        if len(line.steps) <= 3 and "marker" not in style:
            style = {**style, "marker": "o", "ms": 4}  # a lone point (e.g. one evaluation)
        ax.plot(line.steps, line.values, color=colors[line.run % len(colors)], lw=1.1,
                markevery=max(1, len(line.steps) // _MARKS_PER_LINE), **style)
    for i in sorted({line.run for line in lines}):
        _mark_steps(ax, runs[i], colors[i % len(colors)])
    ax.set_yscale(panel.yscale)
    if panel.yscale == "log":
        _log_ticks(ax)
    else:
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(panel.title, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _log_ticks(ax) -> None:
    """Plain numbers, no minor labels; evenly spaced ticks when the range is under a decade,
    1-2-5 ticks under three decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    low, high = ax.get_ylim()
    if high < 10 * low:
        ax.yaxis.set_major_locator(MaxNLocator(4))
    elif high < 1000 * low:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _mark_steps(ax, run: MarkedRun, color: str) -> None:
    for step in run.spikes:
        ax.axvline(step, color=color, ls=MARK_STYLES["spike"], lw=0.8, alpha=0.7)
    for step in sorted({step for step, _ in run.warnings}):
        ax.axvline(step, color=color, ls=MARK_STYLES["warning"], lw=0.9, alpha=0.8)
    if run.diverged is not None:
        ax.axvline(run.diverged, color=color, ls=MARK_STYLES["diverged"], lw=1.6)


def _figure_legend(fig, runs: list[MarkedRun], colors: list[str],
                   styles: dict[str, dict[str, Any]]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2, label=run.label)
               for i, run in enumerate(runs)]
    handles += [Line2D([], [], color="gray", lw=1.1, label=name, **style)
                for name, style in styles.items()]
    handles += [Line2D([], [], color="gray", ls=MARK_STYLES[kind], lw=1.2, label=text)
                for kind, text in (("spike", "spike step"), ("warning", "early warning step"),
                                   ("diverged", "divergence step"))]
    fig.legend(handles=handles, loc="upper right", fontsize=7, frameon=False)
