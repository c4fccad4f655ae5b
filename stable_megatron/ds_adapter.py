"""The one module that reaches into DeepSpeed's internals (deepspeed 0.19.8).

Everything else in stable_megatron uses DeepSpeed's public API (`deepspeed.initialize`,
`train_batch`, `eval_batch`, `save_checkpoint`, `load_checkpoint`, `PipelineModule`). Where the
project needs more (a decision inside the optimizer step, safe checkpoint reads, the universal
checkpoint switch, the pipeline module's layer specs, ZeRO's gradient fragments), the access
lives here, each with a comment naming the DeepSpeed behaviour it relies on; the tests in
tests/unit/test_ds_adapter.py fail when one of those behaviours changes. A test scans the
package so that no other module touches a private DeepSpeed attribute.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------
# The optimizer step


class UpdateGate:
    """Calls `decide(grad_norm) -> bool` once per optimizer step of `engine`, after the
    gradients are reduced and before the update; True drops the update.

    DeepSpeed's ZeRO stage 1/2 optimizer (`DeepSpeedZeroOptimizer.step`, the only optimizer
    the pipeline engine allows) decides in two places whether a step's update is applied:
    - `check_overflow()`, run first when it checks the gradients for inf/NaN itself (fp16; bf16
      with `check_grad_overflow`, which we switch on). On an overflow it sets `overflow` and
      skips the norm, so the step is decided there, with an infinite grad norm;
    - `scaled_global_norm()`, the global gradient norm, identical on every rank; the step
      then reads `overflow` and, when set, skips the update and the LR-scheduler step and the
      engine counts `skipped_steps`.
    Both run on every rank with the gradients still in place and the weights not yet updated.
    Dropping an update sets `overflow`, so DeepSpeed skips it exactly as an overflowing one.
    Installed as instance attributes over the bound methods; `remove()` restores them.
    """

    def __init__(self, engine, decide) -> None:
        opt = engine.optimizer
        for name in ("check_overflow", "scaled_global_norm", "overflow"):
            if not hasattr(opt, name):
                raise RuntimeError(
                    f"DeepSpeed optimizer {type(opt).__name__} has no {name}: stable_megatron "
                    f"needs the ZeRO stage 1 optimizer (parallel.zero_stage=1)"
                )
        self.optimizer, self.decide, self.fired = opt, decide, False
        self._check_overflow, self._global_norm = opt.check_overflow, opt.scaled_global_norm
        opt.check_overflow = self._on_check_overflow
        opt.scaled_global_norm = self._on_global_norm

    def arm(self) -> None:
        """Before each `train_batch`: the next decision point is this step's."""
        self.fired = False

    def _fire(self, grad_norm: float) -> None:
        self.fired = True
        if self.decide(grad_norm):
            self.optimizer.overflow = True

    def _on_check_overflow(self, *args, **kwargs):
        result = self._check_overflow(*args, **kwargs)
        if self.optimizer.overflow and not self.fired:
            self._fire(float("inf"))
        return result

    def _on_global_norm(self, *args, **kwargs):
        norm = self._global_norm(*args, **kwargs)
        if not self.fired:
            self._fire(float(norm))
        return norm

    def remove(self) -> None:
        for name in ("check_overflow", "scaled_global_norm"):
            self.optimizer.__dict__.pop(name, None)


def step_loss_sum(engine) -> float:
    """The sum over this rank's micro-batches of the step's loss, before the update: the
    pipeline engine accumulates it in `total_loss` on the last stage during `train_batch`
    (`PipelineEngine._aggregate_total_loss` later averages it); 0 elsewhere or when unset."""
    if not engine.is_last_stage() or engine.total_loss is None:
        return 0.0
    return float(engine.total_loss.detach().float().sum())


