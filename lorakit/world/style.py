"""A style for the shapes world: the "checkered" background, which the base model has never seen.

The block-wise LoRA paper trains a *style* adapter (here: a background texture) beside a *character* adapter
(the "zkz" star, ``lorakit.world.concept``) and combines them at inference.  Pretraining never shows a
checkerboard and no pretraining caption says "checkered" (the tokenizer has the word among its common English
words, but its embedding was never paired with an image), so only the style adapter can teach it.  The
style's training set shows the base world's own shapes (never the star) in many colors and places on the
checkered background, so the style adapter learns the texture, not a shape; the attribute reader reads the
texture back (``read_background``: energy on both diagonals).

``write_style_dataset("examples/checkered")`` writes the set in kohya's layout
(``10_checkered background/NNN.png`` + ``NNN.txt``).
"""

from __future__ import annotations

from pathlib import Path

from lorakit.world.captions import natural_caption, tag_caption
from lorakit.world.concept import write_images
from lorakit.world.render import ObjectSpec, Scene

STYLE_BACKGROUND = "checkered"
REPEATS = 10
FOLDER_NAME = f"{REPEATS}_{STYLE_BACKGROUND} background"
SEED_BASE = 737_000

# 16 scenes: each base shape in four colors, spread over the grid, both sizes (never the star)
_STYLE_SPECS = (
    ("circle", "red", "top left", "large"), ("circle", "blue", "center", "small"),
    ("circle", "green", "bottom right", "large"), ("circle", "purple", "right", "large"),
    ("square", "yellow", "top", "large"), ("square", "green", "left", "small"),
    ("square", "orange", "bottom", "large"), ("square", "blue", "top right", "large"),
    ("triangle", "purple", "bottom left", "large"), ("triangle", "red", "right", "small"),
    ("triangle", "orange", "center", "large"), ("triangle", "yellow", "top left", "large"),
    ("cross", "blue", "bottom", "large"), ("cross", "red", "center", "large"),
    ("cross", "yellow", "bottom right", "small"), ("cross", "green", "top", "large"),
)


def style_scenes() -> list[Scene]:
    """The style's 16 training scenes."""
    return [Scene((ObjectSpec(shape, color, size, position),), STYLE_BACKGROUND, seed=SEED_BASE + i)
            for i, (shape, color, position, size) in enumerate(_STYLE_SPECS)]


def style_captions() -> list[str]:
    """Every fourth caption in tag style, the others as sentences; each names the background."""
    return [tag_caption(scene) if i % 4 == 3 else natural_caption(scene, template=i % 6)
            for i, scene in enumerate(style_scenes())]


def write_style_dataset(folder: str | Path) -> list[Path]:
    """Write the style's training set (kohya layout) under ``folder``; deterministic.  Returns the image paths."""
    return write_images(Path(folder) / FOLDER_NAME, style_scenes(), style_captions())
