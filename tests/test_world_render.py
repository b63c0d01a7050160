"""The shapes world's renderer, captions, tokenizer and pretraining splits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lorakit.world.captions import named_background, named_position, natural_caption, random_caption, tag_caption
from lorakit.world.render import (
    ALL_SHAPES,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    ObjectSpec,
    Scene,
    render,
    render_array,
)
from lorakit.world.splits import all_objects, held_out_scenes, is_held_out
from lorakit.world.tokenizer import build_tokenizer, world_words


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# ------------------------------------------------------------------------------------------------ render
def test_same_seed_same_pixels_and_other_seed_other_pixels():
    scene = Scene((ObjectSpec("star", "red", "large", "center"),), "striped", seed=11)
    a, b = render_array(scene), render_array(scene)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    c = render_array(Scene(scene.objects, "striped", seed=12))
    assert not np.array_equal(a, c)


def test_every_attribute_renders_and_jitter_off_is_seed_independent():
    for shape, color in itertools.product(ALL_SHAPES, COLORS):
        scene = Scene((ObjectSpec(shape, color, "small", "top left"),), "white", seed=3)
        img = render_array(scene)
        # the object's color is in the picture (within the jitter of ±12 per channel)
        dist = np.abs(img.astype(int) - np.array(COLORS[color])).max(axis=2)
        assert (dist <= 13).sum() > 20, (shape, color)
    plain = [render_array(Scene((ObjectSpec("square", "blue", "large", "right"),), "dotted", seed=s, jitter=False))
             for s in (1, 2)]
    assert np.array_equal(*plain)


def test_resolution_is_a_parameter_and_backgrounds_differ():
    scene = Scene((), "gray", seed=0)
    assert render(scene, 128).size == (128, 128)
    means = {bg: render_array(Scene((), bg, seed=0, jitter=False)).mean() for bg in BACKGROUNDS}
    assert means["black"] < means["gray"] < means["striped"] < means["white"]
    assert means["dotted"] < means["white"]


def test_unknown_attributes_are_refused():
    with pytest.raises(ValueError, match="unknown shape"):
        ObjectSpec("hexagon", "red", "small", "center")
    with pytest.raises(ValueError, match="unknown background"):
        Scene((), "plaid")


# ---------------------------------------------------------------------------------------------- captions
def test_captions_name_every_attribute_unless_omitted():
    scene = Scene((ObjectSpec("circle", "red", "small", "top left"),), "white")
    assert natural_caption(scene) == "a small red circle at the top left, white background"
    assert natural_caption(scene, template=1) == "a small red circle at the top left on a white background"
    assert natural_caption(scene, template=2).startswith("a picture of ")
    assert natural_caption(scene, omit=["shape", "background"]) == "a small red shape at the top left"
    assert natural_caption(scene, shape_word="zkz shape") == "a small red zkz shape at the top left, white background"
    assert tag_caption(scene) == "red circle, small, top left, white background"
    assert tag_caption(scene, shape_word="zkz shape", omit=["size"]) == "red zkz shape, top left, white background"


def test_position_and_background_read_back_from_every_caption_style():
    rng = np.random.default_rng(0)
    objects = all_objects(held_out=False)
    for i in range(400):
        scene = Scene((objects[i % len(objects)],), BACKGROUNDS[i % len(BACKGROUNDS)])
        caption = random_caption(scene, rng)
        position, background = scene.objects[0].position, scene.background
        # an omitted attribute reads back as None, a named one as itself
        assert named_position(caption) == (position if position in caption else None), caption
        assert named_background(caption) == (background if f"{background} background" in caption else None), caption
    assert named_position("") is None and named_background("a red circle") is None


# --------------------------------------------------------------------------------------------- tokenizer
def test_every_world_word_is_one_token(tokenizer):
    for word in world_words():
        assert len(tokenizer.tokenize(word)) == 1, word


def test_the_trigger_splits_into_pieces(tokenizer):
    pieces = tokenizer.tokenize("zkz")
    assert len(pieces) > 1
    assert "".join(pieces).replace("</w>", "") == "zkz"
    ids = tokenizer("a zkz shape").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_clip_files_load_with_transformers(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    from lorakit.world.model import write_clip_vocab_files

    write_clip_vocab_files(tokenizer, tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    for text in ("a large red zkz shape on the left, white background", "yellow cross, small, top right"):
        assert loaded(text).input_ids == tokenizer(text).input_ids


# ------------------------------------------------------------------------------------------------ splits
def test_24_triples_held_out_and_every_pair_still_seen():
    triples = list(itertools.product(SHAPES, COLORS, POSITIONS))
    held = [t for t in triples if is_held_out(*t)]
    assert len(triples) == 216 and len(held) == 24
    seen = [t for t in triples if not is_held_out(*t)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert {(t[a], t[b]) for t in seen} == {(t[a], t[b]) for t in triples}


def test_split_objects_and_scenes():
    train, held = all_objects(held_out=False), all_objects(held_out=True)
    assert len(train) + len(held) == len(all_objects()) == 216 * 2
    assert all(is_held_out(o.shape, o.color, o.position) for o in held)
    assert not any(o.shape == "star" for o in train + held)
    scenes = held_out_scenes(10, seed=5)
    assert [s.seed for s in scenes] == list(range(5, 15))
    assert all(is_held_out(s.objects[0].shape, s.objects[0].color, s.objects[0].position) for s in scenes)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
