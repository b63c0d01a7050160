"""lorakit.evaluate.metrics: each metric against values worked out by hand, Vendi against the vendi-score
package, the OCR check on text lorakit renders itself."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from lorakit.errors import LorakitError
from lorakit.evaluate import metrics as M
from lorakit.evaluate.metrics import MetricError

R = 1 / math.sqrt(2)


# ---------------------------------------------------------------------------------------------- fidelity
def test_image_similarity_is_the_mean_cosine_of_every_pair():
    # cos((1,0),(1,0)) = 1, cos((0,1),(1,0)) = 0 -> mean 0.5; scaling a row changes nothing
    assert M.image_similarity([[1, 0], [0, 1]], [[1, 0]]) == pytest.approx(0.5)
    assert M.image_similarity(torch.tensor([[2.0, 0], [0, 3]]), torch.tensor([[5.0, 0]])) == pytest.approx(0.5)
    # (1,1) is 45° from both axes
    assert M.image_similarity([[1, 0], [0, 1]], [[1, 1]]) == pytest.approx(R)
    # 2 x 2 pairs: cos = 1, -1, 0, 0 -> mean 0
    assert M.image_similarity([[1, 0], [0, 1]], [[1, 0], [-1, 0]]) == pytest.approx(0.0)


def test_centroid_distance_is_the_squared_distance_of_normalised_means():
    # mean((1,0),(0,1)) = (.5,.5); (1,0) - (.5,.5) = (.5,-.5) -> .25 + .25
    assert M.centroid_distance([[3, 0], [0, 5]], [[2, 0]]) == pytest.approx(0.5)
    assert M.centroid_distance([[1, 1]], [[2, 2]]) == pytest.approx(0.0)
    assert M.centroid_distance([[1, 0]], [[-1, 0]]) == pytest.approx(4.0)


# --------------------------------------------------------------------------------------------- diversity
def test_vendi_of_identical_orthogonal_and_two_row_cases():
    assert M.vendi_score([[1, 2, 3]] * 5) == pytest.approx(1.0)
    assert M.vendi_score(np.eye(4) * 7) == pytest.approx(4.0)
    # two rows with cosine c: K/2 has eigenvalues (1 ± c)/2
    c = 0.5
    p = np.array([(1 + c) / 2, (1 - c) / 2])
    assert M.vendi_score([[1, 0], [c, math.sqrt(1 - c * c)]]) == pytest.approx(math.exp(-np.sum(p * np.log(p))))
    assert M.vendi_score([[1, 0]]) == pytest.approx(1.0)


@pytest.mark.parametrize("n, d", [(12, 5), (5, 12), (30, 30)])  # both the n×n and the d×d route
def test_vendi_equals_the_vendi_score_package(n, d):
    vendi = pytest.importorskip("vendi_score.vendi", reason="vendi-score (test extra) not installed")
    x = np.random.default_rng(n * 100 + d).normal(size=(n, d))
    assert M.vendi_score(x) == pytest.approx(float(vendi.score_X(x)), rel=1e-9)
    assert M.vendi_score(torch.from_numpy(x).float()) == pytest.approx(float(vendi.score_X(x)), rel=1e-5)


def test_mean_vendi_by_group_averages_groups_of_two_or_more():
    x = [[1, 0], [1, 0], [1, 0], [0, 1], [5, 5]]
    # group a: identical -> 1; group b: orthogonal -> 2; c: one row, left out
    assert M.mean_vendi_by_group(x, ["a", "a", "b", "b", "c"]) == pytest.approx(1.5)
    assert math.isnan(M.mean_vendi_by_group(x, [0, 1, 2, 3, 4]))
    with pytest.raises(MetricError, match="5 embeddings but 4 group labels"):
        M.mean_vendi_by_group(x, ["a", "a", "b", "b"])


# -------------------------------------------------------------------------------------- controllability
def test_clip_score_pairs_each_image_with_its_own_text():
    assert M.clip_score([[1, 0], [0, 1]], [[2, 0], [1, 1]]) == pytest.approx((1 + R) / 2)
    with pytest.raises(MetricError, match="2 images but 1 texts"):
        M.clip_score([[1, 0], [0, 1]], [[1, 0]])


def test_prompt_classification_counts_strict_best_matches():
    images = [[1, 0], [0, 1], [1, 1], [1, 0.1]]
    texts = [[1, 0], [0, 1]]
    # images 1, 2 and 4 match their own prompt best; image 3 is equally close to both: a tie is a miss
    assert M.prompt_classification_accuracy(images, texts, [0, 1, 0, 0]) == pytest.approx(3 / 4)
    assert M.prompt_classification_accuracy(images, texts, [1, 0, 1, 1]) == pytest.approx(0.0)
    with pytest.raises(MetricError, match=r"indices must lie in \[0, 2\)"):
        M.prompt_classification_accuracy(images, texts, [0, 1, 2, 0])


# ---------------------------------------------------------------------------------------- preservation
def test_gram_style_loss_sums_layers_and_averages_images():
    # image 0: layer 0 differs by (1,2,3,4) -> 30, layer 1 by 2 -> 4: 34; image 1 identical: 0; mean 17
    a = [np.array([[[1, 2], [3, 4]], [[1, 1], [1, 1]]]), np.array([[[3.0]], [[7.0]]])]
    b = [np.array([[[0, 0], [0, 0]], [[1, 1], [1, 1]]]), np.array([[[1.0]], [[7.0]]])]
    assert M.gram_style_loss(a, b) == pytest.approx(17.0)
    assert M.gram_style_loss([torch.tensor(g) for g in a], [torch.tensor(g) for g in a]) == 0.0
    # the flattened, concatenated form gives the same number
    flat = [np.concatenate([g.reshape(2, -1) for g in gs], axis=1) for gs in (a, b)]
    assert M.gram_style_loss(flat[0], flat[1]) == pytest.approx(17.0)
    with pytest.raises(MetricError, match="layer 1 shapes differ"):
        M.gram_style_loss(a, [b[0], np.zeros((2, 2, 2))])


# -------------------------------------------------------------------------------------------------- leak
def test_concept_leak_is_the_share_closer_to_the_data_than_to_the_reference():
    data, ref = [[1, 0], [2, 0]], [[0, 1]]
    # like the data; like the reference; equally like both (not a leak)
    assert M.concept_leak([[1, 0.1], [0.1, 1], [1, 1]], data, ref) == pytest.approx(1 / 3)
    assert M.concept_leak([[0, 1]], data, ref) == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(MetricError, match="widths differ"):
        M.image_similarity([[1, 0]], [[1, 0, 0]])
    with pytest.raises(MetricError, match="no embeddings"):
        M.vendi_score(np.zeros((0, 3)))
    with pytest.raises(MetricError, match="nan"):
        M.centroid_distance([[float("nan"), 0]], [[1, 0]])
    assert issubclass(MetricError, LorakitError)


# --------------------------------------------------------------------------------------------------- OCR
def _text_image(text: str) -> Image.Image:
    image = Image.new("RGB", (256, 128), "white")
    ImageDraw.Draw(image).text((16, 36), text, fill=(20, 20, 20), font=ImageFont.load_default(size=44))
    return image


def test_ocr_reads_text_lorakit_renders_and_nothing_in_a_drawing():
    pytest.importorskip("rapidocr_onnxruntime", reason="optional extra 'ocr' (rapidocr-onnxruntime) not installed")
    assert M.ocr_contains(_text_image("LORAKIT"), "lorakit")
    drawing = Image.new("RGB", (256, 128), "white")
    ImageDraw.Draw(drawing).ellipse((88, 24, 168, 104), fill="red")
    assert not M.ocr_contains(drawing, "lorakit")


def test_ocr_matching_rule():
    assert M.text_contains(["LORAKIT"], "lorakit")
    assert M.text_contains(["L0RA", "KIT"], "Lorakit")  # 0 is o; a word split over two boxes counts
    assert M.text_contains(["Hello, lora-kit!"], "LORA KIT")  # spaces and punctuation ignored
    assert not M.text_contains(["LORAKIT"], "banana")
    assert not M.text_contains([], "lorakit")
    with pytest.raises(MetricError, match="no letters or digits"):
        M.ocr_contains(Image.new("RGB", (8, 8)), "--")


def test_ocr_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import now fails
    M._ocr_engine.cache_clear()
    try:
        with pytest.raises(LorakitError, match=r"lorakit\[ocr\]"):
            M.ocr_contains(Image.new("RGB", (8, 8)), "x")
    finally:
        M._ocr_engine.cache_clear()


def test_the_evaluation_library_does_not_import_the_world():
    import subprocess

    code = ("import sys, lorakit.evaluate.prompts, lorakit.evaluate.extractors, lorakit.evaluate.metrics, "
            "lorakit.evaluate.scores; print(sorted(m for m in sys.modules if m.startswith('lorakit.world')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
