"""kohya's validation split: held-out images are never trained on, and their loss at fixed timesteps and noise
is logged while training (log.jsonl, TensorBoard, summary, the run page)."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import make_config, run_train, write_dataset

from lorakit.config import ConfigError
from lorakit.data import DataConfig, DatasetError, TrainingData
from lorakit.formats import read_adapter


def data_config(folder, **options) -> DataConfig:
    return DataConfig(train_data=str(folder), resolution=64, **options)


def test_the_split_holds_out_images_of_each_training_folder_as_kohya_rounds_it(tmp_path):
    folder = write_dataset(tmp_path / "data", n=10, repeats=3)
    data = TrainingData(data_config(folder, validation_split=0.25))
    # kohya: the training share is ceil(10 × 0.75) = 8, so 2 are held out
    assert len(data.held_out) == 2
    assert data.num_train_images == 8 * 3 and data.samples_per_epoch == 8 * 3
    trained = {data.records[data.samples[i]].path for i in range(data.samples_per_epoch)}
    held = {data.records[i].path for i in data.held_out}
    assert not trained & held and len(trained) == 8
    assert "2 images held out for validation (validation_split 0.25)" in data.summary()
    assert "8 images" in data.summary().splitlines()[0]
    meta = data.kohya_metadata()
    assert meta["ss_validation_split"] == "0.25" and json.loads(meta["ss_dataset_dirs"])["3_zkz shape"] == {
        "n_repeats": 3, "img_count": 8}
    # the same seed holds out the same images; another seed (or validation_seed) others
    assert TrainingData(data_config(folder, validation_split=0.25)).held_out == data.held_out
    others = [TrainingData(data_config(folder, validation_split=0.25, validation_seed=s)).held_out for s in range(5)]
    assert any(o != data.held_out for o in others)
    # no split: nothing held out, the data as before
    assert TrainingData(data_config(folder)).held_out == set()


def test_held_out_batches_are_the_images_as_they_are_every_time(tmp_path):
    folder = write_dataset(tmp_path / "data", n=6)
    data = TrainingData(data_config(folder, validation_split=0.5, batch_size=2, shuffle_caption=True,
                                    caption_dropout_rate=0.5, flip_aug=True))
    first, second = list(data.validation_batches()), list(data.validation_batches())
    assert [len(b) for b in first] == [2, 1]
    for a, b in zip(first, second, strict=True):
        assert a.captions == b.captions and torch.equal(a.pixel_values, b.pixel_values)
        assert a.flipped == [False] * len(a) and not a.is_reg.any()
    captions = {data.records[i].path.name: data.records[i].caption for i in data.held_out}
    assert sorted(c for b in first for c in b.captions) == sorted(captions.values())  # no dropout, no shuffle


def test_a_split_too_small_to_hold_out_an_image_is_refused(tmp_path):
    folder = write_dataset(tmp_path / "data", n=5)
    with pytest.raises(DatasetError, match=r"validation_split 0.1 of its 5 images holds none out .* at least 0.2"):
        TrainingData(data_config(folder, validation_split=0.1))
    with pytest.raises(DatasetError, match="validation_split must be at least 0 and below 1"):
        TrainingData(data_config(folder, validation_split=1.0))


def test_validation_settings_without_a_split_are_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    folder = write_dataset(tmp_path / "data")
    cfg = make_config(tiny_model_dir, folder, tmp_path / "run", training={"validate_every_n_steps": 2})
    with pytest.raises(ConfigError, match="training.validate_every_n_steps: no image is held out"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_run_logs_the_validation_loss_and_says_where_it_was_lowest(tiny_model_dir, tmp_path):
    folder = write_dataset(tmp_path / "data", n=6, repeats=2)
    out = tmp_path / "run"
    cfg = make_config(tiny_model_dir, folder, out, data={"validation_split": 0.34},
                      training={"max_epochs": 3, "validate_every_n_steps": 2})
    result = run_train(cfg)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps_with = [r["step"] for r in log if "val_loss" in r and "loss" in r]
    epoch_ends = [r for r in log if "val_loss" in r and "loss" not in r]
    assert steps_with == list(range(2, result.steps + 1, 2))  # 4 images × 2 repeats / batch 2: 4 steps an epoch
    # every epoch ends on an even step: measured there already, not twice; the base model's before the first step
    assert [(r["step"], r["epoch"]) for r in epoch_ends] == [(0, 0)]
    values = [r["val_loss"] for r in log if "val_loss" in r]
    assert all(v > 0 for v in values) and len(set(values)) > 1  # the adapter changes, so does the loss
    summary = json.loads((out / "summary.json").read_text())["validation"]
    assert summary["held_out_images"] == 2 and summary["measured"] == len(values)
    assert summary["lowest"]["val_loss"] == min(values) and summary["last"]["val_loss"] == values[-1]
    assert summary["base_model"] == values[0] == epoch_ends[0]["val_loss"]
    assert f"validation loss (2 held-out images): base model {values[0]:.4f}, last" in result.summary
    meta = read_adapter(out / "lorakit.safetensors").metadata
    assert meta["ss_validation_split"] == "0.34" and meta["ss_validate_every_n_steps"] == "2"
    assert meta["ss_num_train_images"] == "8"


def test_the_validation_loss_does_not_change_training_and_repeats_exactly(tiny_model_dir, tmp_path):
    """The held-out loss draws from its own seed and restores the modules' modes: training with it measured
    every step gives the same weights as training without measuring it (same held-out images)."""
    folder = write_dataset(tmp_path / "data", n=6)
    runs = {}
    for name, every in (("measured", 1), ("epochs", None)):
        cfg = make_config(tiny_model_dir, folder, tmp_path / name, data={"validation_split": 0.34},
                          training={"max_epochs": 2, "validate_every_n_steps": every},
                          network={"dropout": 0.1})
        run_train(cfg)
        runs[name] = read_adapter(tmp_path / name / "lorakit.safetensors").tensors
    for key, tensor in runs["measured"].items():
        assert torch.equal(tensor, runs["epochs"][key]), key
    logs = {n: [json.loads(x) for x in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in runs}
    at_end = {n: {r["step"]: r["val_loss"] for r in log if "val_loss" in r} for n, log in logs.items()}
    assert at_end["epochs"] and all(at_end["measured"][s] == v for s, v in at_end["epochs"].items())


def test_a_resumed_run_keeps_its_earlier_validation_losses(tiny_model_dir, tmp_path):
    folder = write_dataset(tmp_path / "data", n=6)
    out = tmp_path / "run"
    run_train(make_config(tiny_model_dir, folder, out, data={"validation_split": 0.34}, training={"max_epochs": 2}))
    cfg = make_config(tiny_model_dir, folder, out, data={"validation_split": 0.34}, training={"max_epochs": 3})
    cfg.output.if_exists = "resume"
    run_train(cfg)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    measured = [(r["epoch"], r["step"]) for r in log if "val_loss" in r]
    assert measured == [(0, 0), (1, 2), (2, 4), (3, 6)]  # the base model, each epoch end (4 images, batch 2), none
    # twice: the resumed session does not measure a base model again
    summary = json.loads((out / "summary.json").read_text())["validation"]
    assert summary["measured"] == 4 and summary["last"]["epoch"] == 3


def test_the_dataset_toml_sets_the_split_per_dataset_as_kohya_does(tmp_path):
    folder = write_dataset(tmp_path / "data", n=8)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""[general]
resolution = 64
validation_split = 0.25
validation_seed = 7

[[datasets]]
[[datasets.subsets]]
image_dir = "{folder / '1_zkz shape'}"
class_tokens = "zkz shape"
""")
    data = TrainingData(DataConfig(train_data=str(toml)))
    assert len(data.held_out) == 2 and data.datasets[0].validation_seed == 7
    toml.write_text(toml.read_text().replace('class_tokens = "zkz shape"', 'class_tokens = "zkz shape"\n'
                                                                            "validation_split = 0.5"))
    with pytest.raises(DatasetError, match=r"'validation_split' cannot be set in .*\[general\] or \[\[datasets\]\]"):
        TrainingData(DataConfig(train_data=str(toml)))


