"""Where a run starts: this run's newest complete checkpoint that verifies, else
`checkpoint.load`, else nothing. Corrupt checkpoints of this run are reported in one line,
marked and passed over (or, with `checkpoint.on_corrupt=stop`, end the run); the run and
checkpoint directories are checked writable on every rank before the first step. Used by the
Trainer (train.py) before and just after the process groups start."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from stable_megatron.config import Config, ConfigError


class StartFinder:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.events: list[dict] = []  # corrupt_checkpoint events, for metrics.jsonl
        self._reported: set = set()  # corrupt checkpoints reported

    def find(self, skip: frozenset = frozenset()):
        """(tag_dir, meta, weights_only) to start from, or None. A rerun continues from this
        run's own newest complete checkpoint (not one in `skip`); `checkpoint.load` is used when
        there is none yet. Corrupt checkpoints of this run newer than that are reported
        (`_corrupt`), and with `checkpoint.on_corrupt=stop` end the run."""
        from stable_megatron import checkpoint as ckpt

        c = self.cfg.checkpoint
        tag_dir, weights_only = None, False
        if c.resume:
            complete, corrupt = ckpt.scan(self.cfg.checkpoint_dir)
            complete = [t for t in complete if t not in skip]
            tag_dir = complete[-1] if complete else None
            newest = ckpt.read_meta(tag_dir)["step"] if tag_dir is not None else -1
            for bad, reason in corrupt:  # those that cost progress: newer than what we load
                if _step_of(bad) > newest:
                    self._corrupt(bad, reason, tag_dir)
        if tag_dir is None and c.load:
            tag_dir, weights_only = ckpt.resolve(c.load, label="checkpoint.load"), c.finetune
        if tag_dir is None:
            return None
        meta = ckpt.read_meta(tag_dir)
        ckpt.verify(tag_dir, meta)
        ckpt.check_compatible(meta, self.cfg)
        return tag_dir, meta, weights_only

    def check_writable(self, layout) -> None:
        """The run and checkpoint directories can be written, on every rank (a probe file
        written and removed), so that a read-only, full or missing mount stops the run now,
        not at its first save; every rank gets the verdict."""
        from stable_megatron import parallel
        from stable_megatron.checkpoint.save import cause_of

        problems = []
        for key, path in (("train.run_dir", Path(self.cfg.train.run_dir)),
                          ("checkpoint.dir", self.cfg.checkpoint_dir)):
            probe = path / f".write-test-{layout.rank}"
            try:
                path.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"stable_megatron")
                probe.unlink()
            except OSError as err:
                problems.append(f"{key}={path}: cannot write there: {cause_of(err)}")
        found = [p for rank in parallel.all_gather_objects(problems) for p in rank]
        if found:
            raise ConfigError(found[0])

    def _corrupt(self, tag_dir: Path, reason: str, instead: Path | None) -> None:
        """Report a corrupt checkpoint of this run in one line (naming it, the file and the
        check that failed), mark it (`CORRUPT`), keep an event for metrics.jsonl, and stop
        with `checkpoint.on_corrupt=stop`."""
        from stable_megatron import checkpoint as ckpt

        if tag_dir in self._reported:
            return
        self._reported.add(tag_dir)
        if self.cfg.checkpoint.on_corrupt == "stop":
            raise ckpt.CheckpointError(f"checkpoint {tag_dir} is corrupt: {reason} "
                                       f"(checkpoint.on_corrupt=stop)")
        action = (f"resuming from {instead.name} instead" if instead is not None
                  else "no verified checkpoint left: starting")
        line = f"checkpoint {tag_dir.name} is corrupt and passed over: {reason}; {action}"
        if os.environ.get("RANK", "0") == "0":
            if ckpt.corrupt_reason(tag_dir) is None:
                ckpt.mark_corrupt(tag_dir, reason)
            print(f"warning: {line}", file=sys.stderr, flush=True)
        self.events.append({"event": "corrupt_checkpoint", "tag": tag_dir.name,
                            "reason": reason, "instead": instead and instead.name})

    def verify_checksums(self, start, layout):
        """The starting checkpoint with every file's checksum verified (the files split over
        the ranks, the verdicts gathered, so every rank agrees), falling back past corrupt ones
        of this run; a corrupt `checkpoint.load` is an error."""
        from stable_megatron import checkpoint as ckpt
        from stable_megatron import parallel

        skip: set = set()
        while start is not None:
            tag_dir, meta, _ = start
            names = sorted(meta.get("checksums", {}))
            mine = names[layout.rank::layout.world]
            try:
                ckpt.verify(tag_dir, meta, checksums=True, only=mine)
                error = None
            except ckpt.CheckpointError as err:
                error = str(err)
            errors = [e for e in parallel.all_gather_objects(error) if e is not None]
            if not errors:
                return start
            own = self.cfg.checkpoint.resume and tag_dir.parent == self.cfg.checkpoint_dir
            if not own:
                raise ckpt.CheckpointError(errors[0])
            skip.add(tag_dir)
            start = self.find(frozenset(skip))
            self._corrupt(tag_dir, errors[0], start[0] if start else None)
        return None


def _step_of(tag_dir: Path) -> float:
    """A checkpoint's step from its manifest, else its name; inf when neither tells."""
    from stable_megatron import checkpoint as ckpt

    try:
        return ckpt.read_meta(tag_dir)["step"]
    except ckpt.CheckpointError:
        digits = "".join(c for c in tag_dir.name if c.isdigit())
        return int(digits) if digits else math.inf
