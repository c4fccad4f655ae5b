"""How good the early warning is, scored on a sweep's runs.

Each run is first **labelled from its losses alone** (never from its warnings), against the
other runs of the same method and seed:

- `diverged`: stopped by the divergence rule;
- `healthy`: its final loss is within `MARGIN` nats of the best final loss of its method and
  seed over the LR grid;
- `degraded`: worse than that, at an LR above the best one (too large a learning rate);
- `slow`: worse than that, at an LR below the best one (too small a learning rate: not an
  instability, so a warning there is a false alarm too).

The **onset** of an unstable (degraded or diverged) run is the step from which its training
loss, averaged over the trailing `SMOOTH` logged steps, stays above the same average of the
method and seed's best run (its healthy trajectory) by more than `MARGIN` to the end of the run
(a bump in warm-up that the run recovers from is not the onset); for a diverged run without
such a stretch, its divergence step. A warning **before the loss**
is one at or before the onset; the **lead time** is onset - first warning (in steps).

For each rule and their union (`any`): precision (unstable runs among the warned ones),
recall (unstable runs warned at any step), recall before the loss, the false-alarm rate on
healthy runs (and on slow ones), and the median lead time of the warned unstable runs.

The warnings are replayed from each run's records through the rules (`stability.warning.replay`)
with a given `stability.warning` config, so that old runs can be scored under new settings;
`choose_config` picks settings on some seeds (`TUNING_GRID`, `OBJECTIVE`), to be reported on
the others. The labels, the onset and both constants were fixed before any run of the
held-out seeds (2 and 3 of recipes/repro/seeds.yaml) had ended; the onset's "stays above to the
end" and the grid's `min_records` and lower `logit_floor` were added after seeing the first
runs of seed 1, the tuning seed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stable_megatron.analysis.runs import RunLogError, read_run
from stable_megatron.stability.warning import RULES, replay

MARGIN = 0.1  # nats: of the best final loss (labels), of the healthy trajectory (onset)
SMOOTH = 10  # logged steps in the trailing mean of the training loss (onset)
LABELS = ("healthy", "slow", "degraded", "diverged")
UNSTABLE = ("degraded", "diverged")
ANY = "any"

# The settings `choose_config` tries (every combination), and what it maximises.
TUNING_GRID: dict[str, Sequence[Any]] = {  # each key's first value: the previous default
    "grace_steps": (0, 20, 40),
    "persist": (1, 2),
    "min_records": (3, 2, 1),
    "logit_floor": (50.0, 20.0, 100.0),
    "entropy_floor": (0.2, 0.0),
    "tev_growth": (2.0, 3.0, 0.0),
    "update_growth": (3.0, 5.0, 0.0),
}
MAX_FALSE_ALARMS = 0.10  # on healthy runs
OBJECTIVE = ("among the settings whose union raises a false alarm on at most 10% of healthy "
             "runs, the highest recall before the loss; ties: the highest precision, then the "
             "highest recall at any step, then the first in grid order (the defaults first)")

_RUN_PATH = re.compile(r"^(?P<method>[^/]+)(/seed_(?P<seed>\d+))?/lr_(?P<lr>[^/]+)$")


@dataclass
class ScoredRun:
    """A run with what scoring needs: its outcome, its loss per step, its records."""

    method: str
    lr: float
    seed: int | None
    status: str  # done / diverged
    final_loss: float | None
    losses: dict[int, float]
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    diverged_step: int | None = None
    label: str | None = None
    onset: int | None = None  # first step the loss shows it (unstable runs)

    @property
    def group(self) -> tuple[str, int | None]:
        return self.method, self.seed


@dataclass
class RuleScore:
    rule: str
    warned: int  # runs warned at least once
    unstable: int
    healthy: int
    slow: int
    true_positives: int
    early: int  # unstable runs warned at or before their onset
    false_healthy: int
    false_slow: int
    leads: list[int]

    @property
    def precision(self) -> float | None:
        stable_warned = self.false_healthy + self.false_slow
        total = self.true_positives + stable_warned
        return self.true_positives / total if total else None

    @property
    def recall(self) -> float | None:
        return self.true_positives / self.unstable if self.unstable else None

    @property
    def recall_early(self) -> float | None:
        return self.early / self.unstable if self.unstable else None

    @property
    def false_alarm_rate(self) -> float | None:
        """On healthy runs."""
        return self.false_healthy / self.healthy if self.healthy else None

    @property
    def median_lead(self) -> float | None:
        return statistics.median(self.leads) if self.leads else None


# ------------------------------------------------------------------------------ loading


def load_sweep(sweep_dir: str | Path) -> list[ScoredRun]:
    """The ended runs under a sweep (or results) directory, `<method>[/seed_<s>]/lr_<lr>`,
    each with a `sweep_run.json` and a log (metrics.jsonl or series.jsonl.gz)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise RunLogError(f"{root}: no such sweep directory")
    runs = []
    for result_file in sorted(root.rglob("sweep_run.json")):
        rel = result_file.parent.relative_to(root).as_posix()
        match = _RUN_PATH.match(rel)
        if not match:
            continue
        result = json.loads(result_file.read_text())
        status = result.get("status")
        if status not in ("done", "diverged"):
            continue
        log = read_run(result_file.parent)
        losses = {int(r["step"]): float(r["loss"]) for r in log.records
                  if isinstance(r.get("loss"), (int, float))}
        final = log.last("val_loss")
        if final is None:
            final = log.last("loss")
        diverged = log.events_of("diverged")
        runs.append(ScoredRun(
            method=match["method"], lr=float(match["lr"]),
            seed=int(match["seed"]) if match["seed"] is not None else None, status=status,
            final_loss=final if status == "done" else None, losses=losses, records=log.records,
            diverged_step=int(diverged[-1]["step"]) if diverged else None))
    if not runs:
        raise RunLogError(f"{root}: no ended run (no <method>/[seed_<s>/]lr_<lr>/"
                          f"sweep_run.json)")
    return runs