# ------------------------------------------------------------------------------- a folder of held-out images
def test_a_validation_folder_is_held_out_whole_and_leaves_the_training_data_as_it_was(tmp_path):
    """data.validation_data (OneTrainer's validation concepts): every image of that folder is held out, the
    training data, its metadata and its fingerprint (what resume compares) stay what they were without it."""
    folder = write_dataset(tmp_path / "data", n=4, repeats=3)
    held = write_dataset(tmp_path / "held", n=3, repeats=5)
    plain = TrainingData(data_config(folder))
    data = TrainingData(data_config(folder, validation_data=str(held)))
    assert {data.records[i].path.parent for i in data.held_out} == {held / "5_zkz shape"}
    assert len(data.held_out) == 3
    assert data.num_train_images == plain.num_train_images == 12 and data.steps_per_epoch == plain.steps_per_epoch
    assert [data.records[s].path for s in data.samples] == [plain.records[s].path for s in plain.samples]
    assert data.fingerprint() == plain.fingerprint()
    lanczos = {"resize_interpolation": "lanczos"}  # a subset option the validation folder inherits too
    assert TrainingData(data_config(folder, validation_data=str(held), **lanczos)).fingerprint() == \
        TrainingData(data_config(folder, **lanczos)).fingerprint()
    assert data.kohya_metadata()["ss_dataset_dirs"] == plain.kohya_metadata()["ss_dataset_dirs"]
    assert "3 images held out for validation (3 in validation folders)" in data.summary()
    assert [len(b) for b in data.validation_batches()] == [1, 1, 1]
    # with a split too: both held out, each said
    both = TrainingData(data_config(folder, validation_data=str(held), validation_split=0.25))
    assert len(both.held_out) == 4 and "(validation_split 0.25; 3 in validation folders)" in both.summary()
    # a plain folder of images with the trigger given works as train_data does
    loose = tmp_path / "loose"
    loose.mkdir()
    for path in (held / "5_zkz shape").iterdir():
        (loose / path.name).write_bytes(path.read_bytes())
    assert len(TrainingData(data_config(folder, validation_data=str(loose), trigger="zkz")).held_out) == 3


