"""The one module that reaches into DeepSpeed's internals (deepspeed 0.19.8).

Everything else in stable_megatron uses DeepSpeed's public API (`train_batch`, `eval_batch`,
`save_checkpoint`, `load_checkpoint`, `PipelineModule`). Where the project needs more (the
engine at pipeline size 1 with the pipeline engine's interface, a decision inside each ZeRO
stage's optimizer step, safe checkpoint reads, the universal checkpoint switch, the pipeline
module's layer specs, ZeRO's gradient fragments and master weights, ZeRO-3's gathered
weights), the access lives here, each with a comment naming the DeepSpeed behaviour it relies
on; the tests in tests/unit/test_ds_adapter.py fail when one of those behaviours changes. A
test scans the package so that no other module touches a private DeepSpeed attribute.
"""

from __future__ import annotations

import contextlib

# --------------------------------------------------------------------------------------------
# The optimizer step


class UpdateGate:
    """Calls `decide(grad_norm) -> bool` once per optimizer step of `engine`, after the
    gradients are reduced and before the update; True drops the update.

    ZeRO stage 3 decides at `_get_norm_groups()` (see `__init__`); stage 0 at the same two
    points as stages 1-2, which `StageZeroOptimizer` provides.

    DeepSpeed's ZeRO stage 1/2 optimizer (`DeepSpeedZeroOptimizer.step`) decides in two
    places whether a step's update is applied:
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
        self.optimizer, self.decide, self.fired = opt, decide, False
        if _is_stage3(opt):
            # ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3.step`) sums the groups' norms from
            # `_get_norm_groups()` and drops the update when `overflow` is set after it (or
            # the norm is not finite), with no fp32/bf16 overflow check before
            self._norm_groups = opt._get_norm_groups
            opt._get_norm_groups = self._on_norm_groups
            self._patched = ("_get_norm_groups",)
            return
        for name in ("check_overflow", "scaled_global_norm", "overflow"):
            if not hasattr(opt, name):
                raise RuntimeError(
                    f"DeepSpeed optimizer {type(opt).__name__} has no {name}: stable_megatron "
                    f"needs a ZeRO optimizer or stage 0's StageZeroOptimizer"
                )
        self._check_overflow, self._global_norm = opt.check_overflow, opt.scaled_global_norm
        opt.check_overflow = self._on_check_overflow
        opt.scaled_global_norm = self._on_global_norm
        self._patched = ("check_overflow", "scaled_global_norm")

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

    def _on_norm_groups(self, *args, **kwargs):
        import math

        groups = self._norm_groups(*args, **kwargs)
        if not self.fired:
            norm = math.sqrt(sum(float(n) ** 2 for n in groups))
            self._fire(norm if math.isfinite(norm) else float("inf"))
        return groups

    def remove(self) -> None:
        for name in self._patched:
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
    ("fragment", this data-parallel rank's flat piece of the averaged gradient) under ZeRO 1, 2
    and 3, ("full", the whole gradient) for a plain `.grad`, or (None, None). No collective.
    ZeRO 3 first (`ds_id`: the entries of this rank's gradient partition,
    `safe_get_local_grad`, less the last partition's padding), then the order of
    `deepspeed.utils.safe_get_full_grad`: ZeRO's `_hp_grad`, `.grad`, the `_hp_mapping` the
    ZeRO optimizer links to each parameter (`get_lp_grad_fragment(_index_in_param_group)`; the
    bf16 optimizer's mapping returns the whole gradient, its own fragment being a slice of it)."""
    if hasattr(param, "ds_id"):  # ZeRO stage 3
        from deepspeed.utils import safe_get_local_grad

        grad = safe_get_local_grad(param)
        return (None, None) if grad is None else ("fragment", _unpadded(param, grad))
    if getattr(param, "_hp_grad", None) is not None:
        return _zero_fragment(param)
    if param.grad is not None:
        return "full", param.grad
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
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the parameter
        found = _stage3_master(param)
        if found is None:
            return False
        local, start = found
        flat = scale.reshape(-1).narrow(0, start, local.numel())
        local.mul_(flat.to(device=local.device, dtype=local.dtype))
        return True
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return False
    address = mapping.lp_fragment_address
    flat = scale.reshape(-1).narrow(0, address.start, address.numel)
    hp = mapping.hp_fragment  # on the host with ZeRO's CPU offload
    hp.mul_(flat.to(device=hp.device, dtype=hp.dtype))
    return True


