"""Reshaping: loading a checkpoint at another tensor-, pipeline- or data-parallel layout.

A checkpoint written at TP x PP x DP holds DeepSpeed's files for that layout: per pipeline block
and TP rank the module's state dict (`layer_XX-model_YY-model_states.pt`), per rank a ZeRO
shard of the optimizer (fp32 master weights, Adam moments) partitioned over that data-parallel
group. Another ZeRO stage (`parallel.zero_stage`) partitions it otherwise, so a checkpoint
loaded at another stage takes the same road (`is_reshape`). Loading it elsewhere goes through
DeepSpeed's *universal checkpoint* format, one directory per parameter with its whole
(un-split) fp32 value and Adam moments:

1. Conversion, once per checkpoint and loading run (rank 0; the other ranks wait; an error on
   rank 0 is raised on every rank), always under the LOADING run's checkpoint directory, never
   in the source's (which may belong to another run, reached through `checkpoint.load`):
   `<checkpoint.dir>/.reshape/<tag>-<manifest hash>/`. The source is verified against its
   manifest, then its DeepSpeed files are copied into `source/` there and the copies verified
   again (sizes against the manifest, and every file read with `safe_load`,
   `weights_only=True`); DeepSpeed's converter, which unpickles with `weights_only=False`, then
   reads those private copies only, which nothing else writes: no file can change between the
   check and the conversion. `python -m deepspeed.checkpoint.ds_to_universal` writes into
   `.tmp-universal/universal`, renamed to `universal/` when complete (with a marker file,
   `stable_megatron_universal.json`); the optimizer copies are then dropped. Later loads by
   this run reuse it; `stable-megatron reshape TAG_DIR [--into CHECKPOINT_DIR]` converts
   offline.
2. Loading: rank 0 reads every file of `universal/` with `weights_only=True` (DeepSpeed's
   universal loader uses `weights_only=False`), then every rank calls
   `engine.load_checkpoint(<cache>, tag="universal")` with DeepSpeed's
   `load_universal_checkpoint` switched on for that call only: each rank takes its TP slice of
   every parameter of its pipeline stage and its ZeRO-1 partition of the fp32 weights and Adam
   moments; the LR scheduler, step counters and our client state come from the saved engine
   state.
3. Module buffers are not in the universal format (DeepSpeed restores parameters only):
   sigma-reparam's power-iteration vectors `u`/`v` are read from the verified copies of the
   source layer files and resharded (`shards.reshard`).
4. RNG states are per rank and are not restored at another layout (dropout is off by default).

How each parameter is split comes from the model itself (`shards.parameter_kinds`);
`universal_checkpoint_info` turns this into DeepSpeed's pattern lists, which the Trainer has
DeepSpeed save with every checkpoint (`attach_universal_checkpoint_info`).

Vocabulary padding: the vocabulary is padded to a multiple of lcm(`model.vocab_pad_multiple`,
tp), the same size at every tp dividing `vocab_pad_multiple` (powers of two up to 128 by
default), where a reshape is exact. The converter keeps the first `original_vocab_size` rows,
set here to the padded size at TP=1 (the smallest of any layout), and the loader pads with zero
rows up to this layout's size: only at a tp that does not divide `vocab_pad_multiple` (e.g. 3)
do padding rows restart at zero, and since padded logits take part in the softmax the first
loss after such a reshape then differs slightly from the original layout's.

`checkpoint.finetune=true` at another layout (weights only) needs no conversion: each rank reads
the source layer files of its blocks (`safe_load`) and reshards every parameter and buffer.

Limits: into ZeRO-3, TP1 only (DeepSpeed's ZeRO-3 universal loader does not slice over TP); a
ZeRO-0 checkpoint (its optimizer state in the engine file, which the converter does not read)
loads at its own layout and stage only, and nothing converts into ZeRO-0 (weights only:
`checkpoint.finetune=true`); checkpoints saved before `universal_checkpoint_info` was recorded
cannot be converted (resume them at their own layout and save again).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stable_megatron import ds_adapter
from stable_megatron.checkpoint.format import (
    META_FILE,
    RESHAPE_DIR,
    SNAPSHOT,
    UNIVERSAL,
    UNIVERSAL_MARKER,
    UNIVERSAL_TMP,
    CheckpointError,
    describe_layout,
    engine_file,
    layer_file,
    layout_of,
    read_meta,
    safe_load,
    source_files,
    verify,
)
from stable_megatron.checkpoint.shards import KINDS, classify, parameter_kinds, reshard

INFO_ATTR = ds_adapter.UNIVERSAL_INFO_ATTR


# --------------------------------------------------------------------------------------------
# DeepSpeed's universal_checkpoint_info


def name_pattern(name: str) -> str:
    """A regex for `name` with its pipeline block index generalised (so one pattern covers every
    transformer layer, whatever stage holds it), anchored at both ends."""
    block, dot, rest = name.partition(".")
    if block.isdigit():
        return rf"\d+\.{re.escape(rest)}$"
    return f"{re.escape(name)}$"


def parameter_patterns(cfg) -> dict[str, list[str]]:
    """Per kind, the patterns of its parameters; every parameter matches exactly one pattern
    over all kinds (CheckpointError otherwise)."""
    by_pattern: dict[str, str] = {}
    for name, kind in parameter_kinds(cfg).items():
        pattern = name_pattern(name)
        if by_pattern.setdefault(pattern, kind) != kind:
            raise CheckpointError(
                f"{name}: {kind}, but other parameters matching {pattern} are "
                f"{by_pattern[pattern]}"
            )
    return {kind: sorted(p for p, k in by_pattern.items() if k == kind) for kind in KINDS}


def universal_checkpoint_info(cfg) -> dict[str, Any]:
    """DeepSpeed's `universal_checkpoint_info` for the model of `cfg`: how `ds_to_universal`
    merges each parameter's TP slices (column-parallel is its default, dim 0)."""
    from deepspeed.checkpoint import constants as c

    patterns = parameter_patterns(cfg)
    tied = sorted({name_pattern(n) for n in parameter_kinds(cfg) if n.startswith("tied_modules.")})
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: patterns["replicated"],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: patterns["row"],
        c.VOCABULARY_PARAMETER_PATTERNS: patterns["vocab"],
        # SwiGLU's FC1: each TP slice is [gate rows; up rows] (megatron-core's stride 2)
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: patterns["column_glu"],
        # the tied embedding is on the first and the last stage: take the first stage's copy
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: tied,
        # rows kept by the converter: the padded vocabulary at TP=1 (see the module docstring)
        c.ORIGINAL_VOCAB_SIZE: cfg.model.padded_vocab_size(1),
        c.PADDED_VOCAB_SIZE: cfg.model.padded_vocab_size(cfg.parallel.tp),
    }


