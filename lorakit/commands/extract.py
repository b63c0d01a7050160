"""``lorakit extract TUNED --base BASE --out FILE``: a LoRA/LoCon from the difference of two models."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.commands.arg_types import non_negative_float
from lorakit.commands.rank_options import KOHYA_TOOL_OPTIONS, add_rank_arguments, dtype, finish, rank_rules

HELP = "an adapter (LoRA/LoCon) from the difference of a fine-tuned model and its base, by SVD"
#: kohya's extract_lora_from_models.py options, said in lorakit's words when given here
KOHYA_OPTIONS = {
    **KOHYA_TOOL_OPTIONS, "--model-org": "--base", "--dim": "--rank", "--conv-dim": "--conv-rank",
    "--model-tuned": "(the fine-tuned model is the first argument: lorakit extract TUNED --base ORIGINAL)",
    "--load-precision": "(not needed: lorakit computes in fp32 whatever the files hold)",
    "--load-original-model-to": "(not needed: lorakit's model tools run on the CPU)",
    "--load-tuned-model-to": "(not needed: lorakit's model tools run on the CPU)",
}

#: a second model given as an argument, as LyCORIS's extract_locon.py takes them (BASE TUNED OUTPUT)
EXTRA_ARGUMENT_HINT = ("(one model is the argument, the fine-tuned one; its base is --base: "
                       "lorakit extract TUNED --base BASE)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tuned", help="the fine-tuned model: a diffusers folder or a single-file .safetensors")
    parser.add_argument("--base", "--model", dest="base", default=None,
                        help="the model it was tuned from (default: the built-in model)")
    parser.add_argument("--out", type=Path, required=True, help="the adapter file to write (.safetensors)")
    parser.add_argument("--preset", default="full",
                        help="which layers (lorakit presets: full = LoCon, attn-mlp, attn-only, kohya, lycoris-…; or "
                             "a LyCORIS preset .toml)")
    parser.add_argument("--no-text-encoder", action="store_true", help="extract the U-Net only")
    parser.add_argument("--norms", action="store_true",
                        help="also write the differences of the norm layers in the extracted blocks, exactly, as "
                             "LyCORIS norm updates (train_norm; A1111, ComfyUI and LyCORIS apply them)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--min-diff", type=non_negative_float, default=0.0,
                        help="layers whose largest |ΔW| is at most this get no module (default 0: identical only)")
    add_rank_arguments(parser, rank_help="rank to keep (default 4; with --dynamic: the most it may be)")


def run(args: argparse.Namespace) -> int:
    from lorakit.models import load_base_model
    from lorakit.network import get_preset
    from lorakit.tools import check_output
    from lorakit.tools.extract import extract_adapter

    check_output(args.out, [args.tuned, args.base], overwrite=args.overwrite, suffix=".safetensors")
    get_preset(args.preset)  # a preset name or file that does not read is said before the models load
    if args.report is not None:  # checked now, not after the work: the table is written last
        check_output(args.report, [args.tuned, args.base, args.out], overwrite=args.overwrite)
    rule, conv_rule = rank_rules(args, default_rank=4)
    tuned = load_base_model(args.tuned)
    base = load_base_model(args.base)
    result = extract_adapter(tuned, base, rule, conv_rule, preset=args.preset,
                             text_encoder=not args.no_text_encoder, clamp_quantile=args.clamp_quantile,
                             min_diff=args.min_diff, dtype=dtype(args), norms=args.norms,
                             progress=not args.no_progress)
    written = result.write(args.out, [args.tuned, args.base], overwrite=args.overwrite)
    return finish(result, args, written)
