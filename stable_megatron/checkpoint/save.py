"""Saving and loading at the same layout: atomic saves, RNG states, keep-K pruning.

A save writes everything into `.tmp-<tag>/<tag>`, checks that every rank's files are there,
writes the manifest, renames the tag directory into place, and only then rewrites `latest`
(atomically, via a temporary file). A process killed at any point leaves the previous
checkpoint intact and loadable, and `format.newest_complete` finds the newest one whatever
`latest` says.

Every file goes through `format.ChecksumWriter` (DeepSpeed's through its checkpoint engine,
`install_safe_loading`), so the CRC-32 the manifest records is of the bytes as written, at no
second read; rank 0 collects every rank's. Pruning counts complete checkpoints only: one marked
corrupt is neither kept in their place nor deleted (it stays for a person to look at).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stable_megatron.checkpoint.format import (
    FORMAT_VERSION,
    LATEST,
    META_FILE,
    RNG_DIR,
    TMP_PREFIX,
    CheckpointError,
    ChecksumWriter,
    code_version,
    complete_checkpoints,
    file_checksum,
    rng_file,
    safe_load,
    tag_for,
)


def install_safe_loading(engine) -> None:
    """Route DeepSpeed's own checkpoint reads through `safe_load` and its writes through
    `save_with_checksum`; a write that fails there is recorded for `save` to report after
    DeepSpeed's collectives (raising inside them would leave the other ranks waiting)."""
    from stable_megatron import ds_adapter

    ds_adapter.route_checkpoint_reads(engine, safe_load, _engine_save)


_WRITTEN: dict[str, str] = {}  # path -> CRC-32 of the files this process wrote (one save)
_FAILED: list[str] = []  # "path: cause" of the writes that failed (one save)


def save_with_checksum(obj, path: str | os.PathLike, zipfile_serialization: bool = True) -> None:
    """`torch.save(obj, path)`, recording the CRC-32 of the bytes written. A failed write raises
    the file system's own error (no space, permission, I/O) when there is one."""
    writer = ChecksumWriter(path)
    try:
        with writer:
            torch.save(obj, writer, _use_new_zipfile_serialization=zipfile_serialization)
    except (OSError, RuntimeError) as err:
        raise (writer.error or err) from None
    _WRITTEN[str(Path(path).resolve())] = writer.checksum


def _engine_save(obj, path: str, zipfile_serialization: bool = True) -> None:
    try:
        save_with_checksum(obj, path, zipfile_serialization)
    except (OSError, RuntimeError) as err:
        _FAILED.append(f"{path}: {cause_of(err)}")
        Path(path).unlink(missing_ok=True)


def cause_of(err: BaseException) -> str:
    """A failed write's cause in a few words: the file system's message and errno."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror} (errno {err.errno})"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


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


def save(engine, cfg, layout, ckpt_dir: Path, step: int, client_state: dict,
         tag: str | None = None) -> SaveResult:
    """Save atomically (see the module docstring); every rank calls this."""
    from stable_megatron import parallel

    started = time.time()
    tag = tag or tag_for(step)
    ckpt_dir = Path(ckpt_dir)
    staging = ckpt_dir / f"{TMP_PREFIX}{tag}"
    error = None
    if layout.rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in ckpt_dir.glob(f"{TMP_PREFIX}*"):  # interrupted earlier saves
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            staging.mkdir()
        except OSError as err:
            error = f"{err.filename or staging}: {cause_of(err)}"
    error = parallel.broadcast_object(error)  # the barrier before the writes, too
    if error is not None:
        raise CheckpointError(_failed(ckpt_dir, step, error))
    _WRITTEN.clear()
    _FAILED.clear()
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
    work = staging / tag
    try:
        (work / RNG_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _FAILED.append(f"{work / RNG_DIR}: {cause_of(err)}")
    else:
        _engine_save(rng_state(), str(work / rng_file(layout.rank)))
    # every rank's checksums and failures; a collective, so the barrier after the writes too
    gathered = parallel.all_gather_objects((dict(_WRITTEN), list(_FAILED)))
    failures = [f for _, failed in gathered for f in failed]
    removed: list[str] = []
    error = None
    if failures:
        error = _failed(ckpt_dir, step, failures[0], len(failures) - 1)
        if layout.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    elif layout.rank == 0:
        checksums = {path: crc for written, _ in gathered for path, crc in written.items()}
        try:
            removed = _publish(work, staging, ckpt_dir, cfg, layout, step, tag, client_state,
                               checksums)
        except (CheckpointError, OSError) as err:
            error = _failed(ckpt_dir, step, str(err))
    error = parallel.broadcast_object(error)  # every rank raises, none waits forever
    if error is not None:
        raise CheckpointError(error)
    return SaveResult(ckpt_dir / tag, time.time() - started, removed)


def _failed(ckpt_dir: Path, step: int, first: str, more: int = 0) -> str:
    """The one line of a failed save: where, why, and that nothing older was touched."""
    previous = complete_checkpoints(ckpt_dir)
    kept = (f"the previous checkpoint {previous[-1].name} is intact and still the newest "
            f"complete one" if previous else "there is no earlier checkpoint")
    others = f" (and {more} more failed write{'s' * (more > 1)})" if more else ""
    return f"checkpoint save at step {step} failed: {first}{others}; {kept}"


def _publish(work: Path, staging: Path, ckpt_dir: Path, cfg, layout, step: int, tag: str,
             client_state: dict, written: dict[str, str] | None = None) -> list[str]:
    """Rank 0: check, write the manifest, move into place, update `latest`, prune. `written`:
    the CRC-32 of the files as the ranks wrote them, by absolute path; a file missing there is
    read once to checksum it."""
    _check_written(work, layout, cfg.parallel.zero_stage)
    paths = [p for p in sorted(work.rglob("*")) if p.is_file()]
    files = {str(p.relative_to(work)): p.stat().st_size for p in paths}
    written = written or {}
    checksums = {str(p.relative_to(work)): written.get(str(p.resolve())) or file_checksum(p)
                 for p in paths}
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
        "checksums": checksums,
    }
    write_atomic(work / META_FILE, json.dumps(meta, indent=1))
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
    write_latest(ckpt_dir, tag)
    return prune(ckpt_dir, cfg.checkpoint.keep, protect=target)


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """`latest` (a convenience: readers use `format.newest_complete`)."""
    write_atomic(ckpt_dir / LATEST, tag)


def _check_written(work: Path, layout, zero_stage: int) -> None:
    """DeepSpeed wrote one ZeRO optimizer shard per rank (none at ZeRO stage 0: the optimizer
    state is in the engine file) and each rank its RNG file."""
    shards = list(work.glob("*optim_states.pt"))
    rngs = list((work / RNG_DIR).glob("rank*.pt"))
    expected = layout.world if zero_stage > 0 else 0
    if len(shards) != expected or len(rngs) != layout.world:
        raise CheckpointError(
            f"{work}: save incomplete ({len(shards)} optimizer shards and {len(rngs)} RNG files "
            f"for {layout.world} ranks); the previous checkpoint is untouched"
        )


def write_atomic(path: Path, text: str) -> None:
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
    set_rng_state(safe_load(tag_dir / rng_file(layout.rank)))
    return client
