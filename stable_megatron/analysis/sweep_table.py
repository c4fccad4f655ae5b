"""The LR sweep's numbers: per run, its outcome; per method, how robust it is to the LR.

Definitions (docs/results.md, docs/training.md):
- a run's **final loss** is its last validation loss (`val_loss`, evaluated at the end of the
  run), or its last training loss when the run has no validation data; a diverged run has none;
- **initial loss** L0 is the first step's training loss (the untrained model's loss);
- **diverges at**: the smallest LR of the grid at which the run diverged (stopped by
  `stability.stop_on_divergence`); **largest stable LR**: the largest LR below it (every LR
  of the grid up to it trained without diverging);
- **LR sensitivity** (Wortsman et al., arXiv 2309.14322): the mean over the LR grid of
  `min(L(lr), L0) - L*`, with `L(lr)` the final loss (L0 for a diverged run) and `L*` the best
  final loss over the grid. Lower is more robust; 0 means every LR reached the best loss.
  The **headline** sensitivity is computed over a sub-grid (`sweep.headline_lrs`), e.g. without
  an LR at which every method fails in warm-up and which would add a constant to every score.
- with seeds (`sweep --seeds`), each statistic is computed per (method, seed) over that seed's
  grid, then reported as the **mean and sample standard deviation over seeds**; a difference
  between two methods is called **resolved** when it exceeds twice the larger of their two
  standard deviations (`resolved`), and within noise otherwise.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

STATUSES = ("done", "diverged", "failed", "pending")


@dataclass
class SweepRun:
    method: str
    lr: float
    status: str  # one of STATUSES
    seed: int | None = None  # train.seed of a seeded sweep
    run_dir: str = ""
    steps: int = 0  # the last step logged
    initial_loss: float | None = None
    train_loss: float | None = None  # the last logged training loss
    val_loss: float | None = None  # the last validation loss
    diverged_step: int | None = None
    max_attn_logit: float | None = None  # the largest attention logit logged in the run
    min_attn_entropy: float | None = None  # lowest normalised head entropy, last metric step
    seconds: float | None = None  # wall time of the run's launches

    @property
    def final_loss(self) -> float | None:
        if self.status != "done":
            return None
        return self.val_loss if self.val_loss is not None else self.train_loss


@dataclass
class MethodSummary:
    method: str
    runs: int
    diverged: int
    diverges_at: float | None
    largest_stable_lr: float | None
    best_lr: float | None
    best_loss: float | None
    initial_loss: float | None
    lr_sensitivity: float | None
    complete: bool  # every LR of the grid finished (done or diverged)

    @property
    def best_ppl(self) -> float | None:
        return math.exp(min(self.best_loss, 50.0)) if self.best_loss is not None else None


def lr_sensitivity(final_losses: Sequence[float | None], initial_loss: float) -> float:
    """Mean over the grid of min(L, L0) - L*; `None` (diverged) counts as L0."""
    if not final_losses:
        raise ValueError("lr_sensitivity needs at least one run")
    capped = [initial_loss if loss is None or not math.isfinite(loss) else min(loss, initial_loss)
              for loss in final_losses]
    best = min(capped)
    return sum(c - best for c in capped) / len(capped)


def diverges_at(runs: Iterable[SweepRun]) -> float | None:
    diverged = [r.lr for r in runs if r.status == "diverged"]
    return min(diverged) if diverged else None


def largest_stable_lr(runs: Iterable[SweepRun]) -> float | None:
    """The largest LR below the smallest diverging one, among the runs that finished."""
    runs = list(runs)
    limit = diverges_at(runs)
    stable = [r.lr for r in runs if r.status == "done" and (limit is None or r.lr < limit)]
    return max(stable) if stable else None


def summarise(runs: Sequence[SweepRun], methods: Sequence[str] | None = None
              ) -> list[MethodSummary]:
    """One summary per method (in `methods` order, else first-seen order)."""
    order = list(methods) if methods else list(dict.fromkeys(r.method for r in runs))
    out = []
    for method in order:
        mine = sorted((r for r in runs if r.method == method), key=lambda r: r.lr)
        finished = [r for r in mine if r.status in ("done", "diverged")]
        initial = [r.initial_loss for r in mine if r.initial_loss is not None]
        l0 = sorted(initial)[len(initial) // 2] if initial else None
        done = [r for r in finished if r.final_loss is not None]
        best = min(done, key=lambda r: r.final_loss) if done else None
        sensitivity = None
        if finished and l0 is not None:
            sensitivity = lr_sensitivity([r.final_loss for r in finished], l0)
        out.append(MethodSummary(
            method=method, runs=len(mine), diverged=sum(r.status == "diverged" for r in mine),
            diverges_at=diverges_at(mine), largest_stable_lr=largest_stable_lr(mine),
            best_lr=best.lr if best else None, best_loss=best.final_loss if best else None,
            initial_loss=l0, lr_sensitivity=sensitivity,
            complete=bool(mine) and len(finished) == len(mine),
        ))
    return out


# ------------------------------------------------------------------------------ seeds


@dataclass
class Spread:
    """Mean and sample standard deviation over seeds (std None for a single value)."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def text(self, fmt: str = ".3f") -> str:
        std = "" if self.std is None else f" ± {format(self.std, fmt)}"
        return f"{format(self.mean, fmt)}{std}"


