"""``lorakit world <task>``: the shapes world's own tools.

- ``pretrain``: pretrain the built-in base model from scratch (VAE, then U-Net + text encoder);
- ``quality``: score a model on held-out prompts with the attribute reader (the README's quality table);
- ``dataset``: write the "zkz" concept's training images, captions and evaluation prompts to a folder;
- ``train-reader``: retrain the attribute reader's shape classifier.
"""

from __future__ import annotations

import argparse

TASKS = {
    "pretrain": "lorakit.world.pretrain",
    "quality": "lorakit.world.quality",
    "train-reader": "lorakit.world.train_reader",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=[*TASKS, "dataset"], help="what to do")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the task's own arguments (see TASK --help)")


def run(args: argparse.Namespace) -> int:
    if args.task == "dataset":
        from lorakit.world.concept import write_concept_dataset

        folder = args.rest[0] if args.rest else "zkz-dataset"
        paths = write_concept_dataset(folder)
        print(f"wrote {len(paths)} images with captions, prompts.json, eval_prompts.txt and sample_prompts.txt "
              f"to {folder}")
        return 0
    import importlib

    result = importlib.import_module(TASKS[args.task]).main(args.rest)
    return int(result or 0)
