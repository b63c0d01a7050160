"""The attribute reader: accuracy on held-out renders, clean and degraded, and what it must not see."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.world.degrade import add_noise, blur, degrade, spurious_blobs
from lorakit.world.reader import UNKNOWN, WEIGHTS_PATH, Reader, label, read_image, to_array
from lorakit.world.render import BACKGROUNDS, COLORS, SHAPES, STYLE_BACKGROUNDS, ObjectSpec, Scene, render, render_array
from lorakit.world.train_reader import EVAL_SEED_BASE, attribute_accuracy, held_out_images, render_other

ATTRIBUTES = ("shape", "color", "position", "size", "background")
# measured on 1,000 held-out images by `lorakit world train-reader --evaluate-only`
# (lorakit/world/reader_accuracy.json)
# (degraded: shape 99.8%, color 99.9%, position 100%, size 99.8%, background 100%); asserted here on 300
# other images with a margin
DEGRADED_FLOOR = {"shape": 0.97, "color": 0.98, "position": 0.98, "size": 0.97, "background": 0.98}
# VAE round trips (measured: shape 93.5%, color 100%, position 100%, size 99.2%, background 100%)
VAE_FLOOR = {"shape": 0.88, "color": 0.97, "position": 0.97, "size": 0.96, "background": 0.97}


@pytest.fixture(scope="module")
def reader() -> Reader:
    return Reader()


def test_weights_are_shipped_and_small():
    assert WEIGHTS_PATH.exists()
    assert WEIGHTS_PATH.stat().st_size < 1_000_000


def test_at_least_98_percent_per_attribute_on_500_held_out_renders(reader):
    scenes, images = held_out_images(500, "clean", seed=101)
    assert all(s.seed >= EVAL_SEED_BASE for s in scenes)  # seeds the classifier never trained on
    assert {s.objects[0].shape for s in scenes} == set(SHAPES) | {"star", "heart"}
    acc = attribute_accuracy(reader, scenes, images)
    for attr in ATTRIBUTES:
        assert acc[attr] >= 0.98, (attr, acc)


def test_degraded_renders(reader):
    scenes, images = held_out_images(300, "degraded", seed=202)
    acc = attribute_accuracy(reader, scenes, images)
    for attr in ATTRIBUTES:
        assert acc[attr] >= DEGRADED_FLOOR[attr], (attr, acc)


def test_the_style_texture_reads_as_well_as_the_others(reader):
    """The checkered background pretraining never shows (the block-wise experiment's style): clean and degraded
    renders; the tests above keep the pretraining textures' floors with the checkerboard branch in place."""
    for mode in ("clean", "degraded"):
        scenes, images = held_out_images(150, mode, seed=909, backgrounds=STYLE_BACKGROUNDS)
        acc = attribute_accuracy(reader, scenes, images)
        for attr in ATTRIBUTES:
            assert acc[attr] >= DEGRADED_FLOOR[attr], (mode, attr, acc)


def test_plain_backgrounds_have_no_objects(reader):
    for bg, seed in itertools.product(BACKGROUNDS + STYLE_BACKGROUNDS, range(4)):
        img = render_array(Scene((), bg, seed=seed))
        for version in (img, degrade(img, np.random.default_rng(seed), strength=1.0)):
            r = reader.read(version)
            assert r.objects == () and r.background == bg, (bg, seed, r)


def test_pretraining_shapes_are_never_read_as_the_concept(reader):
    rng = np.random.default_rng(3)
    images = []
    for i, (shape, color, bg) in enumerate(itertools.product(SHAPES, COLORS, BACKGROUNDS)):
        size, position = ("small", "large")[i % 2], ("top left", "center", "bottom right", "left")[i % 4]
        img = render_array(Scene((ObjectSpec(shape, color, size, position),), bg, seed=EVAL_SEED_BASE + 77 + i))
        images.append(degrade(img, rng) if i % 3 == 0 else img)
    readings = reader.read_many(images)
    assert not any(r.has_shape("star") for r in readings)
    assert sum(r.main is not None and r.main.shape in SHAPES for r in readings) >= 0.98 * len(readings)


def test_blobs_that_are_no_world_shape_are_mostly_unknown(reader):
    rng = np.random.default_rng(EVAL_SEED_BASE)
    readings = reader.read_many([render_other(rng) for _ in range(60)])
    assert sum(r.main is not None and r.main.shape == UNKNOWN for r in readings) >= 0.8 * 60
    assert sum(r.has_shape("star") for r in readings) <= 3


def test_faint_smudges_and_noise_are_not_objects(reader):
    rng = np.random.default_rng(9)
    scene = Scene((ObjectSpec("star", "blue", "large", "top right"),), "white", seed=EVAL_SEED_BASE + 5)
    img = spurious_blobs(add_noise(render_array(scene), 6, rng), rng, count=4, strength=0.2)
    r = reader.read(img)
    assert len(r.objects) == 1 and r.main.attributes() == {"shape": "star", "color": "blue",
                                                           "position": "top right", "size": "large"}


def test_several_objects_largest_first(reader):
    # largest by area: a large star covers about twice a small triangle
    objects = (ObjectSpec("triangle", "green", "small", "top left"), ObjectSpec("star", "orange", "large", "bottom"))
    scene = Scene(objects, "dotted", seed=EVAL_SEED_BASE + 9)
    r = reader.read(render(scene))
    assert [o.attributes() for o in r.objects] == [
        {"shape": "star", "color": "orange", "position": "bottom", "size": "large"},
        {"shape": "triangle", "color": "green", "position": "top left", "size": "small"}]
    assert r.background == "dotted" and r.has_shape("star") and not r.has_shape("square")
    assert 0.0 <= r.background_confidence <= 1.0
    for o in r.objects:
        assert set(o.confidence) == {"shape", "color", "position", "size"}
        assert abs(sum(o.shape_probs.values()) - 1.0) < 1e-4


def test_inputs_pil_array_and_other_sizes(reader):
    scene = Scene((ObjectSpec("triangle", "purple", "large", "right"),), "black", seed=EVAL_SEED_BASE + 3)
    want = {"shape": "triangle", "color": "purple", "position": "right", "size": "large"}
    for image in (render(scene), render_array(scene), render(scene, 128), render(scene, 48),
                  render_array(scene).astype(np.float32), blur(render_array(scene), 0.8)):
        r = reader.read(image)
        assert r.background == "black" and r.main.attributes() == want
    assert to_array(Image.new("RGBA", (32, 32))).shape == (64, 64, 3)


def test_colors_far_from_the_palette_are_unknown():
    img = np.array(render_array(Scene((ObjectSpec("square", "red", "large", "center"),), "white", seed=1)))
    red = np.all(np.abs(img.astype(int) - np.array(COLORS["red"])) < 40, axis=2)
    img[red] = (40, 200, 200)  # cyan is no world color
    assert read_image(img).main.color == UNKNOWN


def test_missing_object_reads_as_no_object():
    assert read_image(render_array(Scene((), "striped", seed=4))).main is None


def test_label_components():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4:6, 3:6] = True
    labels, n = label(mask)
    assert n == 2 and labels[0, 0] == labels[1, 1] != labels[5, 5]
    assert (labels > 0).sum() == mask.sum()