def attach_universal_checkpoint_info(engine, cfg) -> None:
    """Have DeepSpeed save `universal_checkpoint_info(cfg)` with every checkpoint."""
    ds_adapter.set_universal_checkpoint_info(engine, universal_checkpoint_info(cfg))


# --------------------------------------------------------------------------------------------
# Checks


def saved_zero_stage(meta: dict) -> int:
    return meta["config"].get("parallel", {}).get("zero_stage", 1)


def is_reshape(meta: dict, layout, zero_stage: int) -> bool:
    """Whether the checkpoint is loaded at another layout or ZeRO stage (the optimizer state's
    partitioning differs: DeepSpeed's universal checkpoint in between)."""
    return (layout_of(meta) != (layout.tp, layout.pp, layout.dp)
            or saved_zero_stage(meta) != zero_stage)


def describe(layout: tuple[int, int, int], zero_stage: int) -> str:
    return f"{describe_layout(*layout)} (ZeRO-{zero_stage})"


def cache_for(ckpt_dir: Path, tag_dir: Path) -> Path:
    """Where the loading run (checkpoint directory `ckpt_dir`) keeps its conversion of
    `tag_dir`: named by the tag and a hash of its manifest (which has the save time and the
    size of every file), so another checkpoint of the same name gets its own."""
    return _cache(ckpt_dir, tag_dir, _manifest_bytes(tag_dir))


