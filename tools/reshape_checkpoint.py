#!/usr/bin/env python
"""Convert a stable_megatron checkpoint to DeepSpeed's universal format, offline, so that a run
at another TP x PP x DP layout loads it without converting first.

usage: python tools/reshape_checkpoint.py PATH [--workers N] [--force]

PATH is one checkpoint's directory (e.g. runs/tiny/checkpoints/step00000300) or a checkpoint
directory (its newest complete checkpoint is converted). The result is PATH/universal; a
training run started at another layout with checkpoint.load=PATH (or resuming from its own
checkpoint directory) uses it. Training converts by itself when it finds no conversion: this
tool is for checkpoints too big to convert while the other ranks wait (default 30 minutes).

Every source file is first read with torch.load(weights_only=True): DeepSpeed's converter
(python -m deepspeed.checkpoint.ds_to_universal, run here in a subprocess) unpickles them with
weights_only=False. Exit code 2 with one line on stderr for a checkpoint that cannot be
converted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

try:
    import stable_megatron  # noqa: F401
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reshape_checkpoint.py",
        description="Convert a checkpoint to DeepSpeed's universal format (PATH/universal), "
                    "for loading at another tensor/pipeline/data-parallel layout.",
    )
    parser.add_argument("path", help="one checkpoint's directory, or a checkpoint directory")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes extracting and merging the shards (default 1)")
    parser.add_argument("--force", action="store_true",
                        help="convert again even if PATH/universal exists")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")  # import-time notices of megatron-core and torch
    from stable_megatron import checkpoint as ckpt
    from stable_megatron import reshape

    try:
        with contextlib.redirect_stdout(sys.stderr):  # library log lines go to stderr
            tag_dir = ckpt.resolve(args.path)
            meta = ckpt.read_meta(tag_dir)
            existing = reshape.universal_dir(tag_dir)
            if existing is None or args.force:
                existing = None
                out = reshape.convert(tag_dir, workers=args.workers, force=args.force)
    except (ckpt.CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if existing is not None:
        print(f"{existing}: already converted (--force converts again)")
        return 0
    lay = meta["layout"]
    print(f"{out}: step {meta['step']}, saved at tp {lay['tp']} x pp {lay['pp']} x "
          f"dp {lay['dp']}; load it at any layout with checkpoint.load={tag_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
