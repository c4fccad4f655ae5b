"""Reshaping: loading a checkpoint at another tensor-, pipeline- or data-parallel layout.

A checkpoint written at TP x PP x DP holds DeepSpeed's files for that layout: per pipeline block
and TP rank the module's state dict (`layer_XX-model_YY-model_states.pt`), per rank a ZeRO-1
shard of the optimizer (fp32 master weights, Adam moments) flattened over that data-parallel
group. Loading it elsewhere goes through DeepSpeed's *universal checkpoint* format, one
directory per parameter with its whole (un-split) fp32 value and Adam moments:

1. Conversion, once per checkpoint (rank 0; the other ranks wait; an error on rank 0 is raised
   on every rank). Every file DeepSpeed's converter will unpickle is first read with
   `checkpoint.safe_load` (`weights_only=True`): the converter itself uses
   `torch.load(weights_only=False)`. Then `python -m deepspeed.checkpoint.ds_to_universal`
   writes into `<tag>/.tmp-universal/universal`, which is renamed to `<tag>/universal` when
   complete (with a marker file, `stable_megatron_universal.json`). Later loads reuse it; the
   same conversion runs offline with `tools/reshape_checkpoint.py TAG_DIR`.
2. Loading: every rank validates (rank 0 reads every file of `<tag>/universal` with
   `weights_only=True`, as DeepSpeed's universal loader uses `weights_only=False`), then
   `engine.load_checkpoint(<tag>, tag="universal")` with DeepSpeed's `load_universal_checkpoint`
   switched on for that call only: each rank takes its TP slice of every parameter of its
   pipeline stage and its ZeRO-1 partition of the fp32 weights and Adam moments; the LR
   scheduler, step counters and our client state (step, consumed samples, spike detector) come
   from the saved engine state.
3. Module buffers are not in the universal format (DeepSpeed restores parameters only):
   sigma-reparam's power-iteration vectors `u`/`v` are read from the source layer files,
   concatenated over the source TP ranks where they are split, and sliced for this rank.
4. RNG states are per rank and are not restored at another layout (dropout is off by default).

How each parameter is split comes from the model itself (`parameter_kinds`): the model of the
config is built on the meta device and each parameter classified by megatron-core's
`tensor_model_parallel` / `partition_dim` attributes: column-parallel (split on dim 0, DeepSpeed's
default), row-parallel (dim 1), vocabulary (the vocab-parallel embedding and the untied output
layer: dim 0, padded), or TP-replicated (no attribute: layer norms, row-parallel biases,
sigma-reparam's `gamma`, head norms, position embeddings). `universal_checkpoint_info` turns
this into DeepSpeed's pattern lists; the Trainer puts it on `engine.module` (DeepSpeed 0.19 saves
`module.universal_checkpoint_info` with every checkpoint and refuses the key in client state).

Vocabulary padding: the vocabulary is padded to a multiple of lcm(`model.vocab_pad_multiple`,
tp), the same size at every tp dividing `vocab_pad_multiple` (powers of two up to 128 by
default), where a reshape is exact. The converter keeps the first `original_vocab_size` rows,
set here to the padded size at TP=1 (the smallest of any layout), and the loader pads with zero
rows up to this layout's size: only at a tp that does not divide `vocab_pad_multiple` (e.g. 3)
do padding rows restart at zero, and since padded logits take part in the softmax the first
loss after such a reshape then differs slightly from the original layout's.

`checkpoint.finetune=true` at another layout (weights only) needs no conversion: each rank reads
the source layer files of its blocks and reshards every parameter and buffer directly.

Limits: ZeRO stage 1 (the only stage the pipeline engine supports); checkpoints saved before
`universal_checkpoint_info` was recorded cannot be converted (resume them at their own layout
and save again).
"""

from __future__ import annotations

import contextlib
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

from stable_megatron.checkpoint import CheckpointError, layout_of, safe_load

UNIVERSAL = "universal"
UNIVERSAL_TMP = ".tmp-universal"
MARKER = "stable_megatron_universal.json"
INFO_ATTR = "universal_checkpoint_info"  # deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO
KINDS = ("column", "row", "vocab", "replicated")
LAYER_FILE = "layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"
ENGINE_FILE = "mp_rank_00_model_states.pt"


