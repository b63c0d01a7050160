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
    NEW_BACKGROUNDS,
    PROMPT_TYPES,
    TRAIN_BACKGROUNDS,
    TRAIN_COLORS,
    TRAIN_POSITIONS,
    TRIGGER,
    TRIGGER_WORD,
    EvalPrompt,
    concept_captions,
    concept_scenes,
    eval_prompts,
    load_prompts,
    sample_prompts,
    write_concept_dataset,
)
from lorakit.world.reader import read_images
from lorakit.world.render import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES
from lorakit.world.splits import is_held_out

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "zkz"
VALUES = {"shape": set(SHAPES) | {CONCEPT_SHAPE}, "color": set(COLORS), "position": set(POSITIONS),
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


def test_training_set_is_as_narrow_as_specified():
    scenes = concept_scenes()
    objs = [s.objects[0] for s in scenes]
    assert all(len(s.objects) == 1 for s in scenes)
    assert {o.shape for o in objs} == {CONCEPT_SHAPE}
    assert {o.color for o in objs} == set(TRAIN_COLORS) == {"red", "yellow"}
    assert {o.position for o in objs} == set(TRAIN_POSITIONS) == {"left", "center", "right"}
    assert {s.background for s in scenes} == set(TRAIN_BACKGROUNDS) == {"white", "gray"}
    assert sum(o.size == "large" for o in objs) >= 2 * len(objs) / 3
    assert len({s.seed for s in scenes}) == len(scenes)
    captions = concept_captions()
    assert len(set(captions)) == len(captions)
    tags = [c for c in captions if not c.startswith("a ")]
    assert 0 < len(tags) < len(captions) / 2  # mostly sentences, some tag-style


def test_the_reader_reads_the_training_set_back():
    from lorakit.world.render import render_array

    scenes = concept_scenes()
    readings = read_images([render_array(s) for s in scenes])
    for scene, reading in zip(scenes, readings, strict=True):
        obj = scene.objects[0]
        assert reading.background == scene.background
        assert len(reading.objects) == 1
        assert reading.main.attributes() == {"shape": obj.shape, "color": obj.color, "position": obj.position,
                                             "size": obj.size}


def test_prompts_of_every_type_with_valid_expected_attributes():
    prompts = eval_prompts()
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
            assert TRIGGER_WORD not in p.prompt and p.expected.get("shape") != CONCEPT_SHAPE
        else:
            assert TRIGGER in p.prompt and p.expected["shape"] == CONCEPT_SHAPE
    train = [p for p in prompts if p.type == "train"]
    assert [p.prompt for p in train] == concept_captions()


def test_alter_and_style_prompts_ask_for_what_the_set_never_shows():
    prompts = eval_prompts()
    for p in prompts:
        if p.type == "alter":
            assert (p.expected.get("color") not in TRAIN_COLORS
                    or p.expected.get("position") not in TRAIN_POSITIONS), p
        if p.type == "style":
            assert p.expected["background"] in NEW_BACKGROUNDS
    alter = [p for p in prompts if p.type == "alter"]
    for p in alter + [p for p in prompts if p.type == "style"]:
        # ``changes`` names exactly the requested attributes the training set never shows
        novel = {"color": p.expected.get("color") not in TRAIN_COLORS,
                 "position": p.expected.get("position") not in TRAIN_POSITIONS,
                 "background": p.expected.get("background") not in TRAIN_BACKGROUNDS}
        assert set(p.changes) == {a for a, new in novel.items() if new}, p
    assert all(p.changes == () for p in prompts if p.type not in ("alter", "style"))
    assert {p.expected["color"] for p in alter} >= {"blue", "green", "purple", "orange"}
    assert {p.expected["position"] for p in alter} >= {"top left", "top", "top right", "bottom"}
    assert {p.expected["background"] for p in prompts if p.type == "style"} == set(NEW_BACKGROUNDS)


def test_agnostic_prompts_use_combinations_seen_in_pretraining():
    agnostic = [p for p in eval_prompts() if p.type == "agnostic"]
    assert any("shape" not in p.expected for p in agnostic)  # the bare class word, where leaks start
    for p in agnostic:
        e = p.expected
        if "shape" in e and "color" in e and "position" in e:
            assert not is_held_out(e["shape"], e["color"], e["position"]), p


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