@dataclass
class SeededSummary:
    """A method over several seeds: per seed, its summary on the full grid and its headline
    LR sensitivity; over seeds, the spreads of the seeds whose grid has ended (a seed with a
    pending run counts in none of them)."""

    method: str
    seeds: list[int]
    per_seed: list[MethodSummary]
    headline_sensitivity: list[float | None]
    complete: bool  # every run of every seed ended

    @property
    def sensitivity(self) -> Spread | None:
        return Spread.of(self.headline_sensitivity)

    @property
    def full_sensitivity(self) -> Spread | None:
        return Spread.of([s.lr_sensitivity for s in self.per_seed if s.complete])

    @property
    def best_loss(self) -> Spread | None:
        return Spread.of([s.best_loss for s in self.per_seed if s.complete])

    @property
    def complete_seeds(self) -> int:
        return sum(s.complete for s in self.per_seed)

    @property
    def diverged(self) -> int:
        return sum(s.diverged for s in self.per_seed)

    @property
    def runs(self) -> int:
        return sum(s.runs for s in self.per_seed)


def seeds_of(runs: Iterable[SweepRun]) -> list[int]:
    return sorted({r.seed for r in runs if r.seed is not None})


def summarise_seeds(runs: Sequence[SweepRun], methods: Sequence[str],
                    headline_lrs: Sequence[float] | None = None) -> list[SeededSummary]:
    """Per method: `summarise` for each seed alone, and the LR sensitivity of each seed over
    `headline_lrs` (default: the whole grid)."""
    out = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        seeds = seeds_of(mine)
        per_seed, headline = [], []
        for seed in seeds:
            rows = [r for r in mine if r.seed == seed]
            summary = summarise(rows, [method])[0]
            per_seed.append(summary)
            if headline_lrs is not None:
                rows = [r for r in rows if any(math.isclose(r.lr, x) for x in headline_lrs)]
            part = summarise(rows, [method])[0] if rows else None
            headline.append(part.lr_sensitivity if part and part.complete else None)
        out.append(SeededSummary(method, seeds, per_seed, headline,
                                 complete=bool(per_seed) and all(s.complete for s in per_seed)))
    return out


def resolved(a: Spread | None, b: Spread | None) -> bool | None:
    """|mean a - mean b| > 2 x the larger standard deviation; None without two spreads."""
    if a is None or b is None or a.std is None or b.std is None:
        return None
    return abs(a.mean - b.mean) > 2 * max(a.std, b.std)


def _versus(spread: Spread | None, reference: Spread | None) -> str:
    if spread is None or reference is None or spread is reference:
        return "-"
    verdict = resolved(spread, reference)
    mark = "" if verdict is None else (" (resolved)" if verdict else " (within noise)")
    return f"{spread.mean - reference.mean:+.3f}{mark}"