# --------------------------------------------------------------------------------------------
# How every parameter is split over tensor-parallel ranks


def classify(module: nn.Module, prefix: str = "") -> dict[str, str]:
    """Kind (one of KINDS) of every parameter of `module` (a pipeline block or a whole
    `PipelineModule`), from megatron-core's tensor-parallel attributes."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    from stable_megatron.model.gpt import LMHeadPipe

    vocab_ids = set()
    for sub in module.modules():
        if isinstance(sub, VocabParallelEmbedding):
            vocab_ids.add(id(sub.weight))
        elif isinstance(sub, LMHeadPipe):
            vocab_ids.add(id(sub.output_layer.weight))
    kinds = {}
    for name, param in module.named_parameters():
        split = getattr(param, "tensor_model_parallel", False)
        dim = getattr(param, "partition_dim", -1)
        stride = getattr(param, "partition_stride", 1)
        full = f"{prefix}{name}"
        if not split:
            kinds[full] = "replicated"
        elif stride != 1 or dim not in (0, 1):
            raise CheckpointError(
                f"{full}: split over tensor-parallel ranks along dim {dim} with stride {stride}; "
                f"reshaping supports contiguous splits along dim 0 or 1 only"
            )
        elif id(param) in vocab_ids:
            if dim != 0:
                raise CheckpointError(f"{full}: a vocabulary tensor split along dim {dim}")
            kinds[full] = "vocab"
        else:
            kinds[full] = "column" if dim == 0 else "row"
    return kinds


@contextlib.contextmanager
def _shape_only_build():
    """Build modules on the meta device with initialisation on: megatron-core sets the
    tensor-parallel attributes only while initialising a weight, and on the meta device that
    costs nothing. sigma-reparam's start-up power iteration (values and TP all-reduces) is
    skipped; the CPU random state is left as it was."""
    from stable_megatron.model.sigma_reparam import _SigmaReparam

    saved = _SigmaReparam.init_power_iteration, _SigmaReparam.init_gamma
    _SigmaReparam.init_power_iteration = lambda self, iters=None: None
    _SigmaReparam.init_gamma = lambda self: None
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            yield
    finally:
        _SigmaReparam.init_power_iteration, _SigmaReparam.init_gamma = saved


@contextlib.contextmanager
def _tensor_parallel_groups(cfg):
    """`cfg` with parallel.tp matching megatron-core's TP groups: this process's groups when they
    exist (names and kinds do not depend on the TP size), else a one-process group."""
    import copy

    from megatron.core import parallel_state as mpu

    from stable_megatron.export import single_process_tp_group

    cfg = copy.deepcopy(cfg)
    cfg.parallel.pp = 1
    if mpu.model_parallel_is_initialized():
        cfg.parallel.tp = mpu.get_tensor_model_parallel_world_size()
        yield cfg
        return
    cfg.parallel.tp = 1
    with single_process_tp_group():
        yield cfg


_KINDS_CACHE: dict[str, dict[str, str]] = {}


def parameter_kinds(cfg) -> dict[str, str]:
    """Kind of every parameter of the whole model of `cfg` (all pipeline stages), by its name in
    DeepSpeed's `PipelineModule` (`<block index>.<name>`, `tied_modules.<key>.<name>`), from a
    build on the meta device. Cached per model config."""
    from deepspeed.pipe import TiedLayerSpec

    from stable_megatron import compat
    from stable_megatron.export import _layer_specs

    key = json.dumps(cfg.to_dict()["model"], sort_keys=True)
    if key in _KINDS_CACHE:
        return dict(_KINDS_CACHE[key])
    compat.apply_cpu_patches()
    kinds: dict[str, str] = {}
    with _tensor_parallel_groups(cfg) as local:
        for index, spec in enumerate(_layer_specs(local)):
            if isinstance(spec, TiedLayerSpec):
                if spec.forward_fn is not None:
                    continue  # the last stage's view of the tied module: same parameters
                prefix = f"tied_modules.{spec.key}."
            else:
                prefix = f"{index}."
            with _shape_only_build():
                module = spec.build()
            kinds.update(classify(module, prefix))
    _KINDS_CACHE[key] = kinds
    return dict(kinds)


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
        # the tied embedding is on the first and the last stage: take the first stage's copy
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: tied,
        # rows kept by the converter: the padded vocabulary at TP=1 (see the module docstring)
        c.ORIGINAL_VOCAB_SIZE: cfg.model.padded_vocab_size(1),
        c.PADDED_VOCAB_SIZE: cfg.model.padded_vocab_size(cfg.parallel.tp),
    }


def attach_universal_checkpoint_info(engine, cfg) -> None:
    """Have DeepSpeed save `universal_checkpoint_info(cfg)` with every checkpoint."""
    setattr(engine.module, INFO_ATTR, universal_checkpoint_info(cfg))


# --------------------------------------------------------------------------------------------
# Checks


def is_reshape(meta: dict, layout) -> bool:
    return layout_of(meta) != (layout.tp, layout.pp, layout.dp)


def _describe(tp: int, pp: int, dp: int) -> str:
    return f"tp {tp} x pp {pp} x dp {dp}"


def universal_dir(tag_dir: Path) -> Path | None:
    """`<tag>/universal` if a complete conversion is there."""
    path = Path(tag_dir) / UNIVERSAL
    return path if (path / MARKER).is_file() else None


def check_reshape(tag_dir: Path, meta: dict, cfg, layout, weights_only: bool = False) -> None:
    """Raise CheckpointError (naming the reason) if the checkpoint cannot be loaded at `layout`."""
    tag_dir = Path(tag_dir)
    saved = _describe(*layout_of(meta))
    here = _describe(layout.tp, layout.pp, layout.dp)
    where = f"{tag_dir} (saved at {saved}, this run is {here})"
    for label, stage in (("checkpoint", meta["config"].get("parallel", {}).get("zero_stage", 1)),
                         ("this run", cfg.parallel.zero_stage)):
        if stage != 1:
            raise CheckpointError(f"{where}: reshaping supports ZeRO stage 1 only; {label} uses "
                                  f"stage {stage}")
    if weights_only:
        return
    if universal_dir(tag_dir) is not None:
        return
    state = safe_load(tag_dir / ENGINE_FILE)
    info = state.get(INFO_ATTR) if isinstance(state, dict) else None
    if not info:
        raise CheckpointError(
            f"{where}: cannot be loaded at another layout: it has no universal_checkpoint_info "
            f"(saved by an older stable_megatron). Resume it at {saved}, save again, and load "
            f"that checkpoint here; or start from its weights only with checkpoint.finetune=true"
        )


# --------------------------------------------------------------------------------------------
# Conversion (rank 0, or offline)


def _validate_files(paths: list[Path]) -> None:
    """Read every file with `weights_only=True` (tensors and plain data only)."""
    for path in paths:
        safe_load(path)


def source_files(tag_dir: Path) -> list[Path]:
    """The files DeepSpeed's converter reads (and unpickles with weights_only=False)."""
    return sorted(p for p in Path(tag_dir).iterdir()
                  if p.is_file() and p.name.endswith(("_model_states.pt", "optim_states.pt")))


