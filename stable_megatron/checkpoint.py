"""Checkpoints: atomic saves, safe loads, and finding the checkpoint to resume from.

Layout of `checkpoint.dir`:

    latest                  the tag of the newest complete checkpoint (written last)
    step00000200/           one complete checkpoint ("tag" directory)
        stable_megatron.json    step, data position, layout, resolved config, code version,
                                and the size of every file (written last, before the rename)
        rng/rank00000.pt        each rank's random-number generator states
        layer_*, mp_rank_*, *optim_states.pt   DeepSpeed's model and ZeRO optimizer shards
    .tmp-step00000300/      a save in progress (or interrupted); never loaded, removed by the
                            next save

A save writes everything into `.tmp-<tag>/<tag>`, checks that every rank's files are there,
writes the manifest, renames the tag directory into place, and only then rewrites `latest`
(atomically, via a temporary file). A checkpoint is complete when its manifest exists (it is
written after every shard); resuming takes the newest complete one and first checks each file
against the manifest's sizes. A process killed at any point leaves the previous checkpoint
intact and loadable.

Loading never unpickles arbitrary objects: every file goes through `safe_load`
(`torch.load(weights_only=True)`, with three plain-data DeepSpeed classes allowlisted) —
including DeepSpeed's own reads, through `SafeCheckpointEngine`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

META_FILE = "stable_megatron.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file or field."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def code_version() -> str:
    """The package version, plus the git commit (and `-dirty`) when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        out = version("stable_megatron")
    except PackageNotFoundError:
        out = "unknown"
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
            out += f"+{commit}"
        except (OSError, subprocess.SubprocessError):
            pass
    return out


# --------------------------------------------------------------------------------------------
# Safe loading


def _allowed_globals() -> list:
    """DeepSpeed classes inside its ZeRO optimizer files: plain data (attributes only)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)`: tensors, containers and numbers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: refused, it holds objects other than tensors and plain data ({detail}); "
            f"stable_megatron never unpickles code from a checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: truncated or corrupt ({first})") from None


def install_safe_loading(engine) -> None:
    """Route DeepSpeed's checkpoint reads through `safe_load`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}")
    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


# --------------------------------------------------------------------------------------------
# Finding checkpoints


