"""Process groups, the device, and every collective the project issues.

One place decides the device (`select_device`) and the backend (NCCL with CUDA, gloo on CPU);
one place initialises torch.distributed, megatron-core's tensor-parallel groups and DeepSpeed's
pipeline topology, and checks that both agree on the rank layout. Model code (sigma-reparam's
power iteration) and metrics both reduce through the helpers here, so every group and every
reduction is visible in one file.

Rank layout (megatron-core's default order, which DeepSpeed's `PipeModelDataParallelTopology`
shares): tensor-parallel fastest, then data-parallel, then pipeline stages,
`rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def select_device(requested: str = "auto") -> torch.device:
    """The device of this process: the local GPU when CUDA exists (unless 'cpu' is asked)."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("parallel.device=cuda but CUDA is not available on this machine")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class Layout:
    """Sizes and this process's coordinates in the TP x DP x PP grid."""

    world: int
    tp: int
    pp: int
    dp: int
    rank: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @classmethod
    def of(cls, world: int, tp: int, pp: int, rank: int) -> Layout:
        return cls(world=world, tp=tp, pp=pp, dp=world // (tp * pp), rank=rank)


@dataclass
class ParallelState:
    layout: Layout
    device: torch.device
    topology: object  # deepspeed PipeModelDataParallelTopology

    @property
    def is_logging_rank(self) -> bool:
        return self.layout.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


_NO_LAUNCHER = "STABLE_MEGATRON_NO_LAUNCHER"


def _ensure_single_process_env() -> bool:
    """Let `python -m stable_megatron.train` run without a launcher (world size 1); True when
    there is no launcher (no MASTER_PORT given, world size 1). The mark left by an earlier
    training in this process never outweighs a launcher's world size: a child of this process
    that torchrun or deepspeed starts inherits the mark with a WORLD_SIZE of its own."""
    one = os.environ.get("WORLD_SIZE", "1") == "1"
    alone = one and (os.environ.get(_NO_LAUNCHER) == "1" or "MASTER_PORT" not in os.environ)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    if alone:  # remembered for later trainings in this process (MASTER_PORT is set now)
        os.environ[_NO_LAUNCHER] = "1"
    return alone


def initialize(tp: int, pp: int, device: str = "auto", timeout_minutes: float = 30
               ) -> ParallelState:
    """Start torch.distributed (through DeepSpeed), megatron-core's TP groups, and the topology."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as mpu

    from stable_megatron import compat, ds_adapter

    alone = _ensure_single_process_env()
    dev = select_device(device)
    if dev.type == "cpu":
        _share_cpu_threads()
        keep_cpu_memory()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        ds_adapter.disable_shm_comm()
        compat.apply_cpu_patches()
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if alone:
            # One process: an in-memory store, so that runs started side by side (a sweep's
            # jobs) never race for the same free TCP port; DeepSpeed adopts the group.
            dist.init_process_group(backend_for(dev), store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
        deepspeed.init_distributed(
            dist_backend=backend_for(dev),
            timeout=timeout,
            verbose=False,
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = Layout.of(world, tp, pp, rank)
    # megatron-core serves the tensor-parallel layers only; pipelining is DeepSpeed's, so its
    # own pipeline size stays 1 and its "data-parallel" groups are unused.
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    elif mpu.get_tensor_model_parallel_world_size() != tp:
        raise RuntimeError(
            f"tensor-parallel groups of size {mpu.get_tensor_model_parallel_world_size()} exist "
            f"already; call parallel.shutdown() before initialising tp={tp}"
        )
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=layout.dp)
    _check_layouts_agree(layout, topology)
    return ParallelState(layout=layout, device=dev, topology=topology)


def _share_cpu_threads() -> None:
    """Split the cores between the local processes unless OMP_NUM_THREADS says otherwise:
    the deepspeed launcher, unlike torchrun, leaves every process at all cores, and on CPU
    that oversubscription costs several times the step time."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_cpu_memory() -> bool:
    """Make glibc's malloc keep the memory a CPU training step frees, for the next step.

    By default glibc serves every allocation above 128 KiB - 32 MiB with a fresh mmap and
    returns it to the kernel on free, so each step's large temporaries (activations, gradients,
    ZeRO's flat gradient partition and the optimizer's work tensors) fault in and zero new
    pages again, step after step: 87,000 minor faults per step at the benchmark's medium shape,
    whose step took 3.76 s with glibc's defaults and 3.01 s with this (docs/performance.md).
    Here large blocks come from the heap (`M_MMAP_MAX` 0) and freed memory stays in the process
    (`M_TRIM_THRESHOLD` at its maximum); the resident set then stays at the run's peak instead
    of falling between steps.

    CPU only (on CUDA, torch's caching allocator already reuses device memory); idempotent;
    `STABLE_MEGATRON_MALLOC=default` leaves glibc's defaults (for comparisons); a C library
    other than glibc is left alone. Returns whether the settings were applied."""
    import ctypes
    import ctypes.util

    if os.environ.get("STABLE_MEGATRON_MALLOC", "keep") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: mallopt differs elsewhere
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _check_layouts_agree(layout: Layout, topology) -> None:
    from megatron.core import parallel_state as mpu

    coord = topology.get_coord(layout.rank)
    mine = (coord.pipe, coord.data, coord.model)
    expected = (layout.pp_rank, layout.dp_rank, layout.tp_rank)
    tp_ranks = dist.get_process_group_ranks(mpu.get_tensor_model_parallel_group())
    ds_tp_ranks = topology.get_axis_comm_lists("model")
    ds_group = next(g for g in ds_tp_ranks if layout.rank in g)
    if mine != expected or sorted(tp_ranks) != sorted(ds_group):
        raise RuntimeError(
            f"rank {layout.rank}: megatron-core and DeepSpeed disagree on the rank layout "
            f"(DeepSpeed pipe/data/model {mine}, expected {expected}; TP group {tp_ranks} vs "
            f"{ds_group})"
        )


def reset_groups() -> None:
    """End megatron-core's groups and our grid groups but keep torch.distributed, so that the
    next `initialize` may use another layout of the same processes."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    _GRID_GROUPS.clear()


def shutdown() -> None:
    """End megatron-core's groups and torch.distributed (gloo can abort at exit otherwise)."""
    if not dist.is_initialized():
        return
    reset_groups()
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Collectives


def tp_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_group()


def tp_rank() -> int:
    """This process's tensor-parallel rank (0 before the groups exist)."""
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_rank() if mpu.model_parallel_is_initialized() else 0


def all_reduce_(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce; a no-op without torch.distributed or on a group of one."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """`obj` of every rank, in rank order, on every rank (`[obj]` without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def tp_all_reduce_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over a tensor-parallel group (this rank's by default), through `all_reduce_`.

    NCCL takes CUDA tensors only: a CPU tensor (a layer initialised on the CPU with
    `use_cpu_initialization` on a GPU machine) goes through the current CUDA device and back.
    """
    group = tp_group() if group is None else group
    if (
        tensor.device.type == "cpu"
        and dist.is_initialized()
        and dist.get_world_size(group) > 1
        and dist.get_backend(group) == "nccl"
    ):
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        all_reduce_(staged, group=group)
        return tensor.copy_(staged)
    return all_reduce_(tensor, group=group)


class _TPReduceSum(torch.autograd.Function):
    """Forward: sum over the group; backward: identity (megatron-core's
    `reduce_from_tensor_model_parallel_region`). Right when the result feeds a computation
    that every rank of the group repeats identically, so each rank's incoming gradient is
    already the full one."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        return tp_all_reduce_(tensor.clone(), group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def tp_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Autograd-aware sum over a tensor-parallel group (forward all-reduce, backward identity);
    issues one `all_reduce_`."""
    return _TPReduceSum.apply(tensor, tp_group() if group is None else group)


# --------------------------------------------------------------------------------------------
# Groups of the TP x DP x PP grid beyond megatron-core's (metrics reductions)
#
# megatron-core's parallel state sees one pipeline stage (pipelining is DeepSpeed's), so its
# data-parallel groups span the pipeline stages too; the groups below come from DeepSpeed's
# topology instead.


@dataclass(frozen=True)
class GridGroups:
    stage: object  # the ranks of this rank's pipeline stage (its TP x DP slice); None: world
    pipe: object  # the ranks with this rank's TP and DP coordinates, one per stage; None: pp=1
    pipe_ranks: tuple[int, ...]


_GRID_GROUPS: dict[tuple, GridGroups] = {}


def grid_groups(state: ParallelState) -> GridGroups:
    """This rank's stage and pipe groups, created on first use. Every rank must make the first
    call for a layout at the same point (torch.distributed creates groups collectively)."""
    layout, topo = state.layout, state.topology
    key = (id(dist.group.WORLD) if dist.is_initialized() else None, layout.tp, layout.pp,
           layout.dp)
    if key in _GRID_GROUPS:
        return _GRID_GROUPS[key]
    pipe_lists = [tuple(ranks) for ranks in topo.get_axis_comm_lists("pipe")] or [(layout.rank,)]
    pipe_ranks = next(r for r in pipe_lists if layout.rank in r)
    stage = pipe = None
    if layout.pp > 1:
        for p in range(layout.pp):  # every rank creates every group, in the same order
            group = dist.new_group(sorted(topo.filter_match(pipe=p)))
            if p == layout.pp_rank:
                stage = group
        for ranks in pipe_lists:
            group = dist.new_group(list(ranks))
            if ranks == pipe_ranks:
                pipe = group
    groups = GridGroups(stage=stage, pipe=pipe, pipe_ranks=pipe_ranks)
    _GRID_GROUPS[key] = groups
    return groups


def gather_objects(obj, group, ranks: tuple[int, ...]) -> list | None:
    """`obj` of every rank in `group` (whose members are `ranks`), on the first of `ranks`;
    None on the others. Without a group (a single member) this is `[obj]`."""
    if group is None or len(ranks) == 1:
        return [obj]
    dst = ranks[0]
    out = [None] * len(ranks) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out
