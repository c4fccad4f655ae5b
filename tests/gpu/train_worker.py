"""Worker: train each named case (a recipe and its overrides) in the same processes, one run
after the other, each into OUT_DIR/<name>; prints the device and backend it ran on.

usage: torchrun --nproc_per_node N tests/gpu/train_worker.py OUT_DIR CASES_JSON OVERRIDE...
where CASES_JSON maps a case name to [recipe path, extra override, ...].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch.distributed as dist

    from stable_megatron import parallel
    from stable_megatron.config import load_config, validate
    from stable_megatron.train import train

    out, cases, common = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
    try:
        for name, (recipe, *extra) in cases.items():
            cfg = load_config(recipe, [*common, *extra, f"train.run_dir={out / name}"])
            validate(cfg, parallel.env_world_size())
            train(cfg)
            if dist.get_rank() == 0:
                import torch

                print(f"case {name}: backend {dist.get_backend()} device "
                      f"{torch.cuda.get_device_name()}", flush=True)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()
