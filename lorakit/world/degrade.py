"""Degradations that make a clean render look like what a small diffusion model generates.

The attribute reader is trained and tested on renders passed through these: blur, noise, per-channel color
shifts, wobbly ("blobby") edges from a smooth random warp, faint spurious blobs, and a round trip through a
VAE (every generated image comes out of a VAE decoder).  All functions take and return uint8 (H, W, 3)
arrays and draw their randomness from the generator they are given, so a seed fixes the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image, ImageFilter

from lorakit.world.model import VAE_CONFIG


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.uint8)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def color_shift(image: np.ndarray, rng: np.random.Generator, gain: float = 0.08, offset: float = 14.0) -> np.ndarray:
    """Per-channel gain and offset: the "slightly wrong colors" of a generated image."""
    g = rng.uniform(1 - gain, 1 + gain, size=3)
    o = rng.uniform(-offset, offset, size=3)
    return np.clip(np.rint(image.astype(np.float32) * g + o), 0, 255).astype(np.uint8)


def wobble(image: np.ndarray, rng: np.random.Generator, amplitude: float = 1.0, cells: int = 6) -> np.ndarray:
    """Warp by a smooth random displacement field (``amplitude`` pixels): blobby, uneven edges."""
    h, w = image.shape[:2]
    field = torch.from_numpy(rng.normal(0.0, 1.0, size=(1, 2, cells, cells)).astype(np.float32))
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1)[None] + field.permute(0, 2, 3, 1) * (2 * amplitude / w)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def spurious_blobs(image: np.ndarray, rng: np.random.Generator, count: int = 2, strength: float = 0.25) -> np.ndarray:
    """Faint, small colored smudges, as a diffusion model leaves here and there."""
    h, w = image.shape[:2]
    out = image.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(count):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rad = rng.uniform(1.0, 3.0) * w / 64
        alpha = strength * rng.uniform(0.3, 1.0) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rad**2))
        color = rng.integers(0, 256, size=3).astype(np.float32)
        out = out * (1 - alpha[..., None]) + color * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def degrade(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A random mix of the degradations above; ``strength`` 1.0 is about as bad as a weak generator gets
    while still drawing the right thing (sigma of blur up to 1.2 px, noise up to 10 levels)."""
    out = image
    if rng.random() < 0.5:
        out = wobble(out, rng, amplitude=strength * rng.uniform(0.3, 1.2))
    if rng.random() < 0.7:
        out = blur(out, strength * rng.uniform(0.2, 1.2) * image.shape[0] / 64)
    if rng.random() < 0.7:
        out = color_shift(out, rng, gain=0.08 * strength, offset=14 * strength)
    if rng.random() < 0.4:
        out = spurious_blobs(out, rng, count=int(rng.integers(1, 4)), strength=0.3 * strength)
    if rng.random() < 0.7:
        out = add_noise(out, strength * rng.uniform(1, 10), rng)
    return out


def load_vae(path: str | Path):
    """The shapes world's VAE from a pretraining checkpoint (``vae_checkpoint.pt``, whose ``model`` entry is
    an ``AutoencoderKL`` state dict, or a bare state dict) or a diffusers folder (``model/vae``)."""
    path = Path(path)
    if path.is_dir():
        return AutoencoderKL.from_pretrained(path).eval()
    state = torch.load(path, map_location="cpu", weights_only=True)
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict(state.get("model", state))
    return vae.eval()


@torch.no_grad()
def vae_roundtrip(images: list[np.ndarray], vae, sample: bool = True, seed: int = 0,
                  batch: int = 64) -> list[np.ndarray]:
    """Encode and decode with ``vae``; ``sample`` draws from the posterior (as a generator's latents are not
    exactly any image's mean)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[np.ndarray] = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[s:s + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen) if sample else dist.mean
        y = vae.decode(z).sample
        y = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out.extend(list(y))
    return out
