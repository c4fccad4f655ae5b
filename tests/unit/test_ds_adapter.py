"""The DeepSpeed behaviours `stable_megatron.ds_adapter`'s step section relies on, checked on a
real engine (one process, fp32; ZeRO 1, and the gate also at stages 0 and 3, whose decision
points differ): each test fails if DeepSpeed changes what the adapter assumes. The checkpoint
section has its own tests (test_ds_adapter_checkpoint.py)."""

from __future__ import annotations

import pytest
import torch

from stable_megatron.config import config_from_dict, validate

pytestmark = pytest.mark.filterwarnings("ignore:.*tp_group is None:DeprecationWarning")


@pytest.fixture(scope="module")
def state(one_process):
    return one_process


def make_engine(state, accum: int = 2, zero: int = 1, model: dict | None = None):
    from stable_megatron.train import build_engine

    cfg = config_from_dict({
        "data": {"vocab_size": 128},
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "seq_length": 16, **(model or {})},
        "train": {"micro_batch_size": 2, "global_batch_size": 2 * accum, "warmup_steps": 0,
                  "lr": 1e-2},
        "parallel": {"zero_stage": zero},
    })
    validate(cfg, 1)
    return cfg, build_engine(cfg, state)


def batches(cfg, engine, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(engine.gradient_accumulation_steps()):
        rows = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length + 1),
                             generator=generator)
        out.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    return iter(out)


def weights(engine):
    from stable_megatron.ds_adapter import gathered

    with gathered(engine.module.parameters()):  # whole under ZeRO-3
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


STAGES = [0, 1, 3]  # stage 2 decides where stage 1 does (the same optimizer class)


@pytest.mark.parametrize("zero", STAGES)
def test_gate_decides_once_per_step_with_the_engines_grad_norm(state, zero):
    """Each stage's `step()` reaches the gate's decision point once, before the update (ZeRO-1
    and stage 0's `StageZeroOptimizer` at `scaled_global_norm()`, ZeRO-3 at
    `_get_norm_groups()`), with the norm the engine reports afterwards."""
    from stable_megatron.ds_adapter import UpdateGate

    cfg, engine = make_engine(state, zero=zero)
    seen = []
    before = {}

    def decide(grad_norm):
        seen.append(grad_norm)
        before.update(weights(engine))  # the weights are not updated yet
        return False

    gate = UpdateGate(engine, decide)
    start = weights(engine)
    for step in range(2):
        gate.arm()
        engine.train_batch(batches(cfg, engine, seed=step))
        assert gate.fired and len(seen) == step + 1
        assert seen[-1] == pytest.approx(float(engine.get_global_grad_norm()), rel=1e-6)
        if step == 0:
            assert all(torch.equal(before[n], start[n]) for n in start)
    assert engine.skipped_steps == 0
    gate.remove()
    assert not {"check_overflow", "scaled_global_norm", "_get_norm_groups"} & set(
        engine.optimizer.__dict__)


@pytest.mark.parametrize("zero", STAGES)
def test_dropping_an_update_skips_it_like_an_overflow(state, zero):
    """Setting the optimizer's `overflow` at the norm makes DeepSpeed skip the update and the
    LR-scheduler step and count `skipped_steps`."""
    from stable_megatron.ds_adapter import UpdateGate

    cfg, engine = make_engine(state, zero=zero)
    gate = UpdateGate(engine, lambda grad_norm: True)
    start, lr_step = weights(engine), engine.lr_scheduler.last_epoch
    gate.arm()
    engine.train_batch(batches(cfg, engine))
    assert engine.skipped_steps == 1 and engine.lr_scheduler.last_epoch == lr_step
    assert all(torch.equal(p, start[n]) for n, p in weights(engine).items())
    gate.remove()
    engine.train_batch(batches(cfg, engine, seed=1))  # no gate: the update is applied
    assert engine.skipped_steps == 1
    assert any(not torch.equal(p, start[n]) for n, p in weights(engine).items())


