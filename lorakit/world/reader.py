"""Read a shapes-world image back into its attributes: the world's exact, offline replacement for CLIP/DINO.

Every object color of the world is strongly saturated and every background is (close to) gray, so the
foreground is where a pixel is far from the background's gray axis.  From there on it is plain geometry:

- background: the global tint is measured on the border and taken out; the brightness of the background
  pixels (80th percentile, so dark stripes and dots do not count) says black / gray / light, and for a
  light one the texture says white / striped / dotted / checkered (how much of it is darker than the base,
  and whether its periodic energy lies on one diagonal (stripes), on both (a checkerboard, a texture only
  ``lorakit.world.style`` teaches) or on the axes too (a dot lattice));
- objects: connected components of the foreground (hysteresis: a component needs a strongly saturated
  core, and a minimum area, so faint smudges are ignored), largest first;
- color: the median color of a component's core, nearest palette color (``unknown`` if none is near);
- position: the component's centroid on the 3×3 grid;
- size: the radius its area implies for the shape read (each shape has its own area per radius²),
  compared with the midpoint of the small and large sizes;
- shape: a tiny CNN on a scale-normalised 24×24 crop of the soft foreground mask, over the six shapes (the
  two concepts' star and heart included), with an ``other`` class for blobs that are none of the world's
  shapes (read as ``unknown``).  Its weights,
  ``reader_weights.safetensors``, are made by ``lorakit world train-reader`` (deterministic).

Measured accuracy (``lorakit world train-reader --vae lorakit/world/base_model/vae --evaluate-only``; 1,000
held-out renders per row, render seeds never used in training, all six shapes (the base world's four, the
star and the heart, ~160 of each), colors, positions, sizes and backgrounds; the VAE is the built-in model's,
the pretraining's step-3000 one; stored in ``reader_accuracy.json``).  Shape after a VAE round trip is the
weak spot, and it is the small objects whose corners this VAE rounds off (read ``unknown`` mostly; the VAE
never saw a heart in pretraining, and it still keeps hearts recognisable more often than stars):

==========================  =======  =======  ========  ======  ==========  ======  ======
images                      shape    color    position  size    background  star    heart
==========================  =======  =======  ========  ======  ==========  ======  ======
clean renders               100.0%   100.0%   100.0%    100.0%  100.0%      100.0%  100.0%
degraded (``degrade``, 1.0)  99.9%   100.0%   100.0%     99.8%  100.0%      100.0%  100.0%
VAE round trip (sampled)     95.1%   100.0%   100.0%     99.1%  100.0%       90.3%   95.6%
VAE round trip + degraded    93.2%    99.9%   100.0%     98.2%  100.0%       89.7%   96.8%
==========================  =======  =======  ========  ======  ==========  ======  ======

(star, heart: the share of that shape's images whose shape is read right; the other shapes' are in the json.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from lorakit.world.render import ALL_SHAPES, COLORS, POSITIONS, SIZES, polygon_area, shape_polygon

UNKNOWN = "unknown"
SHAPE_CLASSES: tuple[str, ...] = ALL_SHAPES + ("other",)
WEIGHTS_PATH = Path(__file__).with_name("reader_weights.safetensors")
CROP = 24

# area of each shape per r² (r = half-extent), from render.shape_polygon's geometry: size is read as the
# radius the area implies, so a small square and a large star are not confused.
AREA_PER_R2: dict[str, float] = {
    "circle": math.pi * 0.95**2,
    "square": (2 * 0.88) ** 2,
    "triangle": 3 * math.sqrt(3) / 4,
    "cross": 2 * (2 * 0.72) - 0.72**2,
    "star": 10 * 0.5 * 0.42 * math.sin(math.pi / 5),
    "heart": polygon_area(shape_polygon("heart", 0.0, 0.0, 1.0, 0.0)),
}
_MEAN_AREA_PER_R2 = float(np.mean(list(AREA_PER_R2.values())))
# small is r·(0.9..1.1) = 0.1035..0.1265, large 0.153..0.187: split at the geometric midpoint
_SIZE_SPLIT = math.sqrt(SIZES["small"] * 1.1 * SIZES["large"] * 0.9)

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_COLOR_NAMES = list(COLORS)
_GRID = {v: k for k, v in POSITIONS.items()}

# chroma thresholds in 0..255 units, after the background tint is removed.  Palette colors have chroma
# 125..225 and backgrounds ~0 (stripes ~30): a core must reach SEED, a component extends down to GROW.
SEED, GROW = 65.0, 40.0
# fraction of the image: the smallest world object (a small triangle or star) covers >= 50 of 4096 pixels,
# so anything under half of that is a smudge, not an object
MIN_AREA = 25 / 4096
# periodic contrast (gray levels) above which a light background is textured: plain white measures < 2
# even when degraded, stripes and dots > 3.8 (measured on degraded renders)
TEXTURE_AMPLITUDE = 2.8


@dataclass(frozen=True)
class ReadObject:
    shape: str
    color: str
    position: str
    size: str
    confidence: dict[str, float]
    area: float  # fraction of the image
    centroid: tuple[float, float]  # (x, y) in [0, 1]
    shape_probs: dict[str, float] = field(default_factory=dict)

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "position": self.position, "size": self.size}


@dataclass(frozen=True)
class Reading:
    background: str
    background_confidence: float
    objects: tuple[ReadObject, ...]  # largest first

    @property
    def main(self) -> ReadObject | None:
        return self.objects[0] if self.objects else None

    def shapes(self) -> list[str]:
        return [o.shape for o in self.objects]

    def has_shape(self, shape: str) -> bool:
        return shape in self.shapes()


class ShapeNet(nn.Module):
    """A tiny CNN: 24×24 soft mask -> logits over SHAPE_CLASSES."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 3 * 3, 64), nn.ReLU(),
                                  nn.Linear(64, len(SHAPE_CLASSES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ------------------------------------------------------------------------------------------ pixel stages
def to_array(image: Image.Image | np.ndarray, resolution: int = 64) -> np.ndarray:
    """uint8 (resolution, resolution, 3) from a PIL image or array of any size (resized if needed)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        image = Image.fromarray(image[..., :3] if image.ndim == 3 else image)
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BOX if image.size[0] > resolution
                             else Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _box3(a: np.ndarray) -> np.ndarray:
    """3×3 mean with edge padding (takes pixel noise out of the chroma map); (H, W) or (H, W, C)."""
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    y = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]
    return (y[0] if a.ndim == 2 else y.permute(1, 2, 0)).numpy()


def _ring(a: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([a[:width].reshape(-1, *a.shape[2:]), a[-width:].reshape(-1, *a.shape[2:]),
                           a[width:-width, :width].reshape(-1, *a.shape[2:]),
                           a[width:-width, -width:].reshape(-1, *a.shape[2:])])


def chroma_map(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chroma, tint): distance of each (3×3-smoothed) pixel from the gray axis after removing the
    background's tint, measured as the median off-gray offset of the least saturated border pixels."""
    x = _box3(img.astype(np.float32))
    off = x - x.mean(axis=2, keepdims=True)
    ring = _ring(off, max(2, img.shape[0] // 20))
    ring_chroma = np.abs(ring).max(axis=1)
    calm = ring[ring_chroma <= np.percentile(ring_chroma, 60)]  # objects touching the border stay out
    tint = np.median(calm, axis=0)
    rel = off - tint
    return rel.max(axis=2) - rel.min(axis=2), tint


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels with 0 = background, count)."""
    h, w = mask.shape
    m = torch.from_numpy(np.ascontiguousarray(mask))[None, None]
    lab = torch.where(m, torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, 1, h, w), 0.0)
    while True:  # spread the largest index through each component until nothing changes
        grown = torch.where(m, F.max_pool2d(lab, 3, stride=1, padding=1), 0.0)
        if torch.equal(grown, lab):
            break
        lab = grown
    lab_np = lab[0, 0].numpy().astype(np.int64)
    ids = np.unique(lab_np[lab_np > 0])
    remap = np.zeros(h * w + 1, dtype=np.int64)
    remap[ids] = np.arange(1, len(ids) + 1)
    return remap[lab_np], len(ids)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.max_pool2d(x, 2 * steps + 1, stride=1, padding=steps)[0, 0].numpy() > 0


def read_background(img: np.ndarray, foreground: np.ndarray, tint: np.ndarray) -> tuple[str, float]:
    """Background class and a confidence in [0, 1] from the pixels away from every object."""
    bg = ~_dilate(foreground, 2)
    if bg.sum() < 0.1 * bg.size:  # the objects cover the picture: nothing to read
        return UNKNOWN, 0.0
    lum = img.astype(np.float32).mean(axis=2)
    values = lum[bg]
    level = float(np.percentile(values, 80))  # the base tone: stripes and dots are darker than it
    if level < 75:
        return "black", float(np.clip((75 - level) / 30, 0, 1))
    if level < 185:
        return "gray", float(np.clip(min(level - 75, 185 - level) / 30, 0, 1))
    light_conf = float(np.clip((level - 185) / 30, 0, 1))
    # periodic energy at the texture's frequencies (periods of 4..16 px), from the smoothed luminance with
    # the objects filled in: stripes (constant along x + y) have it only on the diagonal kx = ky, a dot
    # lattice on the axes too.  Spectra are robust to blur and noise, where thresholds on pixels are not.
    smooth = _box3(lum)
    base = float(np.median(smooth[bg]))
    spec = np.abs(np.fft.fft2(np.where(bg, smooth, base) - base)) ** 2
    n = img.shape[0]
    k = np.fft.fftfreq(n) * n
    ky, kx = np.meshgrid(k, k, indexing="ij")
    band = (np.hypot(kx, ky) >= 4) & (np.hypot(kx, ky) <= 16)
    e_diag = float(spec[band & (np.abs(kx - ky) <= 1.5)].sum())
    e_anti = float(spec[band & (np.abs(kx + ky) <= 1.5)].sum())
    e_axes = float(spec[band & ((np.abs(kx) <= 1.5) | (np.abs(ky) <= 1.5))].sum())
    amplitude = math.sqrt(e_diag + e_axes) / (n * n)  # ~ the pattern's contrast in gray levels
    if amplitude < TEXTURE_AMPLITUDE:
        return "white", min(light_conf, float(np.clip((TEXTURE_AMPLITUDE - amplitude) / 1.0, 0, 1)))
    texture_conf = min(light_conf, float(np.clip((amplitude - TEXTURE_AMPLITUDE) / 1.0, 0, 1)))
    ratio = e_axes / (e_axes + e_diag)
    if ratio >= 0.45:
        return "dotted", min(texture_conf, float(np.clip((ratio - 0.45) / 0.2, 0, 1)))
    # no energy on the axes: stripes (one diagonal) or a checkerboard (both diagonals, as much on each)
    both = e_anti / (e_anti + e_diag)
    off_axes_conf = float(np.clip((0.45 - ratio) / 0.2, 0, 1))
    if both < 0.25:
        return "striped", min(texture_conf, off_axes_conf, float(np.clip((0.25 - both) / 0.1, 0, 1)))
    return "checkered", min(texture_conf, off_axes_conf, float(np.clip((both - 0.25) / 0.1, 0, 1)))


@dataclass
class _Component:
    soft: np.ndarray  # soft mask of this component, 0..1
    color: np.ndarray
    area: float
    centroid: tuple[float, float]


def find_objects(img: np.ndarray, chroma: np.ndarray, tint: np.ndarray) -> tuple[list[_Component], np.ndarray]:
    """Foreground components (largest first) and the foreground mask."""
    h, w = chroma.shape
    lab, n = label(chroma > GROW)
    comps: list[_Component] = []
    yy, xx = np.mgrid[0:h, 0:w]
    floor = float(np.median(chroma))  # the background's own chroma (stripes have a little)
    for i in range(1, n + 1):
        m = lab == i
        peak = float(chroma[m].max())
        if peak < SEED:
            continue
        core_level = float(np.percentile(chroma[m], 75))
        region = _dilate(m, 1)  # the anti-aliased rim below GROW belongs to the object too
        soft = np.clip((chroma - floor) / max(core_level - floor, 1.0), 0, 1) * region
        area = float(soft.sum()) / (h * w)
        if area < MIN_AREA:
            continue
        core = m & (chroma >= 0.8 * core_level)
        color = np.median(img[core].astype(np.float32), axis=0) - tint
        total = float(soft.sum())
        centroid = (float((soft * (xx + 0.5)).sum() / total / w), float((soft * (yy + 0.5)).sum() / total / h))
        comps.append(_Component(soft, color, area, centroid))
    comps.sort(key=lambda c: -c.area)
    return comps, lab > 0


def shape_crops(soft_masks: list[np.ndarray], centroids: list[tuple[float, float]]) -> torch.Tensor:
    """Scale-normalised CROP×CROP crops of soft masks: centred on the centroid, the farthest mask pixel at
    0.8 of the crop's half-side (so size is taken out and shape alone is left)."""
    if not soft_masks:
        return torch.zeros(0, 1, CROP, CROP)
    thetas, masks = [], []
    for soft, (cx, cy) in zip(soft_masks, centroids, strict=True):
        h, w = soft.shape
        ys, xs = np.nonzero(soft > 0.5)
        if len(xs) == 0:
            ys, xs = np.nonzero(soft > 0)
        radius = float(np.sqrt(((xs + 0.5) / w - cx) ** 2 + ((ys + 0.5) / h - cy) ** 2).max()) + 0.5 / w
        half = radius / 0.8
        # affine_grid works in [-1, 1] coordinates of the input image
        thetas.append([[2 * half, 0, 2 * cx - 1], [0, 2 * half, 2 * cy - 1]])
        masks.append(soft.astype(np.float32))
    theta = torch.tensor(thetas, dtype=torch.float32)
    x = torch.from_numpy(np.stack(masks))[:, None]
    grid = F.affine_grid(theta, [len(masks), 1, CROP, CROP], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ------------------------------------------------------------------------------------------- the reader
def _color_name(rgb: np.ndarray) -> tuple[str, float]:
    d = np.linalg.norm(_PALETTE - rgb[None], axis=1)
    order = np.argsort(d)
    d1, d2 = float(d[order[0]]), float(d[order[1]])
    if d1 > 110:  # nothing in the palette is near: a color the world does not have
        return UNKNOWN, 0.0
    return _COLOR_NAMES[order[0]], float(np.clip(2 * (d2 - d1) / d2, 0, 1))


def _position_name(cx: float, cy: float) -> tuple[str, float]:
    col, row = min(2, max(0, int(cx * 3))), min(2, max(0, int(cy * 3)))
    # distance to the nearest cell edge inside the image, relative to half a cell
    edges = [abs(cx * 3 - round(cx * 3)) if 0 < round(cx * 3) < 3 else 0.5,
             abs(cy * 3 - round(cy * 3)) if 0 < round(cy * 3) < 3 else 0.5]
    return _GRID[(col, row)], float(np.clip(min(edges) / 0.25, 0, 1))


def _size_name(area: float, shape: str) -> tuple[str, float]:
    r = math.sqrt(area / AREA_PER_R2.get(shape, _MEAN_AREA_PER_R2))
    conf = float(np.clip(abs(math.log(r / _SIZE_SPLIT)) / 0.1, 0, 1))
    return ("small" if r < _SIZE_SPLIT else "large"), conf


class Reader:
    """Reads shapes-world images.  ``Reader()`` loads the shipped shape classifier; ``min_shape_prob``
    is the probability below which a shape is read as ``unknown``."""

    def __init__(self, weights: str | Path | None = WEIGHTS_PATH, min_shape_prob: float = 0.5) -> None:
        self.net = ShapeNet().eval()
        if weights is not None:
            self.net.load_state_dict(load_file(str(weights)))
        self.min_shape_prob = min_shape_prob

    @torch.no_grad()
    def classify(self, crops: torch.Tensor) -> torch.Tensor:
        """Shape probabilities (N, len(SHAPE_CLASSES)) of CROP×CROP crops."""
        if len(crops) == 0:
            return torch.zeros(0, len(SHAPE_CLASSES))
        return self.net(crops).softmax(dim=1)

    def read(self, image: Image.Image | np.ndarray) -> Reading:
        return self.read_many([image])[0]

    def read_many(self, images: list[Image.Image | np.ndarray]) -> list[Reading]:
        """Read several images, with one classifier pass over all their objects."""
        parsed = []
        for image in images:
            img = to_array(image)
            chroma, tint = chroma_map(img)
            comps, fg = find_objects(img, chroma, tint)
            background, bg_conf = read_background(img, fg, tint)
            parsed.append((background, bg_conf, comps))
        flat = [c for _, _, comps in parsed for c in comps]
        probs = self.classify(shape_crops([c.soft for c in flat], [c.centroid for c in flat]))
        readings, k = [], 0
        for background, bg_conf, comps in parsed:
            objects = []
            for c in comps:
                p = probs[k]
                k += 1
                best = int(p.argmax())
                shape = SHAPE_CLASSES[best]
                shape_conf = float(p[best])
                if shape == "other" or shape_conf < self.min_shape_prob:
                    shape = UNKNOWN
                color, color_conf = _color_name(c.color)
                position, pos_conf = _position_name(*c.centroid)
                # an unclear shape is still most like one of the world's: its area per r² is the best guess
                size, size_conf = _size_name(c.area, ALL_SHAPES[int(p[:len(ALL_SHAPES)].argmax())])
                objects.append(ReadObject(
                    shape=shape, color=color, position=position, size=size,
                    confidence={"shape": shape_conf, "color": color_conf, "position": pos_conf, "size": size_conf},
                    area=c.area, centroid=c.centroid,
                    shape_probs={name: float(v) for name, v in zip(SHAPE_CLASSES, p.tolist(), strict=True)}))
            readings.append(Reading(background, bg_conf, tuple(objects)))
        return readings


@lru_cache(maxsize=1)
def default_reader() -> Reader:
    return Reader()


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Read one image with the shipped reader."""
    return default_reader().read(image)


def read_images(images: list[Image.Image | np.ndarray]) -> list[Reading]:
    """Read several images with the shipped reader (one classifier pass)."""
    return default_reader().read_many(images)