def _stage3_span(param) -> tuple[int, int]:
    """(offset in the flattened parameter, count) of the entries of ZeRO-3 parameter `param`
    this rank holds (count 0: none). Relies on: ZeRO-3 partitioning each parameter over its
    `ds_process_group` in rank order, `partition_numel()` elements each, the last padded."""
    import torch.distributed as dist

    per_rank = param.partition_numel()
    start = dist.get_rank(param.ds_process_group) * per_rank
    return start, max(0, min(per_rank, param.ds_numel - start))


def _unpadded(param, partition):
    """A flat view of the entries of `partition` (this rank's partition of ZeRO-3 parameter
    `param`, or of its gradient or master copy) that hold entries of `param`: the last rank's
    padding left out (possibly empty)."""
    _, count = _stage3_span(param)
    return partition.reshape(-1).narrow(0, 0, count)


def local_weights(param):
    """This rank's entries of `param` as the forward uses them: the parameter itself, or under
    ZeRO-3 (`partitioned`) a flat view of its partition, the padding left out (possibly empty).
    ZeRO-3's partitions over the data-parallel ranks are disjoint and make up the whole."""
    return _unpadded(param, param.ds_tensor) if partitioned(param) else param


def _stage3_master(param):
    """(the fp32 master entries of `param` this rank holds under ZeRO-3, a view; their offset
    in the flattened parameter) or None. Relies on `_stage3_span`'s layout and the optimizer's
    `get_local_fp32_param(param)` (behind `safe_get_local_fp32_param`) being a view of its fp32
    partition of that parameter."""
    optimizer = getattr(param, "_z3_optimizer", None)
    if optimizer is None:
        return None
    start, count = _stage3_span(param)
    if count == 0:
        return None
    local = _unpadded(param, optimizer.get_local_fp32_param(param))
    return local, start


def master_fragment(param):
    """(this rank's fp32 master entries of `param`, their offset in the flattened parameter),
    or None (see `scale_master_weights` for what this relies on)."""
    if hasattr(param, "ds_id"):
        return _stage3_master(param)
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.hp_fragment, mapping.lp_fragment_address.start


def base_optimizer(engine):
    """The optimizer DeepSpeed steps inside its ZeRO optimizer (the one passed to
    `deepspeed.initialize`); relies on the ZeRO optimizers (and stage 0's
    `StageZeroOptimizer`) keeping it in `.optimizer`."""
    return base_optimizer_of(engine.optimizer)


