"""Convert a stable_megatron checkpoint to DeepSpeed's universal format, offline, so that a run
at another TP x PP x DP layout loads it without converting first.

usage: stable-megatron reshape PATH [--into CHECKPOINT_DIR] [--workers N] [--force]

PATH is one checkpoint's directory (e.g. runs/tiny/checkpoints/step00000300) or a checkpoint
directory (its newest complete checkpoint is converted). The conversion is written under the
checkpoint directory of the run that will load it, CHECKPOINT_DIR (that run's checkpoint.dir,
default <run_dir>/checkpoints), as CHECKPOINT_DIR/.reshape/<tag>-<id>/; without --into, under
the directory holding PATH (for resuming that run at another layout). The source checkpoint is
never written to. Training converts by itself when it finds no conversion: this tool is for
checkpoints too big to convert while the other ranks wait (default 30 minutes).

The source's DeepSpeed files are copied first and the copies checked against the manifest and
read with torch.load(weights_only=True): DeepSpeed's converter (python -m
deepspeed.checkpoint.ds_to_universal, run here in a subprocess) unpickles them with
weights_only=False, and reads only those checked copies. Exit code 2 with one line on stderr
for a checkpoint that cannot be converted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

EXIT_ERROR = 2


def main(argv: list[str] | None = None, prog: str = "stable-megatron reshape") -> int:
    """`prog`: the name in usage and error lines (tools/reshape_checkpoint.py passes its own)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a checkpoint to DeepSpeed's universal format (under "
                    "CHECKPOINT_DIR/.reshape/), for loading at another tensor/pipeline/"
                    "data-parallel layout. The source checkpoint is never written to.",
    )
    parser.add_argument("path", help="one checkpoint's directory, or a checkpoint directory")
    parser.add_argument("--into", help="checkpoint directory of the run that will load it "
                        "(default: the directory holding PATH)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes extracting and merging the shards (default 1)")
    parser.add_argument("--force", action="store_true",
                        help="convert again even if a conversion of PATH exists")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")  # import-time notices of megatron-core and torch
    from stable_megatron import checkpoint as ckpt
    from stable_megatron.checkpoint import reshape

    try:
        with contextlib.redirect_stdout(sys.stderr):  # library log lines go to stderr
            tag_dir = ckpt.resolve(args.path)
            meta = ckpt.read_meta(tag_dir)
            into = Path(args.into) if args.into else tag_dir.parent
            cache = reshape.cache_for(into, tag_dir)
            existing = reshape.universal_dir(cache)
            if existing is None or args.force:
                existing = None
                cache = reshape.convert(tag_dir, into, workers=args.workers, force=args.force)
    except (ckpt.CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if existing is not None:
        print(f"{existing}: already converted (--force converts again)")
        return 0
    lay = meta["layout"]
    print(f"{cache / reshape.UNIVERSAL}: step {meta['step']}, saved at tp {lay['tp']} x pp "
          f"{lay['pp']} x dp {lay['dp']}; a run with checkpoint.dir={into} loads it at any "
          f"layout from checkpoint.load={tag_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
