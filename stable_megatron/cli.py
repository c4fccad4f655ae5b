"""`stable-megatron` command: `stable-megatron train RECIPE [key=value ...]`, `plan`, `sweep`,
`report`, `generate CHECKPOINT --prompt TEXT`."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "train a model from a recipe (launch with deepspeed/torchrun for several processes)",
    "plan": "dry run: validate at a world size; layout, sizes, memory, speed, launch commands",
    "sweep": "train every (method, learning rate) pair of a grid; LR sensitivity table and plot",
    "report": "Markdown page with plots of runs' stability metrics, spikes, warnings, divergence",
    "generate": "continue a prompt with a checkpoint's model (any layout, one process, CPU)",
}


def _usage() -> str:
    lines = ["usage: stable-megatron COMMAND RECIPE [key=value ...]", "", "commands:"]
    lines += [f"  {name:<8}{text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "train":
        from stable_megatron.train import main as train_main

        return train_main(rest)
    if command == "plan":
        from stable_megatron.plan import main as plan_main

        return plan_main(rest)
    if command == "sweep":
        from stable_megatron.sweep import main as sweep_main

        return sweep_main(rest)
    if command == "generate":
        from stable_megatron.generate import main as generate_main

        return generate_main(rest)
    if command == "report":
        from stable_megatron.report import main as report_main

        return report_main(rest)
    print(f"error: unknown command {command!r}\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
