"""The command lines in the README and docs/ name only options their command has, and `--set` only settings a
config has: a renamed option or setting fails here, not in a user's shell."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

from lorakit.cli import COMMANDS
from lorakit.config import ConfigError, TrainConfig, set_option

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `lorakit CMD ...` up to the end of a code span, a table cell, a shell separator or the line
COMMAND = re.compile(r"lorakit ([a-z]+)((?: [^`\n|;]*)?)")


def _known_options(parser: argparse.ArgumentParser) -> set[str]:
    known: set[str] = set()
    for action in parser._actions:
        known.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):  # `lorakit world <sub>`
            for sub in action.choices.values():
                known |= _known_options(sub)
    return known


def _command_lines() -> list[tuple[str, str, list[str]]]:
    """(where, command, its words) for every `lorakit CMD ...` in the pages."""
    found = []
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for match in COMMAND.finditer(line):
                command, rest = match.group(1), match.group(2).split(" # ")[0].rstrip(" \\).,:")
                if command not in COMMANDS:
                    continue
                try:
                    words = shlex.split(rest)
                except ValueError:  # prose around an unclosed quote: not a command to paste
                    continue
                found.append((f"{page.relative_to(ROOT)}:{number}", command, words))
    return found


def test_the_pages_hold_many_command_lines():
    lines = _command_lines()
    assert len(lines) > 100 and {command for _, command, _ in lines} >= {"train", "eval", "sample", "merge"}


def test_every_option_in_the_pages_is_one_the_command_has():
    options = {}
    wrong = []
    for where, command, words in _command_lines():
        if command not in options:
            parser = argparse.ArgumentParser(prog=f"lorakit {command}")
            importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
            options[command] = _known_options(parser) | {"--verbose"}
        wrong += [f"{where}: lorakit {command} {word}" for word in words
                  if word.startswith("--") and word.split("=")[0] not in options[command]]
    assert not wrong, "options the commands do not have:\n" + "\n".join(wrong)


def test_every_setting_the_pages_set_is_one_a_config_has():
    settings = [(where, words[i + 1]) for where, command, words in _command_lines() if command == "train"
                for i, word in enumerate(words[:-1]) if word == "--set"]
    assert len(settings) >= 5
    wrong = []
    for where, item in settings:
        dotted, _, raw = item.partition("=")
        try:
            set_option(TrainConfig(), dotted, raw if raw and not raw.isupper() else "1")
        except ConfigError as err:
            if "unknown" in str(err).lower() or "expected section" in str(err):
                wrong.append(f"{where}: --set {item}: {err}")
    assert not wrong, "\n".join(wrong)

