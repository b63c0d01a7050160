"""Captions for shapes-world scenes, in the two styles people write: sentences and comma-separated tags.

Any attribute may be left out of a caption (``omit``), as people do; a left-out shape is called "shape",
which is the class word a trigger is paired with ("a zkz shape", as "a sks dog").
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from lorakit.world.render import BACKGROUNDS, ObjectSpec, Scene

CLASS_WORD = "shape"

_POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}

ATTRIBUTES = ("shape", "color", "size", "position", "background")


def _noun(obj: ObjectSpec, omit: frozenset[str], shape_word: str | None) -> str:
    words = []
    if "size" not in omit:
        words.append(obj.size)
    if "color" not in omit:
        words.append(obj.color)
    if shape_word is not None:
        words.append(shape_word)
    elif "shape" in omit:
        words.append(CLASS_WORD)
    else:
        words.append(obj.shape)
    return " ".join(words)


def natural_caption(scene: Scene, omit: Iterable[str] = (), shape_word: str | None = None,
                    template: int = 0) -> str:
    """A sentence such as "a small red circle at the top left, white background".

    ``shape_word`` replaces the shape's name (e.g. "zkz shape" for a trigger); ``template`` picks one of
    a few phrasings so a model does not learn a single sentence.
    """
    omit = frozenset(omit)
    parts = []
    for obj in scene.objects:
        phrase = "a " + _noun(obj, omit, shape_word)
        if "position" not in omit:
            phrase += " " + _POSITION_PHRASES[obj.position]
        parts.append(phrase)
    text = " and ".join(parts)
    if "background" not in omit:
        text += (f", {scene.background} background" if template % 2 == 0
                 else f" on a {scene.background} background")
    if template % 3 == 2:
        text = "a picture of " + text
    return text


def tag_caption(scene: Scene, omit: Iterable[str] = (), shape_word: str | None = None) -> str:
    """Tags such as "red circle, small, top left, white background"."""
    omit = frozenset(omit)
    tags = []
    for obj in scene.objects:
        noun = shape_word if shape_word is not None else (CLASS_WORD if "shape" in omit else obj.shape)
        tags.append(noun if "color" in omit else f"{obj.color} {noun}")
        if "size" not in omit:
            tags.append(obj.size)
        if "position" not in omit:
            tags.append(obj.position)
    if "background" not in omit:
        tags.append(f"{scene.background} background")
    return ", ".join(tags)


def random_caption(scene: Scene, rng: np.random.Generator, omit_probability: float = 0.25,
                   tag_probability: float = 0.3) -> str:
    """A caption in a random style with attributes randomly left out (pretraining data)."""
    probs = {"shape": omit_probability / 3, "color": omit_probability / 2, "size": omit_probability,
             "position": omit_probability, "background": omit_probability}
    omit = [a for a in ATTRIBUTES if rng.random() < probs[a]]
    if rng.random() < tag_probability:
        return tag_caption(scene, omit)
    return natural_caption(scene, omit, template=int(rng.integers(0, 6)))


def named_position(caption: str) -> str | None:
    """The position a caption of either style names ("top left", "center", ...), read back from its words, or
    None when it names none (pretraining's position probe learns from this)."""
    words = re.findall(r"[a-z]+", caption.lower())
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    if vertical or horizontal:
        return " ".join(w for w in (vertical, horizontal) if w)
    return "center" if "center" in words else None


def named_background(caption: str) -> str | None:
    """The background a caption names ("..., white background", "... on a gray background"), or None."""
    named = re.search(r"([a-z]+) background", caption.lower())
    return named.group(1) if named and named.group(1) in BACKGROUNDS else None
