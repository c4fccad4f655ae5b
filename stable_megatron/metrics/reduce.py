"""Every reduction of the stability metrics, in one place.

Each rank states its raw contribution to a metric with the kind of the metric, which fixes how
contributions combine over tensor-, data- and pipeline-parallel ranks and how the logged value
is derived from the combined parts:

| kind         | parts                  | combined | logged value                |
|--------------|------------------------|----------|-----------------------------|
| `mean`       | sum, count             | sum      | sum / count                 |
| `norm`       | sum of squares         | sum      | sqrt(sum of squares)        |
| `moments`    | count, sum, sum sq.    | sum      | `<key>/mean`, `<key>/std` (population) |
| `max`, `min` | value                  | max, min | value                       |
| `replicated` | value (equal wherever it is held) | max | value                  |

Contributions are disjoint by construction: data-parallel ranks add their own tokens to a
`mean`; tensor-parallel ranks add their own heads, vocabulary rows or weight shards; whatever
is replicated (a TP-replicated weight, the weights on the other data-parallel ranks, the tied
embedding copy on the last pipeline stage) is contributed by one owner and added as zero by the
others, so that every rank of a stage holds the same keys.

`reduce_metrics` then issues, for the ranks of one pipeline stage (all its TP x DP ranks), one
all-reduce per combine op (sum, max, min) of all parts packed into one float64 tensor, gathers
the stages' results onto global rank 0 over its pipe group (the ranks with TP and DP coordinate
0, one per stage), combines keys that several stages contribute to (totals) and derives the
logged values there. The result is the full model's metrics on rank 0, the same for any
TP x PP x DP layout of the same model and data up to float rounding.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from stable_megatron import parallel

KINDS = {"mean": "sum", "norm": "sum", "moments": "sum", "max": "max", "min": "min",
         "replicated": "max"}
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_COMBINE = {"sum": lambda a, b: a + b, "max": max, "min": min}


def _float(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


@dataclass
class Contributions:
    """This rank's parts of the metrics: key -> (kind, parts)."""

    entries: dict[str, tuple[str, list]] = field(default_factory=dict)

    def _add(self, key: str, kind: str, parts: list) -> None:
        # a snapshot: a tensor may be a view of a parameter that the optimizer updates next
        parts = [p.detach().clone() if isinstance(p, torch.Tensor) else p for p in parts]
        if key in self.entries:
            old_kind, old = self.entries[key]
            if old_kind != kind:
                raise ValueError(f"metric {key}: contributed as {old_kind} and as {kind}")
            combine = _COMBINE[KINDS[kind]]
            parts = [combine(_float(a), _float(b)) for a, b in zip(old, parts, strict=True)]
        self.entries[key] = (kind, parts)

    def mean(self, key: str, total, count) -> None:
        self._add(key, "mean", [total, count])

    def norm(self, key: str, sum_sq) -> None:
        self._add(key, "norm", [sum_sq])

    def moments(self, key: str, count, total, total_sq) -> None:
        self._add(key, "moments", [count, total, total_sq])

    def max(self, key: str, value) -> None:
        self._add(key, "max", [value])

    def min(self, key: str, value) -> None:
        self._add(key, "min", [value])

    def replicated(self, key: str, value) -> None:
        self._add(key, "replicated", [value])


def _reduce_stage(entries: dict[str, tuple[str, list]], group, device) -> dict[str, list]:
    """All-reduce the parts over the ranks of one stage: one collective per combine op.
    A checksum of the key names travels with the max and min buffers, so ranks that disagree on
    the keys fail loudly instead of mixing numbers."""
    keys = sorted(entries)
    checksum = float(zlib.crc32("\n".join(f"{k}:{entries[k][0]}" for k in keys).encode()))
    packed: dict[str, list[float]] = {"sum": [], "max": [checksum], "min": [checksum]}
    slots: dict[str, tuple[str, int, int]] = {}
    for key in keys:
        kind, parts = entries[key]
        buf = packed[KINDS[kind]]
        slots[key] = (KINDS[kind], len(buf), len(parts))
        buf.extend(parts)
    reduced = {}
    for op, values in packed.items():
        # one tensor per op; parts stay on their device until here (no sync per metric)
        if not values:
            reduced[op] = []
            continue
        tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(())
                              for v in values])
        parallel.all_reduce_(tensor, group=group, op=_OPS[op])
        reduced[op] = tensor.cpu().tolist()
    if reduced["max"][0] != reduced["min"][0]:
        raise RuntimeError("stability metrics: the ranks of a pipeline stage contributed "
                           "different metric keys (a bug in a metric's owner rule)")
    return {key: reduced[op][start:start + n] for key, (op, start, n) in slots.items()}


def _finish(kind: str, key: str, parts: list[float]) -> dict[str, float]:
    if kind == "mean":
        total, count = parts
        return {key: total / count if count else math.nan}
    if kind == "norm":
        return {key: math.sqrt(max(parts[0], 0.0)) if math.isfinite(parts[0]) else parts[0]}
    if kind == "moments":
        count, total, total_sq = parts
        if not count:
            return {f"{key}/mean": math.nan, f"{key}/std": math.nan}
        mean = total / count
        return {f"{key}/mean": mean, f"{key}/std": math.sqrt(max(total_sq / count - mean**2, 0.0))}
    return {key: parts[0]}


def reduce_metrics(contrib: Contributions, state) -> dict[str, float]:
    """The logged metrics of the whole model on global rank 0 (an empty dict elsewhere).
    Every rank must call it, with the same keys on every rank of a pipeline stage."""
    groups = parallel.grid_groups(state)
    stage = _reduce_stage(contrib.entries, groups.stage, state.device)
    layout = state.layout
    if layout.tp_rank != 0 or layout.dp_rank != 0:
        return {}
    kinds = {key: kind for key, (kind, _) in contrib.entries.items()}
    gathered = parallel.gather_objects((kinds, stage), groups.pipe, groups.pipe_ranks)
    if gathered is None:
        return {}
    merged: dict[str, tuple[str, list[float]]] = {}
    for stage_kinds, stage_parts in gathered:
        for key, parts in stage_parts.items():
            kind = stage_kinds[key]
            if key in merged:
                combine = _COMBINE[KINDS[kind]]
                parts = [combine(a, b) for a, b in zip(merged[key][1], parts, strict=True)]
            merged[key] = (kind, parts)
    out: dict[str, float] = {}
    for key in sorted(merged):
        kind, parts = merged[key]
        out.update(_finish(kind, key, parts))
    return out
