"""``lorakit convert FILE --to kohya|diffusers --out FILE``: the same adapter in another key layout."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "rewrite an adapter in the kohya or diffusers/PEFT key layout, the same ΔW"
#: without --model, the built-in model is used: a file that does not fit it is answered with that
DEFAULT_MODEL_IS_BUILT_IN = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the adapter file (.safetensors), any layout lorakit reads")
    parser.add_argument("--to", choices=["kohya", "diffusers"], required=True,
                        help="kohya: lora_unet_/lora_te_ names (A1111, ComfyUI, kohya, LyCORIS; every algorithm); "
                             "diffusers: diffusers/PEFT names (load_lora_weights; plain LoRA/LoCon only)")
    parser.add_argument("--out", type=Path, required=True, help="the file to write (.safetensors)")
    parser.add_argument("--model", default=None,
                        help="the base model the adapter is for (default: the built-in model); the file must fit it")
    parser.add_argument("--dtype", default=None,
                        help="dtype of the written tensors: fp32, fp16, bf16 (default: the file's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")


def run(args: argparse.Namespace) -> int:
    from lorakit.models import load_base_model, resolve_dtype
    from lorakit.tools import check_output
    from lorakit.tools.convert import convert_adapter

    check_output(args.out, [args.file], overwrite=args.overwrite, suffix=".safetensors")
    dtype = resolve_dtype(args.dtype) if args.dtype is not None else None  # None: the file's own
    model = load_base_model(args.model)
    result = convert_adapter(args.file, args.out, args.to, model, overwrite=args.overwrite, dtype=dtype)
    print(result.summary())
    return 0
