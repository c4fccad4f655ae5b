"""Worker for test_replay.py: one Trainer per rank (TP2) per mode, driven step by step, the
megatron-core groups restarted between modes (one launch for all).

    replay_worker.py OUT_DIR DATA_CACHE MODE [MODE ...]

MODE `clean`: 8 steps. `transient`: step 5's first attempt has its loss times 100 (a one-time
fault), then the Trainer's replay recomputes it without the fault. `poisoned`: step 5's batch
gives a NaN loss every time it is computed. Each rank saves {losses, records, replay event,
final weights, consumed} to OUT_DIR/<mode>-rank<r>.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from stable_megatron import parallel
from stable_megatron.config import load_config, validate
from stable_megatron.model.gpt import lm_loss
from stable_megatron.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
FAULT_STEP, STEPS = 5, 8


def main(out: Path, data_cache: str, mode: str) -> None:
    cfg = load_config(ROOT / "recipes" / "tiny.yaml", [
        "parallel.tp=2", "model.num_layers=2", "model.hidden_size=64",
        "model.num_attention_heads=4", "model.seq_length=32", "data.vocab_size=1024",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=2",
        "train.eval_interval=0", "metrics.interval=2", "logging.tensorboard=false",
        "logging.progress=false", "stability.min_history=3", "stability.on_spike=replay",
        f"data.cache_dir={data_cache}", f"train.run_dir={out / mode}",
    ])
    validate(cfg, int(os.environ["WORLD_SIZE"]))
    trainer = Trainer(cfg)
    module = trainer.engine.module
    records, events = [], []
    trainer.log.log = lambda record: events.append(record)  # noqa: E731  (capture the events)
    while trainer.step < STEPS:
        faulty = mode != "clean" and trainer.step + 1 == FAULT_STEP
        if faulty:
            factor = float("nan") if mode == "poisoned" else 100.0
            module.loss_fn = lambda logits, labels, f=factor: lm_loss(logits, labels) * f
        record = trainer.train_one_step()
        if mode == "transient":
            module.loss_fn = lm_loss  # the fault is gone when the step is recomputed
        if trainer.last_verdict.is_spike:
            record = trainer.replay(record)
        module.loss_fn = lm_loss
        records.append(record)
    torch.save({
        "records": records,
        "events": [e for e in events if e.get("event") == "replay"],
        "weights": {k: v.clone() for k, v in module.state_dict().items()
                    if isinstance(v, torch.Tensor)},
        "consumed": trainer.consumed,
    }, out / f"{mode}-rank{os.environ['RANK']}.pt")
    parallel.reset_groups()  # the next mode's Trainer starts them again




if __name__ == "__main__":
    for name in sys.argv[3:]:
        main(Path(sys.argv[1]), sys.argv[2], name)
    parallel.shutdown()
