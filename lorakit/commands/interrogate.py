"""``lorakit interrogate FILE``: the words an adapter changes most (its trigger and caption words, when nobody
wrote them down), scored on the base model's whole vocabulary; for an embedding, the words its vectors resemble
(``lorakit.tools.interrogate``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.commands.arg_types import positive_int

HELP = "the words an adapter changes most: its trigger and caption words, read off the weights"
#: without --model, the built-in model is used: a file that does not fit it is answered with that
DEFAULT_MODEL_IS_BUILT_IN = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER[:MULT]",
                        help="the adapter file (kohya, LyCORIS or diffusers keys); or a textual-inversion embedding, "
                             "whose vectors' nearest words are listed")
    parser.add_argument("--model", default=None, help="the base model it was trained on (default: the built-in one)")
    parser.add_argument("--top", type=positive_int, default=30, help="how many words to list per score (default 30)")
    parser.add_argument("--clip-skip", type=int, default=None,
                        help="read the text as the adapter was trained (default: its ss_clip_skip, else 1)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="tokens encoded at once (default 256)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write every token's scores as JSON (atomic; not over an existing file)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorakit.atomic import atomic_write_text
    from lorakit.file_kinds import embedding_header
    from lorakit.models import check_clip_skip, load_base_model
    from lorakit.sample import trained_text_settings
    from lorakit.tools import check_output
    from lorakit.tools.deltas import parse_adapter_spec
    from lorakit.tools.interrogate import embedding_neighbours, interrogate, vocabulary

    spec = parse_adapter_spec(args.adapter)
    if args.json is not None:
        check_output(args.json, [spec.path], overwrite=args.overwrite)
    if embedding_header(spec.path) is not None:  # a textual-inversion embedding: the words its vectors resemble
        found = embedding_neighbours(load_base_model(args.model), spec.path, args.top)
        print(found.summary())
        if args.json is not None:
            atomic_write_text(args.json, json.dumps({"source": found.source, "token": found.token,
                                                     "neighbours": found.neighbours}, indent=1))
            print(f"wrote {args.json}")
        return 0
    settings, said = trained_text_settings([spec.path], clip_skip=args.clip_skip)
    model = load_base_model(args.model)
    if not model.is_sdxl:  # SDXL is read at clip skip 1 whatever its file says (below), as before
        check_clip_skip(model, settings["clip_skip"])  # -1 would read a layer counted from the wrong end
    for line in said:
        print(line)
    bars = []  # drawn with the first batch: a file that does not fit is said without a bar at 0% before it

    def advance(n: int) -> None:
        if not bars:
            bars.append(tqdm(total=len(vocabulary(model)), unit="token", disable=args.no_progress, leave=False))
        bars[0].update(n)

    try:
        result = interrogate(model, spec, clip_skip=1 if model.is_sdxl else settings["clip_skip"],
                             batch_size=args.batch_size, progress=advance)
    finally:
        for bar in bars:
            bar.close()
    print(result.summary(args.top))
    if args.json is not None:
        rows = [{"id": s.token_id, "text": s.text, "text_encoder": s.text_encoder, "unet": s.unet}
                for s in result.scores]
        atomic_write_text(args.json, json.dumps({"source": result.source, "tokens": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0