def _manifest_bytes(tag_dir: Path) -> bytes:
    try:
        return (Path(tag_dir) / META_FILE).read_bytes()
    except OSError:
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint (no {META_FILE})") from None


def _cache(ckpt_dir: Path, tag_dir: Path, raw: bytes) -> Path:
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return Path(ckpt_dir) / RESHAPE_DIR / f"{Path(tag_dir).name}-{digest}"


def universal_dir(cache: Path) -> Path | None:
    """`<cache>/universal` if a complete conversion is there."""
    path = Path(cache) / UNIVERSAL
    return path if (path / UNIVERSAL_MARKER).is_file() else None


def check_reshape(tag_dir: Path, meta: dict, cfg, layout, weights_only: bool = False) -> None:
    """Raise CheckpointError (naming the reason) if the checkpoint cannot be loaded at `layout`."""
    tag_dir = Path(tag_dir)
    saved = describe(layout_of(meta), saved_zero_stage(meta))
    here = describe((layout.tp, layout.pp, layout.dp), cfg.parallel.zero_stage)
    where = f"{tag_dir} (saved at {saved}, this run is {here})"
    if weights_only:
        return
    if cfg.parallel.zero_stage == 3 and layout.tp > 1:
        raise CheckpointError(
            f"{where}: loading a checkpoint at another layout or stage into ZeRO-3 needs "
            f"parallel.tp=1 (DeepSpeed's ZeRO-3 loader of universal checkpoints does not split "
            f"the weights over tensor-parallel ranks); load it at ZeRO-1/2, or at tp 1 under "
            f"ZeRO-3, or start from its weights only with checkpoint.finetune=true"
        )
    for label, stage in (("the checkpoint", saved_zero_stage(meta)),
                         ("this run", cfg.parallel.zero_stage)):
        if stage == 0:
            raise CheckpointError(
                f"{where}: {label} uses ZeRO stage 0, whose optimizer state DeepSpeed's "
                f"universal checkpoint does not convert; resume it at its own layout and stage, "
                f"or start from its weights only with checkpoint.finetune=true"
            )
    if universal_dir(cache_for(cfg.checkpoint_dir, tag_dir)) is not None:
        return
    if not _has_universal_info(engine_file(tag_dir)):
        raise CheckpointError(
            f"{where}: cannot be loaded at another layout: it has no universal_checkpoint_info "
            f"(saved by an older stable_megatron). Resume it at {saved}, save again, and load "
            f"that checkpoint here; or start from its weights only with checkpoint.finetune=true"
        )


def _has_universal_info(engine_file: Path) -> bool:
    state = safe_load(engine_file)
    return isinstance(state, dict) and bool(state.get(INFO_ATTR))


# --------------------------------------------------------------------------------------------
# Conversion (rank 0, or offline)


def _snapshot(tag_dir: Path, raw: bytes, into: Path) -> Path:
    """Copy the checkpoint's DeepSpeed files and its manifest (`raw`, the bytes the cache is
    named after) into `into`, then check the copies: every DeepSpeed file of the manifest
    present with its size, and readable as tensors and plain data only."""
    into.mkdir(parents=True)
    for path in source_files(tag_dir):
        shutil.copyfile(path, into / path.name)
    (into / META_FILE).write_bytes(raw)
    meta = read_meta(into)
    listed = {rel: size for rel, size in meta["files"].items()
              if "/" not in rel and rel.endswith(("model_states.pt", "optim_states.pt"))}
    copied = {p.name for p in source_files(into)}
    if copied != set(listed):
        extra = sorted(copied - set(listed)) or sorted(set(listed) - copied)
        raise CheckpointError(f"{tag_dir}: DeepSpeed files do not match its {META_FILE} "
                              f"({', '.join(extra[:3])})")
    verify(into, {"files": listed})
    for path in source_files(into):
        safe_load(path)
    return into


