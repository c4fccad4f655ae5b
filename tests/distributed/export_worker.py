"""Worker: train the tiny recipe once per named case in the same processes, one run after the
other, each leaving a checkpoint in its own run directory (for the checkpoint-tool tests).

usage: torchrun --nproc_per_node N export_worker.py OUT_DIR CASES_JSON OVERRIDE...
where CASES_JSON maps a case name to a list of extra overrides (every case at the same TP size).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    from stable_megatron import parallel
    from stable_megatron.config import load_config, validate
    from stable_megatron.train import train

    out, cases, common = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
    try:
        for name, extra in cases.items():
            cfg = load_config(ROOT / "recipes" / "tiny.yaml",
                              [*common, *extra, f"train.run_dir={out / name}"])
            validate(cfg, parallel.env_world_size())
            train(cfg)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()
