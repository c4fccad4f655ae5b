"""How the model's tensors are split over tensor-parallel ranks, and the one routine that merges
saved shards into full tensors (export) and splits them again for another layout (reshape).

Two sources tell how a tensor is split, both from the model of the config built block by block
on the meta device (no memory, no values):
- `reference_tensors`: the full (TP=1) shape of every tensor of every saved block; a saved
  shard equal to it is replicated, a shard 1/tp of it along exactly one dimension is split
  there (`split_dim`). Covers buffers too (sigma-reparam's `u`/`v`).
- `parameter_kinds`: each parameter classified by megatron-core's `tensor_model_parallel` /
  `partition_dim` / `partition_stride` attributes: column-parallel (dim 0), row-parallel (dim
  1), vocabulary (the vocab-parallel embedding and the untied output layer: dim 0, padded),
  `column_glu` (SwiGLU's FC1, dim 0 with stride 2: the whole tensor is [gate; up] and each rank
  holds [its rows of gate; its rows of up]) or replicated. DeepSpeed's universal converter
  needs these as patterns.

`merge` concatenates shards along their split dimension (rank 0's copy of a replicated tensor;
with stride 2, the ranks' first halves, then their second halves); `split` is its inverse;
`reshard` merges and takes this rank's part at another TP size.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from stable_megatron.checkpoint.format import EXTRA_STATE, CheckpointError

KINDS = ("column", "row", "vocab", "column_glu", "replicated")
GLU_STRIDE = 2  # megatron-core's FC1 stride with gated_linear_unit
INVALID = "invalid"


# --------------------------------------------------------------------------------------------
# Merging and splitting


def split_dim(shard: tuple[int, ...], full: tuple[int, ...], tp: int) -> int | None | str:
    """The dimension along which `shard` is 1/tp of `full`; None if equal (replicated);
    INVALID otherwise."""
    shard, full = tuple(shard), tuple(full)
    if shard == full:
        return None
    if len(shard) == len(full):
        differ = [d for d, (s, f) in enumerate(zip(shard, full, strict=True)) if s != f]
        if len(differ) == 1 and shard[differ[0]] * tp == full[differ[0]]:
            return differ[0]
    return INVALID


def merge(shards: list[torch.Tensor], dim: int | None, stride: int = 1) -> torch.Tensor:
    """The full tensor of `shards` (one per TP rank, in order): concatenated along `dim`, or
    rank 0's copy of a replicated tensor (`dim` None). With `stride` k, each shard holds k
    equal pieces along `dim` and the full tensor is every rank's first piece, then every rank's
    second piece, ... (megatron-core's strided split)."""
    if dim is None:
        return shards[0]
    if stride == 1:
        return torch.cat(shards, dim=dim)
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([p[i] for i in range(stride) for p in pieces], dim=dim)


def split(full: torch.Tensor, dim: int, tp_rank: int, tp: int, stride: int = 1) -> torch.Tensor:
    """Rank `tp_rank`'s part of `full` split over `tp` ranks along `dim` (`merge`'s inverse)."""
    if stride == 1:
        return full.chunk(tp, dim=dim)[tp_rank]
    return torch.cat([piece.chunk(tp, dim=dim)[tp_rank] for piece in full.chunk(stride, dim=dim)],
                     dim=dim)


def stride_of(kind: str | None) -> int:
    return GLU_STRIDE if kind == "column_glu" else 1


def reshard(shards: list[torch.Tensor], shape: tuple[int, ...], tp_rank: int, tp: int,
            kind: str | None = None, name: str = "tensor") -> torch.Tensor:
    """This rank's part (`shape`, TP rank `tp_rank` of `tp`) of a tensor saved as `shards` (one
    per source TP rank, in order). `kind` as from `classify`; None (buffers): by shape, a tensor
    whose shard shape differs between the layouts is split along the one dim that differs."""
    shape = tuple(shape)
    src = len(shards)
    first = tuple(shards[0].shape)
    if kind == "vocab":
        full = merge(shards, 0)
        rows = shape[0] * tp
        if full.shape[0] >= rows:
            full = full[:rows]
        else:  # this layout pads the vocabulary further: zero rows, as DeepSpeed's loader
            full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
        return full.chunk(tp, dim=0)[tp_rank]
    if src == tp:  # same TP size: the same shard, split or replicated
        out = shards[tp_rank]
    elif kind == "replicated" or (kind is None and first == shape):
        out = merge(shards, None)
    else:
        if kind in ("column", "row", "column_glu"):
            dim = 1 if kind == "row" else 0
        else:
            differ = [d for d, (a, b) in enumerate(zip(first, shape, strict=False)) if a != b]
            dim = differ[0] if len(differ) == 1 and len(first) == len(shape) else -1
        if dim < 0 or dim >= len(first) or first[dim] * src != shape[dim] * tp:
            raise CheckpointError(
                f"{name}: saved shard shape {list(first)} at tp {src} does not reshard to "
                f"{list(shape)} at tp {tp}"
            )
        stride = stride_of(kind)
        out = split(merge(shards, dim, stride), dim, tp_rank, tp, stride)
    if tuple(out.shape) != shape:
        raise CheckpointError(f"{name}: saved shape {list(out.shape)}, this layout needs "
                              f"{list(shape)}")
    return out


# --------------------------------------------------------------------------------------------
# The model's blocks on the meta device


@contextlib.contextmanager
def single_process_tp_group():
    """A tensor-parallel group of size 1 for building megatron-core layers in this process: the
    existing groups if they have TP size 1, else a one-process gloo world (in-memory store)
    started here and torn down after."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    owns = not mpu.model_parallel_is_initialized()
    try:
        if owns:
            if dist.get_world_size() != 1:
                raise RuntimeError("the checkpoint tools build the model in one process; "
                                   "call them outside a multi-process job")
            mpu.initialize_model_parallel(tensor_model_parallel_size=1)
        elif mpu.get_tensor_model_parallel_world_size() != 1:
            raise RuntimeError("the checkpoint tools need tensor-parallel groups of size 1")
        yield
    finally:
        if owns and mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        if started:
            dist.destroy_process_group()


def _specs(cfg) -> list:
    from stable_megatron import compat
    from stable_megatron.model.gpt import layer_specs

    compat.apply_cpu_patches()
    return layer_specs(cfg, torch.device("cpu"))


def reference_config(cfg, tp: int):
    """`cfg` at TP=1, PP=1 with the vocabulary padded as at TP size `tp`: the model whose
    tensors are the merged ones of a checkpoint written at `tp`."""
    ref = copy.deepcopy(cfg)
    ref.model.vocab_pad_multiple = math.lcm(cfg.model.vocab_pad_multiple, tp)
    ref.parallel.tp, ref.parallel.pp = 1, 1
    return ref


@dataclass(frozen=True)
class RefTensor:
    shape: tuple[int, ...]
    kind: str  # "param" or "buffer"


def reference_tensors(cfg, tp: int = 1) -> dict[int, dict[str, RefTensor]]:
    """Per saved block index, the full shape and kind of every tensor of its `state_dict`, from
    the model of `cfg` built at TP=1 on the meta device with the vocabulary padded as at `tp`.
    Blocks DeepSpeed does not save (the tied output layer, a view of block 0) are left out."""
    from deepspeed.pipe import TiedLayerSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

    out: dict[int, dict[str, RefTensor]] = {}
    with single_process_tp_group():
        for index, spec in enumerate(_specs(reference_config(cfg, tp))):
            if isinstance(spec, TiedLayerSpec) and spec.forward_fn is not None:
                continue  # DeepSpeed saves only modules it calls directly
            for arg in (*spec.module_args, *spec.module_kwargs.values()):
                if isinstance(arg, TransformerConfig):
                    arg.perform_initialization = False  # meta tensors hold no values
            with torch.device("meta"):
                module = spec.build()
            params = {name for name, _ in module.named_parameters()}
            out[index] = {
                key: RefTensor(tuple(value.shape), "param" if key in params else "buffer")
                for key, value in module.state_dict().items()
                if torch.is_tensor(value) and not key.endswith(EXTRA_STATE)
            }
    return out


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
        is_split = getattr(param, "tensor_model_parallel", False)
        dim = getattr(param, "partition_dim", -1)
        stride = getattr(param, "partition_stride", 1)
        full = f"{prefix}{name}"
        if not is_split:
            kinds[full] = "replicated"
        elif (dim, stride) == (0, GLU_STRIDE):
            kinds[full] = "column_glu"
        elif stride != 1 or dim not in (0, 1):
            raise CheckpointError(
                f"{full}: split over tensor-parallel ranks along dim {dim} with stride {stride}; "
                f"reshaping supports contiguous splits along dim 0 or 1 and SwiGLU's stride 2 "
                f"along dim 0 only"
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
    costs nothing (sigma-reparam skips its start-up power iteration there). The CPU random
    state is left as it was."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        yield


@contextlib.contextmanager
def _tensor_parallel_groups(cfg):
    """`cfg` with parallel.tp matching megatron-core's TP groups: this process's groups when they
    exist (names and kinds do not depend on the TP size), else a one-process group."""
    from megatron.core import parallel_state as mpu

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

    key = json.dumps(cfg.to_dict()["model"], sort_keys=True)
    if key in _KINDS_CACHE:
        return dict(_KINDS_CACHE[key])
    kinds: dict[str, str] = {}
    with _tensor_parallel_groups(cfg) as local:
        for index, spec in enumerate(_specs(local)):
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