def convert(tag_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, workers: int = 1,
            force: bool = False, log=print) -> Path:
    """Convert one checkpoint (a tag directory) for runs whose checkpoint directory is
    `ckpt_dir`; returns the cache directory (`load_checkpoint(<it>, tag="universal")`).
    Reuses a complete earlier conversion unless `force`."""
    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir)
    verify(tag_dir, meta)  # a clear error before anything is copied
    raw = _manifest_bytes(tag_dir)  # the snapshot is checked against these very bytes
    cache = _cache(ckpt_dir, tag_dir, raw)
    target = cache / UNIVERSAL
    if target.exists():
        if universal_dir(cache) is not None and not force:
            return cache
        if not force:
            raise CheckpointError(
                f"{target}: exists without {UNIVERSAL_MARKER} (an incomplete or foreign "
                f"conversion); delete it, or convert with --force"
            )
    started = time.time()
    staging = cache / UNIVERSAL_TMP
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted earlier conversion
    staging.mkdir(parents=True)
    try:
        snapshot = _snapshot(tag_dir, raw, staging / SNAPSHOT)
        if not _has_universal_info(engine_file(snapshot)):
            raise CheckpointError(
                f"{tag_dir}: has no universal_checkpoint_info (saved by an older "
                f"stable_megatron); it can only be loaded at the layout it was saved at"
            )
        out = staging / UNIVERSAL
        _run_converter(tag_dir, snapshot, out, staging, workers)
        _for_every_stage(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (out / UNIVERSAL_MARKER).write_text(json.dumps({
        "source": str(tag_dir.resolve()),
        "step": meta["step"],
        "layout": meta["layout"],
        "deepspeed": _deepspeed_version(),
        "seconds": round(time.time() - started, 2),
        "converted_at": time.time(),
    }, indent=1))
    for path in snapshot.glob("*optim_states.pt"):  # in the universal files now
        path.unlink()
    for name in (UNIVERSAL, SNAPSHOT):
        shutil.rmtree(cache / name, ignore_errors=True)
    (staging / SNAPSHOT).rename(cache / SNAPSHOT)
    out.rename(target)  # last: the marker inside makes the conversion complete
    shutil.rmtree(staging, ignore_errors=True)
    log(f"converted {tag_dir} to DeepSpeed's universal format in {time.time() - started:.1f}s "
        f"({target})")
    return cache


def _for_every_stage(universal: Path) -> None:
    """Make DeepSpeed's universal checkpoint (0.19.8) loadable at every ZeRO stage from 1 to 3,
    whichever stage saved it. The converter writes what the saving stage's loader reads, and
    the two loaders differ:
    - the engine state (step counters, LR scheduler, client state) is read from
      `mp_rank_XX_model_states.pt` below stage 3 and from
      `zero_pp_rank_0_mp_rank_XX_model_states.pt` at stage 3: both names are given;
    - a parameter's `fp32.pt` / `exp_avg.pt` / `exp_avg_sq.pt`: stages 1-2 read a dict
      `{"param": tensor, ...}` and the Adam step from `step.pt`; a stage-3 source (TP1) gives
      bare tensors and no `step.pt`: wrapped, and the step written;
    - `zero/optimizer_state.pt`: stages 1-2 need `ds_version`, stage 3 the base optimizer's
      state dict (`optimizer_state_dict`: the step of its first group, and the groups).
    Every file is read with `safe_load` (tensors and plain data only), as `ensure_universal`
    reads them all again before DeepSpeed loads them."""
    from deepspeed.checkpoint import constants as c

    _engine_state_names(universal)
    zero = universal / "zero"
    state_path = zero / "optimizer_state.pt"
    state = safe_load(state_path)
    engine = safe_load(engine_file(universal))
    nested = state.get(c.OPTIMIZER_STATE_DICT)
    if nested is not None:  # saved by stage 3: the Adam step of its (common) first group
        step = nested["state"][0]["step"]
    else:  # stages 1-2: every parameter's step.pt holds it
        step = safe_load(next(zero.glob("*/step.pt")))
        state[c.OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}},
                                         "param_groups": state[c.PARAM_GROUPS]}
    state.setdefault(c.DS_VERSION, engine.get(c.DS_VERSION))
    torch.save(state, state_path)
    shapes = {name: shape for group in engine.get(c.PARAM_SHAPES) or []
              for name, shape in group.items()}
    info = engine.get(c.UNIVERSAL_CHECKPOINT_INFO) or {}
    for folder in sorted(p for p in zero.iterdir() if p.is_dir()):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            path = folder / f"{key}.pt"
            value = safe_load(path)
            if torch.is_tensor(value):
                torch.save(_universal_entry(folder.name, value, shapes, info), path)
        if not (folder / "step.pt").exists():
            torch.save(step, folder / "step.pt")


