"""``early_stop.samples = "clip=PATH"``: the samples scored with a local CLIP model (fidelity to the training images
× how the prompts still steer them), on a tiny random CLIP saved as a user's folder is; and a run stopping on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from test_evaluate_extractors import make_tiny_clip
from test_train import make_config, run_train, write_dataset

from lorakit.config import ConfigError
from lorakit.errors import LorakitError
from lorakit.evaluate import metrics as M
from lorakit.evaluate.extractors import CLIPExtractor
from lorakit.evaluate.prompts import EvalPrompt

PROMPTS = """trigger = "zkz shape"
train = ["a red {trigger} on the left"]
alter = ["a blue {trigger} in the center", "a green {trigger} at the top"]
agnostic = ["a red circle"]
"""


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_the_score_is_fidelity_to_the_training_images_times_prompt_following(clip):
    from lorakit.earlystop.samples import load_sample_scorer

    scorer = load_sample_scorer(f"clip={clip}")  # built in: imported when first named
    reference, drawn = _images(4, seed=1), _images(3, seed=2)
    scorer.set_reference(reference)
    prompts = [EvalPrompt("a red zkz shape", "train"), EvalPrompt("a blue zkz shape", "alter"),
               EvalPrompt("zkz shape, watercolor", "style")]
    parts = scorer.components(drawn, prompts)
    ext = CLIPExtractor(clip)  # the same model read again, the metrics computed here
    images = ext.embed_images(drawn).numpy()
    assert parts["fidelity"] == pytest.approx(M.image_similarity(images, ext.embed_images(reference).numpy()))
    steered = ext.embed_texts(["a blue zkz shape", "zkz shape, watercolor"]).numpy()
    assert parts["following"] == pytest.approx(M.clip_score(images[1:], steered))  # the train prompt steers nothing
    assert scorer(drawn, prompts) == pytest.approx(max(parts["fidelity"], 0) * max(parts["following"], 0))
    # drawing the training images themselves is the most faithful a sample can be
    assert scorer.components(reference[:3], prompts)["fidelity"] > parts["fidelity"]



def test_the_training_images_are_read_from_their_files_a_batch_at_a_time(clip, tmp_path, monkeypatch):
    import lorakit.evaluate.sample_scorer as module
    from lorakit.earlystop.samples import load_sample_scorer

    reference = _images(5, seed=1)
    paths = []
    for i, im in enumerate(reference):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    scorer = load_sample_scorer(f"clip={clip}")
    scorer.set_reference(reference)
    in_memory = scorer.reference
    monkeypatch.setattr(module, "REFERENCE_BATCH", 2)  # 5 files: batches of 2, 2 and 1
    scorer.set_reference(paths)
    assert scorer.reference.shape == in_memory.shape and np.allclose(scorer.reference, in_memory, atol=1e-5)


def test_clip_scorer_settings_are_refused_with_what_to_do(clip, tmp_path):
    from lorakit.earlystop.samples import load_sample_scorer, make_sample_stop

    with pytest.raises(LorakitError, match='needs the local folder of a CLIP model: "clip=/path/to/clip"'):
        load_sample_scorer("clip")
    with pytest.raises(LorakitError, match=f"{tmp_path}: not a CLIP model folder"):
        load_sample_scorer(f"clip={tmp_path}")
    no_alter = tmp_path / "p.toml"
    no_alter.write_text('trigger = "zkz shape"\ntrain = ["a {trigger}"]\n')
    with pytest.raises(LorakitError, match=f"{no_alter}: the clip sample scorer needs alter or style prompts"):
        make_sample_stop(f"clip={clip}", str(no_alter), 1, 0.8, 3)
    scorer = load_sample_scorer(f"clip={clip}")
    with pytest.raises(LorakitError, match="no training images to compare with"):
        scorer(_images(1, 0), [EvalPrompt("a zkz shape", "alter")])


def test_a_run_scores_its_samples_with_clip_against_its_own_training_images(tiny_model_dir, clip, tmp_path):
    (tmp_path / "p.toml").write_text(PROMPTS)
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    result = run_train(make_config(tiny_model_dir, data, out, training={"max_epochs": 3},
                                   early_stop={"mode": "report", "samples": f"clip={clip}",
                                               "sample_prompts": str(tmp_path / "p.toml"), "sample_patience": 2}))
    record = json.loads((out / "sample_scores.json").read_text())
    assert record["scorer"] == "clip" and record["images_per_epoch"] == 3  # train + 2 alter; agnostic not drawn
    scores = [record["scores"][str(e)] for e in range(4)]  # the base model first, then every epoch
    assert all(math.isfinite(s) and s >= 0 for s in scores) and len(set(scores)) > 1
    assert not result.stopped_early  # report mode: recorded, not acted on
    with pytest.raises(ConfigError, match="clip sample scorer needs alter or style prompts"):
        (tmp_path / "q.toml").write_text('trigger = "zkz shape"\ntrain = ["a {trigger}"]\n')
        run_train(make_config(tiny_model_dir, data, tmp_path / "refused",
                              early_stop={"mode": "report", "samples": f"clip={clip}",
                                          "sample_prompts": str(tmp_path / "q.toml")}))
    assert not (tmp_path / "refused").exists()
