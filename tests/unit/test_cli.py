"""The one `stable-megatron` command: every subcommand dispatches to its module's `main` and
answers `--help`; the checkpoint, data and log tools of tools/ are the same commands."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from stable_megatron import cli

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"inspect": "inspect_checkpoint", "export": "export_checkpoint",
         "reshape": "reshape_checkpoint", "preprocess": "preprocess_data", "plot": "plot_metrics"}


def test_usage_lists_every_command(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out, name


def test_unknown_command_is_refused(capsys):
    assert cli.main(["inspectt"]) == 2
    assert "error: unknown command 'inspectt'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_a_main(name):
    assert callable(importlib.import_module(cli.COMMANDS[name][0]).main)


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tool_commands_answer_help_under_their_new_name(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: stable-megatron {name} ")


def test_inspect_of_a_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing" in err


@pytest.mark.parametrize("name", sorted(TOOLS.values()))
def test_the_tools_scripts_are_thin_wrappers_of_the_commands(name):
    """`python tools/<name>.py --help` runs the packaged command under the script's old name
    (its usage and error lines are as they were)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), "--help"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {name}.py ")
    command = next(k for k, v in TOOLS.items() if v == name)
    wrapper = (ROOT / "tools" / f"{name}.py").read_text()
    assert f"from {cli.COMMANDS[command][0]} import main" in wrapper
    assert len(wrapper.splitlines()) < 15  # a wrapper, not a copy
