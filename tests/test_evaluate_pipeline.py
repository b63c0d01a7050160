"""The metrics pipeline on synthetic images: values equal the metric functions applied by hand, scores are
rank-normalised per (type, metric), NaN becomes null, metrics.json / metrics.csv hold the same numbers."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.evaluate import metrics as M
from lorakit.evaluate.checkpoints import EvalCheckpoint, RunInfo
from lorakit.evaluate.generate import make_jobs
from lorakit.evaluate.pipeline import EvaluationError, evaluate, result_from_dict, write_results
from lorakit.evaluate.prompts import EvalPrompt

PROMPTS = [EvalPrompt("a zkz shape", "trigger", seed=1), EvalPrompt("red zkz shape", "train", seed=2),
           EvalPrompt("blue zkz shape", "alter", seed=3), EvalPrompt("green zkz shape", "alter", seed=4),
           EvalPrompt("a circle", "agnostic", seed=5)]


class ThumbExtractor:
    """8x8 thumbnails as image embeddings; texts embedded by a hash (deterministic, different per text)."""

    name = "thumb"
    supports_text = True

    def embed_images(self, images):
        return torch.tensor(np.stack([np.asarray(im.resize((8, 8)), dtype=np.float32).ravel() / 255 - 0.5
                                      for im in images]))

    def embed_texts(self, texts):
        rows = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            rows.append(np.random.default_rng(seed).standard_normal(192).astype(np.float32))
        return torch.tensor(np.stack(rows))


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8))


def setup():
    checkpoints = [EvalCheckpoint("base", "base", None, "base", epoch=0),
                   EvalCheckpoint("r/e1", "adapter", None, "h1", run="r", epoch=1),
                   EvalCheckpoint("r/e2", "adapter", None, "h2", run="r", epoch=2)]
    runs = [RunInfo("r", None, {"algorithm": "lora"}, turning_epoch=1)]
    jobs = make_jobs(PROMPTS, seeds=2)
    images = {c.label: [image(100 * k + i) for i in range(len(jobs))] for k, c in enumerate(checkpoints)}
    data = [image(1000 + i) for i in range(4)]
    return checkpoints, runs, jobs, images, data


def test_metrics_are_the_metric_functions_per_type_and_checkpoint(tmp_path):
    checkpoints, runs, jobs, images, data = setup()
    ex = ThumbExtractor()
    result = evaluate(checkpoints, runs, jobs, images, {"thumb": ex}, data, seeds=2)
    assert result.groups == ["train", "trigger", "alter", "agnostic"]
    alter = [i for i, j in enumerate(jobs) if j.prompt.type == "alter"]
    emb = ex.embed_images([images["r/e1"][i] for i in alter])
    d = ex.embed_images(data)
    assert result.value("alter", "r/e1", "fidelity[thumb]") == pytest.approx(M.image_similarity(emb, d))
    assert result.value("alter", "r/e1", "centroid_dist[thumb]") == pytest.approx(M.centroid_distance(emb, d))
    groups = [jobs[i].prompt_index for i in alter]
    assert result.value("alter", "r/e1", "diversity[thumb]") == pytest.approx(M.mean_vendi_by_group(emb, groups))
    texts = ex.embed_texts([jobs[i].prompt.text for i in alter])
    assert result.value("alter", "r/e1", "clip_score[thumb]") == pytest.approx(M.clip_score(emb, texts))
    ag = [i for i, j in enumerate(jobs) if j.prompt.type == "agnostic"]
    leak = M.concept_leak(ex.embed_images([images["r/e2"][i] for i in ag]), d,
                          ex.embed_images([images["base"][i] for i in ag]))
    assert result.value("agnostic", "r/e2", "leak[thumb]") == pytest.approx(leak)
    assert "fidelity[thumb]" not in result.metric_names("agnostic")  # no fidelity without the trigger
    assert "prompt_acc[thumb]" in result.metric_names("alter")  # two alter prompts to choose between
    assert "prompt_acc[thumb]" not in result.metric_names("train")  # one train prompt: nothing to classify
    assert result.directions["centroid_dist[thumb]"] is False and result.directions["fidelity[thumb]"] is True
    # scores: each (type, metric) rank-normalised across the three checkpoints, best 1, worst 0
    fid = {c.label: result.value("alter", c.label, "fidelity[thumb]") for c in checkpoints}
    best = max(fid, key=fid.get)
    assert result.scores["alter"][best]["fidelity[thumb]"] == 1.0
    assert sorted(result.scores["alter"][c]["fidelity[thumb]"] for c in fid) == [0.0, 0.5, 1.0]
    assert result.best in fid and set(result.harmonic_mean) == set(fid)


def test_metrics_json_and_csv_hold_the_same_numbers_and_no_nan(tmp_path):
    checkpoints, runs, jobs, images, data = setup()

    class Provider:
        name = "exact"
        directions = {"exact.nothing": True, "exact.count": False, "exact.some": True}

        def __call__(self, images, prompts):
            some = float("nan") if images[0] is images_by_label["base"][0] else 1.0
            return {"all": {"exact.nothing": float("nan"), "exact.count": float(len(images)), "exact.some": some}}

    images_by_label = images

    result = evaluate(checkpoints, runs, jobs, images, {"thumb": ThumbExtractor()}, data, [Provider()], seeds=2)
    written = write_results(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.csv", "metrics.json"]
    text = written[0].read_text()
    assert "NaN" not in text
    data_json = json.loads(text)
    assert data_json["metrics"]["all"]["base"]["exact.some"] is None  # nan for one checkpoint: null
    assert "exact.nothing" not in data_json["metrics"]["all"]["base"]  # nan for every checkpoint: dropped
    assert data_json["metrics"]["all"]["base"]["exact.count"] == len(jobs)
    assert result_from_dict(data_json).value("alter", "r/e2", "fidelity[thumb]") == pytest.approx(
        result.value("alter", "r/e2", "fidelity[thumb]"))
    rows = list(csv.DictReader(written[1].open()))
    assert len(rows) == sum(len(r) for g in data_json["metrics"].values() for r in g.values())
    for row in rows:
        want = data_json["metrics"][row["group"]][row["checkpoint"]][row["metric"]]
        assert (row["value"] == "" and want is None) or float(row["value"]) == want
        epoch = next(c["epoch"] for c in data_json["checkpoints"] if c["label"] == row["checkpoint"])
        assert row["epoch"] == str(epoch)


def test_nothing_to_measure_is_an_error():
    checkpoints, runs, jobs, images, data = setup()
    with pytest.raises(EvaluationError, match="no extractor"):
        evaluate(checkpoints, runs, jobs, images, {}, data)
    with pytest.raises(EvaluationError, match="no prompts"):
        evaluate(checkpoints, runs, [], images, {"thumb": ThumbExtractor()}, data)


# ------------------------------------------------------------------------------------------- the shapes world
def rendered(shape: str, p: EvalPrompt, seed: int) -> Image.Image:
    from lorakit.world.render import ObjectSpec, Scene, render

    e = p.expected
    obj = ObjectSpec(shape, e.get("color", "red"), e.get("size", "large"), e.get("position", "center"))
    return render(Scene((obj,), e.get("background", "white"), seed=seed))


def test_world_reader_extractor_and_exact_metrics_agree_on_drawn_stars_and_circles():
    from eval_helpers import PROMPTS as WORLD_PROMPTS

    from lorakit.evaluate.extractors import ExtractorError, load_extractor
    from lorakit.evaluate.pipeline import load_metric_provider
    from lorakit.world import evaluation  # noqa: F401  (registers the reader and the provider)
    from lorakit.world.metrics import attribute_vector
    from lorakit.world.reader import read_image

    reader = load_extractor("world-reader", None)
    star = rendered("star", WORLD_PROMPTS[0], 1)
    assert torch.equal(reader.embed_images([star])[0], torch.tensor(attribute_vector(read_image(star))).float())
    with pytest.raises(ExtractorError, match="nowhere.safetensors"):
        load_extractor("world-reader", "/nowhere.safetensors")

    # "good" draws what each prompt asks (the star where the trigger is); "bad" draws circles everywhere
    jobs = make_jobs(WORLD_PROMPTS, seeds=2)
    good = [rendered(j.prompt.expected["shape"], j.prompt, j.seed) for j in jobs]
    bad = [rendered("circle", j.prompt, j.seed) for j in jobs]
    checkpoints = [EvalCheckpoint("base", "base", None, "base", epoch=0),
                   EvalCheckpoint("good", "adapter", None, "g", epoch=1), EvalCheckpoint("bad", "adapter", None, "b")]
    data = [rendered("star", WORLD_PROMPTS[0], 100 + i) for i in range(4)]
    result = evaluate(checkpoints, [], jobs, {"base": bad, "good": good, "bad": bad}, {"world-reader": reader},
                      data, [load_metric_provider("world")], seeds=2)
    for t in ("train", "alter"):
        assert result.value(t, "good", "world.fidelity") == 1.0 and result.value(t, "bad", "world.fidelity") == 0.0
        # the generic fidelity on the reader's embedding says the same
        assert result.value(t, "good", "fidelity[world-reader]") > result.value(t, "bad", "fidelity[world-reader]")
    assert result.value("alter", "good", "world.success") == 1.0
    assert result.value("agnostic", "good", "world.leak") == 0.0
    assert result.value("all", "good", "world.success_color") == 1.0
    assert result.best == "good"


def test_shap_importance_names_the_setting_that_drives_a_metric():
    pytest.importorskip("catboost")
    pytest.importorskip("shap")
    from lorakit.evaluate.pipeline import add_importance

    # two runs differing in lr; the "exact.score" metric follows the lr only
    checkpoints = [EvalCheckpoint(f"{r}/e{e}", "adapter", None, f"{r}{e}", run=r, epoch=e)
                   for r in ("slow", "fast") for e in (1, 2, 3)]
    runs = [RunInfo("slow", None, {"algorithm": "lora", "lr": 1e-4, "rank": 8}),
            RunInfo("fast", None, {"algorithm": "lora", "lr": 1e-3, "rank": 8})]
    jobs = make_jobs(PROMPTS[:1], seeds=1)
    images = {c.label: [image(k)] for k, c in enumerate(checkpoints)}

    class Provider:
        name, directions = "exact", {"exact.score": True}

        def __call__(self, imgs, prompts):
            label = next(lb for lb, v in images.items() if v[0] is imgs[0])
            return {"trigger": {"exact.score": 1.0 if label.startswith("fast") else 0.0}}

    result = evaluate(checkpoints, runs, jobs, images, {}, (), [Provider()])
    add_importance(result, [("trigger", "exact.score")])
    importance = result.importance["trigger/exact.score"]
    assert set(importance) == {"lr", "epoch"}  # algorithm and rank never vary: left out
    assert importance["lr"] > 0.1 and importance["lr"] > 10 * importance["epoch"]
    with pytest.raises(EvaluationError, match="at least 3 checkpoints"):
        add_importance(evaluate(checkpoints[:2], runs, jobs, images, {}, (), [Provider()]))


def test_ocr_provider_reads_the_expected_word():
    pytest.importorskip("rapidocr_onnxruntime", reason="optional extra 'ocr' (rapidocr-onnxruntime) not installed")
    from PIL import ImageDraw, ImageFont

    from lorakit.evaluate.pipeline import load_metric_provider

    def text_image(text: str) -> Image.Image:
        im = Image.new("RGB", (256, 128), "white")
        ImageDraw.Draw(im).text((16, 36), text, fill=(20, 20, 20), font=ImageFont.load_default(size=44))
        return im

    prompts = [EvalPrompt("a logo saying LORAKIT", "trigger", expected={"text": "LORAKIT"}),
               EvalPrompt("a logo saying LORAKIT on a mug", "alter", expected={"text": "lorakit"}),
               EvalPrompt("a mug", "agnostic")]
    ocr = load_metric_provider("ocr")
    got = ocr([text_image("LORAKIT"), Image.new("RGB", (256, 128), "white"), text_image("LORAKIT")], prompts)
    assert got == {"trigger": {"ocr_text": 1.0}, "alter": {"ocr_text": 0.0}}  # agnostic: no word expected


def _result(harmonic, means, best):
    from lorakit.evaluate.pipeline import EvalResult

    return EvalResult(checkpoints=[], runs=[], groups=[], directions={}, metrics={}, scores={},
                      harmonic_mean=harmonic, best=best, mean_score=means)


def test_the_summary_says_which_mean_chose_the_best_checkpoint():
    from lorakit.evaluate.pipeline import summary_lines

    alone = summary_lines(_result({"e1": 0.2, "e2": 0.6}, {"e1": 0.4, "e2": 0.7}, "e2"))[0]
    assert alone == "best checkpoint (harmonic mean of rank-normalised metrics): e2 (0.600; arithmetic mean 0.700)"
    # every checkpoint worst at some metric: the harmonic means all 0, the arithmetic mean chose
    tied = summary_lines(_result({"e1": 0.0, "e2": 0.0, "e3": 0.0}, {"e1": 0.4, "e2": 0.7, "e3": 0.5}, "e2"))[0]
    assert tied == ("best checkpoint: e2 (arithmetic mean of rank-normalised metrics 0.700; 3 checkpoints tie on "
                    "the harmonic mean at 0.000, each worst at one metric or more)")
    two = summary_lines(_result({"e1": 0.5, "e2": 0.5, "e3": 0.1}, {"e1": 0.4, "e2": 0.7, "e3": 0.5}, "e2"))[0]
    assert two.endswith("2 checkpoints tie on the harmonic mean at 0.500)")
    # a metrics.json with no harmonic means (null) still prints, as before
    unknown = summary_lines(_result({"e1": None, "e2": None}, {"e1": 0.4, "e2": 0.7}, "e2"))[0]
    assert unknown == "best checkpoint (harmonic mean of rank-normalised metrics): e2 (; arithmetic mean 0.700)"


def test_checkpoints_rank_by_harmonic_mean_then_arithmetic_mean_then_their_order():
    """One ordering serves ``evaluate``'s best, the page's ranking table and the summary's tie count."""
    from lorakit.evaluate.pipeline import best_first

    harmonic = {"a": 0.0, "b": 0.5, "c": 0.0, "d": None, "e": 0.0}
    means = {"a": 0.4, "b": 0.1, "c": 0.6, "d": 0.9, "e": 0.4}
    # b has the best harmonic mean whatever its arithmetic mean; c beats a and e on the arithmetic mean; a comes
    # before e as given (equal keys); d, with no harmonic mean, is last
    assert best_first(["a", "b", "c", "d", "e"], harmonic, means) == ["b", "c", "a", "e", "d"]
    assert best_first(["e", "a"], harmonic, means) == ["e", "a"]
    result = _result(harmonic, means, "b")
    result.checkpoints = [{"label": lb} for lb in "abcde"]
    assert result.ranking()[0] == result.best and result.tied_with_best() == 1
    assert _result(harmonic, means, "c").tied_with_best() == 3 and _result({}, {}, None).tied_with_best() == 0


