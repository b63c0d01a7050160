"""Aspect-ratio buckets, as kohya sd-scripts makes and assigns them.

Buckets are (width, height) pairs with sides multiple of ``steps``, between ``min_reso`` and ``max_reso``,
area at most the resolution's. Each image goes to the bucket of nearest aspect ratio (its exact size when
that is a bucket), is resized to cover the bucket and cropped to it. Without buckets there is one bucket,
the resolution itself.  With kohya's ``bucket_no_upscale`` every image has a bucket of its own size instead:
shrunk (keeping its aspect ratio) only when its area exceeds the resolution's, never enlarged, its sides
cut down to multiples of ``steps``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.config import DatasetConfig

Size = tuple[int, int]  # (width, height), as PIL


def bucket_resolutions(resolution: Size, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """kohya's ``make_bucket_resolutions``: for each width from min to max in steps, the tallest height that
    keeps the area within the resolution's, both orientations, plus the largest square; sorted."""
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((max_area // width) // steps) * steps)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


@dataclass(frozen=True)
class BucketScheme:
    """The buckets of one dataset."""

    resolution: Size
    resos: tuple[Size, ...]
    enabled: bool
    steps: int
    min_reso: int | None
    max_reso: int | None
    #: kohya's bucket_no_upscale: buckets from each image's own size (``resos`` is then empty)
    no_upscale: bool = False

    def select(self, size: Size) -> tuple[Size, Size]:
        """(bucket, resized size) for an image of ``size``: the bucket of nearest aspect ratio (the first such
        in sorted order on a tie, as kohya's argmin), and the size that covers it keeping the aspect ratio.
        With ``no_upscale``: the image's own size, a side below ``steps`` giving a bucket side of 0 (the caller
        refuses it)."""
        if self.no_upscale:
            return self._own_size(size)
        width, height = size
        aspect = width / height
        if size in self.resos:
            reso = size
        else:
            reso = min(self.resos, key=lambda r: abs(r[0] / r[1] - aspect))
        if aspect > reso[0] / reso[1]:  # wider than the bucket: match heights, crop the sides
            scale = reso[1] / height
        else:
            scale = reso[0] / width
        resized = (max(reso[0], int(width * scale + 0.5)), max(reso[1], int(height * scale + 0.5)))
        return reso, resized

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return max(self.steps, x - x % self.steps)  # kohya's round_to_steps, never 0 (kohya divides by it)

    def _own_size(self, size: Size) -> tuple[Size, Size]:
        width, height = size
        max_area = self.resolution[0] * self.resolution[1]
        resized = size
        if width * height > max_area:
            # shrink to the resolution's area; round the side whose rounding keeps the aspect ratio better
            aspect = width / height
            scaled_width = math.sqrt(max_area * aspect)
            by_width, by_height = self._round(scaled_width), self._round(max_area / scaled_width)
            width_error = abs(by_width / self._round(by_width / aspect) - aspect)
            height_error = abs(self._round(by_height * aspect) / by_height - aspect)
            if width_error < height_error:
                resized = (by_width, int(by_width / aspect + 0.5))
            else:
                resized = (int(by_height * aspect + 0.5), by_height)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return bucket, resized


def make_scheme(dataset: DatasetConfig) -> tuple[BucketScheme, list[str], list[str]]:
    """The bucket scheme of a dataset, with (errors, warnings) about its settings."""
    errors: list[str] = []
    warnings: list[str] = []
    res = dataset.resolution
    if min(res) <= 0 or res[0] % 8 or res[1] % 8:
        errors.append(f"resolution {res[0]}×{res[1]}: sides must be positive multiples of 8 (the VAE's factor)")
    if not dataset.enable_bucket:
        if dataset.bucket_no_upscale:
            warnings.append("bucket_no_upscale = true does nothing without enable_bucket = true (kohya ignores it "
                            "too): images are resized to the resolution")
        return BucketScheme(res, (res,), False, 8, None, None), errors, warnings
    steps = dataset.bucket_reso_steps
    if steps <= 0 or steps % 8:
        errors.append(f"bucket_reso_steps = {steps}: must be a positive multiple of 8 (e.g. 64, or 8 for "
                      "64-pixel models)")
        return BucketScheme(res, (res,), True, steps, None, None), errors, warnings
    if dataset.bucket_no_upscale:
        if dataset.min_bucket_reso is not None or dataset.max_bucket_reso is not None:
            warnings.append("min_bucket_reso and max_bucket_reso are not used with bucket_no_upscale: each image's "
                            "bucket is its own size (as in kohya)")
        return BucketScheme(res, (), True, steps, None, None, no_upscale=True), errors, warnings
    lo = dataset.min_bucket_reso
    hi = dataset.max_bucket_reso
    lo = max(steps, min(res) // 2 // steps * steps) if lo is None else lo
    hi = -(-max(res) * 2 // steps) * steps if hi is None else hi
    if lo % steps:  # kohya rounds both to the step with a warning
        warnings.append(f"min_bucket_reso {lo} is not a multiple of bucket_reso_steps {steps}: using {lo - lo % steps}")
        lo -= lo % steps
    if hi % steps:
        warnings.append(f"max_bucket_reso {hi} is not a multiple of bucket_reso_steps {steps}: "
                        f"using {hi + steps - hi % steps}")
        hi += steps - hi % steps
    if lo < steps:
        errors.append(f"min_bucket_reso {lo} must be at least bucket_reso_steps ({steps})")
    elif lo > min(res):
        errors.append(f"min_bucket_reso {lo} is larger than the resolution's short side {min(res)}")
    elif hi < max(res):
        errors.append(f"max_bucket_reso {hi} is smaller than the resolution's long side {max(res)}")
    if errors:
        return BucketScheme(res, (res,), True, steps, lo, hi), errors, warnings
    return BucketScheme(res, tuple(bucket_resolutions(res, lo, hi, steps)), True, steps, lo, hi), errors, warnings


def face_from_name(path: Path) -> tuple[int, int, int, int] | None:
    """kohya's face position in a file name, ``<name>_<cx>_<cy>_<w>_<h>.png`` (its detect_face_rotate script
    writes them, in the image's pixels); None when the name does not end in four numbers."""
    tokens = path.stem.split("_")
    if len(tokens) < 5 or not all(t.isdigit() for t in tokens[-4:]):
        return None
    cx, cy, w, h = (int(t) for t in tokens[-4:])
    return (cx, cy, w, h) if w > 0 and h > 0 else None


def face_crop(size: Size, reso: Size, face: tuple[int, int, int, int], face_range: tuple[float, float],
              rng: random.Random | None, random_crop: bool = False) -> tuple[Size, tuple[int, int]]:
    """kohya's face_crop_aug_range (without buckets): the (resized size, crop offset) that puts the face near the
    middle of ``reso`` at a scale where the face fills between 1/range[1] and 1/range[0] of the shorter side,
    drawn from ``rng`` when the range is not one value (never enlarged, unless the image is smaller than ``reso``:
    kohya refuses those, lorakit enlarges them to cover it).  With ``random_crop`` the face moves off centre."""
    width, height = size
    cx, cy, fw, fh = face
    face_size = max(fw, fh)
    side = min(reso)
    cover = max(reso[0] / width, reso[1] / height)
    ceiling = max(1.0, cover)
    low = min(ceiling, max(cover, side / (face_size * face_range[1])))
    high = min(ceiling, max(low, side / (face_size * face_range[0])))
    scale = low if low >= high else rng.uniform(low, high)
    resized = (max(reso[0], int(width * scale + 0.5)), max(reso[1], int(height * scale + 0.5)))
    offset = []
    for target, length, centre in ((reso[0], resized[0], int(cx * scale + 0.5)),
                                   (reso[1], resized[1], int(cy * scale + 0.5))):
        start = centre - target // 2
        if random_crop:  # kohya: off centre, more often near it, to show some background
            reach = max(length - centre, centre)
            start += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif face_range[0] != face_range[1] and face_size > side // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        offset.append(max(0, min(start, length - target)))
    return resized, (offset[0], offset[1])


def crop_offset(resized: Size, reso: Size, u: float | None = None, v: float | None = None) -> tuple[int, int]:
    """Top-left corner of the bucket inside the resized image: centered (kohya: ``trim // 2``), or at fractions
    ``u``, ``v`` in [0, 1) of the free room for a random crop."""
    free_x, free_y = resized[0] - reso[0], resized[1] - reso[1]
    if u is None or v is None:
        return free_x // 2, free_y // 2
    return int(u * (free_x + 1)), int(v * (free_y + 1))


def size_condition(original: Size, reso: Size, flip: bool = False) -> tuple[int, int, int, int, int, int]:
    """SDXL's size conditioning of one image, as kohya computes it (``BucketManager.get_crop_ltrb``, after Stability
    AI's preprocessing): (original height, width, crop top, crop left, bucket height, width), where the crop is
    where the whole image, fitted inside the bucket, would sit (its left edge mirrored under a horizontal flip)."""
    bucket_ar, image_ar = reso[0] / reso[1], original[0] / original[1]
    if bucket_ar > image_ar:  # a wider bucket: the heights match
        fitted = (reso[1] * image_ar, float(reso[1]))
    else:
        fitted = (float(reso[0]), reso[0] / image_ar)
    left, top = (reso[0] - fitted[0]) // 2, (reso[1] - fitted[1]) // 2
    if flip:
        left = reso[0] - (left + fitted[0])
    return original[1], original[0], int(top), int(left), reso[1], reso[0]
