"""``lorakit inspect FILE``: what an adapter file holds (the report itself: ``lorakit.inspection``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.embedding_inspection import format_embedding_report, inspect_embedding
from lorakit.file_kinds import embedding_header, is_full_model
from lorakit.inspection import format_report, inspect_file

HELP = "show what an adapter file holds: algorithm, modules, ranks, metadata, blocks (or an embedding's vectors)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .safetensors adapter file (kohya or LyCORIS keys), a "
                        "textual-inversion embedding, or a whole model (single file or diffusers folder)")


def run(args: argparse.Namespace) -> int:
    if embedding_header(args.file) is not None:  # an embedding: what it holds, instead of "not an adapter"
        print(format_embedding_report(inspect_embedding(args.file)))
        return 0
    if is_full_model(args.file):  # a whole model: what it is, and where it goes
        from lorakit.model_inspection import format_model_report, inspect_model

        print(format_model_report(inspect_model(args.file)))
        return 0
    print(format_report(inspect_file(args.file)))
    return 0
