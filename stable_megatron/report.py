"""`stable-megatron report RUN_DIR [RUN_DIR ...] --out DIR`: a Markdown page with PNG plots of
the stability metrics of one or more runs, overlaid (one colour per run).

`stable-megatron report --warnings SWEEP_DIR [--seeds 2,3] [--tune-seeds 1]` prints instead how
well the early-warning rules did on a sweep's runs (analysis/warning_score.py): the runs'
labels, then precision, recall, false alarms and lead time per rule, for the previous and the
current defaults and, with `--tune-seeds`, for the settings chosen on those seeds.

`stable-megatron report --logit-growth SWEEP_DIR [--out DIR]` writes the largest attention
logit at matched loss per method and LR of a sweep, table and figure
(analysis/logit_growth.py), into DIR (default SWEEP_DIR).

`stable-megatron report --sweep-csv A.csv [B.csv ...] --out DIR` redraws a sweep's figure
(`DIR/sweep.png`, final loss against LR) from committed `sweep.csv` files, for sweeps whose run
directories are gone; several files are drawn together (e.g. a method beside a baseline run
in another sweep with the same code), `--methods a,b` picks and orders the curves.

`DIR/report.md` has a table (one row per run: steps, final loss, final validation loss,
spikes, early warnings, divergence) and the figures of `analysis.plotting.REPORT_FIGURES`, each
with what to look for; spikes, early warnings (logged, and replayed from the records through the
warning rules) and the divergence are vertical lines in the run's colour. A figure none of the
runs has data for is skipped with one line. Errors print one `error: ...` line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stable_megatron.analysis import plotting
from stable_megatron.analysis.runs import RunLogError

MARKS_LINE = ("Vertical lines in each run's colour: dash-dot = loss spike, dashed = early "
              "warning, dotted = divergence.")


class ReportError(ValueError):
    """A report that cannot be built; the message is the one line printed."""


def build_report(run_dirs: list[str | Path], out_dir: str | Path,
                 labels: list[str] | None = None,
                 title: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Write `out_dir/report.md` and its PNGs; returns, per figure file, the (run label,
    series key) pairs drawn ([] for a skipped figure)."""
    run_dirs = [Path(d) for d in run_dirs]
    labels = list(labels) if labels else default_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ReportError(f"--labels: {len(labels)} labels for {len(run_dirs)} run directories")
    try:
        runs = [plotting.mark_run(d, label) for d, label in zip(run_dirs, labels, strict=True)]
    except RunLogError as err:
        raise ReportError(str(err)) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        drawn = plotting.report_figures(runs, out_dir)
    except ImportError as err:
        if (err.name or "").split(".")[0] != "matplotlib":
            raise
        raise ReportError("matplotlib is not installed (pip install matplotlib)") from None
    page = markdown(runs, drawn, title or "Stability report")
    (out_dir / "report.md").write_text(page, encoding="utf-8")
    return drawn