def test_a_validation_folder_that_would_be_trained_on_or_is_missing_is_refused(tmp_path):
    folder = write_dataset(tmp_path / "data", n=4)
    with pytest.raises(DatasetError, match=r"held: validation folder not found"):
        TrainingData(data_config(folder, validation_data=str(tmp_path / "held")))
    with pytest.raises(DatasetError, match=r"validation_data is \(inside\) the training folder"):
        TrainingData(data_config(folder, validation_data=str(folder / "1_zkz shape")))
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""[general]
resolution = 64
[[datasets]]
[[datasets.subsets]]
image_dir = "{folder / '1_zkz shape'}"
class_tokens = "zkz shape"
[[datasets.subsets]]
image_dir = "{write_dataset(tmp_path / 'held', n=2) / '1_zkz shape'}"
class_tokens = "zkz shape"
is_validation = true
""")
    assert len(TrainingData(DataConfig(train_data=str(toml))).held_out) == 2
    with pytest.raises(DatasetError, match="validation_data .* is not used with a dataset config file"):
        TrainingData(DataConfig(train_data=str(toml), validation_data=str(tmp_path / "held")))
    toml.write_text(toml.read_text() + "is_reg = true\n")
    with pytest.raises(DatasetError, match="is_reg and is_validation"):
        TrainingData(DataConfig(train_data=str(toml)))
    only_held = tmp_path / "only.toml"
    only_held.write_text(toml.read_text().split("[[datasets.subsets]]")[0] + "[[datasets.subsets]]" +
                         toml.read_text().split("[[datasets.subsets]]")[2].replace("is_reg = true\n", ""))
    with pytest.raises(DatasetError, match="only regularization or validation images"):
        TrainingData(DataConfig(train_data=str(only_held)))


def test_a_run_with_a_validation_folder_trains_what_it_trains_without_and_measures_its_loss(tiny_model_dir,
                                                                                           tmp_path):
    folder = write_dataset(tmp_path / "data", n=4)
    held = write_dataset(tmp_path / "held", n=2)
    runs = {}
    for name, extra in (("with", {"validation_data": str(held)}), ("without", {})):
        run_train(make_config(tiny_model_dir, folder, tmp_path / name, data=extra, training={"max_epochs": 2}))
        runs[name] = read_adapter(tmp_path / name / "lorakit.safetensors").tensors
    for key, tensor in runs["with"].items():
        assert torch.equal(tensor, runs["without"][key]), key
    log = [json.loads(line) for line in (tmp_path / "with" / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in log if "val_loss" in r] == [(0, 0), (1, 2), (2, 4)]
    assert json.loads((tmp_path / "with" / "summary.json").read_text())["validation"]["held_out_images"] == 2
    # a folder of held-out images may be given to a run that is resumed: it changes nothing trained so far
    cfg = make_config(tiny_model_dir, folder, tmp_path / "without", data={"validation_data": str(held)},
                      training={"max_epochs": 3})
    cfg.output.if_exists = "resume"
    run_train(cfg)
    log = [json.loads(line) for line in (tmp_path / "without" / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in log if "val_loss" in r] == [(3, 6)]
