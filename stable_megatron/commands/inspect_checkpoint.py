"""Print what a stable_megatron checkpoint holds: step, consumed samples, parallel layout, the
model, parameter count, size on disk and (with --tensors) every merged tensor.

usage: stable-megatron inspect PATH [--tensors] [--json] [--config FILE]

PATH is a checkpoint directory (its newest complete checkpoint, the one a resume loads), one
checkpoint's directory (e.g. runs/tiny/checkpoints/step00000300) or a run directory. The config
comes from the checkpoint's stable_megatron.json, else --config, else the run's config.yaml.
Read-only: files are loaded with torch.load(weights_only=True) and never unpickled as arbitrary
objects.
Exit code 2 with one line on stderr for a checkpoint that cannot be read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

EXIT_ERROR = 2


def main(argv: list[str] | None = None, prog: str = "stable-megatron inspect") -> int:
    """`prog`: the name in usage and error lines (tools/inspect_checkpoint.py passes its own)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Summarise a stable_megatron checkpoint (read-only).",
    )
    parser.add_argument("path", help="checkpoint directory, step directory or run directory")
    parser.add_argument("--tensors", action="store_true",
                        help="list every tensor: name, full shape, dtype, numel, TP split")
    parser.add_argument("--json", action="store_true",
                        help="print the summary (with every tensor) as JSON")
    parser.add_argument("--config", help="the run's config YAML, for checkpoints without "
                        "stable_megatron.json whose run directory has no config.yaml")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")  # import-time notices of megatron-core and torch
    from stable_megatron.checkpoint import CheckpointError
    from stable_megatron.checkpoint.view import format_summary, summary

    try:
        # library log lines (DeepSpeed's, megatron-core's) go to stderr: stdout is the report
        with contextlib.redirect_stdout(sys.stderr):
            info = summary(args.path, args.config)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(info, indent=1) if args.json else format_summary(info, args.tensors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
