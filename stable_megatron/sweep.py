"""`stable-megatron sweep`: train every (method, learning rate) pair of a grid and summarise how
robust each method is to the learning rate.

    stable-megatron sweep RECIPE [--methods a,b,...] [--lrs 1e-3,3e-3,...] [--seeds 1,2,3]
                                 [--out DIR] [--results DIR] [--headline-lrs ...]
                                 [--nproc N] [--jobs J] [--dry-run] [key=value ...]

Each pair is an ordinary run directory, `OUT/<method>/lr_<lr>`, trained by the same command as
any training run (`python -m stable_megatron.train` for one process; the `deepspeed` launcher
for `--nproc` > 1), so every run can be inspected, resumed, plotted and reported on by the
usual tools. Its console output goes to `train.log` in the run directory; `sweep_run.json`
beside it records the outcome once the run has ended.

- Methods are names of `recipes/methods/*.yaml` (their settings, without `base` and the run
  directory, are applied as overrides on top of RECIPE), paths to such a YAML file, or
  `name:key=value,key=value` for a custom one. The recipe may list default `methods` and
  `lrs` in a `sweep:` section.
- Every run gets `train.lr=<lr>`, `train.min_lr` at the recipe's min_lr / lr ratio, and
  `stability.stop_on_divergence=true`: a run stops early once its loss is not finite or has
  been above its first-step loss for `stability.divergence_patience` steps
  (stable_megatron/stability/divergence.py).
- `--seeds` runs the grid once per `train.seed` (initialisation and data order), in
  `OUT/<method>/seed_<s>/lr_<lr>`, seed by seed; the summary then reports means and standard
  deviations over seeds (analysis/sweep_table.py), with the headline LR sensitivity over
  `--headline-lrs` (default: the whole grid).
- `--results DIR` mirrors each ended run's `sweep_run.json` and compact series
  (`series.jsonl.gz`, analysis/series.py) into `DIR/<same path>`, small enough to commit; the
  summary is written there too, from the mirrored series.
- Runs go one after another, or `--jobs J` at a time (each with cores / (J * nproc) threads).
- Run again, the same command skips the runs that ended (done or diverged) with the same
  overrides, in OUT or in the results mirror (so a fresh checkout with committed results
  relaunches nothing), and relaunches the others, which resume from their latest checkpoint.
  (An edit of the recipe file itself is not detected: sweep into a new `--out` after one.)
- At the end (and with `--summarise-only`) it writes `OUT/sweep.csv` (one row per run),
  `OUT/sweep.md` (loss grid, per-method summary, LR sensitivity; definitions in
  stable_megatron/analysis/sweep_table.py; the early-warning scores of the ended runs,
  analysis/warning_score.py) and `OUT/sweep.png` (final loss against LR).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stable_megatron.analysis import sweep_table
from stable_megatron.analysis.runs import SERIES_FILE, RunLogError, is_number, read_run
from stable_megatron.analysis.series import write_series
from stable_megatron.config import ConfigError, load_config, read_recipe, validate

RESULT_FILE = "sweep_run.json"
METHODS_DIR = Path(__file__).resolve().parents[1] / "recipes" / "methods"
_KEY_VALUE = re.compile(r"[A-Za-z_][\w.]*=")


class SweepError(ValueError):
    """A sweep that cannot start; the message names the flag, method or file."""


@dataclass
class Method:
    name: str
    overrides: list[str]


@dataclass
class RunSpec:
    method: Method
    lr: float
    run_dir: Path
    overrides: list[str] = field(default_factory=list)  # everything given to train, in order
    seed: int | None = None  # train.seed, when the sweep was given seeds

    @property
    def label(self) -> str:
        seed = "" if self.seed is None else f" seed={self.seed}"
        return f"{self.method.name}{seed} lr={self.lr:g}"


# ------------------------------------------------------------------------------ planning


def flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested mapping as dotted `key=value` overrides (values in YAML flow style)."""
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += flatten(value, f"{name}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
            out.append(f"{name}={text.removesuffix('...').strip()}")
    return out


def method_from_yaml(name: str, path: Path) -> Method:
    """A method recipe's own settings (not its base), minus where it logs."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"method {name}: {path} is not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise SweepError(f"method {name}: {path} is not a mapping of sections")
    data.pop("base", None)
    train = data.get("train")
    if isinstance(train, dict):
        train.pop("run_dir", None)
        if not train:
            data.pop("train")
    return Method(name, flatten(data))


def resolve_method(spec: str, search: Sequence[Path] = (METHODS_DIR,)) -> Method:
    """`qk_norm` (recipes/methods/qk_norm.yaml), `path/to/m.yaml`, or `name:k=v,k=v`."""
    spec = spec.strip()
    if ":" in spec:
        name, _, rest = spec.partition(":")
        items = split_top_level(rest)
        bad = [item for item in items if "=" not in item]
        if not name or bad:
            raise SweepError(f"method {spec!r}: expected name:key=value,key=value")
        return Method(name.strip(), items)
    if spec.endswith((".yaml", ".yml")):
        path = Path(spec)
        if not path.is_file():
            raise SweepError(f"method {spec}: no such file")
        return method_from_yaml(path.stem, path)
    for folder in search:
        path = folder / f"{spec}.yaml"
        if path.is_file():
            return method_from_yaml(spec, path)
    known = sorted({p.stem for folder in search if folder.is_dir() for p in folder.glob("*.yaml")})
    raise SweepError(f"unknown method {spec!r}; known: {', '.join(known)} "
                     f"(or name:key=value,... for a custom one)")


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"--lrs {text}: expected comma-separated numbers, e.g. 1e-3,3e-3") \
            from None
    if not lrs or any(not lr > 0 for lr in lrs):
        raise SweepError(f"--lrs {text}: needs at least one learning rate, all > 0")
    if len(set(lrs)) != len(lrs):
        raise SweepError(f"--lrs {text}: a learning rate is listed twice")
    return sorted(lrs)


def recipe_sweep_defaults(recipe: str) -> dict[str, Any]:
    section = read_recipe(recipe).get("sweep") or {}
    if not isinstance(section, dict):
        raise SweepError(f"recipe {recipe}: sweep must be a mapping (methods, lrs)")
    return section


def lr_dir_name(lr: float) -> str:
    return f"lr_{lr:g}"


def run_dir_of(out: Path, method: str, lr: float, seed: int | None) -> Path:
    """`OUT/<method>/lr_<lr>`, or `OUT/<method>/seed_<seed>/lr_<lr>` in a seeded sweep."""
    folder = out / method if seed is None else out / method / f"seed_{seed}"
    return folder / lr_dir_name(lr)


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """`1,2,3` as a list of seeds; `flag` names the option in the error."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"{flag} {text}: expected comma-separated integers, e.g. 1,2,3") \
            from None
    if not seeds or any(s < 0 for s in seeds):
        raise SweepError(f"{flag} {text}: needs at least one seed, all >= 0")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{flag} {text}: a seed is listed twice")
    return seeds


def plan_runs(recipe: str, methods: list[Method], lrs: list[float], out: Path,
              overrides: list[str], world: int, seeds: Sequence[int] | None = None
              ) -> list[RunSpec]:
    """Every (seed, method, lr) run, its config checked at `world` processes before anything
    runs. Seed-major: a sweep stopped part-way has whole seeds done first."""
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise SweepError(f"--methods: a method name is listed twice ({', '.join(names)})")
    base = load_config(recipe, overrides)
    ratio = base.train.min_lr / base.train.lr
    runs = []
    for seed in (seeds or [None]):
        # train.seed sets both the model's initialisation and the data order
        seed_override = [] if seed is None else [f"train.seed={seed}"]
        for method in methods:
            for lr in lrs:
                run_dir = run_dir_of(out, method.name, lr, seed)
                run_overrides = [*method.overrides, *overrides, *seed_override,
                                 f"train.lr={lr!r}", f"train.min_lr={lr * ratio:.6g}",
                                 f"train.run_dir={run_dir}", "stability.stop_on_divergence=true"]
                try:
                    validate(load_config(recipe, run_overrides), world)
                except ConfigError as err:
                    where = "" if seed is None else f" seed {seed}"
                    raise SweepError(f"method {method.name}{where} at lr {lr:g}: {err}") \
                        from None
                runs.append(RunSpec(method, lr, run_dir, run_overrides, seed))
    return runs


# ------------------------------------------------------------------------------ running


def train_command(recipe: str, run: RunSpec, nproc: int, port: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "stable_megatron.train", recipe, *run.overrides]
    launcher = ["deepspeed"] if shutil.which("deepspeed") else \
        [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*launcher, "--num_gpus", str(nproc), "--master_port", str(port),
            "--module", "stable_megatron.train", recipe, *run.overrides]


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def ended(run_dir: Path, run: RunSpec) -> bool:
    """`run_dir` records that `run` ended (done or diverged) with the same settings as now."""
    result = read_result(run_dir)
    return bool(result) and result.get("status") in ("done", "diverged") and \
        result.get("overrides") == run.overrides


def mirror_dir(run: RunSpec, out: Path, results: Path | None) -> Path | None:
    """Where `results` keeps the run's record and series: its path under `out`, under
    `results`."""
    return None if results is None else results / run.run_dir.relative_to(out)


def is_finished(run: RunSpec, out: Path | None = None, results: Path | None = None) -> bool:
    """Ended with the same settings as now, in its run directory or in the results mirror
    (a fresh checkout has only the latter)."""
    mirror = mirror_dir(run, out, results) if out is not None else None
    return ended(run.run_dir, run) or (mirror is not None and ended(mirror, run))


def mirror_run(run_dir: Path, mirror: Path) -> None:
    """Copy the ended run's outcome and its compact series into `mirror` (the series is
    written first where the run directory has none yet)."""
    series = run_dir / SERIES_FILE
    if series.is_file():
        mirror.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(series, mirror / SERIES_FILE)
    else:
        write_series(run_dir, mirror / SERIES_FILE)
    shutil.copyfile(run_dir / RESULT_FILE, mirror / RESULT_FILE)


def sync_results(runs: list[RunSpec], out: Path, results: Path | None) -> int:
    """Mirror every run that ended in its run directory and is missing from (or newer than)
    the results mirror; returns how many were copied."""
    copied = 0
    for run in runs:
        mirror = mirror_dir(run, out, results)
        if mirror is None or not ended(run.run_dir, run):
            continue
        if read_result(mirror) != read_result(run.run_dir) or not (mirror / SERIES_FILE).is_file():
            mirror_run(run.run_dir, mirror)
            copied += 1
    return copied


def outcome(run_dir: Path, returncode: int, steps: int) -> tuple[str, str]:
    """(status, detail) of a run whose process has ended."""
    try:
        log = read_run(run_dir)
    except RunLogError:
        return "failed", f"exit code {returncode}, no metrics.jsonl"
    diverged = log.events_of("diverged")
    if returncode == 0 and diverged:
        return "diverged", diverged[-1].get("reason", "")
    if returncode == 0 and log.last_step >= steps:
        return "done", ""
    return "failed", f"exit code {returncode} at step {log.last_step}"


def run_summary(run_dir: Path, method: str, lr: float, seed: int | None = None
                ) -> sweep_table.SweepRun:
    """One row of the table, from the run's log (or series) and result file."""
    result = read_result(run_dir) or {}
    status = result.get("status", "pending")
    row = sweep_table.SweepRun(method=method, lr=lr, status=status, run_dir=str(run_dir),
                               seconds=result.get("seconds"), seed=seed)
    try:
        log = read_run(run_dir)
    except RunLogError:
        return row
    row.steps = log.last_step
    row.initial_loss = log.first("loss")
    row.train_loss = log.last("loss")
    row.val_loss = log.last("val_loss")
    diverged = log.events_of("diverged")
    if status == "diverged" and diverged:
        row.diverged_step = int(diverged[-1]["step"])
        if is_number(diverged[-1].get("initial_loss")):
            row.initial_loss = float(diverged[-1]["initial_loss"])
    logits = [v for r in log.records for k, v in r.items()
              if k.startswith("attn_logit_max/layer_") and is_number(v)]
    row.max_attn_logit = max(logits) if logits else None
    for record in reversed(log.records):
        entropies = [v for k, v in record.items()
                     if k.startswith("attn_entropy_norm/layer_") and k.endswith("/min")
                     and is_number(v)]
        if entropies:
            row.min_attn_entropy = min(entropies)
            break
    return row


class Runner:
    """Launches the runs, `jobs` at a time, and records each one's outcome."""

    def __init__(self, recipe: str, runs: list[RunSpec], nproc: int, jobs: int,
                 port: int, steps: int, out: Path | None = None,
                 results: Path | None = None) -> None:
        self.recipe, self.runs, self.nproc, self.jobs = recipe, runs, nproc, jobs
        self.port, self.steps = port, steps
        self.out, self.results = out, results
        self.durations: list[float] = []

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        threads = max(1, (os.cpu_count() or 1) // (self.jobs * self.nproc))
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("PYTHONWARNINGS", "ignore")
        return env

    def _start(self, run: RunSpec, slot: int) -> tuple[subprocess.Popen, float, Any]:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run.run_dir / "train.log", "a")
        cmd = train_command(self.recipe, run, self.nproc, self.port + slot)
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        # its own session, so that stopping it stops the launcher's workers too; and a SIGTERM
        # to it if the sweep itself is killed, so that no orphan keeps writing the run
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                start_new_session=True, preexec_fn=_terminate_with_parent)
        return proc, time.time(), log

    def _finish(self, run: RunSpec, proc: subprocess.Popen, started: float) -> str:
        seconds = time.time() - started
        previous = read_result(run.run_dir) or {}
        status, detail = outcome(run.run_dir, proc.returncode, self.steps)
        result = {"status": status, "detail": detail, "returncode": proc.returncode,
                  "seconds": round(seconds + float(previous.get("seconds") or 0.0), 1),
                  "launches": int(previous.get("launches", 0)) + 1,
                  "overrides": run.overrides}
        tmp = run.run_dir / f".{RESULT_FILE}.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(run.run_dir / RESULT_FILE)
        if status in ("done", "diverged"):
            write_series(run.run_dir)
            mirror = mirror_dir(run, self.out, self.results) if self.out is not None else None
            if mirror is not None:
                mirror_run(run.run_dir, mirror)
        self.durations.append(seconds)
        return f"{status}{': ' + detail if detail else ''} ({seconds:.0f}s)"

    def run(self) -> None:
        todo = [r for r in self.runs if not is_finished(r, self.out, self.results)]
        skipped = len(self.runs) - len(todo)
        if skipped:
            print(f"sweep: {skipped} of {len(self.runs)} runs already ended; skipping them",
                  flush=True)
        active: dict[int, tuple[RunSpec, subprocess.Popen, float, Any]] = {}
        queue, done_count, total = list(todo), 0, len(todo)
        sweep_start = time.time()
        try:
            while queue or active:
                while queue and len(active) < self.jobs:
                    slot = next(i for i in range(self.jobs) if i not in active)
                    run = queue.pop(0)
                    resumed = " (resuming)" if (run.run_dir / "metrics.jsonl").exists() else ""
                    print(f"[{done_count + len(active) + 1}/{total}] {run.label}: "
                          f"started{resumed} -> {run.run_dir}/train.log", flush=True)
                    active[slot] = (run, *self._start(run, slot))
                time.sleep(0.5)
                for slot, (run, proc, started, log) in list(active.items()):
                    if proc.poll() is None:
                        continue
                    log.close()
                    message = self._finish(run, proc, started)
                    del active[slot]
                    done_count += 1
                    eta = ""
                    if queue or active:
                        per_run = (time.time() - sweep_start) / done_count
                        left = per_run * (total - done_count)
                        eta = f"; {total - done_count} left, ETA {left / 60:.0f} min"
                    print(f"[{done_count}/{total}] {run.label}: {message}{eta}", flush=True)
        except KeyboardInterrupt:
            for _, proc, _, log in active.values():
                _stop(proc)
                log.close()
            print("sweep: interrupted; run the same command again to continue "
                  "(ended runs are kept, the others resume)", file=sys.stderr)
            raise


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _terminate_with_parent() -> None:
    """Linux: deliver SIGTERM to this (child) process when its parent dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------ summary


def summarise(out: Path, runs: list[RunSpec], methods: list[str], header: list[str],
              results: Path | None = None, headline_lrs: Sequence[float] | None = None
              ) -> tuple[list[sweep_table.SweepRun], list[str]]:
    """Write sweep.csv, sweep.md and sweep.png into `out` (and `results`, where the rows are
    read from the mirrored series of the runs that ended, so that the committed tables are
    those of the committed data); returns the rows and the per-method table's lines."""
    rows = []
    for run in runs:
        mirror = mirror_dir(run, out, results)
        source = mirror if mirror is not None and ended(mirror, run) else run.run_dir
        rows.append(run_summary(source, run.method.name, run.lr, run.seed))
    seeded = any(r.seed is not None for r in rows)
    seconds = sum(r.seconds or 0.0 for r in rows)
    header = [*header, f"Sum of the runs' own wall times (start-up included): "
              f"{seconds / 60:.1f} min over {sum(r.seconds is not None for r in rows)} runs."]
    sensitivity_text = ("LR sensitivity (Wortsman et al. 2023): mean over the grid of min(final "
                        "loss, initial loss) - best final loss; lower is more robust. Final "
                        "loss: the last validation loss; a diverged run counts as its initial "
                        "loss.")
    if seeded:
        summaries = sweep_table.summarise_seeds(rows, methods, headline_lrs)
        table = sweep_table.seeded_table(summaries, methods[0])
        grid = ", ".join(f"{lr:g}" for lr in (headline_lrs or sorted({r.lr for r in rows})))
        body = ["## Per method (mean ± standard deviation over seeds "
                f"{', '.join(map(str, sweep_table.seeds_of(rows)))})", "", *table, "",
                sensitivity_text + f" Headline grid: lr {grid}; the full grid is every LR "
                "of the sweep. Each is computed per seed, then averaged. *Resolved*: the "
                "difference exceeds twice the larger of the two standard deviations.", "",
                "## Which differences are resolved", "",
                "Headline LR sensitivity, row against column: `<` lower and `>` higher by more "
                "than twice the larger seed spread, `~` within it:", "",
                *sweep_table.resolution_matrix(summaries, lambda s: s.sensitivity), "",
                "Best final loss, row against column:", "",
                *sweep_table.resolution_matrix(summaries, lambda s: s.best_loss), "",
                "## Final loss per LR (mean ± std over seeds)", "",
                *sweep_table.seeded_loss_grid(rows, methods), "",
                "A diverged run counts as its initial loss (`k div`: k seeds diverged).", "",
                "## Largest attention logit (smallest-largest over seeds) / last lowest "
                "normalised entropy (mean over seeds)", "",
                *sweep_table.seeded_extremes_grid(rows, methods), ""]
    else:
        summaries = sweep_table.summarise(rows, methods)
        table = sweep_table.summary_table(summaries)
        body = ["## Per method", "", *table, "", sensitivity_text, "",
                "## Final loss per run", "", *sweep_table.loss_grid(rows, methods), "",
                "`div@N`: stopped by the divergence rule at step N.", "",
                "## Largest attention logit / last lowest normalised entropy", "",
                *sweep_table.extremes_grid(rows, methods), ""]
    warning_lines = _warning_scores(results if results is not None else out)
    out.mkdir(parents=True, exist_ok=True)
    plot_note = _plot(rows, out / "sweep.png")  # drawn once, copied to the mirror
    for folder in [out] + ([results] if results is not None else []):
        folder.mkdir(parents=True, exist_ok=True)
        sweep_table.write_csv(rows, folder / "sweep.csv")
        if folder != out and (out / "sweep.png").is_file():
            shutil.copyfile(out / "sweep.png", folder / "sweep.png")
        lines = ["# LR sweep", "", *header, "", *body, plot_note, "", *warning_lines]
        (folder / "sweep.md").write_text("\n".join(lines))
    return rows, table


