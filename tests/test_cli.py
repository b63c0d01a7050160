"""The command layer: one pattern for every command (``lorakit/commands/<name>.py``), ``lorakit world <task>``."""

from __future__ import annotations

import argparse
import importlib

import pytest

from lorakit.cli import COMMANDS, main
from lorakit.config import ConfigError


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

    assert set(TASKS) == {"pretrain", "quality", "dataset", "train-reader", "experiment", "curve-report", "grid",
                          "blockwise"}
    assert main(["world", "dataset", str(tmp_path / "zkz")]) == 0
    assert "wrote 15 images" in capsys.readouterr().out
    assert (tmp_path / "zkz" / "sample_prompts.txt").is_file()
    with pytest.raises(SystemExit) as exit_:  # argparse checks each task's own arguments
        main(["world", "pretrain", "--out", str(tmp_path / "p"), "--high-noise-fraction", "2"])
    assert exit_.value.code == 2 and "must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["world", "no-such-task"])


class _Command:
    """A stand-in command module that raises what it is given."""

    HELP = "raise"

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise self.error


@pytest.mark.parametrize("error, message", [
    (ConfigError("network.rank must be positive"), "network.rank must be positive"),
    (FileNotFoundError("x.safetensors: no such file"), "no such file"),
    (PermissionError("out/: permission denied"), "permission denied"),
    (OSError(28, "No space left on device"), "No space left"),
])
def test_user_errors_are_one_line(monkeypatch, capsys, error, message):
    monkeypatch.setitem(COMMANDS, "boom", ("boom", "raise"))
    monkeypatch.setattr(importlib, "import_module", lambda name: _Command(error))
    assert main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit boom: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize("error", [ValueError("a bug inside torch"), RuntimeError("bug"), OSError(5, "I/O")])
def test_bugs_keep_their_traceback(monkeypatch, error):
    monkeypatch.setitem(COMMANDS, "boom", ("boom", "raise"))
    monkeypatch.setattr(importlib, "import_module", lambda name: _Command(error))
    with pytest.raises(type(error)):
        main(["boom"])


def test_domain_errors_are_lorakit_errors_and_value_errors():
    from lorakit.adapters import AdapterFormatError
    from lorakit.checkpoints import OutputFolderError
    from lorakit.data import DatasetError
    from lorakit.embeddings import EmbeddingError
    from lorakit.errors import InvalidValueError, LorakitError
    from lorakit.formats import AdapterFileError
    from lorakit.models import ModelLoadError
    from lorakit.sample import PromptSyntaxError
    from lorakit.train import TrainingError

    for cls in (AdapterFormatError, OutputFolderError, ConfigError, DatasetError, AdapterFileError,
                ModelLoadError, PromptSyntaxError, InvalidValueError):
        assert issubclass(cls, LorakitError) and issubclass(cls, ValueError), cls
    assert issubclass(EmbeddingError, LorakitError) and issubclass(TrainingError, LorakitError)