def base_optimizer_of(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


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
    layout) take the ordinary path again.

    Under ZeRO-3, DeepSpeed's universal loader
    (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`) gives every parameter group the
    saved *first* group's hyperparameters (so the weight decay of the matrices reached the
    norms and biases): the groups' own hyperparameters are put back after the load. Their
    `lr` is then the fresh engine's; the caller sets it from the restored LR schedule. The same
    loader also gives every group's state one shared `step` tensor, which torch's fused AdamW
    then increments once per group and step (the second group's bias correction ran a step
    ahead): each group gets its own copy."""

    def __init__(self, engine) -> None:
        self.config, self.optimizer = engine._config, engine.optimizer
        if not hasattr(self.config, "load_universal_checkpoint"):
            raise RuntimeError("this DeepSpeed has no load_universal_checkpoint setting")

    def __enter__(self) -> None:
        self.saved = self.config.load_universal_checkpoint
        self.config.load_universal_checkpoint = True
        self.groups = [{k: v for k, v in g.items() if k != "params"}
                       for g in self.optimizer.param_groups]

    def __exit__(self, *exc) -> None:
        self.config.load_universal_checkpoint = self.saved
        if _is_stage3(self.optimizer):
            import torch

            for group, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
                group.update(saved)
            for state in base_optimizer_of(self.optimizer).state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()


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
    ZeRO optimizers' `refresh_fp32_params()` (stages 1-3) copying the bit16 parameters (stage
    3: this rank's partitions) into their fp32 partitions. Stage 0 has no copy."""
    opt = engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()


# --------------------------------------------------------------------------------------------
# The engine at pipeline size 1


def initialize(model, optimizer, lr_scheduler, config: dict):
    """`deepspeed.initialize` for our `PipelineModule`: DeepSpeed's `PipelineEngine` when the
    model has several stages, else a `DataParallelEngine` (DeepSpeed's plain engine, so ZeRO
    stages 0-3 are open). Relies on: `deepspeed.initialize` choosing the engine class by
    `isinstance(model, PipelineModule)` only, after `shutdown_init_context()`, building a
    `DeepSpeedConfig(config, mpu)` and `set_optimizer_flags`, and constructing the engine with
    those keywords; the pipeline module's `mpu()` (its grid) serving as the model-parallel unit
    at one stage as it does at several."""
    import deepspeed

    if model.num_stages > 1:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=lr_scheduler, config=config)
        return engine
    from deepspeed import zero
    from deepspeed.runtime.config import DeepSpeedConfig

    mpu = model.mpu()
    zero.partition_parameters.shutdown_init_context()
    try:
        config_class = DeepSpeedConfig(config, mpu)
        deepspeed.set_optimizer_flags(config_class, model)
        with _stage3_master_shares_fp32_weights():
            engine = _data_parallel_engine_class()(
                args=None, model=model, optimizer=optimizer, model_parameters=None,
                training_data=None, lr_scheduler=lr_scheduler, mpu=mpu,
                dist_init_required=None, collate_fn=None, config=config,
                config_class=config_class)
    finally:
        zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine


@contextlib.contextmanager
def _stage3_master_shares_fp32_weights():
    """While the engine is built: ZeRO-3 with fp32 weights uses its partition of the weights as
    its fp32 master partition instead of a second copy of it (4 bytes a parameter / dp).
    DeepSpeed 0.19.8's `_create_fp32_partitions` has that branch (taken when the weights'
    partition already has the master dtype and device), but compares `tensor.device` with the
    device *name* (`current_device_name()`, a str), which torch never finds equal, so the
    branch is never taken and the copy is made. Here the name is a `torch.device` while that
    method runs (and only then); the optimizer then steps the weights' partition in place and
    its copy back to them is a no-op. bf16 weights (a bf16 partition, an fp32 master) and
    optimizer offload (another device) do not meet the branch's condition and are unchanged.
    Checked by test_ds_adapter's stage-3 memory test and by every ZeRO-3 parity test."""
    import torch
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions

    def create_fp32_partitions(self):
        name = self.device
        if isinstance(name, str) and not self.offload_optimizer:
            self.device = torch.device(name)
        try:
            return original(self)
        finally:
            self.device = name

    Stage3._create_fp32_partitions = create_fp32_partitions
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = original


_ENGINE_CLASS = None


def _data_parallel_engine_class():
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        _ENGINE_CLASS = _make_data_parallel_engine_class()
    return _ENGINE_CLASS


def _make_data_parallel_engine_class():
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    class DataParallelEngine(DeepSpeedEngine):
        """DeepSpeed's plain engine over a one-stage `PipelineModule`, with the pipeline
        engine's interface (`train_batch`, `eval_batch`, `is_last_stage`, `total_loss`) and its
        checkpoint layout (one file per block and TP rank), so that the loop, the hooks and
        the checkpoint code are the same over either engine."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            # read by PipelineModule.save_state_dict; the pipeline engine sets it likewise
            self.module.checkpoint_parallel_write_pipeline = \
                self._config.checkpoint_parallel_write_pipeline
            if self.dp_world_size == 1 and not self.zero_optimization():
                # one data-parallel rank, no ZeRO: `backward` would still copy every gradient
                # into flat buckets, "all-reduce" them over one rank and copy them back
                self.enable_backward_allreduce = False

        def is_first_stage(self) -> bool:
            return True

        def is_last_stage(self) -> bool:
            return True

        def _micro_batches(self, data_iter, count):
            for _ in range(count):
                yield next(data_iter)

        def train_batch(self, data_iter):
            """One optimizer step over `gradient_accumulation_steps()` micro-batches from
            `data_iter` ((tokens, labels) pairs); the loss averaged over them and over the
            data-parallel ranks, as the pipeline engine returns it. `total_loss` holds this
            rank's sum while the optimizer step runs."""
            self.module.train()
            self.total_loss = None
            for tokens, labels in self._micro_batches(iter(data_iter),
                                                      self.gradient_accumulation_steps()):
                loss = self.module.loss_fn(self(tokens), labels)
                self.backward(loss)
                detached = loss.detach().clone()
                self.total_loss = detached if self.total_loss is None \
                    else self.total_loss + detached
                self.step()
            return self._dp_mean(self.total_loss / self.gradient_accumulation_steps())

        def eval_batch(self, data_iter):
            self.module.eval()
            losses = []
            with torch.no_grad():
                for tokens, labels in self._micro_batches(iter(data_iter),
                                                          self.gradient_accumulation_steps()):
                    losses.append(self.module.loss_fn(self(tokens), labels).detach())
            self.module.train()
            return self._dp_mean(sum(losses) / len(losses))

        def _dp_mean(self, value):
            value = value.clone()
            if self.dp_world_size > 1:
                torch.distributed.all_reduce(value, group=self.mpu.get_data_parallel_group())
                value /= self.dp_world_size
            return value

        def module_state_dict(self, exclude_frozen_parameters=False):
            """Saved as the pipeline engine saves it: a file per block (`layer_XX-...`); under
            ZeRO-3 each block gathered whole in turn, never the whole model."""
            if not self._partitioned():
                self.module.save_state_dict(self._curr_ckpt_path,
                                            checkpoint_engine=self.checkpoint_engine,
                                            exclude_frozen_params=exclude_frozen_parameters)
            else:
                self._save_blocks_one_at_a_time(exclude_frozen_parameters)
            return None

        def _partitioned(self) -> bool:
            """Whether ZeRO-3 holds the model's weights partitioned."""
            return any(partitioned(p) for p in self.module.parameters())

        def _save_blocks_one_at_a_time(self, exclude_frozen: bool) -> None:
            """`PipelineModule.save_state_dict` under ZeRO-3: every rank takes part in each
            block's gather, the ranks that write the block save it, each from a clone (the
            gathered weights are released when the gather ends). Relies on: the pipeline
            module's layer-file naming (`ckpt_layer_path`), its grid's data-parallel id and
            size, and its split of the blocks over the data-parallel ranks with
            `checkpoint_parallel_write_pipeline` (`partition_uniform`), as in that method."""
            from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
            from deepspeed.runtime.utils import partition_uniform

            pipe, writer = self.module, self.checkpoint_engine
            layers, grid = pipe.forward_funcs, pipe._grid
            if pipe.checkpoint_parallel_write_pipeline:
                bounds = partition_uniform(len(layers), grid.data_parallel_size)
                mine = range(bounds[grid.data_parallel_id], bounds[grid.data_parallel_id + 1])
            else:
                mine = range(len(layers)) if grid.data_parallel_id == 0 else range(0)
            writer.makedirs(self._curr_ckpt_path, exist_ok=True)
            for idx, layer in enumerate(layers):
                if not hasattr(layer, "state_dict"):
                    continue
                with gathered(layer.parameters()):
                    if idx not in mine:
                        continue
                    state = layer.state_dict()
                    if exclude_frozen:
                        for name in pipe._get_frozen_parameter_names(layer):
                            del state[name]
                    writer.save(state_dict=clone_tensors_for_torch_save(state),
                                path=pipe.ckpt_layer_path(self._curr_ckpt_path, idx))

        def load_module_state_dict(self, checkpoint, strict=True, custom_load_fn=None,
                                   fetch_z3_params=False, z3_params_to_fetch=None,
                                   allowed_missing_keys=None):
            state = checkpoint["module"]
            if state is not None and not isinstance(state, str):  # universal checkpoints
                return super().load_module_state_dict(
                    checkpoint, strict, custom_load_fn=custom_load_fn,
                    fetch_z3_params=fetch_z3_params, z3_params_to_fetch=z3_params_to_fetch,
                    allowed_missing_keys=allowed_missing_keys)
            if not self._partitioned():
                self.module.load_state_dir(load_dir=self._curr_ckpt_path, strict=strict,
                                           checkpoint_engine=self.checkpoint_engine)
            else:
                self._load_blocks_one_at_a_time(strict)
            return None

        def _load_blocks_one_at_a_time(self, strict: bool) -> None:
            """`PipelineModule.load_state_dir` under ZeRO-3: each block's files read, then the
            block gathered whole, loaded and re-partitioned, in turn. Relies on: the layer
            files of a block (`ckpt_layer_path_list`), DeepSpeed's state-dict loader picking
            this TP rank's (`SDLoaderFactory`, version 2.0, as in that method) and the tied
            weights synchronised after (`_synchronize_tied_weights`)."""
            from deepspeed.runtime.state_dict_factory import SDLoaderFactory

            pipe, reader = self.module, self.checkpoint_engine
            grid = pipe._grid
            for idx, layer in enumerate(pipe.forward_funcs):
                if not hasattr(layer, "load_state_dict"):
                    continue
                files = pipe.ckpt_layer_path_list(self._curr_ckpt_path, idx)
                loader = SDLoaderFactory.get_sd_loader(files, version=2.0,
                                                       checkpoint_engine=reader)
                _, state, _ = loader.load(grid.get_slice_parallel_world_size(),
                                          grid.get_slice_parallel_rank(), module_key=None,
                                          is_pipe_parallel=True)
                with gathered(layer.parameters(), modify=True):
                    layer.load_state_dict(state, strict=strict)
            pipe._synchronize_tied_weights()

    return DataParallelEngine


def _is_stage3(optimizer) -> bool:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3)


def partitioned_build(enabled: bool):
    """The context a model is built in. Enabled (ZeRO-3): DeepSpeed's `zero.Init`, which splits
    each module's parameters over the data-parallel group (megatron-core's, which at pipeline
    size 1, the only size ZeRO-3 runs at, holds the ranks of DeepSpeed's) as soon as that
    module's constructor returns, so no rank holds the whole model; a constructor still sees its
    own parameters whole (megatron-core's initialisation, sigma-reparam's first power
    iteration). Built in fp32 whatever `train.precision`: zero.Init would otherwise turn every
    floating tensor a constructor makes, fp32 buffers included, into the configured dtype;
    `cast_partitions` casts the weights afterwards, as DeepSpeed casts a model it is given
    whole. `memory_efficient_linear` off: it swaps `torch.nn.functional.linear` for
    DeepSpeed's own and leaves it swapped. Disabled: a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    import torch
    from deepspeed import zero
    from megatron.core import parallel_state

    # what zero.Init reads of a config: the engine's persistence threshold (0: every weight
    # split), no linear swap, and the dtype: fp32, as neither bf16 nor fp16 is enabled (its
    # `dtype` argument is not used for that: DeepSpeed 0.19.8 ignores it where the accelerator
    # has no fp16, as the CPU's has not, and builds in bf16); a batch size only because
    # DeepSpeedConfig requires one
    config = {"train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "memory_efficient_linear": False}}
    built = zero.Init(data_parallel_group=parallel_state.get_data_parallel_group(),
                      config_dict_or_path=config)
    if built.dtype != torch.float32:
        raise RuntimeError(f"DeepSpeed's zero.Init would build the model in {built.dtype}, "
                           f"not fp32: read ds_adapter.partitioned_build")
    return built


def cast_partitions(model, dtype) -> None:
    """Every ZeRO-3 parameter of `model` (its partition, and its empty placeholder) to `dtype`;
    buffers are left as they are. Relies on: ZeRO-3 keeping this rank's partition in
    `param.ds_tensor` and the engine reading the parameter's dtype from it."""
    for param in model.parameters():
        if partitioned(param):
            param.ds_tensor.data = param.ds_tensor.data.to(dtype)
            param.data = param.data.to(dtype)


def full_shape(param) -> tuple:
    """The shape of `param` whole (ZeRO-3 keeps it in `ds_shape`; its placeholder is empty)."""
    return tuple(param.ds_shape) if partitioned(param) else tuple(param.shape)


def full_numel(param) -> int:
    return param.ds_numel if partitioned(param) else param.numel()


def partitioned(param) -> bool:
    """Whether ZeRO-3 holds `param` partitioned (outside a forward, an empty placeholder)."""
    return hasattr(param, "ds_id")


def gathered(params, modify: bool = False):
    """A context in which every ZeRO-3 parameter among `params` is whole on every rank (a
    collective: every data-parallel rank enters it with the same parameters); with `modify`,
    the changes made inside are kept (each rank makes the same ones, rank 0's are
    re-partitioned). Other parameters are left as they are: a no-op below stage 3. Uses
    DeepSpeed's public `zero.GatheredParameters`."""
    params = [p for p in params if partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    from deepspeed import zero

    return zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def _make_stage_zero_optimizer_class():
    import math

    import torch
    import torch.distributed as dist

    class StageZeroOptimizer(torch.optim.Optimizer):
        """ZeRO stage 0: DeepSpeed then steps the optimizer it is given with no decision point
        between the reduced gradients and the update and no global norm kept (its fp32 path
        clips through `clip_fp32_gradients` and drops the norm). This wrapper is stepped in
        its place and gives stage 0 what the ZeRO optimizers have: `scaled_global_norm()` (the
        gradients' global L2 norm, a TP all-reduce; the gradients are whole and data-parallel
        averaged by then; not finite: the step is an overflow), `overflow`
        (which DeepSpeed's engine reads to skip the LR step and count `skipped_steps`),
        `_global_grad_norm` (`engine.get_global_grad_norm()`) and the clipping (DeepSpeed's
        own is switched off: `gradient_clipping` 0 in its config). Parameter groups and state
        are the wrapped optimizer's own objects, so the LR scheduler and checkpoints see it."""

        def __init__(self, inner: torch.optim.Optimizer, clip: float, tp_group) -> None:
            self.optimizer, self.clip, self.tp_group = inner, clip, tp_group
            super().__init__(inner.param_groups, inner.defaults)
            self.param_groups, self.state = inner.param_groups, inner.state
            self.overflow, self._global_grad_norm = False, None

        def _grads(self) -> list:
            return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

        def check_overflow(self) -> bool:
            """Stages 1-2 call this for bf16/fp16 only; stage 0 is fp32, where (as there) a
            non-finite global norm is the overflow."""
            return self.overflow

        def scaled_global_norm(self) -> float:
            """The L2 norm of all gradients, TP-replicated ones counted by TP rank 0 only:
            torch's foreach norm per rank, the squares summed in fp64 over the TP group."""
            from megatron.core import parallel_state as mpu

            first = mpu.get_tensor_model_parallel_rank() == 0
            grads = [p.grad for g in self.param_groups for p in g["params"]
                     if p.grad is not None and (first or getattr(p, "tensor_model_parallel",
                                                                 False))]
            local = (torch.nn.utils.get_total_norm(grads).double() if grads
                     else torch.zeros((), dtype=torch.float64, device=self._device()))
            total = local.square().reshape(1)
            dist.all_reduce(total, group=self.tp_group)
            return math.sqrt(float(total))

        def _device(self):
            return self.param_groups[0]["params"][0].device

        @torch.no_grad()
        def step(self, closure=None):
            self.overflow = False
            self._global_grad_norm = float("inf")
            norm = self.scaled_global_norm()
            if not math.isfinite(norm):
                self.overflow = True
            if self.overflow:  # non-finite, or dropped (stable_megatron's UpdateGate)
                return None
            self._global_grad_norm = norm
            if self.clip > 0:  # as ZeRO clips: by (norm + 1e-6) / clip when that exceeds 1
                torch.nn.utils.clip_grads_with_norm_(
                    [p for g in self.param_groups for p in g["params"]], self.clip,
                    torch.tensor(norm))
            return self.optimizer.step(closure)

        def zero_grad(self, set_to_none: bool = True) -> None:
            self.optimizer.zero_grad(set_to_none=set_to_none)

        def state_dict(self):
            return self.optimizer.state_dict()

        def load_state_dict(self, state_dict) -> None:
            self.optimizer.load_state_dict(state_dict)
            self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state

    return StageZeroOptimizer


_STAGE_ZERO_CLASS = None


def stage_zero_optimizer(inner, clip: float, tp_group):
    """`inner` wrapped for ZeRO stage 0 (`StageZeroOptimizer`, above)."""
    global _STAGE_ZERO_CLASS
    if _STAGE_ZERO_CLASS is None:
        _STAGE_ZERO_CLASS = _make_stage_zero_optimizer_class()
    return _STAGE_ZERO_CLASS(inner, clip, tp_group)
