#!/usr/bin/env python
"""`stable-megatron inspect`, kept as a script for compatibility: the command lives in
stable_megatron/commands/inspect_checkpoint.py (`--help` there)."""

import sys

from stable_megatron.commands.inspect_checkpoint import main

if __name__ == "__main__":
    sys.exit(main(prog="inspect_checkpoint.py"))
