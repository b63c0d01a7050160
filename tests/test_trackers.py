"""kohya's --log_with tensorboard: a run writes its step records as TensorBoard scalars (read back with
TensorBoard's own reader), a resumed run continues the curves, and an overwrite removes them with the run."""

from __future__ import annotations

import json

import pytest
from test_train import write_dataset

from lorakit.cli import main


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(folder))
    mux.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in mux.Scalars(run, tag))
    return {tag: sorted(values) for tag, values in out.items()}


def test_a_run_logs_to_tensorboard_and_a_resumed_run_continues_the_curves(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir), "--out",
             str(out), "--no-progress", "--set", "output.log_with=tensorboard", "--early-stop", "report"]
    assert main([*flags, "--epochs", "1"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    scalars = _scalars(out / "logs")
    # every step's loss, learning rate and CS, at its step, as in log.jsonl
    assert [s for s, _ in scalars["loss"]] == [r["step"] for r in steps]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [v for _, v in scalars["lr"]] == pytest.approx([r["lr"] for r in steps], rel=1e-6)
    assert len(scalars["cs"]) == sum("cs" in r for r in steps) > 0
    assert main([*flags, "--epochs", "2", "--resume"]) == 0
    resumed = _scalars(out / "logs")["loss"]
    assert [s for s, _ in resumed] == list(range(1, 2 * len(steps) + 1))  # continued, nothing repeated
    capsys.readouterr()
    # the run owns its logs: an overwrite removes them with the rest
    assert main([*flags, "--epochs", "1", "--set", "output.if_exists=overwrite"]) == 0
    assert [s for s, _ in _scalars(out / "logs")["loss"]] == [r["step"] for r in steps]


def test_an_unknown_tracker_is_refused_before_the_run(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "run"), "--set", "output.log_with=wandb", "--no-progress"]) == 2
    assert "output.log_with" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_tracker_files(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "run"), "--set", "output.log_with=tensorboard", "--no-progress",
                 "--network-weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err and not (tmp_path / "run").exists()


class _FailingScorer:
    """A user's sample scorer that breaks on the base model's images (the first thing scored)."""

    name = "fail-test"
    types = ("alter", "agnostic")

    def __call__(self, images, prompts) -> float:
        raise RuntimeError("the scorer broke")


def test_tracker_files_of_a_run_that_fails_on_its_first_sample_score_are_the_runs(tiny_model_dir, tmp_path):
    from test_earlystop_samples import PROMPTS
    from test_train import make_config, run_train

    from lorakit.earlystop.samples import register_sample_scorer
    from lorakit.run_manifest import RunManifest

    register_sample_scorer("fail-test", lambda path: _FailingScorer())
    (tmp_path / "p.toml").write_text(PROMPTS)
    out = tmp_path / "run"
    cfg = make_config(tiny_model_dir, write_dataset(tmp_path / "data"), out,
                      early_stop={"mode": "cs-fluctuation", "samples": "fail-test",
                                  "sample_prompts": str(tmp_path / "p.toml")},
                      output={"log_with": "tensorboard"})
    with pytest.raises(RuntimeError, match="the scorer broke"):
        run_train(cfg)
    written = [p for p in (out / "logs").rglob("*") if p.is_file()]
    manifest = RunManifest(out)
    assert written and all(manifest.owns(p) for p in written)  # an overwrite removes them with the rest