# ------------------------------------------------------------------------------ labels


def smoothed(losses: dict[int, float]) -> dict[int, float]:
    """step -> the mean of the loss over the trailing `SMOOTH` logged steps (fewer at the start)."""
    steps = sorted(losses)
    out = {}
    for i, step in enumerate(steps):
        window = [losses[s] for s in steps[max(0, i - SMOOTH + 1):i + 1]]
        out[step] = sum(window) / len(window)
    return out


def onset_step(run: ScoredRun, reference: ScoredRun) -> int | None:
    """The step from which the run's smoothed loss stays more than MARGIN above the
    reference's (a non-finite loss counts as above) to the run's end; for a diverged run
    without one, its divergence step (else its last step)."""
    ours, theirs = smoothed(run.losses), smoothed(reference.losses)
    onset = None
    for step in sorted(ours):
        value = ours[step]
        above = not math.isfinite(value) or (step in theirs and value > theirs[step] + MARGIN)
        if above and onset is None:
            onset = step
        elif not above and step in theirs:
            onset = None
    if onset is not None:
        return onset
    if run.status == "diverged":
        return run.diverged_step or (max(run.losses) if run.losses else None)
    return None


def label_runs(runs: Sequence[ScoredRun]) -> None:
    """Set `label` and `onset` of every run (see the module's docstring)."""
    groups: dict[tuple[str, int | None], list[ScoredRun]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    for members in groups.values():
        done = [r for r in members if r.status == "done" and r.final_loss is not None
                and math.isfinite(r.final_loss)]
        best = min(done, key=lambda r: r.final_loss) if done else None
        for run in members:
            if run.status == "diverged" or run not in done:
                run.label = "diverged"
            elif run.final_loss <= best.final_loss + MARGIN:
                run.label = "healthy"
            else:
                run.label = "degraded" if run.lr > best.lr else "slow"
            run.onset = None
            if run.label in UNSTABLE:
                run.onset = onset_step(run, best) if best is not None else (
                    run.diverged_step or (max(run.losses) if run.losses else None))
                if run.label == "degraded" and run.onset is None:
                    # the final (validation) loss shows it, the training loss never did
                    run.onset = max(run.losses) if run.losses else None


# ------------------------------------------------------------------------------ scoring


def first_warnings(run: ScoredRun, cfg: Any) -> dict[str, int]:
    """Rule -> the step it first fired in the run (replayed with `cfg`); `any` for the union."""
    first: dict[str, int] = {}
    for event in replay(cfg, run.records):
        first.setdefault(event.rule, event.step)
    if first:
        first[ANY] = min(first.values())
    return first


def score(runs: Sequence[ScoredRun], cfg: Any, rules: Iterable[str] = (*RULES, ANY)
          ) -> list[RuleScore]:
    """One RuleScore per rule, over labelled runs (`label_runs` first)."""
    unlabelled = [r for r in runs if r.label is None]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} runs are not labelled; call label_runs first")
    warnings = [first_warnings(run, cfg) for run in runs]
    return score_warnings(runs, warnings, rules)


