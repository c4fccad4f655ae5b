"""Worker for test_reshape.py: trainings of the tiny model, several per process launch.

    reshape_worker.py OUT_DIR CASES_JSON

CASES_JSON maps a case name to {"recipe": ..., "run_dir": ..., "overrides": [...]}, plus
optionally "expect_error": true (the CheckpointError / ConfigError message is written to
OUT_DIR/<case>-error.txt by rank 0 instead of failing) and "no_universal_info": true (the
checkpoints of this case are saved without DeepSpeed's universal_checkpoint_info, as an older
stable_megatron saved them). Cases run in order in this process launch (`Trainer(cfg).run()`,
process groups restarted between cases); rank 0 prints one line per case.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    from stable_megatron import parallel
    from stable_megatron.checkpoint import CheckpointError, reshape
    from stable_megatron.config import ConfigError, load_config, validate
    from stable_megatron.train import Trainer

    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    root = Path(__file__).resolve().parents[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    for name, case in cases.items():
        cfg = load_config(root / case.get("recipe", "recipes/tiny.yaml"),
                          [*case["overrides"], f"train.run_dir={case['run_dir']}"])
        try:
            validate(cfg, world)
            trainer = Trainer(cfg)
            if case.get("no_universal_info"):
                delattr(trainer.engine.module, reshape.INFO_ATTR)
            trainer.run()
        except (CheckpointError, ConfigError) as err:
            if not case.get("expect_error"):
                raise
            if rank == 0:
                (out_dir / f"{name}-error.txt").write_text(str(err))
            print(f"case {name}: error", flush=True)
        else:
            if case.get("expect_error"):
                raise SystemExit(f"case {name}: expected an error")
            if rank == 0:
                print(f"case {name}: step {trainer.step} consumed {trainer.consumed}", flush=True)
        parallel.reset_groups()  # the next case may use another layout of the same processes
    parallel.shutdown()


if __name__ == "__main__":
    main()
