"""``lorakit world <task>``: the shapes world's own tools, one argparse subcommand each.

- ``pretrain``: pretrain the built-in base model from scratch (VAE, then U-Net + text encoder);
- ``quality``: score a model on held-out prompts with the attribute reader (the README's quality table);
- ``dataset``: write the "zkz" concept's training images, captions and evaluation prompts to a folder;
- ``train-reader``: retrain the attribute reader's shape classifier;
- ``experiment``: train past the overfitting point and score every epoch (docs/early_stopping.md);
- ``curve-report``: tables and plots of ``experiment`` runs;
- ``grid``: many ``experiment`` runs in parallel (resumable), then the ``curve-report`` table;
- ``blockwise``: the block-wise LoRA paper's experiment (character + style adapters in chosen blocks).

Each task module has ``add_arguments(parser)`` and ``run(args)``; ``python -m lorakit.world.<module>`` runs
``lorakit world <task>`` (``run_as_script``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from lorakit.world import blockwise, concept, curve_report, experiment, grid, pretrain, quality, train_reader

HELP = ("the built-in shapes world: pretrain, quality, dataset, train-reader, experiment, curve-report, grid, "
        "blockwise")

#: task -> (module with add_arguments/run, or None for "dataset", which lives here; one-line help)
TASKS: dict[str, tuple[ModuleType | None, str]] = {
    "pretrain": (pretrain, "pretrain the built-in base model (VAE, then U-Net + text encoder)"),
    "quality": (quality, "score a model on held-out prompts with the attribute reader"),
    "dataset": (None, "write the \"zkz\" concept's training images, captions and prompts to a folder"),
    "train-reader": (train_reader, "retrain (or measure) the attribute reader's shape classifier"),
    "experiment": (experiment, "train past overfitting and score every epoch's checkpoint"),
    "curve-report": (curve_report, "tables and plots of experiment runs"),
    "grid": (grid, "a grid of experiment runs in parallel, resumable, then the table"),
    "blockwise": (blockwise, "character + style adapters in chosen blocks, combined and read (resumable)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", required=True, metavar="<task>")
    for name, (module, help_) in TASKS.items():
        task = sub.add_parser(name, help=help_, description=module.__doc__ if module else help_,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        if module is None:
            task.add_argument("folder", nargs="?", type=Path, default=None,
                              help="where to write the dataset (default: zkz-dataset)")
            task.add_argument("--out", type=Path, default=None, help="the same as FOLDER (the other tasks take --out)")
            task.add_argument("--overwrite", action="store_true",
                              help="replace files of the dataset that were changed since it was written (your "
                                   "edited captions, say)")
            task.set_defaults(task_run=write_dataset)
        else:
            module.add_arguments(task)
            task.set_defaults(task_run=module.run)


def write_dataset(args: argparse.Namespace) -> int:
    """Rendered aside, then copied in: a file the user changed since (a caption edited) is replaced only when
    asked; an unchanged one is left as it is, and a folder's other files are never touched."""
    import tempfile

    from lorakit.atomic import atomic_write_bytes, file_in_the_way
    from lorakit.errors import LorakitError
    from lorakit.run_messages import count

    if args.folder is not None and args.out is not None and args.folder != args.out:
        raise LorakitError(f"two folders given, {args.folder} and --out {args.out}: give one")
    args.folder = args.out or args.folder or Path("zkz-dataset")
    if (blocking := file_in_the_way(args.folder / "x")) is not None:  # the folder itself, or one above it
        raise LorakitError(f"{args.folder}: {blocking} is a file, not a folder; give another folder")
    with tempfile.TemporaryDirectory() as tmp:
        paths = concept.write_concept_dataset(tmp)
        made = {args.folder / p.relative_to(tmp): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
        to_write = {t: content for t, content in made.items() if not t.is_file() or t.read_bytes() != content}
        changed = [t for t in to_write if t.is_file()]
        if changed and not args.overwrite:
            names = ", ".join(str(t.relative_to(args.folder)) for t in changed[:3])
            raise LorakitError(f"{args.folder}: {count(len(changed), 'file')} of the dataset "
                               f"{'differs' if len(changed) == 1 else 'differ'} from what it writes "
                               f"({names}{', ...' if len(changed) > 3 else ''}): edited since? Pass --overwrite to "
                               f"replace {'it' if len(changed) == 1 else 'them'}, or write the dataset to another "
                               "folder")
        for target, content in to_write.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, content)
    print(f"wrote {len(paths)} images with captions, prompts.json, eval_prompts.toml, eval_prompts.txt and "
          "sample_prompts.txt "
          f"to {args.folder}" + (f" ({count(len(changed), 'changed file')} replaced)" if changed else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    return int(args.task_run(args) or 0)


def run_as_script(task: str, argv: Sequence[str] | None = None) -> int:
    """``python -m lorakit.world.<module>`` (how docs and MADE_BY.txt run a task): the same parser, refusals and exit
    code as ``lorakit world <task>``; each module's own parser returned 0 whatever its task returned."""
    from lorakit import cli

    return cli.main(["world", task, *(sys.argv[1:] if argv is None else argv)])