@pytest.mark.parametrize("zero", STAGES)
def test_step_loss_sum_is_the_micro_batch_losses_before_the_update(state, zero):
    """`total_loss` holds the sum of the step's micro-batch losses when the optimizer runs;
    `train_batch` returns their mean."""
    from stable_megatron.ds_adapter import UpdateGate, step_loss_sum

    cfg, engine = make_engine(state, accum=3, zero=zero)
    sums = []
    gate = UpdateGate(engine, lambda grad_norm: sums.append(step_loss_sum(engine)) or False)
    gate.arm()
    loss = engine.train_batch(batches(cfg, engine))
    gate.remove()
    assert sums[0] == pytest.approx(3 * loss.item(), rel=1e-6)


@pytest.mark.parametrize("zero", [1, 3])
def test_grad_fragments_make_up_the_full_gradient(state, zero):
    """Under ZeRO 1 and 3 each parameter's gradient is reachable as this rank's fragment (one
    rank: the whole gradient), equal to `safe_get_full_grad`'s."""
    from deepspeed.utils import safe_get_full_grad

    from stable_megatron.ds_adapter import UpdateGate, grad_fragment

    cfg, engine = make_engine(state, zero=zero)
    got = {}

    def decide(grad_norm):
        for name, param in engine.module.named_parameters():
            kind, grad = grad_fragment(param)
            full = safe_get_full_grad(param)
            got[name] = (kind, grad.double().square().sum().item(),
                         full.double().square().sum().item())
        return False

    gate = UpdateGate(engine, decide)
    gate.arm()
    engine.train_batch(batches(cfg, engine))
    gate.remove()
    assert got and all(kind == "fragment" for kind, _, _ in got.values())
    for name, (_, mine, full) in got.items():
        assert mine == pytest.approx(full, rel=1e-9), name


def test_engine_at_pipeline_size_1_and_no_gradient_copies_at_stage_0(state):
    """At pp=1 every stage runs DeepSpeed's plain engine with the pipeline engine's interface;
    at stage 0 with one data-parallel rank its backward does not all-reduce (a flatten, a
    one-rank all-reduce and a copy back of every gradient), at stage 1 ZeRO reduces."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine

    for zero in (0, 1, 2, 3):
        cfg, engine = make_engine(state, zero=zero)
        assert isinstance(engine, DeepSpeedEngine) and not isinstance(engine, PipelineEngine)
        assert engine.is_first_stage() and engine.is_last_stage()
        calls = []

        def counted(*args, original=engine.allreduce_gradients, calls=calls, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        engine.allreduce_gradients = counted
        engine.train_batch(batches(cfg, engine))
        assert (len(calls) > 0) == (zero > 0), zero


def test_zero3_in_fp32_steps_the_weights_partition_as_its_master_copy(state):
    """ZeRO-3 with fp32 weights keeps no second fp32 copy of them
    (`ds_adapter._stage3_master_shares_fp32_weights`): each fp32 master partition the optimizer
    steps is the weights' partition itself, so a step moves both, and the master entries
    `_stage3_master` reads are the partition's."""
    from stable_megatron import ds_adapter

    cfg, engine = make_engine(state, zero=3)
    opt = engine.optimizer
    for master, weights_part in zip(opt.fp32_partitioned_groups_flat,
                                    opt.fp16_partitioned_groups_flat, strict=True):
        assert master.data_ptr() == weights_part.data_ptr()
        assert (master.untyped_storage().data_ptr()
                == opt.lp_param_buffer.untyped_storage().data_ptr())
    param = next(engine.module.parameters())
    before = param.ds_tensor.clone()
    engine.train_batch(batches(cfg, engine))
    assert not torch.equal(param.ds_tensor, before)  # the step updated the partition in place
    local, start = ds_adapter._stage3_master(param)
    assert start == 0 and torch.equal(local, param.ds_tensor.narrow(0, 0, local.numel()))
    assert local.data_ptr() == param.ds_tensor.data_ptr()


def record_gathers(monkeypatch) -> list[int]:
    """From now until `monkeypatch.undo()`, each `ds_adapter.gathered` call appends to the
    returned list the whole size of the partitioned parameters it gathers."""
    from stable_megatron import ds_adapter

    sizes, real = [], ds_adapter.gathered

    def counted(params, modify=False):
        params = list(params)
        sizes.append(sum(ds_adapter.full_numel(p) for p in params if ds_adapter.partitioned(p)))
        return real(params, modify)

    monkeypatch.setattr(ds_adapter, "gathered", counted)
    return sizes