def _universal_entry(name: str, value: torch.Tensor, shapes: dict, info: dict) -> dict:
    """A whole (TP1) tensor of a ZeRO-3 source in the form the stage 1-2 loader reads: its
    shape, and how a tensor-parallel rank takes its slice (our patterns, as
    `universal_checkpoint_info` gives them to the converter for stages 1-2)."""
    from deepspeed.checkpoint import constants as c

    def matches(key: str) -> bool:
        return any(re.match(pattern, name) for pattern in info.get(key, []))

    if name in shapes:
        value = value.reshape(shapes[name])
    entry = {c.PARAM: value}
    if matches(c.TP_REPLICATED_PARAMETER_PATTERNS):
        return entry
    entry[c.CAT_DIM] = 1 if matches(c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS) else 0
    if matches(c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0):
        entry[c.PARAM_N_SUB_PARAMS] = 2
    if matches(c.VOCABULARY_PARAMETER_PATTERNS):
        entry[c.VOCAB_TENSOR] = True
    return entry


def _engine_state_names(universal: Path) -> None:
    for path in sorted(universal.glob("*model_states.pt")):
        if path.name.startswith("zero_pp_rank_0_"):
            twin = universal / path.name.removeprefix("zero_pp_rank_0_")
        elif path.name.startswith("mp_rank_"):
            twin = universal / f"zero_pp_rank_0_{path.name}"
        else:
            continue
        if not twin.exists():
            shutil.copyfile(path, twin)


