"""``lorakit merge ADAPTER[:MULT[:LBW]]... --out PATH``: bake adapters into a model, or combine them into one.  A
native fine-tuning run's epoch checkpoint is baked in too (``FILE[:MULT]``: its weights, or that share of the way
from the base model's to them): any epoch of such a run becomes a model a client loads.  So is a whole model (a
single file or a diffusers folder, ``MODEL:0.3``: 0.3 of the way from the base to it, kohya's merge_models)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.commands.rank_options import KOHYA_TOOL_OPTIONS, add_rank_arguments, dtype, finish, rank_rules

if TYPE_CHECKING:
    from lorakit.tools.deltas import AdapterSpec

HELP = "bake adapters (multipliers, block weights) into a base model, or combine them into one adapter file"
#: without --model, the built-in model is used: a file that does not fit it is answered with that
DEFAULT_MODEL_IS_BUILT_IN = True
#: kohya's merge_lora.py and svd_merge_lora.py options, said in lorakit's words when given here
KOHYA_OPTIONS = {
    **KOHYA_TOOL_OPTIONS, "--sd-model": "--model",
    "--new-rank": "--rank (with --to-adapter)",
    "--new-conv-rank": "(not in lorakit merge: --rank is the rank of every layer, convolutions too)",
    "--models": "(the adapter files are the arguments, each with its ratio: A.safetensors:0.7 B.safetensors:0.5)",
    "--ratios": "(each file's ratio follows it after a colon: A.safetensors:0.7)",
    "--lbws": "(each file's block weights follow its ratio after a second colon: A.safetensors:1:1,0,0,...)",
    "--concat": "(what --to-adapter does for LoRA files without --rank: the ranks concatenated, exactly)",
    "--shuffle": "(not in lorakit: it reorders the concatenated ranks, which leaves ΔW as it is)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER[:MULT[:LBW]]",
                        help="adapter files, each with an optional multiplier and LoRA Block Weight string "
                             "(17 or 26 values) or preset (ALL, MIDD, OUTALL, ...); also a native fine-tuning "
                             "run's checkpoints/epoch-NNNN/trained.safetensors, or a whole model (file or folder), "
                             "with a multiplier: that share of the way from the base to it")
    parser.add_argument("--model", "--base", dest="model", default=None,
                        help="base model (default: the built-in model)")
    parser.add_argument("--out", type=Path, required=True,
                        help="a folder (diffusers), a *.safetensors file (single-file LDM checkpoint), or with "
                             "--to-adapter the adapter file")
    parser.add_argument("--to-adapter", action="store_true",
                        help="write one adapter holding the weighted sum: exact for LoRA + LoRA (ranks "
                             "concatenated) unless a rank is asked; otherwise ΔW summed and re-factored by SVD")
    add_rank_arguments(parser, conv=False,
                       rank_help="with --to-adapter: the rank of the combined adapter (default: exact)")


def run(args: argparse.Namespace) -> int:
    from lorakit.file_kinds import check_adapter_path, is_full_model
    from lorakit.models import check_replaceable_model_folder, load_base_model
    from lorakit.native_checkpoints import is_native_checkpoint
    from lorakit.tools import ToolError, check_output
    from lorakit.tools.deltas import parse_adapter_spec
    from lorakit.tools.merge import bake, combine, save_model

    specs = [parse_adapter_spec(a) for a in args.adapters]
    inputs = [s.path for s in specs] + [args.model]
    check_output(args.out, inputs, overwrite=args.overwrite, suffix=".safetensors" if args.to_adapter else None)
    if args.report is not None:  # checked now, not after the work: the table is written last
        check_output(args.report, [*inputs, args.out], overwrite=args.overwrite)
    for text, spec in zip(args.adapters, specs, strict=True):  # what is no adapter is said before the model loads
        whole = is_full_model(spec.path)
        if whole and str(spec.path) == text:  # a model named alone is the base (kohya's merge takes it first)
            raise ToolError(f"{spec.path}: a whole model, not an adapter; use it as --model, or blend it into the "
                            f"base with a share: {spec.path}:0.5")
        if not whole and not is_native_checkpoint(spec.path):
            check_adapter_path(spec.path)
        elif args.to_adapter:
            what = "a whole model" if whole else "a native fine-tuning checkpoint"
            raise ToolError(f"{spec.path}: {what} holds weights, not an update to combine; make it a model "
                            "(without --to-adapter), or an adapter with lorakit extract")
    if not args.to_adapter and not Path(args.out).suffix:  # a model folder: what it would replace, before the work
        check_replaceable_model_folder(args.out)
    model = load_base_model(args.model)
    notes = _embedding_notes(specs)
    if args.to_adapter:
        rule, _ = rank_rules(args)
        result = combine(specs, model, rule, clamp_quantile=args.clamp_quantile, dtype=dtype(args))
        written = result.write(args.out, inputs, overwrite=args.overwrite)
        code = finish(result, args, written)
        for note in notes:
            print(note)
        return code
    for line in bake(model, specs):
        print(line)
    written = save_model(model, args.out, inputs, overwrite=args.overwrite,
                         dtype=None if args.dtype == "fp32" else args.dtype)
    kind = "single-file checkpoint" if written.suffix == ".safetensors" else "diffusers folder"
    print(f"wrote {written} ({kind}, base {model.source})")
    for note in notes:
        print(note)
    return 0


def _embedding_notes(specs: Sequence[AdapterSpec]) -> list[str]:
    """What the merged result lacks for pivotal-tuning adapters: their token is learnt in an embedding file, which
    no merge writes into the weights (a single-file model carries no tokenizer to add the token to)."""
    from lorakit.file_kinds import pivotal_embedding

    notes = []
    for spec in specs:
        pivotal, beside = pivotal_embedding(spec.path)
        if pivotal:
            where = f"its embedding {beside}" if beside is not None else \
                f"its embedding ({spec.path.stem}-TOKEN.safetensors, not beside it now)"
            notes.append(f"note: {spec.path} was trained by pivotal tuning: its token is learnt in {where}, which "
                         "the result does not hold; use the embedding with it (A1111/ComfyUI: models/embeddings; "
                         "lorakit sample --embedding FILE)")
    return notes