def grad_fragment(param):
    """(kind, tensor) of this rank's gradient of `param` after the backward, before the update:
    ("fragment", this data-parallel rank's flat piece of the averaged gradient) under ZeRO 1/2,
    ("full", the whole gradient) for a plain `.grad`, or (None, None). Follows the order of
    `deepspeed.utils.safe_get_full_grad`: ZeRO's `_hp_grad`, `.grad`, ZeRO 3 (`ds_id`, the
    full gradient through a collective: every rank must call this), the `_hp_mapping` the ZeRO
    optimizer links to each parameter (`get_lp_grad_fragment(_index_in_param_group)`; the bf16
    optimizer's mapping returns the whole gradient, its own fragment being a slice of it)."""
    if getattr(param, "_hp_grad", None) is not None:
        return _zero_fragment(param)
    if param.grad is not None:
        return "full", param.grad
    if hasattr(param, "ds_id"):  # ZeRO stage 3 (not a supported config)
        from deepspeed.utils import safe_get_full_grad

        return "full", safe_get_full_grad(param)
    if hasattr(param, "_hp_mapping"):
        return _zero_fragment(param)
    return None, None


def _zero_fragment(param):
    mapping = param._hp_mapping
    if mapping is None:
        return None, None
    fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
    address = mapping.lp_fragment_address
    if fragment.numel() == param.numel():
        fragment = fragment.narrow(0, address.start, address.numel)
    return "fragment", fragment