def _run_converter(tag_dir: Path, snapshot: Path, out: Path, staging: Path,
                   workers: int) -> None:
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(snapshot), "--output_folder", str(out),
        "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
    ]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    (staging / "ds_to_universal.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line][-3:]
        raise CheckpointError(
            f"{tag_dir}: DeepSpeed's universal conversion failed (exit {proc.returncode}): "
            + " | ".join(tail)
        )


def _deepspeed_version() -> str:
    from importlib.metadata import version

    return version("deepspeed")


def ensure_universal(tag_dir: Path, ckpt_dir: Path, layout, workers: int = 1) -> Path:
    """Every rank: the cache directory with a complete conversion of `tag_dir`, converted by
    rank 0 if needed, its files read by rank 0 with `weights_only=True` before DeepSpeed
    unpickles them."""
    error, cache = None, None
    if layout.rank == 0:
        try:
            cache = cache_for(ckpt_dir, tag_dir)
            if universal_dir(cache) is None:
                cache = convert(tag_dir, ckpt_dir, workers=workers, log=_rank0_print)
            else:
                _rank0_print(f"reusing the universal conversion {cache / UNIVERSAL}")
            for path in sorted((cache / UNIVERSAL).rglob("*.pt")):
                safe_load(path)
        except (CheckpointError, OSError) as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - the other ranks must not wait forever
            error = f"{tag_dir}: conversion to the universal format failed: " \
                    f"{type(err).__name__}: {err}"
    from stable_megatron import parallel

    error, cache = parallel.broadcast_object((error, cache))  # every rank raises or loads
    if error is not None:
        raise CheckpointError(error)
    return Path(cache)


def _rank0_print(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# Loading


def load_resharded_state(pipe, tag_dir: Path, src_tp: int, layout, params: bool) -> int:
    """Copy this stage's buffers (and, with `params`, parameters) from the layer files in
    `tag_dir`, resharded from TP `src_tp`; returns the number of tensors set. Under ZeRO-3 each
    block's parameters are gathered whole, set and re-partitioned in turn (every data-parallel
    rank sets the same values), never the whole model at once."""
    kinds = classify(pipe) if params else {}
    names = {id(p): n for n, p in pipe.named_parameters()}
    count = 0
    for index, module in ds_adapter.stage_blocks(pipe):
        with ds_adapter.gathered(module.parameters() if params else [], modify=True):
            count += _load_block(module, tag_dir, index, src_tp, layout, params,
                                 kinds, names)
    return count


def _load_block(module, tag_dir: Path, index: int, src_tp: int, layout, params: bool,
                kinds: dict, names: dict) -> int:
    """`load_resharded_state` for block `index` (`module`, whole): its tensors set from the
    block's layer files of the `src_tp` TP ranks; the number set."""
    wanted = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if not torch.is_tensor(value) or key.endswith("_extra_state"):
            continue
        if isinstance(value, nn.Parameter) and not params:
            continue
        wanted[key] = value
    if not wanted:
        return 0
    shards = []
    for tp_rank in range(src_tp):
        path = tag_dir / layer_file(index, tp_rank)
        state = safe_load(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: corrupt (expected a state dict)")
        shards.append(state)
    with torch.no_grad():
        for key, target in wanted.items():
            values = []
            for tp_rank, state in enumerate(shards):
                if key not in state or not torch.is_tensor(state[key]):
                    raise CheckpointError(f"{tag_dir / layer_file(index, tp_rank)}: no "
                                          f"tensor {key}")
                values.append(state[key])
            kind = kinds.get(names.get(id(target))) if isinstance(target, nn.Parameter) \
                else None
            value = reshard(values, tuple(target.shape), layout.tp_rank, layout.tp, kind,
                            f"{index}.{key}")
            target.copy_(value.to(dtype=target.dtype, device=target.device))
    return len(wanted)


def load(engine, cfg, layout, tag_dir: Path, meta: dict, weights_only: bool = False) -> dict:
    """`checkpoint.load` for a checkpoint saved at another layout; every rank calls this."""
    tag_dir = Path(tag_dir)
    check_reshape(tag_dir, meta, cfg, layout, weights_only)
    saved_tp = layout_of(meta)[0]
    saved = describe(layout_of(meta), saved_zero_stage(meta))
    here = describe((layout.tp, layout.pp, layout.dp), cfg.parallel.zero_stage)
    pipe = engine.module
    if weights_only:
        load_resharded_state(pipe, tag_dir, saved_tp, layout, params=True)
        ds_adapter.refresh_master_weights(engine)
        if layout.rank == 0:
            _rank0_print(f"weights of {tag_dir} (saved at {saved}) resharded to {here}")
        return {}
    cache = ensure_universal(tag_dir, cfg.checkpoint_dir, layout)
    with ds_adapter.universal_loading(engine):
        path, client = engine.load_checkpoint(str(cache), tag=UNIVERSAL)
    if path is None:
        raise CheckpointError(f"{cache / UNIVERSAL}: DeepSpeed found nothing to load there")
    load_resharded_state(pipe, cache / SNAPSHOT, saved_tp, layout, params=False)
    if layout.rank == 0:
        _rank0_print(
            f"reshaped {tag_dir} from {saved} to {here} (DeepSpeed universal checkpoint); "
            f"RNG states are not restored at another layout"
        )
    return client
