"""The "zkz" concept: its training set (deterministic, narrow, as specified) and its evaluation prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.world import concept
from lorakit.world.concept import (
    CONCEPT_SHAPE,
    FOLDER_NAME,
    PROMPT_TYPES,
    TRAIN_BACKGROUNDS,
    TRAIN_COLORS,
    TRAIN_POSITIONS,
    TRIGGER,
    EvalPrompt,
    concept_captions,
    concept_scenes,
    eval_prompts,
    load_prompts,
    sample_prompts,
    write_concept_dataset,
)
from lorakit.world.reader import read_images
from lorakit.world.render import BACKGROUNDS, COLORS, CONCEPT_SHAPES, POSITIONS, SHAPES, SIZES
from lorakit.world.splits import is_held_out

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "zkz"
VALUES = {"shape": set(SHAPES) | set(CONCEPT_SHAPES), "color": set(COLORS), "position": set(POSITIONS),
          "size": set(SIZES), "background": set(BACKGROUNDS)}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zkz")
    write_concept_dataset(folder)
    return folder


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_dataset_is_deterministic_and_matches_the_committed_example(written, tmp_path):
    write_concept_dataset(tmp_path)
    assert _files(written) == _files(tmp_path) == _files(EXAMPLE)
    for name in _files(written):
        a, b, c = written / name, tmp_path / name, EXAMPLE / name
        if name.endswith(".png"):
            pixels = [np.asarray(Image.open(p)) for p in (a, b, c)]
            assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2]), name
        else:
            assert a.read_text() == b.read_text() == c.read_text(), name


def test_kohya_layout(written):
    folder = written / FOLDER_NAME
    assert FOLDER_NAME == "10_zkz shape"
    images = sorted(folder.glob("*.png"))
    assert 10 <= len(images) <= 20
    assert [p.stem for p in images] == [f"{i:03d}" for i in range(len(images))]
    for p in images:
        assert Image.open(p).size == (64, 64)
        caption = p.with_suffix(".txt").read_text().strip()
        assert TRIGGER in caption and CONCEPT_SHAPE not in caption


BOTH = pytest.mark.parametrize("c", list(concept.CONCEPTS.values()), ids=list(concept.CONCEPTS))


def test_training_set_is_as_narrow_as_specified():
    assert (TRAIN_COLORS, TRAIN_POSITIONS, TRAIN_BACKGROUNDS) == (("red", "yellow"), ("left", "center", "right"),
                                                                  ("white", "gray"))
    assert concept.VLX.train_colors == ("blue", "green") and concept.VLX.shape == "heart"


@BOTH
def test_each_concepts_training_set_is_narrow(c):
    scenes = concept_scenes(c)
    objs = [s.objects[0] for s in scenes]
    assert all(len(s.objects) == 1 for s in scenes)
    assert {o.shape for o in objs} == {c.shape}
    assert {o.color for o in objs} == set(c.train_colors)
    assert {o.position for o in objs} == set(c.train_positions)
    assert {s.background for s in scenes} == set(c.train_backgrounds)
    assert sum(o.size == "large" for o in objs) >= 2 * len(objs) / 3
    assert len({s.seed for s in scenes}) == len(scenes)
    captions = concept_captions(c)
    assert len(set(captions)) == len(captions)
    assert all(c.trigger in t and c.shape not in t for t in captions)
    tags = [t for t in captions if not t.startswith("a ")]
    assert 0 < len(tags) < len(captions) / 2  # mostly sentences, some tag-style


def test_the_second_concept_is_new_to_the_base_model():
    from lorakit.world.render import PRETRAINING_SHAPES
    from lorakit.world.tokenizer import world_words

    vlx = concept.VLX
    # a shape pretraining never drew, under a word its tokenizer does not know (it splits into pieces)
    assert vlx.shape not in PRETRAINING_SHAPES and vlx.shape not in world_words()
    assert vlx.trigger_word not in world_words() and vlx.shape != CONCEPT_SHAPE
    assert vlx.folder_name == "10_vlx shape" and vlx.seed_base != concept.ZKZ.seed_base
    assert concept.get_concept("vlx") is vlx
    with pytest.raises(ValueError, match="unknown concept 'moon'"):
        concept.get_concept("moon")


@BOTH
def test_the_reader_reads_the_training_set_back(c):
    from lorakit.world.render import render_array

    scenes = concept_scenes(c)
    readings = read_images([render_array(s) for s in scenes])
    for scene, reading in zip(scenes, readings, strict=True):
        obj = scene.objects[0]
        assert reading.background == scene.background
        assert len(reading.objects) == 1
        assert reading.main.attributes() == {"shape": obj.shape, "color": obj.color, "position": obj.position,
                                             "size": obj.size}


@BOTH
def test_prompts_of_every_type_with_valid_expected_attributes(c):
    prompts = eval_prompts(c)
    assert {p.type for p in prompts} == set(PROMPT_TYPES)
    assert len({(p.prompt, p.seed) for p in prompts}) == len(prompts)
    for p in prompts:
        assert p.expected, p
        for attr, value in p.expected.items():
            assert value in VALUES[attr], (p, attr)
        # what a prompt asks for is what its words say
        for attr in ("color", "background"):
            if attr in p.expected:
                assert p.expected[attr] in p.prompt, p
        if p.type == "agnostic":
            assert c.trigger_word not in p.prompt and p.expected.get("shape") != c.shape
        else:
            assert c.trigger in p.prompt and p.expected["shape"] == c.shape
    train = [p for p in prompts if p.type == "train"]
    assert [p.prompt for p in train] == concept_captions(c)


@BOTH
def test_alter_and_style_prompts_ask_for_what_the_set_never_shows(c):
    prompts = eval_prompts(c)
    for p in prompts:
        if p.type == "alter":
            assert (p.expected.get("color") not in c.train_colors
                    or p.expected.get("position") not in c.train_positions), p
        if p.type == "style":
            assert p.expected["background"] in c.new_backgrounds
    alter = [p for p in prompts if p.type == "alter"]
    for p in alter + [p for p in prompts if p.type == "style"]:
        # ``changes`` names exactly the requested attributes the training set never shows
        novel = {"color": p.expected.get("color") not in c.train_colors,
                 "position": p.expected.get("position") not in c.train_positions,
                 "background": p.expected.get("background") not in c.train_backgrounds}
        assert set(p.changes) == {a for a, new in novel.items() if new}, p
    assert all(p.changes == () for p in prompts if p.type not in ("alter", "style"))
    assert {p.expected["color"] for p in alter} >= set(c.new_colors)
    assert {p.expected["position"] for p in alter} >= {"top left", "top", "top right", "bottom"}
    assert {p.expected["background"] for p in prompts if p.type == "style"} == set(c.new_backgrounds)


@BOTH
def test_agnostic_prompts_use_combinations_seen_in_pretraining(c):
    agnostic = [p for p in eval_prompts(c) if p.type == "agnostic"]
    assert any("shape" not in p.expected for p in agnostic)  # the bare class word, where leaks start
    for p in agnostic:
        e = p.expected
        if "shape" in e and "color" in e and "position" in e:
            assert not is_held_out(e["shape"], e["color"], e["position"]), p


def test_the_second_concepts_prompt_file(tmp_path):
    from lorakit.evaluate.prompts import load_prompt_set

    vlx = concept.VLX
    path = concept.PROMPT_FILES["vlx"]
    assert path.read_text() == concept.prompt_file_text(vlx)  # the shipped file is what the generator writes
    loaded = load_prompt_set(path)
    assert (loaded.concept, loaded.trigger) == ("vlx", "vlx shape")
    assert [(p.text, p.type, p.seed, dict(p.expected), tuple(p.changes)) for p in loaded.prompts] == \
        [(p.prompt, p.type, p.seed, p.expected, p.changes) for p in eval_prompts(vlx)]
    paths = write_concept_dataset(tmp_path, vlx)
    assert {p.parent.name for p in paths} == {"10_vlx shape"} and len(paths) == 15
    assert (tmp_path / "eval_prompts.toml").read_text() == path.read_text()
    assert load_prompts(tmp_path / "prompts.json") == eval_prompts(vlx)
    assert json.loads((tmp_path / "prompts.json").read_text())["concept"]["shape"] == "heart"
    assert (tmp_path / "10_vlx shape" / "000.txt").read_text().strip() == eval_prompts(vlx)[0].prompt


def test_prompt_files(written):
    assert load_prompts(written / "prompts.json") == eval_prompts()
    data = json.loads((written / "prompts.json").read_text())
    assert data["concept"]["trigger"] == TRIGGER and data["concept"]["shape"] == CONCEPT_SHAPE
    line = re.compile(r"^(?P<prompt>[^-]+?)( --n (?P<neg>.+?))? --w 64 --h 64 --d (?P<seed>\d+) --l [\d.]+ --s \d+$")
    for name, expected in (("eval_prompts.txt", eval_prompts()), ("sample_prompts.txt", sample_prompts())):
        lines = (written / name).read_text().splitlines()
        assert len(lines) == len(expected)
        for text, p in zip(lines, expected, strict=True):
            m = line.match(text)
            assert m, text
            assert m["prompt"] == p.prompt and int(m["seed"]) == p.seed
    assert {p.type for p in sample_prompts()} == set(PROMPT_TYPES)
    assert EvalPrompt("trigger", "x", negative="blurry", seed=3).kohya_line(steps=20, cfg=5) == \
        "x --n blurry --w 64 --h 64 --d 3 --l 5 --s 20"
    with pytest.raises(ValueError, match="unknown prompt type"):
        EvalPrompt("weird", "x")


def test_concept_spec_describes_the_set():
    spec = concept.concept_spec()
    assert spec["images"] == len(concept_scenes()) == 15 and spec["large"] == 12