def _warning_scores(folder: Path) -> list[str]:
    """The early-warning score section (analysis/warning_score.py) of the ended runs."""
    from stable_megatron.analysis.warning_score import report_lines

    try:
        lines = report_lines(folder)
    except RunLogError:
        return []
    return ["## Early warning, scored", "",
            "Every rule replayed on every ended run (`stable-megatron report --warnings "
            f"{folder}`; add `--seeds` / `--tune-seeds` to hold seeds out).", "", *lines]


def _plot(rows: list[sweep_table.SweepRun], path: Path) -> str:
    points = sweep_table.plot_points(rows)
    if not points:
        return "(no plot: no run has ended yet)"
    from stable_megatron.analysis.plotting import plot_sweep

    try:
        plot_sweep(points, path, title="final loss against learning rate")
    except ImportError as err:  # matplotlib is optional
        return f"(no plot: {err}; `pip install matplotlib`)"
    return f"![final loss against learning rate]({path.name})"


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="stable-megatron sweep",
        description="Train every (method, LR) pair of a grid; write sweep.csv/.md/.png.")
    parser.add_argument("recipe")
    parser.add_argument("--methods", help="comma-separated; default: the recipe's sweep.methods")
    parser.add_argument("--lrs", help="comma-separated learning rates; default: sweep.lrs")
    parser.add_argument("--seeds", help="comma-separated train.seed values (initialisation and "
                        "data order); each run's directory names its seed; default: sweep.seeds, "
                        "else the recipe's one seed")
    parser.add_argument("--out", type=Path, help="sweep directory (default: sweep.out, "
                        "else runs/sweep/<recipe name>)")
    parser.add_argument("--results", type=Path,
                        help="a committable mirror of the sweep: each ended run's "
                        "sweep_run.json and series.jsonl.gz, and the summary (default: "
                        "sweep.results, else none)")
    parser.add_argument("--headline-lrs", help="comma-separated sub-grid for the headline LR "
                        "sensitivity (default: sweep.headline_lrs, else the whole grid)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run (deepspeed launcher when > 1)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument("--master-port", type=int, default=29600,
                        help="first rendezvous port (one per concurrent job)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and stop")
    parser.add_argument("--summarise-only", action="store_true",
                        help="write the summary of the runs so far; launch nothing")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.nproc < 1 or args.jobs < 1:
        parser.error("--nproc and --jobs must be >= 1")
    return args, overrides


