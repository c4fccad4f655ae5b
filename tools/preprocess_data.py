#!/usr/bin/env python
"""`stable-megatron preprocess`, kept as a script for compatibility: the command lives in
stable_megatron/commands/preprocess_data.py (`--help` there)."""

import sys

from stable_megatron.commands.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main(prog="preprocess_data.py"))
