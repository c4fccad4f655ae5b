"""`stable-megatron` command: `stable-megatron train RECIPE [key=value ...]`, `plan`, `sweep`,
`report`, `generate CHECKPOINT --prompt TEXT`, and the checkpoint, data and log tools
`inspect`, `export`, `reshape`, `preprocess`, `plot` (`stable-megatron COMMAND --help`)."""

from __future__ import annotations

import importlib
import sys

# name: (module with `main(argv) -> int`, one line of help)
COMMANDS = {
    "train": ("stable_megatron.train",
              "train a model from a recipe (launch with deepspeed/torchrun for several processes)"),
    "plan": ("stable_megatron.plan",
             "dry run: validate at a world size; layout, sizes, memory, speed, launch commands"),
    "sweep": ("stable_megatron.sweep",
              "train every (method, learning rate) pair of a grid; LR sensitivity table and plot"),
    "report": ("stable_megatron.report",
               "Markdown page with plots of runs' stability metrics, spikes, warnings, divergence"),
    "generate": ("stable_megatron.generate",
                 "continue a prompt with a checkpoint's model (any layout, one process, CPU)"),
    "inspect": ("stable_megatron.commands.inspect_checkpoint",
                "what a checkpoint holds: step, layout, model, parameters, tensors (read-only)"),
    "export": ("stable_megatron.commands.export_checkpoint",
               "a checkpoint's merged weights as safetensors or a Hugging Face GPT-2/Llama dir"),
    "reshape": ("stable_megatron.commands.reshape_checkpoint",
                "convert a checkpoint offline for a run at another TP x PP x DP layout"),
    "preprocess": ("stable_megatron.commands.preprocess_data",
                   "tokenize .jsonl/.txt files into indexed datasets (and train a tokenizer)"),
    "plot": ("stable_megatron.commands.plot_metrics",
             "plot runs' stability metrics with their early warnings and divergence (PNG)"),
}


def _usage() -> str:
    lines = ["usage: stable-megatron COMMAND [ARGS ...]  (stable-megatron COMMAND --help)", "",
             "commands:"]
    lines += [f"  {name:<11}{text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n{_usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
