"""``lorakit inspect FILE``: what an adapter file holds (the report itself: ``lorakit.inspection``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.inspection import format_report, inspect_file

HELP = "show what an adapter file holds: algorithm, modules, ranks, metadata, blocks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .safetensors adapter file (kohya or LyCORIS keys)")


def run(args: argparse.Namespace) -> int:
    print(format_report(inspect_file(args.file)))
    return 0