def score_warnings(runs: Sequence[ScoredRun], warnings: Sequence[dict[str, int]],
                   rules: Iterable[str] = (*RULES, ANY)) -> list[RuleScore]:
    """As `score`, with each run's first warning step per rule given."""
    out = []
    counts = {label: sum(r.label == label for r in runs) for label in LABELS}
    for rule in rules:
        tp = early = false_healthy = false_slow = warned = 0
        leads = []
        for run, first in zip(runs, warnings, strict=True):
            step = first.get(rule)
            if step is None:
                continue
            warned += 1
            if run.label in UNSTABLE:
                tp += 1
                if run.onset is not None:
                    leads.append(run.onset - step)
                    early += step <= run.onset
            elif run.label == "healthy":
                false_healthy += 1
            else:
                false_slow += 1
        out.append(RuleScore(rule, warned, counts["degraded"] + counts["diverged"],
                             counts["healthy"], counts["slow"], tp, early, false_healthy,
                             false_slow, leads))
    return out


# ------------------------------------------------------------------------------ tuning


def grid_configs(base: Any, grid: dict[str, Sequence[Any]] = TUNING_GRID) -> list[Any]:
    """Every combination of `grid` over `base` (a WarningConfig), in grid order."""
    keys = list(grid)
    return [dataclasses.replace(base, **dict(zip(keys, values, strict=True)))
            for values in itertools.product(*(grid[k] for k in keys))]


def choose_config(runs: Sequence[ScoredRun], base: Any,
                  grid: dict[str, Sequence[Any]] = TUNING_GRID) -> tuple[Any, RuleScore]:
    """The settings of `grid` that best meet OBJECTIVE on `runs`, and their union's score.
    When none keeps the false alarms at or below MAX_FALSE_ALARMS, the one with the fewest."""
    best_key, best = None, None
    for cfg in grid_configs(base, grid):
        union = score(runs, cfg, [ANY])[0]
        alarms = union.false_alarm_rate or 0.0
        feasible = alarms <= MAX_FALSE_ALARMS
        key = (feasible, -alarms if not feasible else 0.0, union.recall_early or 0.0,
               union.precision or 0.0, union.recall or 0.0)
        if best_key is None or key > best_key:
            best_key, best = key, (cfg, union)
    assert best is not None
    return best


def changed_settings(cfg: Any, base: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(base, f.name)}


# ------------------------------------------------------------------------------ tables


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def label_table(runs: Sequence[ScoredRun]) -> list[str]:
    """Markdown: how many runs got each label, per method."""
    methods = list(dict.fromkeys(r.method for r in runs))
    lines = ["| method | " + " | ".join(LABELS) + " |", "|---|" + "---|" * len(LABELS)]
    for method in methods:
        mine = [r for r in runs if r.method == method]
        lines.append(f"| {method} | " + " | ".join(str(sum(r.label == lab for r in mine))
                                                   for lab in LABELS) + " |")
    total = " | ".join(str(sum(r.label == lab for r in runs)) for lab in LABELS)
    lines.append(f"| all | {total} |")
    return lines


