"""A run's compact series: the part of its `metrics.jsonl` that the sweep's tables, figures and
early-warning scores are computed from, small enough to commit for a whole sweep.

`series.jsonl.gz` holds one JSON object per logged step with only the keys of
`keep_pattern()` (values exactly as logged, no rounding, so a table computed from it equals one
computed from the full log), then the run's events (`{"event": ...}`: warnings, spikes,
rollbacks, divergence) as logged. It is gzip with a zero timestamp, so the same run gives the
same bytes. `analysis.runs.read_run` reads it when a run directory has no `metrics.jsonl`.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from stable_megatron.analysis.runs import SERIES_FILE, RunLog, read_run

__all__ = ["SERIES_FILE", "compact", "keep_pattern", "write_series"]

# The keys a series keeps: the losses and optimizer state per step, the stability signals of
# metric steps (what the early-warning rules read, TEV, Muon's residual), and what each
# stability method logs (`Method.series_metrics`: sigma/gamma, QK-clip, z-loss, ...).
BASE_KEYS = (
    r"step|loss|val_loss|val_ppl|lr|grad_norm"
    r"|attn_logit_max/layer_\d+|attn_entropy_norm/layer_\d+/min"
    r"|tev/mean|tev_out/mean|output_logit/(mean|max)|update_rms/[\w.]+"
    r"|muon/ns_residual(_max)?"
)


def keep_pattern() -> re.Pattern:
    """The pattern of the kept keys, with the registered methods' metrics."""
    from stable_megatron import methods

    extra = [m.series_metrics for m in methods.methods() if m.series_metrics]
    return re.compile("^(" + "|".join([BASE_KEYS, *extra]) + ")$")


def compact(log: RunLog) -> list[dict[str, Any]]:
    """The series' lines: the kept keys of every step record, then the events."""
    lines, keep = [], keep_pattern()
    for record in log.records:
        kept = {key: value for key, value in record.items() if keep.match(key)}
        if len(kept) > 1:  # more than the step
            lines.append(kept)
    return lines + list(log.events)


def write_series(run_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Write the series of the run in `run_dir` (read from its metrics.jsonl) to `dest`
    (default `run_dir/series.jsonl.gz`); returns the path. RunLogError without a log."""
    log = read_run(run_dir)
    path = Path(dest) if dest is not None else Path(run_dir) / SERIES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in compact(log))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                               filename="") as handle:
        handle.write(text.encode("utf-8"))
    tmp.replace(path)
    return path
