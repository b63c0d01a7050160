"""``lorakit resize FILE --out FILE``: lower the rank of a LoRA/LoCon, or convert any adapter to plain LoRA."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.commands.rank_options import KOHYA_TOOL_OPTIONS, add_rank_arguments, dtype, finish, rank_rules

HELP = "lower the rank of a LoRA/LoCon file (fixed or sv_ratio/sv_fro/sv_cumulative), or --to lora any adapter"
#: without --model, the built-in model is used: a file that does not fit it is answered with that
DEFAULT_MODEL_IS_BUILT_IN = True
#: kohya's resize_lora.py options, said in lorakit's words when given here
KOHYA_OPTIONS = KOHYA_TOOL_OPTIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the adapter file (.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="the file to write (.safetensors)")
    parser.add_argument("--to", choices=["lora"], default=None,
                        help="convert LoHa, LoKr, full, IA3, DoRA ... into a plain LoRA/LoCon through each module's "
                             "ΔW (without a rank option: lossless up to float noise)")
    parser.add_argument("--model", default=None,
                        help="base model for --to lora (default: the built-in model); checks the file fits it")
    add_rank_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lorakit.formats import read_adapter
    from lorakit.tools import check_output
    from lorakit.tools.deltas import plain_lora
    from lorakit.tools.resize import resize_adapter

    check_output(args.out, [args.file], overwrite=args.overwrite, suffix=".safetensors")
    if args.report is not None:  # checked now, not after the work: the table is written last
        check_output(args.report, [args.file, args.out], overwrite=args.overwrite)
    rule, conv_rule = rank_rules(args)
    file = read_adapter(args.file)
    model = None
    to_lora = args.to == "lora"
    if to_lora and (args.model is not None or not all(plain_lora(t) for t in file.modules().values())):
        from lorakit.models import load_base_model

        model = load_base_model(args.model)
    result = resize_adapter(file, rule, conv_rule=conv_rule, to_lora=to_lora, model=model,
                            clamp_quantile=args.clamp_quantile, dtype=dtype(args))
    written = result.write(args.out, [args.file], overwrite=args.overwrite)
    return finish(result, args, written)
