"""``lorakit inspect FILE``: what an adapter file holds (the report itself: ``lorakit.inspection``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.embedding_inspection import format_embedding_report, inspect_embedding
from lorakit.file_kinds import embedding_header
from lorakit.inspection import format_report, inspect_file

HELP = "show what an adapter file holds: algorithm, modules, ranks, metadata, blocks (or an embedding's vectors)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .safetensors adapter file (kohya or LyCORIS keys), or a "
                        "textual-inversion embedding")


def run(args: argparse.Namespace) -> int:
    if embedding_header(args.file) is not None:  # an embedding: what it holds, instead of "not an adapter"
        print(format_embedding_report(inspect_embedding(args.file)))
        return 0
    print(format_report(inspect_file(args.file)))
    return 0
