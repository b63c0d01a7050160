"""The command layer: one pattern for every command (``lorakit/commands/<name>.py``), ``lorakit world <task>``."""

from __future__ import annotations

import argparse
import importlib

import pytest

from lorakit.cli import COMMANDS, main


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_follows_the_pattern(name):
    module_name, help_ = COMMANDS[name]
    assert module_name == f"lorakit.commands.{name}" and help_
    module = importlib.import_module(module_name)
    assert isinstance(module.HELP, str) and module.HELP
    module.add_arguments(argparse.ArgumentParser())  # builds without errors
    assert callable(module.run)


def test_world_tasks_are_subcommands(tmp_path, capsys):
    from lorakit.commands.world import TASKS

    assert set(TASKS) == {"pretrain", "quality", "dataset", "train-reader", "experiment", "curve-report"}
    assert main(["world", "dataset", str(tmp_path / "zkz")]) == 0
    assert "wrote 15 images" in capsys.readouterr().out
    assert (tmp_path / "zkz" / "sample_prompts.txt").is_file()
    with pytest.raises(SystemExit) as exit_:  # argparse checks each task's own arguments
        main(["world", "pretrain", "--out", str(tmp_path / "p"), "--high-noise-fraction", "2"])
    assert exit_.value.code == 2 and "must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["world", "no-such-task"])