def test_held_out_images_give_their_fidelity_and_the_memorisation_gap():
    """A checkpoint that copies its training images is nearer to them than to held-out images of the concept: its
    memorisation gap (fidelity − held-out fidelity) is the larger; each value is the metric function's."""
    checkpoints, runs, jobs, images, data = setup()
    held = [image(2000 + i) for i in range(3)]
    images["r/e2"] = [data[i % len(data)] for i in range(len(jobs))]  # copies of the training images
    images["r/e1"] = [held[i % len(held)] for i in range(len(jobs))]  # drawn like the held-out ones
    ex = ThumbExtractor()
    result = evaluate(checkpoints, runs, jobs, images, {"thumb": ex}, data, seeds=2, held_out_images=held)
    train = [i for i, j in enumerate(jobs) if j.prompt.type == "train"]
    emb = ex.embed_images([images["r/e2"][i] for i in train])
    near_held = M.image_similarity(emb, ex.embed_images(held))
    assert result.value("train", "r/e2", "heldout_fidelity[thumb]") == pytest.approx(near_held)
    assert result.value("train", "r/e2", "memorisation[thumb]") == pytest.approx(
        M.image_similarity(emb, ex.embed_images(data)) - near_held)
    gap = {c: result.value("train", c, "memorisation[thumb]") for c in ("r/e1", "r/e2")}
    assert gap["r/e2"] > 0 > gap["r/e1"]
    assert result.directions["memorisation[thumb]"] is False and result.directions["heldout_fidelity[thumb]"]
    assert "heldout_fidelity[thumb]" not in result.metric_names("agnostic")
    # without held-out images neither metric exists
    plain = evaluate(checkpoints, runs, jobs, images, {"thumb": ex}, data, seeds=2)
    assert not {m for g in plain.groups for m in plain.metric_names(g)} & {"memorisation[thumb]",
                                                                           "heldout_fidelity[thumb]"}


def test_a_weighted_prompt_is_embedded_as_its_words():
    """clip_score reads what a weighted prompt says: "a (blue:1.3) zkz shape" scores as "a blue zkz shape" (the
    generator weighs the words; the brackets and numbers are no text)."""
    checkpoints, runs, _, images, data = setup()
    weighted = [EvalPrompt("(blue:1.3) zkz shape", "alter", seed=3), EvalPrompt("[green] zkz shape", "alter", seed=4)]
    plain = [EvalPrompt("blue zkz shape", "alter", seed=3), EvalPrompt("green zkz shape", "alter", seed=4)]
    results = [evaluate(checkpoints, runs, make_jobs(prompts, seeds=2), images, {"thumb": ThumbExtractor()}, data,
                        seeds=2) for prompts in (weighted, plain)]
    assert results[0].value("alter", "r/e1", "clip_score[thumb]") == \
        results[1].value("alter", "r/e1", "clip_score[thumb]")