def scale_master_weights(param, scale) -> bool:
    """Multiply this rank's entries of ZeRO's fp32 master copy of `param` by the matching
    entries of `scale` (param's shape), as the caller does to the module's weight: otherwise the
    next optimizer step would write the unscaled master weights back over the module's. Relies
    on: the ZeRO stage-1/2 (and bf16) optimizer linking each parameter to a `tensor_fragment`
    in `param._hp_mapping` (None where this data-parallel rank holds none of it) whose
    `hp_fragment` is a view of the fp32 partition holding the entries
    `lp_fragment_address.start ..` of the flattened parameter. False: no master copy (no ZeRO
    optimizer, or none of this parameter on this rank)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return False
    address = mapping.lp_fragment_address
    flat = scale.reshape(-1).narrow(0, address.start, address.numel)
    hp = mapping.hp_fragment  # on the host with ZeRO's CPU offload
    hp.mul_(flat.to(device=hp.device, dtype=hp.dtype))
    return True


def master_fragment(param):
    """(this rank's fp32 master entries of `param`, their offset in the flattened parameter),
    or None (see `scale_master_weights` for what this relies on)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.hp_fragment, mapping.lp_fragment_address.start


def base_optimizer(engine):
    """The optimizer DeepSpeed steps inside its ZeRO optimizer (the one passed to
    `deepspeed.initialize`); relies on `DeepSpeedZeroOptimizer.optimizer`."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def zero_flat_layouts(engine) -> dict:
    """id(this rank's flat fp32 partition of parameter group i) -> `muon.FlatLayout` of group
    i: its parameters in flat order with their offsets, the partition size and the
    data-parallel group. Relies on: the ZeRO stage-1/2 optimizer keeping, per group i, the
    parameters in their flat order in `round_robin_bit16_groups[i]` and their element offsets
    in `round_robin_bit16_offsets[i]` (each parameter padded to an alignment, the group to a
    multiple of the data-parallel size), `partition_size[i]`, the group `real_dp_process_group[i]`,
    and `single_partition_of_fp32_groups[i]`, the tensor the base optimizer steps: data-parallel
    rank r's elements [r * partition_size, (r + 1) * partition_size) of the flat group."""
    from stable_megatron.muon import FlatLayout

    opt = engine.optimizer
    for name in ("round_robin_bit16_groups", "round_robin_bit16_offsets", "partition_size",
                 "real_dp_process_group", "single_partition_of_fp32_groups"):
        if not hasattr(opt, name):
            raise RuntimeError(f"DeepSpeed optimizer {type(opt).__name__} has no {name}: "
                               f"train.optimizer=muon needs ZeRO stage 1 (parallel.zero_stage=1)")
    return {
        id(flat): FlatLayout(list(params), [int(o) for o in offsets], int(size), group)
        for flat, params, offsets, size, group in zip(
            opt.single_partition_of_fp32_groups, opt.round_robin_bit16_groups,
            opt.round_robin_bit16_offsets, opt.partition_size, opt.real_dp_process_group,
            strict=True)
    }


def disable_shm_comm() -> None:
    """Keep gloo's own all-reduce on CPU: DeepSpeed's shared-memory all-reduce op is compiled
    on first use; `deepspeed.ops.__compatible_ops__` is the table its comm layer consults."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False



# --------------------------------------------------------------------------------------------
# Checkpoints (save, load, reshape, export)


def checkpoint_pickle_classes() -> list:
    """The DeepSpeed classes pickled into its ZeRO optimizer files (plain data: attributes
    only), allowlisted for `torch.load(weights_only=True)`. Relies on: DeepSpeed 0.19 pickling
    `LossScaler`, `ZeroStageEnum` and `fragment_address` objects (and no other class) into
    `*optim_states.pt`; test_ds_adapter_checkpoint.py loads a real save with only these."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def route_checkpoint_reads(engine, load, save=None) -> None:
    """Make DeepSpeed read every checkpoint file through `load(path, map_location)` and, with
    `save`, write every one through `save(state_dict, path, zipfile_serialization)`. Relies on:
    the engine (and the pipeline module's layer files) reading and writing checkpoint files only
    through `engine.checkpoint_engine.load(path, map_location=...)` / `.save(state_dict, path)`,
    and that attribute being a plain `TorchCheckpointEngine` (no async or Nebula engine
    configured) whose state is its `__dict__`, with `zipfile_serialization` among it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load(path, map_location=map_location)

        def save(self, state_dict, path: str):
            if save is None:
                return super().save(state_dict, path)
            return save(state_dict, path, self.zipfile_serialization)

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}")
    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


UNIVERSAL_INFO_ATTR = "universal_checkpoint_info"


def set_universal_checkpoint_info(engine, info: dict) -> None:
    """Have DeepSpeed save `info` with every checkpoint. Relies on: `save_checkpoint` storing
    `engine.module.universal_checkpoint_info` (the name is
    `deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO`) in `mp_rank_*_model_states.pt`,
    and refusing that key in client state."""
    setattr(engine.module, UNIVERSAL_INFO_ATTR, info)


class universal_loading:  # noqa: N801 - used as a function: `with universal_loading(e):`
    """DeepSpeed's `checkpoint.load_universal` switched on for one `load_checkpoint` call.
    Relies on: the engine reading `engine._config.load_universal_checkpoint` at load time (not
    at initialisation), so that the run's later loads (rollbacks to checkpoints at this
    layout) take the ordinary path again."""

    def __init__(self, engine) -> None:
        self.config = engine._config
        if not hasattr(self.config, "load_universal_checkpoint"):
            raise RuntimeError("this DeepSpeed has no load_universal_checkpoint setting")

    def __enter__(self) -> None:
        self.saved = self.config.load_universal_checkpoint
        self.config.load_universal_checkpoint = True

    def __exit__(self, *exc) -> None:
        self.config.load_universal_checkpoint = self.saved


def stage_blocks(pipe) -> list:
    """(saved block index, module) of every module of this pipeline stage with a state dict,
    tied modules once, under the index of their first layer spec. Relies on: `PipelineModule`
    keeping its layer specs in `_layer_specs` (global order) and its first global index in
    `_local_start`, its built blocks in `forward_funcs` and tied modules in `tied_modules`, and
    saving `layer_XX-*` files under those indices (tied modules under their first spec's)."""
    from deepspeed.pipe import TiedLayerSpec
    from torch import nn

    first_index: dict = {}
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


def refresh_master_weights(engine) -> None:
    """ZeRO's fp32 master copy from the module's (just overwritten) weights. Relies on: the
    ZeRO stage-1/2 optimizer's `refresh_fp32_params()` copying the bit16 params into its fp32
    partitions."""
    engine.optimizer.refresh_fp32_params()