def test_zero3_gathers_one_block_at_a_time(state, tmp_path, monkeypatch):
    """Under ZeRO-3 the layer-file save and load, the weights-only load, and sigma-reparam's
    power step gather one block (or one weight) whole at a time, never the whole model; the
    loads restore what was saved."""
    from stable_megatron import ds_adapter
    from stable_megatron.checkpoint import reshape
    from stable_megatron.methods.sigma_reparam import PowerIteration

    cfg, engine = make_engine(state, zero=3)
    engine.train_batch(batches(cfg, engine))
    blocks = [sum(ds_adapter.full_numel(p) for p in layer.parameters())
              for layer in engine.module.forward_funcs if hasattr(layer, "parameters")]
    total = sum(ds_adapter.full_numel(p) for p in engine.module.parameters())
    saved = weights(engine)
    gathers = record_gathers(monkeypatch)
    engine.save_checkpoint(str(tmp_path), tag="t")
    with torch.no_grad():  # change every weight, then load them back
        for param in engine.module.parameters():
            param.ds_tensor.add_(1.0)
    engine.load_checkpoint(str(tmp_path), tag="t")
    assert gathers and max(gathers) <= max(blocks) < total
    monkeypatch.undo()
    for name, value in weights(engine).items():
        assert torch.equal(value, saved[name]), name
    # the weights-only load (`checkpoint.finetune`, reshape.load) reads the same layer files
    with torch.no_grad():
        for param in engine.module.parameters():
            param.ds_tensor.add_(1.0)
    gathers = record_gathers(monkeypatch)
    assert reshape.load_resharded_state(engine.module, tmp_path / "t", 1, state.layout, True)
    monkeypatch.undo()
    assert gathers and max(gathers) <= max(blocks) < total
    for name, value in weights(engine).items():
        assert torch.equal(value, saved[name]), name

    cfg, engine = make_engine(state, zero=3, model={"sigma_reparam": {"enabled": True}})
    gathers = record_gathers(monkeypatch)
    PowerIteration(engine.module).before_step(1)
    monkeypatch.undo()
    largest = max(ds_adapter.full_numel(p) for p in engine.module.parameters())
    assert len(gathers) > 1 and max(gathers) <= largest


def test_zero3_metrics_step_gathers_one_piece_at_a_time(state, monkeypatch):
    """Under ZeRO-3 a stability-metrics step reads the norms and the update from each rank's
    partitions and gathers only TEV's matrix and, for sigma-reparam's metrics, one piece of
    the model (a layer, the embedding) at a time; the metrics are all there. (Their values
    against one process at ZeRO-1: tests/distributed/test_metrics_parity.py.)"""
    from stable_megatron import ds_adapter
    from stable_megatron.hooks import StepRunner
    from stable_megatron.metrics import StabilityMetrics
    from stable_megatron.metrics.parts import model_parts

    cfg, engine = make_engine(state, zero=3, model={"sigma_reparam": {"enabled": True}})
    cfg.metrics.interval = 1
    runner = StepRunner(engine, [StabilityMetrics(cfg, state, engine)])
    gathers = record_gathers(monkeypatch)
    runner.step(1, batches(cfg, engine))
    record = {}
    runner.after_step(1, record)
    monkeypatch.undo()
    pieces = [sum(ds_adapter.full_numel(p) for p in module.parameters())
              for _, module in model_parts(engine.module, 0).pieces()]
    total = sum(ds_adapter.full_numel(p) for p in engine.module.parameters())
    assert gathers and max(gathers) <= max(pieces) < total
    for key in ("param_norm", "grad_norm/total", "update_ratio/total", "tev/mean",
                "sigma/layer_01/qkv", "gamma/layer_02/fc2"):
        assert record[key] > 0, key


def test_shared_memory_all_reduce_switch_exists():
    import deepspeed

    from stable_megatron.ds_adapter import disable_shm_comm

    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__
    disable_shm_comm()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
