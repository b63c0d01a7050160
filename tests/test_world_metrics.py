"""The world's metrics on hand-built readings whose right answers are known, and end to end on renders."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit.world.concept import EvalPrompt, eval_prompts
from lorakit.world.metrics import (
    attribute_vector,
    metrics_from_readings,
    vendi_score,
    vendi_score_kernel,
    world_metrics,
)
from lorakit.world.reader import Reading, ReadObject
from lorakit.world.render import ObjectSpec, Scene, render_array


def obj(shape: str = "star", color: str = "red", position: str = "center", size: str = "large") -> ReadObject:
    return ReadObject(shape, color, position, size, confidence={}, area=0.05, centroid=(0.5, 0.5))


def reading(*objects: ReadObject, background: str = "white") -> Reading:
    return Reading(background, 1.0, tuple(objects))


ALTER = EvalPrompt("alter", "a large blue zkz shape at the top, white background",
                   {"shape": "star", "color": "blue", "position": "top", "size": "large", "background": "white"},
                   changes=("color", "position"))
STYLE = EvalPrompt("style", "a large red zkz shape in the center, black background",
                   {"shape": "star", "color": "red", "position": "center", "background": "black"},
                   changes=("background",))
AGNOSTIC = EvalPrompt("agnostic", "a red circle on the left", {"shape": "circle", "color": "red", "position": "left"})
TRIGGER = EvalPrompt("trigger", "a zkz shape", {"shape": "star"})


# ------------------------------------------------------------------------------------------------ Vendi
def test_vendi_identical_is_one_orthogonal_is_n():
    assert vendi_score(np.ones((7, 5))) == pytest.approx(1.0)
    assert vendi_score(np.eye(6)) == pytest.approx(6.0)
    assert vendi_score(np.eye(6) * 3.5) == pytest.approx(6.0)  # cosine kernel: scale does not matter


def test_vendi_two_orthogonal_groups_is_the_exponential_of_their_entropy():
    x = np.array([[1.0, 0.0]] * 3 + [[0.0, 2.0]] * 1)
    p = np.array([3 / 4, 1 / 4])
    assert vendi_score(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # partly similar items lie in between
    k = np.array([[1.0, 0.5], [0.5, 1.0]])
    assert 1.0 < vendi_score_kernel(k) < 2.0
    assert vendi_score_kernel(np.zeros((0, 0))) == 0.0


def test_vendi_matches_the_reference_formula_on_random_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = np.linalg.eigvalsh(xn @ xn.T / 20)
    w = w[w > 1e-12]
    assert vendi_score(x) == pytest.approx(float(np.exp(-(w * np.log(w)).sum())))


# ---------------------------------------------------------------------------------------------- metrics
def test_all_correct_images_score_perfectly():
    readings = [reading(obj("star", "blue", "top", "large")), reading(obj(), background="black"),
                reading(obj("circle", "red", "left", "small")), reading(obj())]
    m = metrics_from_readings(readings, [ALTER, STYLE, AGNOSTIC, TRIGGER])
    assert m.fidelity == 1.0 and m.fidelity_by_type == {"trigger": 1.0, "alter": 1.0, "style": 1.0}
    assert m.controllability == 1.0
    assert m.controllability_by_attribute == {"color": 1.0, "position": 1.0, "size": 1.0, "background": 1.0}
    assert m.preservation == 1.0 and m.leak == 0.0
    assert m.counts == {"alter": 1, "style": 1, "agnostic": 1, "trigger": 1}


def test_known_partial_values():
    readings = [
        reading(obj("star", "blue", "top")),  # alter: all obeyed
        reading(obj("star", "red", "top")),  # alter: wrong color
        reading(obj("circle", "blue", "center")),  # alter: no star, wrong position; color checked on the circle
        reading(),  # alter: nothing drawn
        reading(obj("star", "red", "center"), background="white"),  # style: wrong background
        reading(obj("star")),  # agnostic: the concept leaked, and it is not the requested circle
        reading(obj("circle", "red", "left"), obj("star", "yellow", "right")),  # agnostic: leak beside the circle
        reading(obj("circle", "red", "left")),  # agnostic: clean
    ]
    prompts = [ALTER] * 4 + [STYLE] + [AGNOSTIC] * 3
    m = metrics_from_readings(readings, prompts)
    assert m.fidelity_by_type == {"alter": 0.5, "style": 1.0}
    assert m.fidelity == pytest.approx(3 / 5)
    assert m.controllability_by_attribute["color"] == pytest.approx(3 / 5)  # blue, red, blue, -, red
    assert m.controllability_by_attribute["position"] == pytest.approx(3 / 5)  # top, top, center, -, center
    assert m.controllability_by_attribute["size"] == pytest.approx(3 / 4)
    assert m.controllability_by_attribute["background"] == pytest.approx(4 / 5)  # only the style one fails
    assert m.controllability == pytest.approx((3 + 3 + 3 + 4) / 19)
    assert m.leak == pytest.approx(2 / 3)
    # agnostic checks color and position on the largest circle, else the largest object: 1 + 2 + 2 of 6
    assert m.preservation == pytest.approx(5 / 6)
    # star AND the changed attribute: color on the 4 alter images (only the first), position likewise (the
    # first and the second: a star at the top in the wrong color still obeys the new position), background
    # on the style image (wrong)
    assert m.success_by_change == {"color": 0.25, "position": 0.5, "background": 0.0}
    assert m.counts_by_change == {"color": 4, "position": 4, "background": 1}


def test_a_prompt_cannot_change_what_it_does_not_ask_for():
    with pytest.raises(ValueError, match="changes"):
        EvalPrompt("alter", "a zkz shape", {"shape": "star"}, changes=("color",))
    assert EvalPrompt(**{**ALTER.__dict__, "changes": ["color"]}).changes == ("color",)  # JSON lists


def test_diversity_per_prompt():
    same = [reading(obj()) for _ in range(4)]
    m = metrics_from_readings(same, [TRIGGER] * 4)
    assert m.diversity == pytest.approx(1.0)
    varied = [reading(obj("star", c, p, s), background=b) for c, p, s, b in
              (("red", "left", "small", "white"), ("blue", "top", "large", "black"))]
    m = metrics_from_readings(varied, [TRIGGER] * 2)
    # two images sharing only their shape: cosine 1/5 between 5-hot vectors
    assert m.diversity == pytest.approx(vendi_score_kernel(np.array([[1, 0.2], [0.2, 1]])))
    assert attribute_vector(reading()).sum() == 1.0  # only the background is read


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="readings for"):
        metrics_from_readings([reading()], [TRIGGER, TRIGGER])


def test_end_to_end_on_renders_of_what_was_asked():
    prompts = [p for p in eval_prompts() if p.type in ("alter", "style", "agnostic") and "shape" in p.expected
               and {"color", "position", "background"} <= set(p.expected)]
    images, asked = [], []
    for i, p in enumerate(prompts):
        e = p.expected
        spec = ObjectSpec(e["shape"], e["color"], e.get("size", "large"), e["position"])
        for seed in (50_000 + i, 60_000 + i):  # two images per prompt: diversity is measured per prompt
            images.append(render_array(Scene((spec,), e["background"], seed=seed)))
            asked.append(p)
    m = world_metrics(images, asked)
    assert m.fidelity == 1.0 and m.controllability == 1.0 and m.preservation == 1.0 and m.leak == 0.0
    assert m.counts == {"alter": 24, "style": 12, "agnostic": 8}
    assert m.diversity == pytest.approx(1.0)  # same attributes read from both images of each prompt
    assert 1.0 < m.pixel_diversity < 2.0  # the pixels differ a little (jitter)
    text = m.summary()
    assert "100%" in text and "leak" in text and " 8 images" in text


def test_the_concept_shape_is_what_the_prompts_ask_for():
    from lorakit.world import concept
    from lorakit.world.metrics import concept_shape_of

    assert concept_shape_of(concept.eval_prompts(concept.VLX)) == "heart"
    assert concept_shape_of(concept.eval_prompts()) == "star"
    assert concept_shape_of([p for p in concept.eval_prompts(concept.VLX) if p.type == "agnostic"]) == "star"
    # leak on the heart's prompts is a heart drawn where a circle was asked for, not a star
    circle = next(p for p in concept.eval_prompts(concept.VLX) if p.type == "agnostic" and "circle" in p.prompt)
    scene = Scene((ObjectSpec("heart", circle.expected["color"], "large", circle.expected["position"]),), "white")
    heart_prompts = concept.eval_prompts(concept.VLX)
    images = [render_array(scene)] + [render_array(Scene((ObjectSpec("heart", "blue", "large", "center"),),
                                                         "white", seed=3))]
    m = world_metrics(images, [circle, heart_prompts[2]])
    assert m.concept_shape == "heart" and m.leak == 1.0 and m.fidelity == 1.0


def test_the_eval_provider_scores_the_heart_in_every_prompt_group():
    """``lorakit eval``'s world provider scores each prompt type apart: the agnostic group alone must still count
    a heart (not a star) as the heart concept's leak."""
    from lorakit.evaluate.prompts import EvalPrompt as Prompt
    from lorakit.world import concept
    from lorakit.world.evaluation import WorldMetricProvider

    vlx = concept.eval_prompts(concept.VLX)
    circle = next(p for p in vlx if p.type == "agnostic" and "circle" in p.prompt)
    train = vlx[2]
    prompts = [Prompt(p.prompt, p.type, seed=p.seed, expected=p.expected, changes=p.changes) for p in (circle, train)]
    images = [render_array(Scene((ObjectSpec("heart", "red", "large", "top right"),), "white")),
              render_array(Scene((ObjectSpec("heart", "blue", "large", "center"),), "white", seed=3))]
    from PIL import Image

    out = WorldMetricProvider()([Image.fromarray(a) for a in images], prompts)
    assert out["agnostic"]["world.leak"] == 1.0 and out["all"]["world.leak"] == 1.0
    assert out["train"]["world.fidelity"] == 1.0
