"""Early warning: trend rules on the stability metrics that fire before the loss diverges.

`EarlyWarning(cfg.stability.warning).update(step, record)` is called with every logged record;
records without stability metrics (steps between `metrics.interval` steps) are ignored. Each
rule compares the newest value of a signal with its values over the trailing `window` steps
(`step - window .. step - 1`; when fewer than `min_records` metric records fall in the window,
as with `metrics.interval` > window / min_records, the last `min_records` records instead), and
scores nothing until `min_records` records exist. Growth is measured against the window's
minimum and a drop against its maximum, so the rules are scale-free where the signal allows.
The rules and their `stability.warning.*` thresholds (docs/stability.md, "Early warning"):

- `logit_growth`: the largest attention logit of a layer (`attn_logit_max/layer_NN`, before
  capping) is >= `logit_floor` (50) and >= `logit_growth` (2) times its minimum over the
  window. Logits are dimensionless (`q.k / sqrt(d_head)`); the floor keeps the ordinary growth
  of the first steps (from ~0.5 at initialisation to 10-40 in a healthy run) quiet.
- `entropy_collapse`: the attention entropy of a layer's most peaked head as a fraction of
  log(number of visible keys) (`attn_entropy_norm/layer_NN/min`; 1 is uniform attention) is
  < `entropy_floor` (0.2) and < `entropy_drop` (0.5) times its maximum over the window:
  entropy collapse [Zhai et al. 2023] under way, not a head that has been sharp all along.
- `tev_growth`: the Token Embedding Variability (`tev/mean`; `tev_out/mean` for an untied
  output layer) is >= `tev_growth` (2) times its minimum over the window [Chung et al. 2024].
- `output_logit_drift`: the mean output logit (`output_logit/mean`) has drifted from 0 to
  >= `output_logit_floor` (20) in absolute value and to >= `output_logit_growth` (2) times its
  smallest absolute value over the window: the output-logit divergence of Wortsman et al.
  (2023, arXiv 2309.14322), in which the logits drift (usually downwards) while the loss,
  blind to a shift of all logits, still looks fine; the z-loss method prevents it. The
  floor is a choice, not a measurement: no run of ours has shown this divergence.

- `update_spike`: the update of some part of the model (`update_rms/<group>`: the RMS of the
  step's weight change divided by its LR, so that warmup and decay do not count) is >=
  `update_growth` (3) times its median over the window. In large runs, spikes of the update
  norm, largest in the lower layers, came before loss spikes. The factor is a choice, not
  fitted to runs of ours.

`logit_growth=0`, `entropy_floor=0`, `tev_growth=0`, `output_logit_growth=0` or
`update_growth=0` turns a rule off. Two settings apply to every rule: `grace_steps` (no rule
fires before that step: the warm-up, when every signal moves fast) and `persist` (a rule fires
once its condition has held on that many metric records in a row, so that one noisy record
does not). A non-finite value of a watched signal fires its rule at once, grace or not. Each
rule fires once per episode: after firing it stays quiet until its condition has been false on
every metric record for `window` steps, then it is armed again. The state (histories and
episodes) is plain Python (`state_dict()` / `load_state_dict()`) for checkpoints; a step that is
not after the last one seen (a rollback) drops the history from that step on and re-arms the
rules that fired since.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any

from stable_megatron.hooks import StepHook

RULES = ("logit_growth", "entropy_collapse", "tev_growth", "output_logit_drift", "update_spike")

_LOGIT = re.compile(r"^attn_logit_max/(layer_\d+)$")
_ENTROPY = re.compile(r"^attn_entropy_norm/(layer_\d+)/min$")
_TEV = {"tev/mean": "input embedding", "tev_out/mean": "output layer"}
_OUTPUT_LOGIT = "output_logit/mean"
_UPDATE = re.compile(r"^update_rms/(\w+)$")


@dataclass(frozen=True)
class WarningEvent:
    """One firing of a rule: `signal` is the metric key that triggered it."""

    step: int
    rule: str
    signal: str
    message: str


def _layer_number(name: str) -> int:
    return int(name.split("_", 1)[1])


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


class EarlyWarning(StepHook):
    """Trend rules over the logged stability metrics; `update` returns the messages of the
    rules that fire at this record (usually none). As a step hook, `after_step` feeds it each
    step's record and keeps the firings in `events`."""

    state_key = "early_warning"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.events: list[WarningEvent] = []  # the firings at the last `after_step`
        # signal key -> [[step, value], ...] over the trailing window (finite values only)
        self.history: dict[str, list[list[float]]] = {}
        # rule -> {"active": bool, "last_true": step the condition last held or None,
        #          "streak": metric records in a row on which the condition held}
        self.episodes: dict[str, dict[str, Any]] = {
            rule: {"active": False, "last_true": None, "streak": 0} for rule in RULES
        }
        self.last_step: int | None = None

    # ----------------------------------------------------------------------------------------
    # Public interface

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        self.events = self.update_events(step, record)

    def update(self, step: int, record: dict[str, Any]) -> list[str]:
        """Messages of the rules that fire at `step` (one line each, starting with the step)."""
        return [event.message for event in self.update_events(step, record)]

    def update_events(self, step: int, record: dict[str, Any]) -> list[WarningEvent]:
        """As `update`, with the rule and the signal of each firing."""
        if not getattr(self.cfg, "enabled", True):
            return []
        signals = self._signals(record)
        if not signals:
            return []
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            self._forget_from(step)
        self.last_step = step
        window, keep = self.cfg.window, self.cfg.min_records
        for hist in self.history.values():
            while len(hist) > keep and hist[0][0] < step - window:
                hist.pop(0)
        c = self.cfg
        findings = {
            "logit_growth": self._logit_growth(step, signals) if c.logit_growth else None,
            "entropy_collapse":
                self._entropy_collapse(step, signals) if c.entropy_floor else None,
            "tev_growth": self._tev_growth(step, signals) if c.tev_growth else None,
            "output_logit_drift":
                self._output_logit_drift(step, signals) if c.output_logit_growth else None,
            "update_spike": self._update_spike(step, signals) if c.update_growth else None,
        }
        for key, value in signals.items():
            if math.isfinite(value):
                self.history.setdefault(key, []).append([step, value])
        events = []
        persist, grace = getattr(c, "persist", 1), getattr(c, "grace_steps", 0)
        for rule in RULES:
            finding = findings[rule]
            episode = self.episodes[rule]
            if finding is not None:
                signal, text = finding
                episode["streak"] = episode.get("streak", 0) + 1
                episode["last_true"] = step
                urgent = not math.isfinite(signals.get(signal, 0.0))
                ready = episode["streak"] >= persist and step >= grace
                if not episode["active"] and (ready or urgent):
                    events.append(WarningEvent(step, rule, signal, f"step {step}: {text}"))
                    episode["active"] = True
            else:
                episode["streak"] = 0
                if episode["active"] and step - episode["last_true"] >= window:
                    episode["active"] = False
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {key: [list(p) for p in hist] for key, hist in self.history.items()},
            "episodes": {rule: dict(ep) for rule, ep in self.episodes.items()},
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {
            str(key): [[int(s), float(v)] for s, v in hist]
            for key, hist in state.get("history", {}).items()
        }
        for rule in RULES:
            ep = state.get("episodes", {}).get(rule, {})
            self.episodes[rule] = {
                "active": bool(ep.get("active", False)),
                "last_true": ep.get("last_true"),
                "streak": int(ep.get("streak", 0)),
            }
        self.last_step = state.get("last_step")

    # ----------------------------------------------------------------------------------------
    # Rules: each returns (signal key, message text) for the worst offender, or None

    def _signals(self, record: dict[str, Any]) -> dict[str, float]:
        out = {}
        for key, value in record.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if (key in _TEV or key == _OUTPUT_LOGIT or _LOGIT.match(key) or _ENTROPY.match(key)
                    or _UPDATE.match(key)):
                out[key] = float(value)
        return out

    def _window(self, key: str, step: int) -> tuple[list[float], int] | None:
        """Values of `key` over the trailing window (or its last `min_records` values, if
        fewer fall in the window) and the number of steps they span up to `step`; None while
        there are fewer than `min_records` values."""
        hist = self.history.get(key, [])
        if len(hist) < self.cfg.min_records:
            return None
        return [v for _, v in hist], step - int(hist[0][0])

    def _logit_growth(self, step: int, signals: dict[str, float]) -> tuple[str, str] | None:
        c = self.cfg
        worst = None  # (ratio, key, text)
        for key, value in signals.items():
            match = _LOGIT.match(key)
            if not match:
                continue
            layer = _layer_number(match.group(1))
            if not math.isfinite(value):
                return key, f"max attention logit is {value} in layer {layer}"
            past = self._window(key, step)
            if past is None or value < c.logit_floor:
                continue
            values, span = past
            low = min(values)
            ratio = value / low if low > 0 else math.inf
            if ratio < c.logit_growth:
                continue
            if worst is None or ratio > worst[0]:
                grew = f"{ratio:.1f}x" if math.isfinite(ratio) else f"from {_fmt(low)}"
                text = (
                    f"max attention logit {_fmt(value)} in layer {layer} grew {grew} over the "
                    f"last {span} steps (logit_growth: >= {c.logit_growth:g}x and "
                    f">= {c.logit_floor:g})"
                )
                worst = (ratio, key, text)
        return None if worst is None else (worst[1], worst[2])

    def _entropy_collapse(self, step: int, signals: dict[str, float]) -> tuple[str, str] | None:
        c = self.cfg
        worst = None  # (value, key, text)
        for key, value in signals.items():
            match = _ENTROPY.match(key)
            if not match:
                continue
            layer = _layer_number(match.group(1))
            if not math.isfinite(value):
                return key, f"attention entropy is {value} in layer {layer}"
            past = self._window(key, step)
            if past is None or value >= c.entropy_floor:
                continue
            values, span = past
            high = max(values)
            if value >= c.entropy_drop * high:
                continue
            # A head that learns a sharp pattern at small logits is specialising, not
            # collapsing (seen at step ~40 of healthy tiny runs): collapse needs large logits.
            logit = signals.get(f"attn_logit_max/{match.group(1)}")
            if logit is not None and logit < c.logit_floor:
                continue
            if worst is None or value < worst[0]:
                text = (
                    f"attention entropy collapsing in layer {layer}: its most peaked head is at "
                    f"{value:.3f} of log(keys), down from {high:.3f} within the last {span} "
                    f"steps (entropy_collapse: < {c.entropy_floor:g} and < {c.entropy_drop:g}x "
                    f"the window's maximum)"
                )
                worst = (value, key, text)
        return None if worst is None else (worst[1], worst[2])

    def _tev_growth(self, step: int, signals: dict[str, float]) -> tuple[str, str] | None:
        c = self.cfg
        for key, what in _TEV.items():
            if key not in signals:
                continue
            value = signals[key]
            if not math.isfinite(value):
                return key, f"TEV of the {what} is {value}"
            past = self._window(key, step)
            if past is None:
                continue
            values, span = past
            low = min(values)
            if low > 0 and value >= c.tev_growth * low:
                return key, (
                    f"TEV of the {what} {value:.4g} grew {value / low:.1f}x over the last "
                    f"{span} steps (tev_growth: >= {c.tev_growth:g}x)"
                )
        return None

    def _output_logit_drift(self, step: int, signals: dict[str, float]) -> tuple[str, str] | None:
        c = self.cfg
        if _OUTPUT_LOGIT not in signals:
            return None
        value = signals[_OUTPUT_LOGIT]
        if not math.isfinite(value):
            return _OUTPUT_LOGIT, f"mean output logit is {value}"
        past = self._window(_OUTPUT_LOGIT, step)
        if past is None or abs(value) < c.output_logit_floor:
            return None
        values, span = past
        low = min(abs(v) for v in values)
        ratio = abs(value) / low if low > 0 else math.inf
        if ratio < c.output_logit_growth:
            return None
        grew = f"{ratio:.1f}x" if math.isfinite(ratio) else f"from {_fmt(low)}"
        return _OUTPUT_LOGIT, (
            f"mean output logit {_fmt(value)} drifted {grew} in magnitude over the last {span} "
            f"steps (output_logit_drift: |mean| >= {c.output_logit_floor:g} and >= "
            f"{c.output_logit_growth:g}x; z-loss counters it)"
        )

    def _update_spike(self, step: int, signals: dict[str, float]) -> tuple[str, str] | None:
        c = self.cfg
        worst = None  # (ratio, key, text)
        for key, value in signals.items():
            match = _UPDATE.match(key)
            if not match:
                continue
            if not math.isfinite(value):
                return key, f"update of {match.group(1)} is {value}"
            past = self._window(key, step)
            if past is None:
                continue
            values, span = past
            median = statistics.median(values)
            ratio = value / median if median > 0 else math.inf
            if ratio < c.update_growth or (worst is not None and ratio <= worst[0]):
                continue
            text = (f"update of {match.group(1)} spiked: RMS of the weight change / lr "
                    f"{_fmt(value)} is {ratio:.1f}x its median over the last {span} steps "
                    f"(update_spike: >= {c.update_growth:g}x)")
            worst = (ratio, key, text)
        return None if worst is None else (worst[1], worst[2])

    def _forget_from(self, step: int) -> None:
        for hist in self.history.values():
            hist[:] = [p for p in hist if p[0] < step]
        for episode in self.episodes.values():
            if episode["last_true"] is not None and episode["last_true"] >= step:
                episode["active"], episode["last_true"], episode["streak"] = False, None, 0


def replay(cfg: Any, records: list[dict[str, Any]]) -> list[WarningEvent]:
    """Every firing over a run's records (e.g. the lines of its metrics.jsonl), in order;
    records without a `step` (or events such as {"event": "warning"}) are skipped."""
    warn = EarlyWarning(cfg)
    events = []
    for record in records:
        if "step" not in record or "event" in record:
            continue
        events.extend(warn.update_events(record["step"], record))
    return events
