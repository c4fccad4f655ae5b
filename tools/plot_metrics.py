#!/usr/bin/env python
"""`stable-megatron plot`, kept as a script for compatibility: the command lives in
stable_megatron/commands/plot_metrics.py (`--help` there)."""

import sys

from stable_megatron.commands.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main(prog="plot_metrics.py"))
