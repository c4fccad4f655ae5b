"""A run directory's log, as the analysis tools read it.

`metrics.jsonl` holds one JSON object per logged step, plus event records (`{"event": ...}`:
spike, rollback, warning, diverged). A resumed run appends: steps after its checkpoint are
logged twice, and the later record (the one the resumed run trained) is the one kept. A torn
last line (a run being written, or killed mid-write) is skipped. A run directory without
`metrics.jsonl` is read from its compact series (`series.jsonl.gz`, analysis/series.py), as a
sweep's committed results are.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SERIES_FILE = "series.jsonl.gz"


class RunLogError(ValueError):
    """A run directory without a readable log; the message names the path."""


@dataclass
class RunLog:
    run_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)  # step records, by step
    events: list[dict[str, Any]] = field(default_factory=list)  # in the order logged

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    @property
    def last_step(self) -> int:
        return int(self.records[-1]["step"]) if self.records else 0

    def last(self, key: str) -> float | None:
        """The newest value of `key` (e.g. `loss`, `val_loss`)."""
        for record in reversed(self.records):
            value = record.get(key)
            if isinstance(value, (int, float)):
                return float(value)
        return None

    def first(self, key: str) -> float | None:
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)):
                return float(value)
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (gzip-compressed if its name ends in .gz); torn or
    non-object lines skipped."""
    out = []
    if path.suffix == ".gz":
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError) as err:
            raise RunLogError(f"{path}: not a readable gzip file ({err})") from None
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def read_run(run_dir: str | Path) -> RunLog:
    """`run_dir/metrics.jsonl` (else `run_dir/series.jsonl.gz`), records deduplicated by step
    (a resumed run's later record wins) and sorted; RunLogError when there is no log."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file() and (run_dir / SERIES_FILE).is_file():
        path = run_dir / SERIES_FILE
    if not path.is_file():
        raise RunLogError(f"{path}: no such file (not a run directory, or the run never logged)")
    by_step: dict[int, dict[str, Any]] = {}
    events = []
    for obj in read_jsonl(path):
        if "step" not in obj:
            continue
        if "event" in obj:
            events.append(obj)
        else:
            by_step[int(obj["step"])] = obj
    return RunLog(run_dir, [by_step[s] for s in sorted(by_step)], events)


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The step records of a run (see `read_run`)."""
    return read_run(run_dir).records


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's resolved config (`config.yaml`, written at its start) as plain data; {} if
    absent or unreadable."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


# ------------------------------------------------------------------------------ tools' CLI glue


def step_list(text: str) -> list[int]:
    """argparse type for `--steps 10,20,50`."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected comma-separated integers") from None


def print_table(build: Callable[[], list[str]]) -> int:
    """Print the Markdown lines `build()` returns; a run without its log is one error line,
    exit code 2."""
    try:
        lines = build()
    except RunLogError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
