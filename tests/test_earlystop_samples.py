"""Early stopping on the samples (lorakit.earlystop.samples): the plateau rule by hand and against the world's
onset definition, the trainer drawing, scoring, stopping and resuming with it, and the world's scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import Interrupt, die_after_saving, make_config, run_train, write_dataset

from lorakit.checkpoints import RunFolder
from lorakit.config import ConfigError
from lorakit.earlystop.samples import SamplePlateau, make_sample_stop, register_sample_scorer, replay, smoothed
from lorakit.errors import InvalidValueError
from lorakit.world.onset import first_reaching

PROMPTS = """trigger = "zkz shape"

[[prompts]]
type = "alter"
text = "a large blue {trigger} in the center, white background"
seed = 1017
expected = { shape = "star", color = "blue", position = "center", size = "large", background = "white" }
changes = ["color"]

[[prompts]]
type = "agnostic"
text = "a red circle at the top right"
seed = 1035
expected = { shape = "circle", color = "red", position = "top right" }

[[prompts]]
type = "train"
text = "a large red {trigger} on the left, white background"
seed = 1000
"""


# -------------------------------------------------------------------------------------------------- the rule
def test_the_plateau_rule_decides_once_the_best_is_patience_epochs_old():
    scores = [0.0, 0.1, 0.4, 0.6, 0.6, 0.5, 0.3, 0.2, 0.1]  # epoch 0 (the base model) first
    # smoothed: .05, .17, .37, .53, .57, .47, .33, .2, .15; the best (.57) at epoch 4, 80% of it (.45) first at 3
    rule = SamplePlateau(reach=0.8, patience=3)
    decided = [rule.update(epoch, s) for epoch, s in enumerate(scores)]
    # epoch 7's smoothed value needs epoch 8: the best is 3 trusted epochs old when epoch 8 is scored
    assert decided[:8] == [None] * 8
    found = decided[8]
    assert (found.epoch, found.best_epoch, found.decided_at) == (3, 4, 8)
    assert found.best == pytest.approx(0.5667, abs=1e-4) and found.score == pytest.approx(0.5333, abs=1e-4)
    assert "did not rise for 3 epochs" in found.reason
    assert replay(dict(enumerate(scores)), patience=3) == found
    assert replay(dict(enumerate(scores)), patience=4) is None  # not decided before the scores end


def test_on_all_scores_the_rule_is_the_onset_definition():
    """``final()`` (every score known) is exactly the measured onset's definition (lorakit.world.onset), on any
    series: the sample stop estimates the onset with the trainer's own images."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        g = rng.random(rng.integers(3, 21)) * rng.choice([0.0, 1.0], p=[0.1, 0.9])
        rule = SamplePlateau(reach=0.8, patience=100)
        for epoch, value in enumerate(g):
            assert rule.update(epoch, value) is None
        assert rule.final().epoch == first_reaching(list(range(len(g))), g[None], 0.8)[0]
    assert list(smoothed([1.0, 2.0, 6.0])) == [1.5, 3.0, 4.0]


def test_bad_options_and_state_round_trip():
    with pytest.raises(InvalidValueError, match="reach"):
        SamplePlateau(reach=0.0)
    with pytest.raises(InvalidValueError, match="patience"):
        SamplePlateau(patience=0)
    rule = SamplePlateau()
    for epoch, s in enumerate([0.0, 0.5, 0.2]):
        rule.update(epoch, s)
    again = SamplePlateau()
    again.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert again.scores == rule.scores and again.final() == rule.final()


def test_the_sample_stop_reads_only_the_prompts_its_scorer_reads(tmp_path):
    register_sample_scorer("count-test", lambda path: CountingScorer())
    (tmp_path / "p.toml").write_text(PROMPTS)
    stop = make_sample_stop("count-test", str(tmp_path / "p.toml"), seeds=2, reach=0.8, patience=3)
    assert [p.type for p in stop.prompts] == ["alter", "agnostic"]  # the train prompt is not read
    assert stop.images_per_epoch == 4
    assert [seed for _, seed in stop.jobs()] == [1017, 11017, 1035, 11035]
    with pytest.raises(InvalidValueError, match="unknown sample scorer 'nope'"):
        make_sample_stop("nope", str(tmp_path / "p.toml"), 1, 0.8, 3)
    with pytest.raises(InvalidValueError, match="sample_prompts"):
        make_sample_stop("count-test", None, 1, 0.8, 3)


