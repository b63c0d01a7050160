"""Images for training the tiny model's VAE: far broader than the shapes world itself.

A VAE is a general image codec.  Trained only on the world's four shapes, it could not represent a new
concept (the user's "zkz" star), and personalization would be impossible for a reason no real model has.
So the VAE sees random polygons (stars and crosses among them), ellipses, rings, lines, arbitrary colors,
gradients, stripes and dots, one to four objects per image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from lorakit.world.render import SUPERSAMPLE


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _random_background(rng: np.random.Generator, size: int) -> Image.Image:
    kind = rng.integers(0, 4)
    c0 = np.array(_random_color(rng), dtype=np.float32)
    if kind == 0:  # solid
        return Image.new("RGB", (size, size), tuple(int(v) for v in c0))
    if kind == 1:  # linear gradient between two colors
        c1 = np.array(_random_color(rng), dtype=np.float32)
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / size
        t = np.clip((xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a) + 0.5, 0, 1)[..., None]
        return Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    img = Image.new("RGB", (size, size), tuple(int(v) for v in c0))
    draw = ImageDraw.Draw(img)
    c1 = _random_color(rng)
    period = size / rng.uniform(4, 12)
    if kind == 2:  # stripes at a random angle
        a = rng.uniform(0, math.pi)
        dx, dy = math.cos(a), math.sin(a)
        for k in range(-30, 30):
            o = k * period
            p = [(size / 2 + dx * o - dy * size * 2, size / 2 + dy * o + dx * size * 2),
                 (size / 2 + dx * (o + period / 2) - dy * size * 2, size / 2 + dy * (o + period / 2) + dx * size * 2),
                 (size / 2 + dx * (o + period / 2) + dy * size * 2, size / 2 + dy * (o + period / 2) - dx * size * 2),
                 (size / 2 + dx * o + dy * size * 2, size / 2 + dy * o - dx * size * 2)]
            draw.polygon(p, fill=c1)
    else:  # dots
        rad = period * rng.uniform(0.1, 0.3)
        for i in range(-1, int(size / period) + 2):
            for j in range(-1, int(size / period) + 2):
                x, y = i * period, j * period
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=c1)
    return img


def _random_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    cx, cy = rng.uniform(0.05, 0.95, size=2) * size
    r = rng.uniform(0.05, 0.3) * size
    fill = _random_color(rng)
    kind = rng.integers(0, 5)
    if kind == 0:  # ellipse
        rx, ry = r, r * rng.uniform(0.4, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
    elif kind == 1:  # ring
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(r * rng.uniform(0.2, 0.5))))
    elif kind == 2:  # star-like polygon: alternating radii
        n = int(rng.integers(3, 9))
        inner = rng.uniform(0.3, 0.7)
        a0 = rng.uniform(0, 2 * math.pi)
        pts = [(cx + (r if k % 2 == 0 else r * inner) * math.cos(a0 + k * math.pi / n),
                cy + (r if k % 2 == 0 else r * inner) * math.sin(a0 + k * math.pi / n)) for k in range(2 * n)]
        draw.polygon(pts, fill=fill)
    elif kind == 3:  # random convex-ish polygon (triangles, squares, crosses' arms all appear)
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
        radii = r * rng.uniform(0.6, 1.0, size=n)
        draw.polygon([(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii, strict=True)],
                     fill=fill)
    else:  # thick line / bar
        a = rng.uniform(0, math.pi)
        draw.line([(cx - r * math.cos(a), cy - r * math.sin(a)), (cx + r * math.cos(a), cy + r * math.sin(a))],
                  fill=fill, width=max(1, int(r * rng.uniform(0.2, 0.6))))


def random_vae_image(rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """One random training image for the VAE, uint8 (H, W, 3)."""
    big = resolution * SUPERSAMPLE
    img = _random_background(rng, big)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        _random_object(draw, rng, big)
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.BOX), dtype=np.uint8)