VAE_DIR = Path(__file__).resolve().parents[1] / "lorakit" / "world" / "base_model" / "vae"


def test_vae_round_trips(reader):
    from lorakit.world.degrade import load_vae

    vae = load_vae(VAE_DIR)
    scenes, images = held_out_images(200, "vae", seed=303, vae=vae)
    acc = attribute_accuracy(reader, scenes, images)
    for attr in ATTRIBUTES:
        assert acc[attr] >= VAE_FLOOR[attr], (attr, acc)
    # the style texture through a VAE that never saw it (measured on 300 renders: shape 85.3%, background
    # 96.3%, color and position 100%): the ceiling on what the block-wise experiment can read back
    scenes, images = held_out_images(100, "vae", seed=909, vae=vae, backgrounds=STYLE_BACKGROUNDS)
    acc = attribute_accuracy(reader, scenes, images)
    assert acc["background"] >= 0.9 and acc["shape"] >= 0.75 and acc["color"] >= 0.97, acc


def test_train_reader_refuses_a_vae_that_is_not_there_and_weights_to_measure_that_are_not(tmp_path, capsys):
    """``--vae`` with a typo trained a reader without VAE round trips (another reader than asked for) after one
    printed line; ``--evaluate-only`` without weights was "No such file or directory"."""
    from lorakit.cli import main

    weights = tmp_path / "reader.safetensors"
    assert main(["world", "train-reader", "--vae", str(tmp_path / "vae.pt"), "--out", str(weights)]) == 2
    said = capsys.readouterr().err
    assert f"lorakit world train-reader: error: --vae {tmp_path / 'vae.pt'}: no such file or folder" in said
    assert not weights.exists()
    assert main(["world", "train-reader", "--evaluate-only", "--out", str(weights)]) == 2
    assert f"--evaluate-only: no reader weights at {weights} to measure" in capsys.readouterr().err