def read_meta(tag_dir: Path) -> dict:
    path = tag_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt ({err})") from None
    for key in ("step", "consumed_samples", "layout", "config", "files"):
        if key not in meta:
            raise CheckpointError(f"{path}: corrupt (no '{key}')")
    return meta


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete tag directories in `ckpt_dir`, oldest first (by step, then save time)."""
    found = []
    if not ckpt_dir.is_dir():
        return found
    for child in ckpt_dir.iterdir():
        if child.name.startswith(".") or not (child / META_FILE).is_file():
            continue
        try:
            meta = read_meta(child)
        except CheckpointError:
            continue
        found.append((meta["step"], meta.get("saved_at", 0.0), child))
    return [path for *_, path in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """What a rerun resumes from: the newest complete checkpoint. (`latest` names the same one,
    except after a kill between a checkpoint's rename and the `latest` update; it is kept for
    DeepSpeed's tools and for people.)"""
    complete = complete_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def resolve(path: str | os.PathLike) -> Path:
    """`checkpoint.load`: a tag directory, or a checkpoint directory (its latest)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint.load={path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.load={path}: expected a directory, got a file")
    if (path / META_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is not None:
        return found
    if any(path.glob("*model_states.pt")):
        raise CheckpointError(
            f"checkpoint.load={path}: has DeepSpeed files but no {META_FILE}: an incomplete save "
            f"or a checkpoint not written by stable_megatron"
        )
    raise CheckpointError(
        f"checkpoint.load={path}: not a checkpoint: expected {META_FILE} (one checkpoint) or "
        f"step directories with it (a checkpoint directory)"
    )


def verify(tag_dir: Path, meta: dict) -> None:
    """Every file the manifest lists is present with its recorded size."""
    for rel, size in sorted(meta["files"].items()):
        path = tag_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{tag_dir}: missing shard {rel}")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{tag_dir}: shard {rel} is truncated or altered ({actual} bytes, saved {size})"
            )


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_compatible(meta: dict, cfg) -> None:
    """The checkpoint's model config equals this run's; names every differing field."""
    saved = _flatten(meta["config"].get("model", {}), "model.")
    current = _flatten(cfg.to_dict()["model"], "model.")
    diffs = [
        f"{key} (checkpoint {saved.get(key)!r}, this run {current.get(key)!r})"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {meta.get('tag', '?')} is from an incompatible model config: "
            + "; ".join(diffs)
        )


def layout_of(meta: dict) -> tuple[int, int, int]:
    lay = meta["layout"]
    return lay["tp"], lay["pp"], lay["dp"]


# --------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random.get_cuda_rng_tracker()
    state["tracker"] = tracker.get_states()
    return state


def _numpy_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


# --------------------------------------------------------------------------------------------
# Save


@dataclass
class SaveResult:
    tag_dir: Path
    seconds: float
    removed: list[str]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, cfg, layout, ckpt_dir: Path, step: int, client_state: dict,
         tag: str | None = None) -> SaveResult:
    """Save atomically (see the module docstring); every rank calls this."""
    started = time.time()
    tag = tag or tag_for(step)
    ckpt_dir = Path(ckpt_dir)
    staging = ckpt_dir / f"{TMP_PREFIX}{tag}"
    if layout.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(f"{TMP_PREFIX}*"):  # interrupted earlier saves
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        staging.mkdir()
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
    work = staging / tag
    (work / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), work / "rng" / f"rank{layout.rank:05d}.pt")
    _barrier()
    removed: list[str] = []
    error = None
    if layout.rank == 0:
        try:
            removed = _publish(work, staging, ckpt_dir, cfg, layout, step, tag, client_state)
        except (CheckpointError, OSError) as err:
            error = str(err)
    from stable_megatron import parallel

    error = parallel.broadcast_object(error)  # every rank raises, none waits forever
    if error is not None:
        raise CheckpointError(error)
    return SaveResult(ckpt_dir / tag, time.time() - started, removed)


def _publish(work: Path, staging: Path, ckpt_dir: Path, cfg, layout, step: int, tag: str,
             client_state: dict) -> list[str]:
    """Rank 0: check, write the manifest, move into place, update `latest`, prune."""
    _check_written(work, layout)
    files = {
        str(p.relative_to(work)): p.stat().st_size for p in sorted(work.rglob("*")) if p.is_file()
    }
    meta = {
        "format": FORMAT_VERSION,
        "tag": tag,
        "step": step,
        "consumed_samples": client_state["consumed_samples"],
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world": layout.world},
        "config": cfg.to_dict(),
        "code_version": code_version(),
        "saved_at": time.time(),
        "files": files,
    }
    _write_atomic(work / META_FILE, json.dumps(meta, indent=1))
    target = ckpt_dir / tag
    if target.exists():  # re-saving a step (e.g. after loading an older checkpoint here)
        old = ckpt_dir / f"{TMP_PREFIX}old-{tag}"
        target.rename(old)
        work.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(target)
    _fsync_dir(ckpt_dir)
    shutil.rmtree(staging, ignore_errors=True)
    _write_atomic(ckpt_dir / LATEST, tag)
    return prune(ckpt_dir, cfg.checkpoint.keep, protect=target)


def _check_written(work: Path, layout) -> None:
    """DeepSpeed wrote one ZeRO optimizer shard per rank and each rank its RNG file."""
    shards = list(work.glob("*optim_states.pt"))
    rngs = list((work / "rng").glob("rank*.pt"))
    if len(shards) != layout.world or len(rngs) != layout.world:
        raise CheckpointError(
            f"{work}: save incomplete ({len(shards)} optimizer shards and {len(rngs)} RNG files "
            f"for {layout.world} ranks); the previous checkpoint is untouched"
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(ckpt_dir: Path, keep: int, protect: Path | None = None) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (0: keep all)."""
    if keep <= 0:
        return []
    complete = complete_checkpoints(ckpt_dir)
    removed = []
    for old in complete[:-keep]:
        if protect is not None and old.resolve() == protect.resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old.name)
    return removed


# --------------------------------------------------------------------------------------------
# Load


def load(engine, cfg, layout, tag_dir: Path, meta: dict, weights_only: bool = False) -> dict:
    """Load a verified checkpoint at the same layout it was saved at; returns its client state
    ({} with `weights_only`). Every rank calls this."""
    if weights_only:
        path, _ = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_module_only=True,
            load_optimizer_states=False, load_lr_scheduler_states=False,
        )
    else:
        path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed found nothing to load there")
    if weights_only:
        return {}
    rng = tag_dir / "rng" / f"rank{layout.rank:05d}.pt"
    set_rng_state(safe_load(rng))
    return client
