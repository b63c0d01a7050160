"""Which attribute combinations the base model is pretrained on, and which are held out to test it.

A (shape, color, position) triple is held out when ``(s + 2c + 4p) mod 9 == 0`` (indices into the world's
tables).  Because 2 and 4 are invertible mod 9, every (shape, color), (shape, position) and (color, position)
pair still occurs in training with other third values: the held-out prompts ask for seen attributes in
unseen combinations, which is what "generalises" means here.  24 of the 216 triples (11%) are held out.
"""

from __future__ import annotations

import itertools

from lorakit.world.render import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ObjectSpec, Scene

_COLOR_NAMES = list(COLORS)
_POSITION_NAMES = list(POSITIONS)


def is_held_out(shape: str, color: str, position: str) -> bool:
    s, c, p = SHAPES.index(shape), _COLOR_NAMES.index(color), _POSITION_NAMES.index(position)
    return (s + 2 * c + 4 * p) % 9 == 0


def all_objects(held_out: bool | None = None) -> list[ObjectSpec]:
    """Every object of the pretraining world; ``held_out`` True/False keeps only that split."""
    objects = []
    for shape, color, size, position in itertools.product(SHAPES, COLORS, SIZES, POSITIONS):
        if held_out is None or is_held_out(shape, color, position) == held_out:
            objects.append(ObjectSpec(shape, color, size, position))
    return objects


def held_out_scenes(count: int, seed: int = 0) -> list[Scene]:
    """``count`` scenes of held-out objects, cycling deterministically through backgrounds."""
    objects = all_objects(held_out=True)
    return [Scene((objects[(i * 7) % len(objects)],), BACKGROUNDS[i % len(BACKGROUNDS)], seed=seed + i)
            for i in range(count)]