def default_labels(run_dirs: list[Path]) -> list[str]:
    """The directory names, or the paths when two runs share a name."""
    names = [d.name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def markdown(runs: list[plotting.MarkedRun], drawn: dict[str, list[tuple[str, str]]],
             title: str) -> str:
    lines = [f"# {title}", "", *_table(runs), "", MARKS_LINE]
    for spec in plotting.REPORT_FIGURES:
        lines += ["", f"## {spec.heading}", ""]
        if drawn.get(spec.file):
            lines += [f"![{spec.heading}]({spec.file})", "", spec.caption]
        else:
            lines.append(f"Skipped: no run logged {spec.needs}.")
    return "\n".join(lines) + "\n"


def _table(runs: list[plotting.MarkedRun]) -> list[str]:
    rows = [
        "| run | run dir | steps | final loss | final val loss (ppl) | spikes | warnings "
        "| diverged at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        log = run.log
        first_warning = f"{run.warnings[0][0]}: {run.warnings[0][1]}" if run.warnings else ""
        cells = [
            run.label, f"`{log.run_dir}`", str(log.last_step), _number(log.last("loss")),
            _val(log.last("val_loss"), log.last("val_ppl")),
            _count(len(run.spikes), run.spikes[0] if run.spikes else None),
            _count(len(run.warnings), first_warning or None),
            "-" if run.diverged is None else str(run.diverged),
        ]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _val(loss: float | None, ppl: float | None) -> str:
    if loss is None:
        return "-"
    return _number(loss) + ("" if ppl is None else f" ({ppl:.4g})")


def _count(count: int, first: object) -> str:
    return str(count) if first is None else f"{count} (first: step {first})"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stable-megatron report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="*", type=Path, help="run directories (metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="directory for report.md and the PNGs")
    parser.add_argument("--warnings", type=Path, metavar="SWEEP_DIR",
                        help="print the early-warning score table of a sweep's runs instead")
    parser.add_argument("--logit-growth", type=Path, metavar="SWEEP_DIR",
                        help="write the largest attention logit at matched loss of a sweep's "
                        "runs (logit_growth.md, .png) instead")
    parser.add_argument("--sweep-csv", nargs="+", type=Path, metavar="CSV",
                        help="draw DIR/sweep.png from these sweep.csv files instead")
    parser.add_argument("--methods", help="with --sweep-csv or --logit-growth: only these "
                        "methods, in this order")
    parser.add_argument("--seeds", help="with --warnings: score these seeds only (e.g. 2,3)")
    parser.add_argument("--tune-seeds", help="with --warnings: also choose the rules' settings "
                        "on these seeds (e.g. 1) and score them on --seeds")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: directory names)")
    parser.add_argument("--title", help="title of the page")
    return parser.parse_args(argv)


def _seed_list(text: str | None, flag: str) -> list[int] | None:
    from stable_megatron.sweep import SweepError, parse_seeds

    if not text:
        return None
    try:
        return parse_seeds(text, flag)
    except SweepError as err:
        raise ReportError(str(err)) from None


def warnings_main(args: argparse.Namespace) -> int:
    from stable_megatron.analysis.warning_score import report_lines

    try:
        lines = report_lines(args.warnings, _seed_list(args.seeds, "--seeds"),
                             _seed_list(args.tune_seeds, "--tune-seeds"))
    except (ReportError, RunLogError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _method_list(text: str | None) -> list[str] | None:
    """`--methods a,b`: the names in order, or None for all."""
    names = [m.strip() for m in (text or "").split(",") if m.strip()]
    return names or None


def sweep_csv_main(paths: list[Path], out: Path | None, methods: str | None = None) -> int:
    from stable_megatron.analysis import sweep_table
    from stable_megatron.analysis.plotting import plot_sweep

    if out is None:
        print("error: --sweep-csv needs --out DIR", file=sys.stderr)
        return 2
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = [row for path in paths for row in sweep_table.read_csv(path)]
    keep = _method_list(methods)
    if keep:
        rows = sorted((r for r in rows if r.method in keep), key=lambda r: keep.index(r.method))
    points = sweep_table.plot_points(rows)
    if not points:
        print("error: no ended run in the CSV file(s)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    plot_sweep(points, out / "sweep.png", title="final loss against learning rate")
    print(f"wrote {out / 'sweep.png'} ({len(points)} runs)")
    return 0


def logit_growth_main(sweep_dir: Path, out: Path | None, methods: str | None) -> int:
    from stable_megatron.analysis import logit_growth

    try:
        path = logit_growth.write(sweep_dir, out, _method_list(methods))
    except RunLogError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.warnings is not None:
        return warnings_main(args)
    if args.logit_growth is not None:
        return logit_growth_main(args.logit_growth, args.out, args.methods)
    if args.sweep_csv:
        return sweep_csv_main(args.sweep_csv, args.out, args.methods)
    if not args.run_dirs or args.out is None:
        print("error: give RUN_DIR... --out DIR (or --warnings SWEEP_DIR)", file=sys.stderr)
        return 2
    try:
        drawn = build_report(args.run_dirs, args.out, args.labels, args.title)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    figures = sum(1 for pairs in drawn.values() if pairs)
    print(f"wrote {args.out / 'report.md'} ({figures} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
