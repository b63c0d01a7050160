"""``lorakit <command> ...``: a thin dispatcher; each command lives in its own module.

A command module provides ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status).  Only the
chosen command's module is imported, so one command's heavy or broken imports never block another.
To add a command, add a line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lorakit.errors import LorakitError

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lorakit.train_command", "train an adapter, embedding or model from a folder of images"),
    "world": ("lorakit.world.command", "the built-in shapes world: pretrain, quality, dataset, train-reader"),
    "inspect": ("lorakit.inspection", "show what an adapter file holds: algorithm, modules, ranks, metadata, blocks"),
    "sample": ("lorakit.commands.sample", "images from a base model with any number of adapters and embeddings"),
    "merge": ("lorakit.commands.merge", "bake adapters into a base model, or combine them into one adapter file"),
    "extract": ("lorakit.commands.extract", "an adapter from the difference of two models, by SVD"),
    "resize": ("lorakit.commands.resize", "lower an adapter's rank, or convert any adapter to plain LoRA"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lorakit", description="Train, inspect and use LoRA-family adapters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    parsers = {name: sub.add_parser(name, help=help_, description=help_) for name, (_, help_) in COMMANDS.items()}
    command = argv[0] if argv and argv[0] in COMMANDS else None
    module = None
    if command is not None:
        module = importlib.import_module(COMMANDS[command][0])
        module.add_arguments(parsers[command])
    args = parser.parse_args(argv)
    try:
        return int(module.run(args))
    except (OSError, ValueError, LorakitError) as err:  # bad files and bad values: a message, not a traceback
        print(f"lorakit {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
