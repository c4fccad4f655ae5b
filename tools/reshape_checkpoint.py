#!/usr/bin/env python
"""`stable-megatron reshape`, kept as a script for compatibility: the command lives in
stable_megatron/commands/reshape_checkpoint.py (`--help` there)."""

import sys

from stable_megatron.commands.reshape_checkpoint import main

if __name__ == "__main__":
    sys.exit(main(prog="reshape_checkpoint.py"))
