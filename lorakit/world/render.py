"""The shapes world: a deterministic renderer of simple scenes and the captions people would write for them.

A scene is a background and one or more objects; an object has a shape, a color, a size and a position on a
3×3 grid.  Rendering draws at ``SUPERSAMPLE``× the resolution and downsamples, so edges are anti-aliased
like a real image; small random jitter (position, size, rotation, color) comes from a seeded generator so
the same seed always gives the same pixels.  Resolution is a parameter: nothing downstream assumes 64×64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# The vocabulary of the base model's world.  STAR is not in it: it is the shape of the concept a user
# teaches (see lorakit.world.concept), so the pretrained model has never drawn one.  HEART is the second
# concept's shape (issue 15: a concept no rule was designed on).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CONCEPT_SHAPES: tuple[str, ...] = ("star", "heart")
ALL_SHAPES: tuple[str, ...] = SHAPES + CONCEPT_SHAPES
#: the shapes the shipped tokenizer's vocabulary and the pretraining's VAE images were made from.  Frozen: the
#: shipped model was built from them, and a shape added later (the heart) is then neither a word the text
#: encoder knows nor a form the VAE saw, as with a user's own new concept in Stable Diffusion.
PRETRAINING_SHAPES: tuple[str, ...] = SHAPES + ("star",)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 50, 175),
    "orange": (245, 130, 20),
}

# half-extent of the object as a fraction of the image side
SIZES: dict[str, float] = {"small": 0.115, "large": 0.17}

# name -> (column, row) on the 3×3 grid
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}

BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "striped", "dotted")
#: textures pretraining never shows (no pretraining caption names them): a style that only an adapter teaches,
#: as in the block-wise experiment (``lorakit.world.style``)
STYLE_BACKGROUNDS: tuple[str, ...] = ("checkered",)

SUPERSAMPLE = 4


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, table, what in ((self.shape, ALL_SHAPES, "shape"), (self.color, COLORS, "color"),
                                   (self.size, SIZES, "size"), (self.position, POSITIONS, "position")):
            if value not in table:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(table)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]
    background: str = "white"
    # jitter of this particular image: a seed, so a Scene plus its seed is one exact picture
    seed: int = 0
    jitter: bool = field(default=True)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS + STYLE_BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; "
                             f"known: {', '.join(BACKGROUNDS + STYLE_BACKGROUNDS)}")


def cell_center(position: str) -> tuple[float, float]:
    """Center of a grid cell in [0, 1] image coordinates (x right, y down)."""
    col, row = POSITIONS[position]
    return (col + 0.5) / 3.0, (row + 0.5) / 3.0


def _heart_outline(points: int = 48) -> list[tuple[float, float]]:
    """The classic parametric heart (two lobes on top, a point below), its bounding box centred on the origin
    with half-width 1, y pointing down as in the image."""
    ts = [2 * math.pi * k / points for k in range(points)]
    raw = [(16 * math.sin(t) ** 3, 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
           for t in ts]
    top, bottom = max(y for _, y in raw), min(y for _, y in raw)
    middle = (top + bottom) / 2
    return [(x / 16, -(y - middle) / 16) for x, y in raw]


_HEART_UNIT = _heart_outline()


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of half-extent ``r`` centred at (cx, cy), rotated by ``angle``."""
    if shape == "square":
        s = r * 0.88  # a square of the same half-extent looks bigger than a circle; even them out
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x, y + r * 0.15) for x, y in pts]  # centre the triangle's bounding box
    elif shape == "cross":
        w = r * 0.36
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
    elif shape == "star":
        pts = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((radius * math.cos(a), radius * math.sin(a) + r * 0.06))
    elif shape == "heart":
        pts = _HEART_UNIT
        pts = [(x * r, y * r) for x, y in pts]
    else:
        raise ValueError(f"{shape!r} is not a polygonal shape")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def polygon_area(points: list[tuple[float, float]]) -> float:
    """Area enclosed by a simple polygon (the shoelace formula)."""
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True))) / 2


def _background(name: str, size: int, rng: np.random.Generator, jitter: bool) -> Image.Image:
    shift = int(rng.integers(-8, 9)) if jitter else 0
    if name in ("white", "striped", "dotted", "checkered"):
        base = 242 + min(shift, 8) // 2
    elif name == "black":
        base = 18 + shift
    else:  # gray
        base = 128 + shift
    img = Image.new("RGB", (size, size), (base, base, base))
    draw = ImageDraw.Draw(img)
    if name == "striped":
        period = size / 8
        offset = rng.uniform(0, period) if jitter else 0.0
        tone = (175 + shift, 190 + shift, 205 + shift)
        # diagonal stripes, half the period wide
        for k in range(-10, 20):
            x0 = k * period + offset
            draw.polygon([(x0, 0), (x0 + period / 2, 0), (x0 + period / 2 - size, size), (x0 - size, size)],
                         fill=tone)
    elif name == "dotted":
        period = size / 8
        offset = rng.uniform(0, period) if jitter else period / 2
        rad = size / 48
        tone = (150 + shift, 150 + shift, 150 + shift)
        for i in range(-1, 10):
            for j in range(-1, 10):
                x, y = i * period + offset, j * period + offset
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=tone)
    elif name == "checkered":
        cell = size / 8  # squares of 8 px at 64 px: a period of 16 px along both axes
        ox, oy = (rng.uniform(0, 2 * cell, size=2) if jitter else (0.0, 0.0))
        tone = (168 + shift, 168 + shift, 168 + shift)
        for i in range(-2, 10):
            for j in range(-2, 10):
                if (i + j) % 2 == 0:
                    x, y = i * cell + ox, j * cell + oy
                    draw.rectangle([x, y, x + cell, y + cell], fill=tone)
    return img


def _jittered_color(name: str, rng: np.random.Generator, jitter: bool) -> tuple[int, int, int]:
    rgb = np.array(COLORS[name], dtype=np.int64)
    if jitter:
        rgb = rgb + rng.integers(-12, 13, size=3)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def _draw_object(draw: ImageDraw.ImageDraw, obj: ObjectSpec, size: int, rng: np.random.Generator,
                 jitter: bool) -> None:
    cx, cy = cell_center(obj.position)
    r = SIZES[obj.size]
    angle = 0.0
    if jitter:
        cx += rng.uniform(-0.035, 0.035)
        cy += rng.uniform(-0.035, 0.035)
        r *= rng.uniform(0.9, 1.1)
        angle = math.radians(rng.uniform(-8, 8))
    fill = _jittered_color(obj.color, rng, jitter)
    cx, cy, r = cx * size, cy * size, r * size
    if obj.shape == "circle":
        draw.ellipse([cx - r * 0.95, cy - r * 0.95, cx + r * 0.95, cy + r * 0.95], fill=fill)
    else:
        draw.polygon(shape_polygon(obj.shape, cx, cy, r, angle), fill=fill)


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """Render ``scene`` as an RGB image of ``resolution``×``resolution`` pixels, deterministically."""
    rng = np.random.default_rng(scene.seed)
    big = resolution * SUPERSAMPLE
    img = _background(scene.background, big, rng, scene.jitter)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, big, rng, scene.jitter)
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def render_array(scene: Scene, resolution: int = 64) -> np.ndarray:
    """``render`` as a uint8 array of shape (H, W, 3)."""
    return np.asarray(render(scene, resolution), dtype=np.uint8)