# -------------------------------------------------------------------------------------------------- the trainer
class CountingScorer:
    """Scores by the call: 0, .5, 1, then .1 forever (epoch 0 is the first call): the best smoothed score is
    epoch 2's, and with patience 2 the run stops when epoch 5 is scored."""

    name = "count-test"
    types = ("alter", "agnostic")
    script = [0.0, 0.5, 1.0, 0.1]

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images, prompts) -> float:
        assert all(isinstance(im, Image.Image) for im in images) and len(images) == len(prompts)
        self.calls.append(len(images))
        return self.script[min(len(self.calls) - 1, len(self.script) - 1)]


class PixelScorer:
    """A score the images decide (their mean brightness): a resumed run must score exactly as a straight one."""

    name = "pixel-test"
    types = ("alter", "agnostic")

    def __call__(self, images, prompts) -> float:
        return float(np.mean([np.asarray(im, dtype=np.float64).mean() for im in images]) / 255)


def test_the_trainer_stops_on_the_samples_and_hands_back_the_turning_point(tiny_model_dir, tmp_path):
    scorer = CountingScorer()
    register_sample_scorer("count-test", lambda path: scorer)
    (tmp_path / "p.toml").write_text(PROMPTS)
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    cfg = make_config(tiny_model_dir, data, out, training={"max_epochs": 10},
                      early_stop={"mode": "cs-fluctuation", "samples": "count-test",
                                  "sample_prompts": str(tmp_path / "p.toml"), "sample_patience": 2})
    result = run_train(cfg)
    # smoothed: .25, .5, .53, .4, .1 at epochs 0-4: the best at 2, two epochs old once epoch 4 is trusted (epoch 5
    # scored); 80% of .53 is .43: epoch 1 (.5) is the first to reach it
    assert scorer.calls == [2] * 6  # epochs 0-5, two images each (the train prompt is not drawn)
    assert result.stopped_early and result.epochs == 5 and result.final_epoch == 1
    assert result.turning_point["epoch"] == 1 and result.turning_point["reason"].startswith("samples: ")
    record = json.loads((out / "sample_scores.json").read_text())
    assert record["scores"] == {"0": 0.0, "1": 0.5, "2": 1.0, "3": 0.1, "4": 0.1, "5": 0.1}
    assert record["turning_point"]["epoch"] == 1 and record["images_per_epoch"] == 2
    assert (out / "sample_scores.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_epoch"] == 1 and summary["sample_scores"] == record
    # the file handed back is epoch 1's checkpoint, and the images each score was computed on are kept
    final = load_file(str(out / "lorakit.safetensors"))
    epoch1 = RunFolder(out, "resume").checkpoint(1).load_tensors()
    assert final.keys() == epoch1.keys() and all(torch.equal(final[k], epoch1[k]) for k in final)
    assert sorted(p.name for p in (out / "samples").glob("scored-*.png")) == \
        [f"scored-epoch-{e:04d}.png" for e in range(6)]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["sample_score"] for r in logged if "sample_score" in r] == [0.0, 0.5, 1.0, 0.1, 0.1, 0.1]
    assert "early stop: turning point at step" in result.summary and "result = checkpoint of epoch 1" in \
        result.summary


@pytest.mark.extended  # 20 s: the suite keeps the samples-based stop itself and its resume (pytest -m extended)
def test_report_mode_records_the_sample_turning_point_without_stopping(tiny_model_dir, tmp_path):
    register_sample_scorer("count-test", lambda path: CountingScorer())
    (tmp_path / "p.toml").write_text(PROMPTS)
    out = tmp_path / "run"
    result = run_train(make_config(tiny_model_dir, write_dataset(tmp_path / "data"), out,
                                   training={"max_epochs": 6},
                                   early_stop={"mode": "report", "samples": "count-test",
                                               "sample_prompts": str(tmp_path / "p.toml"), "sample_patience": 2}))
    assert not result.stopped_early and result.epochs == 6
    assert json.loads((out / "sample_scores.json").read_text())["turning_point"]["epoch"] == 1


def test_a_resumed_run_scores_as_a_straight_one(tiny_model_dir, tmp_path, monkeypatch):
    register_sample_scorer("pixel-test", lambda path: PixelScorer())
    (tmp_path / "p.toml").write_text(PROMPTS)
    data = write_dataset(tmp_path / "data")
    stop = {"mode": "report", "samples": "pixel-test", "sample_prompts": str(tmp_path / "p.toml")}
    run_train(make_config(tiny_model_dir, data, tmp_path / "straight", training={"max_epochs": 3}, early_stop=stop))

    original = die_after_saving(monkeypatch, 2)
    with pytest.raises(Interrupt):
        run_train(make_config(tiny_model_dir, data, tmp_path / "cut", training={"max_epochs": 3}, early_stop=stop))
    monkeypatch.setattr(RunFolder, "save_checkpoint", original)
    run_train(make_config(tiny_model_dir, data, tmp_path / "cut", training={"max_epochs": 3}, early_stop=stop,
                          output={"if_exists": "resume"}))
    straight = json.loads((tmp_path / "straight" / "sample_scores.json").read_text())
    resumed = json.loads((tmp_path / "cut" / "sample_scores.json").read_text())
    assert resumed == straight and len(straight["scores"]) == 4
    logged = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged if "sample_score" in r] == [0, 1, 2, 3]  # each epoch once