def score_table(scores: Sequence[RuleScore]) -> list[str]:
    """Markdown: one row per rule."""
    lines = ["| rule | runs warned | precision | recall | recall before the loss | "
             "false alarms: healthy runs | false alarms: slow runs | median lead (steps) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in scores:
        lead = "-" if s.median_lead is None else f"{s.median_lead:g}"
        slow = f"{s.false_slow}/{s.slow}" if s.slow else "-"
        lines.append(
            f"| {s.rule} | {s.warned} | {_pct(s.precision)} | {_pct(s.recall)} "
            f"({s.true_positives}/{s.unstable}) | {_pct(s.recall_early)} ({s.early}/"
            f"{s.unstable}) | {_pct(s.false_alarm_rate)} ({s.false_healthy}/{s.healthy}) | "
            f"{slow} | {lead} |")
    return lines


# ------------------------------------------------------------------------------ the report

# The rules' settings before they were tuned on a sweep (issue 21): the "before" of the report.
PREVIOUS_DEFAULTS: dict[str, Any] = {
    "window": 50, "min_records": 3, "grace_steps": 0, "persist": 1, "logit_growth": 2.0,
    "logit_floor": 50.0, "entropy_floor": 0.2, "entropy_drop": 0.5, "tev_growth": 2.0,
    "output_logit_growth": 2.0, "output_logit_floor": 20.0, "update_growth": 3.0,
}


def _seeds_text(seeds: Sequence[int] | None) -> str:
    return "all seeds" if not seeds else "seed" + ("s " if len(seeds) > 1 else " ") + \
        ", ".join(map(str, seeds))


def report_lines(sweep_dir: str | Path, score_seeds: Sequence[int] | None = None,
                 tune_seeds: Sequence[int] | None = None, current: Any = None) -> list[str]:
    """Markdown: the labels, then the score table of the previous defaults and of `current`
    (default: today's WarningConfig()) on `score_seeds`; with `tune_seeds`, also the settings
    `choose_config` picks on those seeds and their scores on `score_seeds`."""
    from stable_megatron.config import WarningConfig

    runs = load_sweep(sweep_dir)
    label_runs(runs)
    scored = [r for r in runs if not score_seeds or r.seed in score_seeds]
    if not scored:
        raise RunLogError(f"{sweep_dir}: no ended run of {_seeds_text(score_seeds)}")
    previous = dataclasses.replace(WarningConfig(), **PREVIOUS_DEFAULTS)
    current = current if current is not None else WarningConfig()
    lines = [f"Runs of `{sweep_dir}` by label ({_seeds_text(score_seeds)}; healthy: final "
             f"loss within {MARGIN} nats of the best of its method and seed; degraded: worse, "
             "at a larger LR; slow: worse, at a smaller LR; diverged: stopped by the "
             "divergence rule):", "", *label_table(scored), ""]
    lines += [f"Previous defaults ({_seeds_text(score_seeds)}):", "",
              *score_table(score(scored, previous)), ""]
    changes = changed_settings(current, previous)
    if changes:
        settings = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in changes.items())
        lines += [f"Current defaults ({settings}; {_seeds_text(score_seeds)}):", "",
                  *score_table(score(scored, current)), ""]
    if tune_seeds:
        tuning = [r for r in runs if r.seed in tune_seeds]
        if not tuning:
            raise RunLogError(f"{sweep_dir}: no ended run of {_seeds_text(tune_seeds)}")
        chosen, union = choose_config(tuning, previous)
        picked = changed_settings(chosen, previous)
        settings = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in picked.items()) or "the previous defaults"
        lines += [f"Chosen on {_seeds_text(tune_seeds)} ({len(tuning)} runs; {OBJECTIVE}): "
                  f"{settings}. On those runs the union had recall before the loss "
                  f"{_pct(union.recall_early)} and false alarms on "
                  f"{_pct(union.false_alarm_rate)} of healthy runs. Scored on "
                  f"{_seeds_text(score_seeds)}:", "", *score_table(score(scored, chosen)), ""]
    return lines
