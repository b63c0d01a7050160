"""The names of a run's checkpoint folders (``checkpoints/epoch-0003/``, ``checkpoints/step-00000500/``) and of the
tensors in a native checkpoint, shared by the trainer, which writes them, and evaluation, which reads them without
importing torch."""

from __future__ import annotations

import re
from typing import TypeVar

T = TypeVar("T")  # a tensor; this module stays torch-free

EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")
STEP_DIR = re.compile(r"^step-(\d{8,})$")  # kohya names its step files with 8 digits too
#: a native fine-tuning checkpoint's text-encoder parameters start with this (the U-Net's have no prefix)
TEXT_ENCODER_PREFIX = "text_encoder."
#: ... and per text encoder: SDXL's second has a prefix of its own (diffusers' folder names, both)
TEXT_ENCODER_PREFIXES = (TEXT_ENCODER_PREFIX, "text_encoder_2.")
#: a pivotal-tuning checkpoint's embedding tensors start with this (its adapter's keep their own names)
PIVOTAL_EMBEDDING_PREFIX = "ti."
#: the metadata entry of every checkpoint and result naming the method that made it ("native": a native
#: fine-tuning checkpoint, lorakit.native_checkpoints)
METHOD_KEY = "lorakit_method"
#: the metadata entry of an adapter trained on top of model.base_weights: [[file name, multiplier, sha256 (16 hex
#: digits, lorakit.evaluate.checkpoints.file_hash)], ...] as JSON
BASE_WEIGHTS_KEY = "lorakit_base_weights"
#: the folder in a run where prior preservation draws its class images when no reg_data folder is given
RUN_CLASS_FOLDER = "class_images"


def epoch_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def split_pivotal(tensors: dict[str, T]) -> tuple[dict[str, T], dict[str, T]]:
    """A pivotal-tuning checkpoint's tensors as (the adapter's, the embedding's without their prefix)."""
    n = len(PIVOTAL_EMBEDDING_PREFIX)
    return ({k: v for k, v in tensors.items() if not k.startswith(PIVOTAL_EMBEDDING_PREFIX)},
            {k[n:]: v for k, v in tensors.items() if k.startswith(PIVOTAL_EMBEDDING_PREFIX)})


#: the metadata entry of a checkpoint or result whose weights are a moving average (training.ema_decay): the decay
EMA_DECAY_KEY = "lorakit_ema_decay"