def seeded_table(summaries: Sequence[SeededSummary], reference: str | None = None) -> list[str]:
    """Markdown: per method, mean ± std over seeds of the headline and full-grid LR
    sensitivity and of the best final loss, each against `reference` (a method's name)."""
    ref = next((s for s in summaries if s.method == reference), None)
    against = f" vs {reference}" if ref else ""
    lines = [f"| method | seeds ended | diverged runs | LR sensitivity (headline grid) | "
             f"difference{against} | best final loss | difference{against} | "
             f"LR sensitivity (full grid) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        flag = "" if s.complete else " (incomplete)"
        sens, best, full = s.sensitivity, s.best_loss, s.full_sensitivity
        lines.append(
            f"| {s.method}{flag} | {s.complete_seeds}/{len(s.seeds)} | {s.diverged}/{s.runs} | "
            f"{sens.text() if sens else '-'} | "
            f"{_versus(sens, ref.sensitivity) if ref and s is not ref else '-'} | "
            f"{best.text() if best else '-'} | "
            f"{_versus(best, ref.best_loss) if ref and s is not ref else '-'} | "
            f"{full.text() if full else '-'} |")
    return lines


def resolution_matrix(summaries: Sequence[SeededSummary],
                      statistic: Callable[[SeededSummary], Spread | None]) -> list[str]:
    """Markdown: for every pair of methods, `<` (the row's statistic is lower, resolved), `>`
    (higher, resolved) or `~` (within twice the seed spread); `-` without two spreads."""
    names = [s.method for s in summaries]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in summaries:
        cells = []
        for col in summaries:
            a, b = statistic(row), statistic(col)
            verdict = None if row is col else resolved(a, b)
            cells.append("-" if verdict is None else
                         "~" if not verdict else ("<" if a.mean < b.mean else ">"))
        lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
    return lines


def seeded_cell(runs: Sequence[SweepRun]) -> str:
    """Mean ± std of the final losses of a (method, lr) over seeds; a diverged run counts as
    its initial loss and is marked (`k div`)."""
    if not runs:
        return ""
    values = [r.final_loss if r.status == "done" else r.initial_loss
              for r in runs if r.status in ("done", "diverged")]
    spread = Spread.of(values)
    if spread is None:
        return "pending"
    diverged = sum(r.status == "diverged" for r in runs)
    pending = sum(r.status not in ("done", "diverged") for r in runs)
    notes = ([f"{diverged} div"] if diverged else []) + ([f"{pending} pending"] if pending else [])
    return spread.text() + (f" ({', '.join(notes)})" if notes else "")


def seeded_loss_grid(runs: Sequence[SweepRun], methods: Sequence[str]) -> list[str]:
    """Markdown table: methods x LRs, mean ± std of the final loss over seeds."""
    return seeds_grid(runs, methods, seeded_cell)


def seeded_extremes_cell(runs: Sequence[SweepRun]) -> str:
    """The smallest-largest over seeds of the runs' largest attention logit / the mean over
    seeds of their last lowest normalised entropy."""
    logits = [r.max_attn_logit for r in runs if r.max_attn_logit is not None]
    if not logits:
        return "-"
    entropy = Spread.of([r.min_attn_entropy for r in runs])
    low, high = min(logits), max(logits)
    span = f"{low:.3g}" if len(logits) == 1 else f"{low:.3g}-{high:.3g}"
    return f"{span} / {_num(entropy.mean if entropy else None, '.2f')}"


def seeded_extremes_grid(runs: Sequence[SweepRun], methods: Sequence[str]) -> list[str]:
    """Markdown table: `seeded_extremes_cell` per (method, lr)."""
    return seeds_grid(runs, methods, seeded_extremes_cell)


# ------------------------------------------------------------------------------ output


def plot_points(runs: Iterable[SweepRun]) -> list[dict]:
    """The ended runs as the points `analysis.plotting.plot_sweep` draws."""
    return [{"method": r.method, "lr": r.lr, "loss": r.final_loss, "seed": r.seed,
             "diverged": r.status == "diverged", "initial_loss": r.initial_loss}
            for r in runs if r.status in ("done", "diverged")]


def write_csv(runs: Sequence[SweepRun], path: Path) -> None:
    names = [f.name for f in fields(SweepRun)] + ["final_loss"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for run in runs:
            writer.writerow({**asdict(run), "final_loss": run.final_loss})


def read_csv(path: Path) -> list[SweepRun]:
    """sweep.csv back into runs (for re-plotting or docs)."""
    kinds = {f.name: f.type for f in fields(SweepRun)}
    runs = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            row.pop("final_loss", None)
            kwargs = {}
            for key, raw in row.items():
                kind = str(kinds[key])
                if raw == "":
                    kwargs[key] = None if "None" in kind else raw
                elif kind.startswith("int"):
                    kwargs[key] = int(raw)
                elif "float" in kind:
                    kwargs[key] = float(raw)
                elif "int" in kind:
                    kwargs[key] = int(raw)
                else:
                    kwargs[key] = raw
            runs.append(SweepRun(**kwargs))
    return runs


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _lr(value: float | None) -> str:
    return "-" if value is None else format(value, "g")


def cell(run: SweepRun | None) -> str:
    """A grid cell: the final loss, `div@N` for a diverged run, the status otherwise."""
    if run is None:
        return ""
    if run.status == "diverged":
        return f"div@{run.diverged_step}"
    if run.status == "done":
        return _num(run.final_loss)
    return run.status


def method_lr_grid(runs: Sequence[SweepRun], methods: Sequence[str],
                   cell_of: Callable[[SweepRun | None], str]) -> list[str]:
    """Markdown table: one row per method, one column per LR, `cell_of(run)` in each cell."""
    return seeds_grid(runs, methods, lambda mine: cell_of(mine[-1] if mine else None))


def seeds_grid(runs: Sequence[SweepRun], methods: Sequence[str],
               cell_of: Callable[[list[SweepRun]], str]) -> list[str]:
    """Markdown table: one row per method, one column per LR, `cell_of(the runs of that
    method and LR, one per seed)` in each cell."""
    lrs = sorted({r.lr for r in runs})
    at: dict[tuple[str, float], list[SweepRun]] = {}
    for r in runs:
        at.setdefault((r.method, r.lr), []).append(r)
    lines = ["| method | " + " | ".join(f"lr {_lr(lr)}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cell_of(at.get((method, lr), []))
                                                   for lr in lrs) + " |")
    return lines


def loss_grid(runs: Sequence[SweepRun], methods: Sequence[str]) -> list[str]:
    """Markdown table: methods x LRs, final loss per cell."""
    return method_lr_grid(runs, methods, cell)


def summary_table(summaries: Sequence[MethodSummary]) -> list[str]:
    lines = ["| method | diverged runs | diverges at | largest stable LR | best LR | "
             "best final loss (ppl) | LR sensitivity |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        best = "-" if s.best_loss is None else f"{s.best_loss:.3f} ({s.best_ppl:.1f})"
        flag = "" if s.complete else " (incomplete)"
        lines.append(
            f"| {s.method}{flag} | {s.diverged}/{s.runs} | {_lr(s.diverges_at)} | "
            f"{_lr(s.largest_stable_lr)} | {_lr(s.best_lr)} | {best} | "
            f"{_num(s.lr_sensitivity)} |"
        )
    return lines


def extremes_cell(run: SweepRun | None) -> str:
    """The run's largest attention logit / its last lowest normalised entropy."""
    if run is None or run.max_attn_logit is None:
        return "-"
    return f"{run.max_attn_logit:.3g} / {_num(run.min_attn_entropy, '.2f')}"


def extremes_grid(runs: Sequence[SweepRun], methods: Sequence[str]) -> list[str]:
    """Markdown table: the run's largest attention logit / last lowest normalised entropy."""
    return method_lr_grid(runs, methods, extremes_cell)
