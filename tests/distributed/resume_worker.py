"""Worker for test_resume.py: trainings of the tiny model, several per process launch.

    resume_worker.py OUT_DIR CASES_JSON [--kill POINT]

CASES_JSON maps a case name to {"run_dir": ..., "overrides": [...]} and each case is trained
in turn (`Trainer(cfg).run()`, process groups restarted between cases). After each case every
rank saves its model state dict to OUT_DIR/<case>-rank<r>.pt.

--kill POINT SIGKILLs rank 0 during the save at step 6 (the run's second checkpoint), at one
of: `shards` (after DeepSpeed wrote rank 0's shards, before the other ranks are known to be
done), `manifest` (all shards written, before the manifest), `latest` (after the rename into
place, before `latest` is rewritten).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

KILL_STEP = 6


def install_kill(point: str) -> None:
    import importlib

    from stable_megatron import checkpoint

    saving = importlib.import_module("stable_megatron.checkpoint.save")  # the module

    def die() -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "shards":
        original_save = saving.rng_state

        def rng_then_die():
            state = original_save()
            if _saving_step[0] == KILL_STEP:
                die()
            return state

        saving.rng_state = rng_then_die
    elif point == "manifest":
        original_check = saving._check_written

        def check_then_die(work, layout, zero_stage):
            original_check(work, layout, zero_stage)
            if _saving_step[0] == KILL_STEP:
                die()

        saving._check_written = check_then_die
    elif point == "latest":
        original_fsync = saving._fsync_dir

        def fsync_then_die(path):
            original_fsync(path)
            if _saving_step[0] == KILL_STEP:
                die()

        saving._fsync_dir = fsync_then_die
    else:
        raise SystemExit(f"unknown kill point {point}")
    original = checkpoint.save

    def tracking_save(engine, cfg, layout, ckpt_dir, step, client_state, tag=None):
        _saving_step[0] = step
        return original(engine, cfg, layout, ckpt_dir, step, client_state, tag)

    checkpoint.save = tracking_save


_saving_step = [0]


def main() -> None:
    from stable_megatron import ds_adapter, parallel
    from stable_megatron.config import load_config, validate
    from stable_megatron.train import Trainer

    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    if "--kill" in sys.argv:
        install_kill(sys.argv[sys.argv.index("--kill") + 1])
    root = Path(__file__).resolve().parents[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name, case in cases.items():
        cfg = load_config(root / case.get("recipe", "recipes/tiny.yaml"),
                          [*case["overrides"], f"train.run_dir={case['run_dir']}"])
        validate(cfg, world)
        trainer = Trainer(cfg)
        trainer.run()
        module = trainer.engine.module
        with ds_adapter.gathered(module.parameters()):  # whole under ZeRO-3
            state = {k: v.clone() for k, v in module.state_dict().items()
                     if isinstance(v, torch.Tensor)}
        torch.save(state, out_dir / f"{name}-rank{trainer.layout.rank}.pt")
        print(f"case {name}: step {trainer.step} consumed {trainer.consumed}", flush=True)
        parallel.reset_groups()  # the next case may use another layout of the same processes
    parallel.shutdown()


if __name__ == "__main__":
    main()
