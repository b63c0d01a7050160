"""Options the model tools share (not a command): rank choice, clamp, output dtype, report file."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.atomic import atomic_write_text
from lorakit.commands.arg_types import finite_float, non_negative_int, positive_int
from lorakit.models import resolve_dtype
from lorakit.tools.lowrank import DYNAMIC_METHODS, RankRule
from lorakit.tools.result import ToolResult, write_report

#: kohya's names for the options its scripts networks/resize_lora.py, extract_lora_from_models.py, merge_lora.py and
#: svd_merge_lora.py share, with lorakit's (each tool's ``KOHYA_OPTIONS``; ``lorakit.cli.unrecognized`` says them)
KOHYA_TOOL_OPTIONS: dict[str, str] = {
    "--save-to": "--out", "--save-precision": "--dtype", "--new-rank": "--rank", "--new-conv-rank": "--conv-rank",
    "--dynamic-method": "--dynamic", "--dynamic-param": "--param",
    "--precision": "(not needed: lorakit computes in fp32 whatever the files hold)",
    "--device": "(not needed: lorakit's model tools run on the CPU)",
    "--no-metadata": "(not in lorakit's model tools: they write the metadata clients read)",
    "--v2": "(not needed: lorakit tells SD2.x from the model)",
    "--sdxl": "(not needed: lorakit tells SDXL from the model)",
    "--v-parameterization": "(not needed: lorakit reads the prediction type from the model)",
}


def add_rank_arguments(parser: argparse.ArgumentParser, *, conv: bool = True, rank_help: str = "") -> None:
    group = parser.add_argument_group("rank")
    group.add_argument("--rank", type=positive_int, default=None,
                       help=rank_help or "rank to keep (with --dynamic: the most it may be)")
    group.add_argument("--dynamic", choices=DYNAMIC_METHODS, default=None,
                       help="choose the rank per module as kohya's resize_lora.py: sv_ratio keeps σ > σ1/param, "
                            "sv_fro keeps the fraction param of the Frobenius norm, sv_cumulative of Σσ")
    group.add_argument("--param", type=finite_float, default=None, help="the parameter of --dynamic")
    if conv:
        group.add_argument("--conv-rank", type=non_negative_int, default=None,
                           help="rank of k x k convs (LoCon; default: as --rank; 0: leave convs out)")
    group.add_argument("--clamp-quantile", type=finite_float, default=None,
                       help="clamp factor entries to this quantile of their magnitudes (kohya: 0.99); default off")
    parser.add_argument("--dtype", default="fp32", help="dtype of the written tensors: fp32 (default), fp16, bf16")
    parser.add_argument("--report", type=Path, default=None, help="write the whole per-module table to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")


def rank_rules(args: argparse.Namespace, default_rank: int | None = None) -> tuple[RankRule | None, RankRule | None]:
    """(rule, conv rule) from the options; (None, None) when nothing was asked and there is no default."""
    rank = args.rank if args.rank is not None or args.dynamic else default_rank
    if rank is None and args.dynamic is None:
        rule = None
    else:
        rule = RankRule(rank, args.dynamic, args.param)
    conv_rank = getattr(args, "conv_rank", None)
    conv_rule = None
    if conv_rank is not None:
        conv_rule = RankRule(conv_rank, args.dynamic if conv_rank else None, args.param if conv_rank else None)
    return rule, conv_rule


def dtype(args: argparse.Namespace):
    return resolve_dtype(args.dtype)


def finish(result: ToolResult, args: argparse.Namespace, written: Path) -> int:
    """Print the top of the report and the totals; the whole table to --report."""
    print(result.summary(top=10))
    if args.report is not None:
        write_report(result, args.report)
        print(f"per-module report: {args.report}")
    print(f"wrote {written}")
    return 0


__all__ = ["add_rank_arguments", "rank_rules", "dtype", "finish", "atomic_write_text"]