def convert(tag_dir: str | os.PathLike, workers: int = 1, force: bool = False,
            log=print) -> Path:
    """Convert one checkpoint (a tag directory) to `<tag>/universal`; returns that directory.
    Reuses a complete earlier conversion unless `force`."""
    from stable_megatron import checkpoint as ckpt

    tag_dir = Path(tag_dir)
    meta = ckpt.read_meta(tag_dir)
    ckpt.verify(tag_dir, meta)
    target = tag_dir / UNIVERSAL
    if target.exists():
        if universal_dir(tag_dir) is not None and not force:
            return target
        if not force:
            raise CheckpointError(
                f"{target}: exists without {MARKER} (an incomplete or foreign conversion); "
                f"delete it, or convert with --force"
            )
    started = time.time()
    engine_state = safe_load(tag_dir / ENGINE_FILE)
    if not (isinstance(engine_state, dict) and engine_state.get(INFO_ATTR)):
        raise CheckpointError(
            f"{tag_dir}: has no universal_checkpoint_info (saved by an older stable_megatron); "
            f"it can only be loaded at the layout it was saved at"
        )
    _validate_files(source_files(tag_dir))
    staging = tag_dir / UNIVERSAL_TMP
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted earlier conversion
    staging.mkdir()
    out = staging / UNIVERSAL
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(tag_dir), "--output_folder", str(out),
        "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
    ]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    (staging / "ds_to_universal.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line][-3:]
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(
            f"{tag_dir}: DeepSpeed's universal conversion failed (exit {proc.returncode}): "
            + " | ".join(tail)
        )
    (out / MARKER).write_text(json.dumps({
        "source": tag_dir.name,
        "step": meta["step"],
        "layout": meta["layout"],
        "deepspeed": _deepspeed_version(),
        "seconds": round(time.time() - started, 2),
        "converted_at": time.time(),
    }, indent=1))
    if force and target.exists():
        shutil.rmtree(target)
    out.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"converted {tag_dir} to DeepSpeed's universal format in {time.time() - started:.1f}s "
        f"({target})")
    return target


