"""``lorakit world <task>``: the shapes world's own tools, one argparse subcommand each.

- ``pretrain``: pretrain the built-in base model from scratch (VAE, then U-Net + text encoder);
- ``quality``: score a model on held-out prompts with the attribute reader (the README's quality table);
- ``dataset``: write the "zkz" concept's training images, captions and evaluation prompts to a folder;
- ``train-reader``: retrain the attribute reader's shape classifier;
- ``experiment``: train past the overfitting point and score every epoch (docs/early_stopping.md);
- ``curve-report``: tables and plots of ``experiment`` runs;
- ``grid``: many ``experiment`` runs in parallel (resumable), then the ``curve-report`` table;
- ``blockwise``: the block-wise LoRA paper's experiment (character + style adapters in chosen blocks).

Each task module has ``add_arguments(parser)`` and ``run(args)`` (and ``main(argv)`` for ``python -m``).
"""

from __future__ import annotations

import argparse
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
            task.add_argument("folder", nargs="?", type=Path, default=Path("zkz-dataset"),
                              help="where to write the dataset (default: zkz-dataset)")
            task.set_defaults(task_run=write_dataset)
        else:
            module.add_arguments(task)
            task.set_defaults(task_run=module.run)


def write_dataset(args: argparse.Namespace) -> int:
    paths = concept.write_concept_dataset(args.folder)
    print(f"wrote {len(paths)} images with captions, prompts.json, eval_prompts.txt and sample_prompts.txt "
          f"to {args.folder}")
    return 0


def run(args: argparse.Namespace) -> int:
    return int(args.task_run(args) or 0)
