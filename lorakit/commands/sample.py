"""``lorakit sample [ADAPTER[:MULT[:LBW]]]... --prompt TEXT | --prompts FILE --out DIR``: images with adapters."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.commands.arg_types import finite_float, positive_int
from lorakit.commands.prompt_options import add_prompt_reading_arguments
from lorakit.errors import LorakitError
from lorakit.file_kinds import check_adapter_path, embedding_header

if TYPE_CHECKING:
    from lorakit.tools.deltas import AdapterSpec

HELP = "images from a base model with any number of adapters (multipliers, block weights) and TI embeddings"
#: without --model, the built-in model is used: a file that does not fit it is answered with that
DEFAULT_MODEL_IS_BUILT_IN = True


class SampleCommandError(LorakitError):
    """The command would replace the user's files without being asked to."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER[:MULT[:LBW]]",
                        help="adapter files, each with an optional multiplier and LoRA Block Weight string "
                             "(17 or 26 values) or preset (ALL, MIDD, OUTALL, ...)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (kohya options like --n, --d work inside "
                                                           "quotes); repeat for more")
    prompts.add_argument("--prompts", type=Path, help="a kohya prompt file (.txt, .toml or .json)")
    parser.add_argument("--model", default=None, help="base model (default: the built-in model)")
    parser.add_argument("--vae", default=None, help="another VAE for the base model (kohya's --vae: a .safetensors "
                                                    "VAE or a diffusers VAE folder)")
    parser.add_argument("--embedding", action="append", default=[], type=Path,
                        help="a textual-inversion embedding (.safetensors); repeat for more")
    parser.add_argument("--merged", action="store_true",
                        help="merge the adapters into the weights while sampling (default: a separate path)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the single images and grid.png")
    parser.add_argument("--overwrite", action="store_true", help="replace images of an earlier call in --out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt without --d (then +1 each)")
    parser.add_argument("--steps", type=positive_int, default=None, help="steps for prompts that set none")
    parser.add_argument("--cfg", type=finite_float, default=None, help="CFG scale for prompts that set none")
    parser.add_argument("--sampler", default=None, help="sampler for prompts that set none (ddim, euler_a, ...)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=positive_int, default=4,
                        help="images generated at once (default 4; lower it when memory runs out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    columns = parser.add_mutually_exclusive_group()
    columns.add_argument("--sweep", type=_strengths, default=None, metavar="X,Y,...",
                         help="draw every prompt at each of these strengths, a column each (A1111's X/Y plot of a "
                              "LoRA's weight): each adapter's multiplier times the value (0: the base model)")
    columns.add_argument("--each", action="store_true",
                         help="draw every prompt with each adapter alone, a column each (e.g. a run's epoch "
                              "checkpoints side by side: RUN/checkpoints/epoch-*/trained.safetensors)")
    add_prompt_reading_arguments(parser, "adapters")


def _strengths(text: str) -> list[float]:
    """``--sweep 0,0.5,1``: the strengths, in the order given."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers, e.g. 0,0.5,1") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one strength, e.g. 0,0.5,1")
    if not all(math.isfinite(v) for v in values):  # nan drew a NaN image
        raise argparse.ArgumentTypeError(f"{text!r}: finite numbers, e.g. 0,0.5,1")
    return values


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.checkpoints import folder_for_call
    from lorakit.formats import check_safetensors_header
    from lorakit.host_memory import keep_freed_memory
    from lorakit.models import check_clip_skip, check_device, load_base_model
    from lorakit.sample import (
        SamplePrompt,
        adopt_trained_schedule,
        generate_with_adapters,
        load_prompts,
        long_prompts_note,
        parse_prompt_line,
        sample_paths,
        save_samples,
        trained_text_settings,
    )
    from lorakit.tools.deltas import parse_adapter_spec
    from lorakit.vae import use_vae

    defaults = SamplePrompt("")
    overrides = {k: v for k, v in (("steps", args.steps), ("cfg_scale", args.cfg), ("sampler", args.sampler))
                 if v is not None}
    defaults = replace(defaults, **overrides)
    if args.prompts is not None:
        prompts = load_prompts(args.prompts, defaults)
    else:
        prompts = [parse_prompt_line(p, defaults, where="--prompt") for p in args.prompt]
    if (args.sweep is not None or args.each) and not args.adapters:
        raise SampleCommandError(f"{'--each' if args.each else '--sweep'} draws a column per adapter setting: "
                                 "give at least one adapter")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SampleCommandError(f"--out {args.out}: exists and is not a folder (the images and their grid go in a "
                                 "folder)")
    specs = [parse_adapter_spec(a) for a in args.adapters]
    groups, columns = _columns(specs, args.sweep, args.each)
    taken = [p for p in sample_paths(prompts, args.out, columns) if p.exists()]
    if taken and not args.overwrite:  # checked before the model loads: nothing is generated to be thrown away
        raise SampleCommandError(f"{', '.join(str(p) for p in taken[:3])}{' ...' if len(taken) > 3 else ''} "
                                 f"{'exists' if len(taken) == 1 else 'exist'} (an earlier call?); choose another "
                                 f"--out, or pass --overwrite to replace {'it' if len(taken) == 1 else 'them'}")
    for spec in specs:  # before the model loads: a model folder or checkpoint given as an adapter is said so
        if embedding_header(spec.path) is not None:
            raise SampleCommandError(f"{spec.path}: a textual-inversion embedding, not an adapter: give it with "
                                     f"--embedding {spec.path}")
        check_adapter_path(spec.path)
        if not spec.path.is_file():
            raise FileNotFoundError(f"{spec.path}: no such adapter file")
        check_safetensors_header(spec.path)  # a pickle is named as one, not a traceback further on
    text, said = trained_text_settings([spec.path for spec in specs], args.clip_skip, args.max_token_length)
    said += _base_weights_left_out(specs)
    embeddings = [*args.embedding, *_pivotal_embeddings(specs, args.embedding, said)]
    device = check_device(args.device, "--device") if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    with folder_for_call(args.out):  # a place that cannot hold the images is said before they are made
        keep_freed_memory()  # each denoising step frees and takes back the same buffers (SD1.5, CPU: 6-17 % faster)
        model = load_base_model(args.model, device=device)
        use_vae(model, args.vae)
        check_clip_skip(model, text["clip_skip"])
        said += adopt_trained_schedule(model, [spec.path for spec in specs])
        if note := long_prompts_note(model, [t for p in prompts for t in (p.prompt, p.negative_prompt)],
                                     text["max_token_length"]):
            said.append(note)
        prompts = [replace(p, seed=p.seed if p.seed is not None else args.seed + i)
                   for i, p in enumerate(prompts)]
        labels = [f"sampling {label}" for label in columns] or ["sampling"]  # a bar per column
        by_column = [generate_with_adapters(model, group, prompts, merged=args.merged, embeddings=embeddings,
                                            batch_size=args.batch_size, progress=not args.no_progress,
                                            progress_label=label, **text)
                     for group, label in zip(groups, labels, strict=True)]
        images = [column[i] for i in range(len(prompts)) for column in by_column]  # a row per prompt
        title = "" if args.each else ", ".join(s.label for s in specs) or "no adapter"  # --each: its column says it
        written = save_samples(images, prompts, args.out, columns=columns,
                               title=title + (" (merged)" if args.merged and specs else ""))
    for spec in specs:
        print(f"adapter {spec.label}")
    for line in said:
        print(line)
    vae = f" with the VAE {args.vae}" if args.vae else ""
    print(f"{len(images)} image(s) from {model.source}{vae}: {args.out} (grid: {written[-1].name})")
    return 0


def _columns(specs: list[AdapterSpec], sweep: list[float] | None, each: bool
             ) -> tuple[list[list[AdapterSpec]], list[str]]:
    """The adapters each column draws with, and the columns' labels ([] and one group: no columns): with
    ``sweep`` every adapter at each strength (its own multiplier times the value), with ``each`` each adapter
    alone."""
    if sweep is not None:  # "x0.5": the grid's font has no ×
        return [[replace(s, multiplier=s.multiplier * v) for s in specs] for v in sweep], [f"x{v:g}" for v in sweep]
    if each:
        return [[s] for s in specs], [s.label for s in specs]
    return [specs], []


def _base_weights_left_out(specs: Sequence[AdapterSpec]) -> list[str]:
    """A note for each adapter trained on top of base weights (model.base_weights) given without them: it is an
    update of that model, so alone it draws something else (a note, not an error: that may be what is wanted)."""
    from lorakit.checkpoint_names import BASE_WEIGHTS_KEY
    from lorakit.evaluate.checkpoints import file_hash
    from lorakit.file_kinds import read_header

    notes, given = [], None
    for spec in specs:
        try:
            entries = json.loads(read_header(spec.path)[1].get(BASE_WEIGHTS_KEY) or "[]")
        except (OSError, ValueError):  # an unreadable file is said by the adapter reader
            continue
        if given is None and entries:  # by content: every lorakit result is called lorakit.safetensors
            given = {file_hash(s.path) for s in specs}
        missing = [f"{name}:{multiplier:g}" for name, multiplier, digest in entries if digest not in given]
        if missing:
            notes.append(f"{spec.path} was trained on top of {', '.join(missing)} (model.base_weights): give them "
                         f"too, before it, to draw what it learned (lorakit sample {' '.join(missing)} {spec.path} "
                         "...)")
    return notes


def _pivotal_embeddings(specs: Sequence[AdapterSpec], given: Sequence[Path], said: list[str]) -> list[Path]:
    """The embeddings of the pivotal-tuning adapters among ``specs`` that were not given with --embedding: the
    trainer writes them beside the adapter, and without them the adapter's token is plain text."""
    from lorakit.file_kinds import pivotal_embedding

    given_files = {p.resolve() for p in given}
    found = []
    for spec in specs:
        pivotal, beside = pivotal_embedding(spec.path)
        if not pivotal or (beside is not None and beside.resolve() in given_files):
            continue
        if beside is None:
            if not given:
                said.append(f"{spec.path}: a pivotal-tuning adapter whose embedding is not beside it "
                            f"({spec.path.stem}-TOKEN.safetensors): its token is plain text; pass --embedding FILE")
            continue
        found.append(beside)
        said.append(f"{spec.path}: pivotal tuning, with its embedding {beside}")
    return found