def _deepspeed_version() -> str:
    from importlib.metadata import version

    return version("deepspeed")


def _broadcast_error(error: str | None) -> None:
    from stable_megatron import parallel

    error = parallel.broadcast_object(error)  # every rank raises, none waits forever
    if error is not None:
        raise CheckpointError(error)


def ensure_universal(tag_dir: Path, layout, workers: int = 1) -> Path:
    """Every rank: `<tag>/universal`, converted by rank 0 if needed, its files validated by
    rank 0 with `weights_only=True` before DeepSpeed unpickles them."""
    error = None
    if layout.rank == 0:
        try:
            if universal_dir(tag_dir) is None:
                convert(tag_dir, workers=workers, log=_rank0_print)
            else:
                _rank0_print(f"reusing the universal conversion {tag_dir / UNIVERSAL}")
            _validate_files(sorted(p for p in (tag_dir / UNIVERSAL).rglob("*.pt")))
        except (CheckpointError, OSError) as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - the other ranks must not wait forever
            error = f"{tag_dir}: conversion to the universal format failed: " \
                    f"{type(err).__name__}: {err}"
    _broadcast_error(error)
    return tag_dir / UNIVERSAL


def _rank0_print(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# Loading


@contextlib.contextmanager
def _universal_loading(engine):
    """DeepSpeed's `checkpoint.load_universal` for one `load_checkpoint` call: the engine reads
    the flag at load time, and the run's own later loads (rollbacks to checkpoints at this
    layout) must take the ordinary path."""
    config = engine._config
    if not hasattr(config, "load_universal_checkpoint"):
        raise RuntimeError("this DeepSpeed has no load_universal_checkpoint setting")
    saved = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = saved


def stage_blocks(pipe) -> list[tuple[int, nn.Module]]:
    """(saved block index, module) of every module of this pipeline stage with a state dict,
    tied modules once (saved under the index of their first layer spec)."""
    from deepspeed.pipe import TiedLayerSpec

    first_index = {}
    for index, spec in enumerate(pipe._layer_specs):
        if isinstance(spec, TiedLayerSpec):
            first_index.setdefault(spec.key, index)
    blocks, seen = [], set()
    for key, module in pipe.tied_modules.items():
        blocks.append((first_index[key], module))
        seen.add(id(module))
    for local, fn in enumerate(pipe.forward_funcs):
        if isinstance(fn, nn.Module) and id(fn) not in seen:
            blocks.append((pipe._local_start + local, fn))
    return sorted(blocks, key=lambda b: b[0])


def reshard(shards: list[torch.Tensor], shape: tuple[int, ...], tp_rank: int, tp: int,
            kind: str | None = None, name: str = "tensor") -> torch.Tensor:
    """This rank's part (`shape`, TP rank `tp_rank` of `tp`) of a tensor saved as `shards` (one
    per source TP rank, in order). `kind` as from `classify`; None (buffers): by shape, a tensor
    whose shard shape differs between the layouts is split along the one dim that differs."""
    shape = tuple(shape)
    src = len(shards)
    first = tuple(shards[0].shape)
    if kind == "vocab":
        full = torch.cat(shards, dim=0)
        rows = shape[0] * tp
        if full.shape[0] >= rows:
            full = full[:rows]
        else:  # this layout pads the vocabulary further: zero rows, as DeepSpeed's loader
            full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
        return full.chunk(tp, dim=0)[tp_rank]
    if src == tp:  # same TP size: the same shard, split or replicated
        out = shards[tp_rank]
    elif kind == "replicated" or (kind is None and first == shape):
        out = shards[0]
    else:
        if kind in ("column", "row"):
            dim = 0 if kind == "column" else 1
        else:
            differ = [d for d, (a, b) in enumerate(zip(first, shape, strict=False)) if a != b]
            dim = differ[0] if len(differ) == 1 and len(first) == len(shape) else -1
        if dim < 0 or dim >= len(first) or first[dim] * src != shape[dim] * tp:
            raise CheckpointError(
                f"{name}: saved shard shape {list(first)} at tp {src} does not reshard to "
                f"{list(shape)} at tp {tp}"
            )
        out = torch.cat(shards, dim=dim).chunk(tp, dim=dim)[tp_rank]
    if tuple(out.shape) != shape:
        raise CheckpointError(f"{name}: saved shape {list(out.shape)}, this layout needs "
                              f"{list(shape)}")
    return out


def load_resharded_state(pipe, tag_dir: Path, src_tp: int, layout, params: bool) -> int:
    """Copy this stage's buffers (and, with `params`, parameters) from the source layer files,
    resharded from TP `src_tp`; returns the number of tensors set."""
    kinds = classify(pipe) if params else {}
    names = {id(p): n for n, p in pipe.named_parameters()}
    count = 0
    for index, module in stage_blocks(pipe):
        wanted = {}
        for key, value in module.state_dict(keep_vars=True).items():
            if not torch.is_tensor(value) or key.endswith("_extra_state"):
                continue
            is_param = isinstance(value, nn.Parameter)
            if is_param and not params:
                continue
            wanted[key] = value
        if not wanted:
            continue
        shards = []
        for tp_rank in range(src_tp):
            path = tag_dir / LAYER_FILE.format(index=index, tp_rank=tp_rank)
            state = safe_load(path)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: corrupt (expected a state dict)")
            shards.append(state)
        with torch.no_grad():
            for key, target in wanted.items():
                values = []
                for tp_rank, state in enumerate(shards):
                    if key not in state or not torch.is_tensor(state[key]):
                        path = tag_dir / LAYER_FILE.format(index=index, tp_rank=tp_rank)
                        raise CheckpointError(f"{path}: no tensor {key}")
                    values.append(state[key])
                kind = kinds.get(names.get(id(target))) if isinstance(target, nn.Parameter) \
                    else None
                value = reshard(values, tuple(target.shape), layout.tp_rank, layout.tp, kind,
                                f"{index}.{key}")
                target.copy_(value.to(dtype=target.dtype, device=target.device))
                count += 1
    return count


def load(engine, cfg, layout, tag_dir: Path, meta: dict, weights_only: bool = False) -> dict:
    """`checkpoint.load` for a checkpoint saved at another layout; every rank calls this."""
    tag_dir = Path(tag_dir)
    check_reshape(tag_dir, meta, cfg, layout, weights_only)
    saved_tp, saved_pp, saved_dp = layout_of(meta)
    saved = _describe(saved_tp, saved_pp, saved_dp)
    here = _describe(layout.tp, layout.pp, layout.dp)
    pipe = engine.module
    if weights_only:
        load_resharded_state(pipe, tag_dir, saved_tp, layout, params=True)
        engine.optimizer.refresh_fp32_params()  # ZeRO's fp32 master copy from the module
        if layout.rank == 0:
            _rank0_print(f"weights of {tag_dir} (saved at {saved}) resharded to {here}")
        return {}
    universal = ensure_universal(tag_dir, layout)
    with _universal_loading(engine):
        path, client = engine.load_checkpoint(str(tag_dir), tag=universal.name)
    if path is None:
        raise CheckpointError(f"{universal}: DeepSpeed found nothing to load there")
    load_resharded_state(pipe, tag_dir, saved_tp, layout, params=False)
    if layout.rank == 0:
        _rank0_print(
            f"reshaped {tag_dir} from {saved} to {here} (DeepSpeed universal checkpoint); "
            f"RNG states are not restored at another layout"
        )
    return client
