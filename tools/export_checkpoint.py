#!/usr/bin/env python
"""`stable-megatron export`, kept as a script for compatibility: the command lives in
stable_megatron/commands/export_checkpoint.py (`--help` there)."""

import sys

from stable_megatron.commands.export_checkpoint import main

if __name__ == "__main__":
    sys.exit(main(prog="export_checkpoint.py"))
