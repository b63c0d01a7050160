"""Small image folders, and the data they make, for the lorakit.data tests (not a test module)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image


def make_image(path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 30, 30),
               mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else None).save(path)
    return path


def make_noise_image(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def make_folder(folder: Path, n: int, size: tuple[int, int] = (64, 64), captions: dict[int, str] | None = None,
                ext: str = ".txt") -> Path:
    """``n`` images 000.png... with distinct colors; ``captions`` {i: text} written as ``NNN<ext>``."""
    for i in range(n):
        make_image(folder / f"{i:03d}.png", size, (10 * i % 256, 100, 200))
    for i, text in (captions or {}).items():
        (folder / f"{i:03d}{ext}").write_text(text, encoding="utf-8")
    return folder


def tiny_vae(seed: int = 0):
    """An AutoencoderKL with 4 latent channels and a factor-2 downsampling, built from a config."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, layers_per_block=1, sample_size=32).eval()


def data(path, seed: int = 0, resolution: int = 64, **options):
    """``TrainingData`` for a folder (or TOML) with ``DataConfig`` options; dataset warnings are silenced."""
    from lorakit.data import DataConfig, DatasetWarning, TrainingData

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        return TrainingData(DataConfig(train_data=str(path), resolution=resolution, **options), seed=seed)
