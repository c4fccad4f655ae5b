"""Worker for the stability-metrics parity test: trains a small model a few steps per case,
with the metrics on and the trainer's spike guard judging every step (`stability.on_spike`
log: it scores, never drops), and writes rank 0's records to OUT_DIR/<case>.json.

usage: torchrun --nproc_per_node N metrics_worker.py OUT_DIR CASES_JSON
CASES_JSON maps a case name to config overrides (plus "steps"); the cases run one after the
other in the same processes and may use different TP x PP layouts (megatron-core's TP groups
are rebuilt between cases).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from parity_worker import RandomTokens  # the script's folder comes first on the import path


def run_case(overrides: dict, out: Path) -> None:
    from megatron.core import parallel_state as mpu

    from stable_megatron import parallel
    from stable_megatron.config import config_from_dict, validate
    from stable_megatron.hooks import StepRunner
    from stable_megatron.methods.sigma_reparam import PowerIteration
    from stable_megatron.metrics import StabilityMetrics
    from stable_megatron.metrics.logits import ZLossLog
    from stable_megatron.stability.guard import SpikeGuard
    from stable_megatron.train import build_engine, micro_batches

    steps = overrides.pop("steps", 2)
    cfg = config_from_dict(overrides)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    state = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, "cpu")
    engine = build_engine(cfg, state)
    metrics = StabilityMetrics(cfg, state, engine)
    guard = SpikeGuard(cfg, state, engine)
    zloss = [ZLossLog(state, engine)] if cfg.model.z_loss > 0 else []
    runner = StepRunner(engine, [PowerIteration(engine.module), guard, *zloss, metrics])
    data = RandomTokens(cfg.model.vocab_size, cfg.model.seq_length)
    accum = engine.gradient_accumulation_steps()
    records = []
    for step in range(1, steps + 1):
        first = (step - 1) * cfg.train.global_batch_size
        batches = micro_batches(data, first, cfg, state.layout, state.device, accum)
        loss = runner.step(step, batches).item()
        record: dict = {}
        runner.after_step(step, record)  # the metrics (on measured steps), the spike verdict
        verdict = guard.verdict
        record.update(step=step, loss=loss, engine_grad_norm=float(engine.get_global_grad_norm()),
                      guard_loss=verdict.loss, guard_grad_norm=verdict.grad_norm)
        records.append(record)
    if state.layout.rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records))


def main() -> None:
    from stable_megatron import parallel

    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    try:
        for name, overrides in cases.items():
            run_case(overrides, out / f"{name}.json")
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()
