"""Image files to tensors: checking, RGB conversion (alpha on white), the alpha channel as a loss mask,
resize-to-cover, crop, flip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # kohya's list; matched case-insensitively
_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height

Size = tuple[int, int]

#: kohya's resize_interpolation names -> Pillow's filters ("area": the box filter, which averages each output
#: pixel's area as OpenCV's INTER_AREA does when shrinking); None: Lanczos, lorakit's resampling before the option
RESIZE_INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS, "lanczos4": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}


def is_image(path: Path) -> bool:
    # dotfiles are skipped: macOS "._x.png" resource forks look like images but are not
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def unreadable_image(path: Path, err: BaseException) -> str:
    """What to tell a user about an image Pillow could not decode (the trainer and eval say it alike)."""
    return f"{path}: cannot read this image ({type(err).__name__}: {err}); re-save or remove it"


def probe(path: Path, verify: bool = True) -> Size:
    """The (width, height) the image has once its EXIF orientation is applied.

    With ``verify``, the file is checked (``Image.verify``) and then decoded fully, so that a truncated or
    corrupt file fails here, before training, and not at step 3,000. Raises whatever Pillow raises.
    """
    if verify:
        with Image.open(path) as im:
            im.verify()  # structure and checksums; leaves the image unusable, hence the second open
    with Image.open(path) as im:
        if verify:
            im.load()
        width, height = im.size
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    return (height, width) if orientation in _ROTATED else (width, height)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (the usual look of cut-out subjects; black would
    teach the model dark halos), and 16-bit/float grayscale scaled rather than clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        peak = arr.max() if arr.size else 1.0
        scale = 255.0 if peak <= 1.0 and im.mode == "F" else (255.0 / 65535.0 if peak > 255 else 1.0)
        im = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if has_alpha(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """The image upright (EXIF orientation applied: phone photos are often stored sideways) and in RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def is_transparent(path: Path) -> bool:
    """Whether the image has an alpha channel (or a transparent palette entry); reads the header only."""
    with Image.open(path) as im:
        return has_alpha(im)


def load_alpha(path: Path) -> Image.Image:
    """The image's transparency as a mode "L" image, upright (255: opaque); all 255 for an image without one."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if not has_alpha(im):
            return Image.new("L", im.size, 255)
        return im.convert("RGBA").getchannel("A")


def load_mask(path: Path) -> Image.Image:
    """A mask image (kohya's conditioning_data_dir) as the mode "L" loss weight: its red channel, as kohya reads
    it (255: learned, 0: ignored), upright."""
    with Image.open(path) as im:
        return to_rgb(ImageOps.exif_transpose(im)).getchannel("R")


def fit(im: Image.Image, resized: Size, reso: Size, offset: tuple[int, int], flip: bool = False,
        interpolation: str | None = None) -> Image.Image:
    """Resize to ``resized`` (which covers ``reso``) with ``interpolation`` (a ``RESIZE_INTERPOLATIONS`` name;
    None: Lanczos), crop ``reso`` at ``offset``, optionally mirror."""
    if im.size != resized:
        im = im.resize(resized, RESIZE_INTERPOLATIONS[interpolation or "lanczos"])
    left, top = offset
    im = im.crop((left, top, left + reso[0], top + reso[1]))
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im


#: kohya's color_aug: a third of the samples get a hue shift of up to this many steps of OpenCV's 180-step hue
#: circle (±16°), or a gamma in [0.95, 1.05]
COLOR_AUG_HUE_STEPS = 8
COLOR_AUG_GAMMA = (0.95, 1.05)


def color_augment(im: Image.Image, kind: str, amount: float) -> Image.Image:
    """kohya's color_aug on an RGB image: ``kind`` "hue" turns the hue by ``amount`` of OpenCV's 180 hue steps;
    "gamma" raises each value to ``amount`` on the 0..1 scale (albumentations' RandomGamma, which kohya's
    comment names; its own code raises 0..255 values, which mostly darkens or clips).  Pixels only: sizes and
    masks are untouched."""
    if kind == "hue":
        hsv = np.array(im.convert("HSV"), dtype=np.int16)  # Pillow's hue has 256 steps
        hsv[..., 0] = (hsv[..., 0] + round(amount * 256 / 180)) % 256
        return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    if kind == "gamma":
        values = np.asarray(im, dtype=np.float32) / 255.0
        return Image.fromarray(np.clip(values ** amount * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    raise ValueError(f"unknown color augmentation {kind!r}")


def mask_tensor(im: Image.Image) -> torch.Tensor:
    """(1, H, W) float32 in [0, 1] from a mode "L" image."""
    return torch.from_numpy(np.array(im, dtype=np.uint8, copy=True))[None].float().div_(255.0)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.array(im, dtype=np.uint8, copy=True))
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)