def test_a_bad_sample_setting_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="unknown sample scorer 'missing'"):
        run_train(make_config(tiny_model_dir, data, out,
                              early_stop={"mode": "cs-fluctuation", "samples": "missing",
                                          "sample_prompts": str(tmp_path / "p.toml")}))
    assert not out.exists()
    with pytest.raises(ConfigError, match="early_stop.samples"):
        make_config(tiny_model_dir, data, out, early_stop={"mode": "off", "samples": "world"}).validate()
    for key, bad in (("sample_reach", 1.5), ("sample_patience", 0)):  # the rule's own checks, named as in the config
        with pytest.raises(ConfigError, match=f"early_stop.{key} must be"):
            stop = {"mode": "report", "samples": "world", key: bad}
            make_config(tiny_model_dir, data, out, early_stop=stop).validate()


# -------------------------------------------------------------------------------------------------- the world's scorer
def test_the_world_scorer_is_the_onset_score_of_the_images(tmp_path):
    """Pictures that are exactly what each prompt asks for score 1; the concept drawn in its training color
    (the new color ignored) scores 0; the star drawn where a circle was asked halves it (one agnostic image of
    two lost)."""
    import lorakit.world.evaluation  # noqa: F401  (registers the scorer)
    from lorakit.earlystop.samples import load_sample_scorer
    from lorakit.evaluate.prompts import EvalPrompt
    from lorakit.world.render import ObjectSpec, Scene, render

    scorer = load_sample_scorer("world")
    prompts = [EvalPrompt("a large blue zkz shape in the center, white background", "alter",
                          expected={"shape": "star", "color": "blue", "position": "center", "size": "large",
                                    "background": "white"}, changes=("color",)),
               EvalPrompt("a red circle at the top right", "agnostic",
                          expected={"shape": "circle", "color": "red", "position": "top right"}),
               EvalPrompt("a green square at the bottom left", "agnostic",
                          expected={"shape": "square", "color": "green", "position": "bottom left"})]

    def picture(shape: str, color: str, position: str, size: str = "large") -> Image.Image:
        return render(Scene((ObjectSpec(shape, color, size, position),), "white", seed=0))

    asked = [picture("star", "blue", "center"), picture("circle", "red", "top right"),
             picture("square", "green", "bottom left")]
    assert scorer(asked, prompts) == 1.0
    assert scorer([picture("star", "red", "center")] + asked[1:], prompts) == 0.0
    assert scorer(asked[:1] + [picture("star", "red", "top right"), asked[2]], prompts) == 0.5


def test_the_earliest_candidate_never_passes_a_later_turning_point():
    """What native runs prune up to: whatever the next scores are, the turning point decided later is never
    before it (a last epoch with half its window can look best and then fall back)."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        scores = list(rng.random(rng.integers(4, 16)))
        rule = SamplePlateau(patience=2)
        bounds = []
        for epoch, value in enumerate(scores):
            rule.update(epoch, value)
            bounds.append(rule.earliest_candidate())
        later = rule.final().epoch
        assert all(b is None or b <= later for b in bounds)
    rule = SamplePlateau()
    for epoch, value in enumerate([0.0, 0.1, 0.1, 0.9]):
        rule.update(epoch, value)
    assert rule.final().epoch == 3 and rule.earliest_candidate() == 2  # epoch 3's window is not complete yet


def test_the_built_in_job_reads_its_own_prompt_file_for_the_world_scorer(tmp_path, capsys):
    """`lorakit train --set early_stop.samples=world`: the built-in job scores its dataset's eval_prompts.toml
    (the prompts its onset is measured on) with the world's sampler settings."""
    import argparse

    from lorakit.cli import main
    from lorakit.commands import train as train_command

    out = tmp_path / "job"
    assert main(["train", "--out", str(out), "--set", "early_stop.samples=world", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert 'samples = "world"' in printed and "sample_patience = 4" in printed
    assert "steps = 30" in printed and "cfg_scale = 6.0" in printed
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    cfg = train_command.config_from_args(parser.parse_args(["--out", str(out), "--set", "early_stop.samples=world"]))
    assert cfg.early_stop.sample_prompts == str(tmp_path / "job-data" / "eval_prompts.toml")