def split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets (`[q,k,v]` stays one piece)."""
    pieces, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            pieces.append(current)
            current = ""
        else:
            current += char
    pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


def split_methods(text: str | list | None) -> list[str]:
    """Comma-separated methods, where a custom `name:k=v,k=v` keeps its own commas: a piece
    that is a `key=value` continues the custom method before it."""
    if text is None:
        return []
    if isinstance(text, list):
        return [str(x) for x in text]
    methods: list[str] = []
    for piece in split_top_level(text):
        if methods and ":" in methods[-1] and _KEY_VALUE.match(piece):
            methods[-1] += "," + piece
        else:
            methods.append(piece)
    return methods


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        defaults = recipe_sweep_defaults(args.recipe)
        method_specs = split_methods(args.methods) or split_methods(defaults.get("methods"))
        if not method_specs:
            raise SweepError("no methods: pass --methods (or give the recipe sweep.methods)")
        lr_text = args.lrs or ",".join(str(x) for x in defaults.get("lrs") or [])
        if not lr_text:
            raise SweepError("no learning rates: pass --lrs (or give the recipe sweep.lrs)")
        lrs = parse_lrs(lr_text)
        seed_text = args.seeds or ",".join(str(x) for x in defaults.get("seeds") or [])
        seeds = parse_seeds(seed_text) if seed_text else None
        methods = [resolve_method(s, (Path(args.recipe).parent / "methods", METHODS_DIR))
                   for s in method_specs]
        out = args.out or Path(defaults.get("out") or f"runs/sweep/{Path(args.recipe).stem}")
        results = args.results or (Path(defaults["results"]) if defaults.get("results") else None)
        headline_text = args.headline_lrs or ",".join(
            str(x) for x in defaults.get("headline_lrs") or [])
        headline_lrs = parse_lrs(headline_text) if headline_text else None
        missing = [x for x in headline_lrs or [] if not any(abs(x - lr) <= 1e-12 * lr
                                                          for lr in lrs)]
        if missing:
            raise SweepError(f"headline LRs {', '.join(f'{x:g}' for x in missing)} are not "
                             f"in the grid ({', '.join(f'{lr:g}' for lr in lrs)})")
        runs = plan_runs(args.recipe, methods, lrs, out, overrides, args.nproc, seeds)
        steps = load_config(args.recipe, runs[0].overrides).train.steps
    except (SweepError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = [m.name for m in methods]
    times_seeds = "" if seeds is None else f" x {len(seeds)} seeds"
    print(f"sweep: {len(names)} methods x {len(lrs)} learning rates{times_seeds} = "
          f"{len(runs)} runs of {args.recipe} ({steps} steps, {args.nproc} process(es) each, "
          f"{args.jobs} at a time) -> {out}", flush=True)
    if args.dry_run:
        for run in runs:
            state = " [ended]" if is_finished(run, out, results) else ""
            cmd = train_command(args.recipe, run, args.nproc, args.master_port)
            print(f"{run.label}{state}: {' '.join(cmd)}")
        return 0
    started = time.time()
    if not args.summarise_only:
        # SIGTERM (a scheduler's, or `kill`) stops the runs as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background
            signal.signal(signal.SIGINT, _interrupt)
        try:
            Runner(args.recipe, runs, args.nproc, args.jobs, args.master_port, steps, out,
                   results).run()
        except KeyboardInterrupt:
            return 130
    elapsed = time.time() - started
    header = [f"Recipe `{args.recipe}`, {steps} steps, methods {', '.join(names)}, learning "
              f"rates {', '.join(f'{lr:g}' for lr in lrs)}; {args.nproc} process(es) per run; "
              f"overrides: {' '.join(overrides) or 'none'}."]
    if not args.summarise_only:
        header.append(f"This invocation: {elapsed / 60:.1f} min wall, {args.jobs} run(s) at a "
                      f"time, on {os.cpu_count()} CPU core(s) / visible device(s).")
    copied = sync_results(runs, out, results)
    if copied:
        print(f"sweep: mirrored {copied} ended run(s) into {results}")
    rows, table = summarise(out, runs, names, header, results, headline_lrs)
    print("\n".join(table))
    failed = [r for r in rows if r.status in ("failed", "pending")]
    print(f"sweep: wrote {out}/sweep.md, sweep.csv, sweep.png "
          f"(this invocation {elapsed / 60:.1f} min)")
    if failed and not args.summarise_only:
        names = ", ".join(f"{r.method} lr={r.lr:g}" for r in failed)
        print(f"sweep: {len(failed)} run(s) did not end: {names}; see their train.log",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
