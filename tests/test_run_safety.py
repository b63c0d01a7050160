"""Nothing a user owns is lost, and every bad setting is refused before work starts (issue 16).

The output folder's manifest, the checks of ``TrainConfig.validate`` (run before the model loads and before the
run folder exists), folder-name repeats, resuming with changed settings or data, and options that would be
silently ignored.  The subprocess fault tests are in test_train_faults.py.
"""

from __future__ import annotations

import json
import os

import pytest
from test_train import make_config, run_train, write_dataset

from lorakit.checkpoints import OutputFolderError, RunFolder
from lorakit.cli import main
from lorakit.config import ConfigError, TrainConfig, load_config
from lorakit.data import DatasetError, DatasetWarning, TrainingData
from lorakit.data.dataset import RepeatedIndex
from lorakit.run_manifest import MANIFEST_NAME, ManifestError, RunManifest


# ------------------------------------------------------------------------------------------------ log.jsonl
def test_a_log_line_the_disk_refused_is_written_with_the_next_one(tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    run.log({"step": 1})
    (run.path / "log.jsonl").rename(run.path / "kept.jsonl")
    (run.path / "log.jsonl").mkdir()  # appending to it fails like a full disk: an OSError
    run.log({"step": 2})
    run.log({"step": 3})  # no error while training: the lines wait
    assert capsys.readouterr().err.count("cannot write") == 1
    with pytest.raises(OSError, match="log.jsonl"):
        run.flush_log()  # the trainer's epoch end: now it fails, with the file named
    (run.path / "log.jsonl").rmdir()
    (run.path / "kept.jsonl").rename(run.path / "log.jsonl")
    run.log({"step": 4})
    assert [r["step"] for r in run.read_log()] == [1, 2, 3, 4]


def test_a_log_cut_off_mid_line_still_resumes_but_a_damaged_middle_is_named(tmp_path):
    run = RunFolder(tmp_path / "run")
    for step in (1, 2, 3):
        run.log({"step": step})
    with (run.path / "log.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a crash in the middle of a write
    assert [r["step"] for r in run.read_log()] == [1, 2, 3]
    run.truncate_log(2)
    assert (run.path / "log.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    (run.path / "log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(OutputFolderError, match=r"log.jsonl: line 2 is not JSON"):
        run.read_log()


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_removes_only_what_it_recorded(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_text("config.toml", "x = 1\n")
    run.make_dir("class_images")
    (run.path / "class_images" / "1_a shape").mkdir()  # made by a writer that chose the name itself
    (run.path / "class_images" / "1_a shape" / "0000.png").write_bytes(b"png")
    run.record_tree("class_images")
    (run.path / "notes.txt").write_text("mine")
    (run.path / "samples" / "favourite.png").write_bytes(b"mine too")
    (run.path / ".config.toml.abcd1234.tmp").write_text("left by a killed atomic write")
    kept = RunManifest(run.path).remove_all()
    assert kept == [run.path / "samples"]  # it holds the user's file
    assert sorted(p.name for p in run.path.iterdir()) == [MANIFEST_NAME, "notes.txt", "samples"]
    assert (run.path / "samples" / "favourite.png").read_bytes() == b"mine too"


def test_a_run_folder_is_removed_whole(tmp_path, monkeypatch):
    """Everything a run writes is recorded (checkpoint folders included), so overwrite leaves no empty shells."""
    import torch

    monkeypatch.chdir(tmp_path)
    run = RunFolder("run")  # relative, as users type it
    for epoch in (1, 2):
        run.save_checkpoint(epoch, {"w": torch.ones(2)}, {"step": epoch})
    run.log({"step": 1})
    run.sample_path("epoch-0001").write_bytes(b"png")
    run.write_json("summary.json", {})
    assert RunManifest(run.path).remove_all() == []
    assert list(run.path.iterdir()) == []


def test_an_epoch_checkpoint_is_as_readable_as_the_umask_says(tmp_path):
    """safetensors writes its file 0600; an epoch's adapter is handed on like the final one (umask 022: 0644)."""
    import os
    import stat

    import torch

    previous = os.umask(0o022)
    try:
        ckpt = RunFolder(tmp_path / "run").save_checkpoint(1, {"w": torch.ones(2)}, {"step": 1})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ckpt.path.iterdir()}
    assert modes == {"trained.safetensors": 0o644, "state.pt": 0o644}


def test_manifest_never_leaves_the_folder_or_follows_links(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "photo.png").write_bytes(b"irreplaceable")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(precious)  # a recorded folder replaced by a link to the user's photos
    (run / MANIFEST_NAME).write_text(json.dumps({"files": ["checkpoints/photo.png"], "dirs": ["checkpoints"]}))
    RunManifest(run).remove_all()
    assert (precious / "photo.png").read_bytes() == b"irreplaceable"
    (run / MANIFEST_NAME).write_text(json.dumps({"files": ["../precious/photo.png"], "dirs": []}))
    with pytest.raises(ManifestError, match="not inside the run folder"):
        RunManifest(run).remove_all()
    assert (precious / "photo.png").exists()


def test_recorded_links_are_unlinked_and_their_targets_kept(tmp_path):
    """A tracker's own symbolic links (W&B's latest-run, its debug logs) are removed with the run; what they
    point to never is, nor anything reached through a link the user put in the way."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "photo.png").write_bytes(b"irreplaceable")
    run = tmp_path / "run"
    manifest = RunManifest(run)
    logs = manifest.make_dir(run / "logs" / "wandb")
    (logs / "latest-run").symlink_to(precious, target_is_directory=True)
    (logs / "debug.log").symlink_to(precious / "photo.png")
    (logs / "gone.log").symlink_to(tmp_path / "missing")  # a dangling link
    manifest.add_links([logs / "latest-run", logs / "debug.log", logs / "gone.log"])
    assert RunManifest(run).owns(logs / "latest-run")
    assert RunManifest(run).remove_all() == []
    assert not (run / "logs").exists() and not (run / MANIFEST_NAME).exists()
    assert (precious / "photo.png").read_bytes() == b"irreplaceable"
    # a recorded link reached through a folder the user replaced with a link: left alone
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "wandb").symlink_to(precious, target_is_directory=True)
    (precious / "latest-run").symlink_to(precious / "photo.png")
    (run / MANIFEST_NAME).write_text(json.dumps({"files": [], "dirs": [], "links": ["logs/wandb/latest-run"]}))
    RunManifest(run).remove_all()
    assert (precious / "latest-run").is_symlink() and (precious / "photo.png").exists()


def test_overwrite_refusals(tmp_path):
    legacy = tmp_path / "legacy"  # a run of an older lorakit: no manifest, so its files are not known
    legacy.mkdir()
    (legacy / "config.toml").write_text("")
    (legacy / "photo.png").write_bytes(b"mine")
    with pytest.raises(OutputFolderError, match="cannot tell its own files from yours"):
        RunFolder(legacy, "overwrite")
    run = RunFolder(tmp_path / "run")
    job = run.path / "job.toml"
    job.write_text("")
    with pytest.raises(OutputFolderError, match="which this run reads"):
        RunFolder(run.path, "overwrite", protect=[job])
    job.unlink()
    (run.path / "summary.txt").write_text("the user's own summary")  # a name runs write, not written by lorakit
    with pytest.raises(OutputFolderError, match="summary.txt were not written by lorakit"):
        RunFolder(run.path, "overwrite")
    assert (run.path / "summary.txt").read_text() == "the user's own summary"
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"mine")
    with pytest.raises(OutputFolderError, match="not a lorakit run folder.*check --out"):
        RunFolder(photos, "resume")
    assert (photos / "a.png").exists()
    # --resume --out RUN/checkpoints (a folder of the run, not the run): the run it is in is named
    (run.path / "config.toml").write_text("")  # as a run writes it first
    (run.path / "checkpoints" / "epoch-0001").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match=f"inside the run {run.path}: --out {run.path}"):
        RunFolder(run.path / "checkpoints", "resume")


# ---------------------------------------------------------------------------------------------- validation
BAD_SETTINGS = [
    ({"training": {"save_every_n_epochs": 0}}, "training.save_every_n_epochs"),
    ({"early_stop": {"interval": 0}}, "early_stop.interval"),
    ({"early_stop": {"window": 1}}, "early_stop.window"),
    ({"sample": {"every_n_epochs": 0}}, "sample.every_n_epochs"),
    ({"optimizer": {"learning_rate": 4e37}}, "optimizer.learning_rate"),
    ({"optimizer": {"learning_rate": float("nan")}}, "optimizer.learning_rate"),
    ({"optimizer": {"ti_lr": -1.0}}, "optimizer.ti_lr"),
    ({"optimizer": {"optimizer": "adam"}},
     "optimizer.optimizer: 'adam' is no optimizer lorakit knows (adamw, adamw8bit, "),
    ({"optimizer": {"lr_scheduler": "cosine_annealing"}}, "optimizer.lr_scheduler"),
    ({"optimizer": {"betas": (0.9, 1.5)}}, "optimizer.betas"),
    ({"network": {"algorithm": "lorx"}}, "network.algorithm must be one of lora, loha, lokr, ia3, full"),
    ({"network": {"preset": "attn"}}, "network.preset"),
    ({"network": {"alpha": -1.0}}, "network.alpha"),
    ({"network": {"conv_rank": -4}}, "network.conv_rank"),
    ({"model": {"prediction_type": "sample"}}, "model.prediction_type"),
    ({"data": {"resolution": 63}}, "data.resolution"),
    ({"data": {"repeats": 20230101}}, "data.repeats"),
    ({"training": {"max_steps": 0}}, "training.max_steps"),
    ({"output": {"name": "../elsewhere"}}, "output.name"),
    ({"method": {"kind": "ti", "ti_token": "zkz"}, "network": {"algorithm": "loha", "rank": 64}},
     r"network.algorithm = 'loha', network.rank = 64 would be ignored"),
    ({"method": {"kind": "native"}, "network": {"alpha": 4.0}}, "network.alpha = 4.0 would be ignored"),
    ({"method": {"kind": "ti"}}, "method.kind = 'ti' needs the new token"),
    ({"method": {"native_text_encoder": True}}, "method.native_text_encoder fine-tunes the text encoder in native"),
]


@pytest.mark.parametrize(("sections", "message"), BAD_SETTINGS, ids=[m.split()[0] for _, m in BAD_SETTINGS])
def test_bad_settings_are_refused_before_anything_happens(tmp_path, sections, message):
    out = tmp_path / "run"
    cfg = make_config(tmp_path / "no-such-model", tmp_path / "no-such-data", out)
    cfg.network = type(cfg.network)()  # the defaults: only the setting under test is off
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_train(cfg)  # a missing model or data would fail differently: validation comes first
    assert not out.exists()


def test_names_are_checked_against_the_tables_that_define_them(tmp_path, monkeypatch):
    from lorakit.network import PRESETS
    from lorakit.optimizers import OPTIMIZERS

    cfg = TrainConfig()
    cfg.optimizer.optimizer = "shampoo"
    with pytest.raises(ConfigError, match="optimizer.optimizer"):
        cfg.validate()
    monkeypatch.setitem(OPTIMIZERS, "shampoo", OPTIMIZERS["sgd"])  # a new optimizer needs one table entry
    cfg.validate()
    cfg.network.preset = "mine"
    with pytest.raises(ConfigError, match=", ".join(PRESETS)):
        cfg.validate()


def test_wrong_length_lists_in_toml(tmp_path):
    for line, key in (('[data]\nresolution = [64]\n', "resolution"), ('[optimizer]\nbetas = [0.9]\n', "betas")):
        path = tmp_path / "job.toml"
        path.write_text(line)
        with pytest.raises(ConfigError, match=rf"job.toml \[\w+\]\.{key}: expected a list of 2 values"):
            load_config(path)


def test_cli_refuses_bad_flags_without_leaving_a_folder(tmp_path, capsys):
    out = tmp_path / "job"
    assert main(["train", "--out", str(out), "--resolution", "63"]) == 2
    assert "data.resolution must be a positive multiple of 8" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--model", str(tmp_path / "sd15.safetensors")]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--print-config"]) == 0
    assert "[data]" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # neither the run folder nor the built-in concept's images


# ------------------------------------------------------------------------------------------------- data
def test_folder_name_repeats_are_capped(tmp_path):
    data = write_dataset(tmp_path / "data")
    (data / "1_zkz shape").rename(data / "20230101_photos")
    with pytest.raises(DatasetError, match=r"20230101_photos: the folder name asks for 20230101 repeats"):
        TrainingData(make_config(tmp_path, data, tmp_path / "o").data, default_resolution=64)
    (data / "20230101_photos").rename(data / "99999999999999999999_x")
    with pytest.raises(DatasetError, match="99999999999999999999_x"):
        TrainingData(make_config(tmp_path, data, tmp_path / "o").data, default_resolution=64)


def test_repeats_are_index_arithmetic():
    repeats = [3, 0, 1, 2]
    index = RepeatedIndex(repeats)
    expanded = [i for i, n in enumerate(repeats) for _ in range(n)]
    assert len(index) == len(expanded) and list(index) == expanded
    assert [index[k] for k in range(len(index))] == expanded
    big = RepeatedIndex([10**12, 5])  # no list of a trillion entries is built
    assert len(big) == 10**12 + 5 and big[10**12 - 1] == 0 and big[10**12] == 1


def test_dead_links_and_oversized_batches_are_named(tmp_path):
    data = write_dataset(tmp_path / "data", n=2)
    loop = data / "1_zkz shape" / "loop.png"
    os.symlink(loop, loop)  # a link to itself
    cfg = make_config(tmp_path, data, tmp_path / "o").data
    cfg.batch_size = 10
    with pytest.warns(DatasetWarning) as caught:
        TrainingData(cfg, default_resolution=64)
    messages = [str(w.message) for w in caught]
    assert any("loop.png" in m and "broken or looping" in m for m in messages)
    assert any("batch_size 10 is larger than the 2 samples" in m for m in messages)


# ------------------------------------------------------------------------------------------------ training
def test_one_step_per_epoch_gets_a_working_early_stop_window(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", n=2)
    result = run_train(make_config(tiny_model_dir, data, tmp_path / "run", training={"max_epochs": 3},
                                   data={"batch_size": 2}, early_stop={"mode": "report"}))
    assert result.steps == 3  # a window of 1 used to fail here, after the model had loaded


def test_resume_refuses_changed_settings_and_data(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    run_train(make_config(tiny_model_dir, data, out, training={"max_epochs": 1}))
    before = (out / "config.toml").read_text()
    changed = make_config(tiny_model_dir, data, out, training={"max_epochs": 1}, output={"if_exists": "resume"},
                          optimizer={"learning_rate": 5e-3}, network={"rank": 4})
    with pytest.raises(ConfigError, match=r"network.rank 2 -> 4; optimizer.learning_rate 0.001 -> 0.005"):
        run_train(changed)
    assert (out / "config.toml").read_text() == before  # the run's record still says what it was trained with
    with pytest.raises(Exception, match="finished after 2 steps"):  # nothing left: not "0 steps, success"
        run_train(make_config(tiny_model_dir, data, out, training={"max_epochs": 1}, output={"if_exists": "resume"}))
    write_dataset(tmp_path / "more", n=1)
    (tmp_path / "more" / "1_zkz shape" / "000.png").rename(data / "1_zkz shape" / "new.png")
    with pytest.raises(Exception, match="the training data changed since"):
        run_train(make_config(tiny_model_dir, data, out, training={"max_epochs": 2}, output={"if_exists": "resume"}))


def test_resume_with_only_the_output_folder_continues_a_run_of_any_settings(tiny_model_dir, tmp_path, capsys):
    """`lorakit train --out DIR --resume`, as the README writes it: the run's own config.toml is the base, so a
    run started with flags (here LoHa, rank 2, batch 2, no early stop) continues without repeating them; a flag
    given with --resume is a change to that run, checked like any other."""
    data = write_dataset(tmp_path / "data", n=4, repeats=2)
    flags = ["--data", str(data), "--model", str(tiny_model_dir), "--algorithm", "loha", "--rank", "2",
             "--batch-size", "2", "--early-stop", "off", "--no-progress"]
    assert main(["train", *flags, "--out", str(tmp_path / "straight"), "--max-steps", "6"]) == 0
    out = tmp_path / "run"
    assert main(["train", *flags, "--out", str(out), "--max-steps", "3"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert "training.max_steps 3 -> 6" in capsys.readouterr().out
    losses = [[json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
              for folder in (tmp_path / "straight", out)]
    assert len(losses[1]) == 6 and losses[1] == losses[0]  # the same LoHa run as one never interrupted
    assert load_config(out / "config.toml").network.algorithm == "loha"
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "8", "--rank", "4", "--no-progress"]) == 2
    assert "network.rank 2 -> 4" in capsys.readouterr().err


def test_resume_from_another_directory_finds_the_runs_relative_paths(tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """A run started with relative paths (`--data data`) is resumed from elsewhere (`--out /abs/run --resume`):
    the run's config.toml names its data and model by absolute paths, so the resume finds them."""
    project = tmp_path / "project"
    write_dataset(project / "data", n=4, repeats=2)
    (project / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.chdir(project)
    flags = ["--data", "data", "--model", "model", "--rank", "2", "--batch-size", "2", "--early-stop", "off",
             "--no-progress"]
    assert main(["train", *flags, "--out", "run", "--max-steps", "3"]) == 0
    written = load_config(project / "run" / "config.toml")
    assert written.data.train_data == str(project / "data")
    assert written.model.base == str(project / "model")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "--out", str(project / "run"), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert "training.max_steps 3 -> 4" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (project / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # a run written before paths were made absolute: from elsewhere, the error says where to resume from
    config = project / "run" / "config.toml"
    config.write_text(config.read_text().replace(str(project / "data"), "data"))
    assert main(["train", "--out", str(project / "run"), "--resume", "--max-steps", "5", "--no-progress"]) == 2
    assert "data.train_data = 'data' is relative to the directory the run was started in" in capsys.readouterr().err
    # and the same flags, relative, from the run's own directory still count as unchanged
    monkeypatch.chdir(project)
    assert main(["train", *flags, "--out", "run", "--resume", "--max-steps", "5"]) == 0
    assert "differ" not in capsys.readouterr().err


def test_max_steps_resume_continues_mid_epoch(tiny_model_dir, tmp_path):
    """epoch_batches(skip=): a run stopped by max_steps mid-epoch continues with the rest of that epoch."""
    data = write_dataset(tmp_path / "data", n=4, repeats=2)  # batch 2: 4 steps per epoch
    straight = run_train(make_config(tiny_model_dir, data, tmp_path / "a", training={"max_steps": 6}))
    out = tmp_path / "b"
    run_train(make_config(tiny_model_dir, data, out, training={"max_steps": 3}))
    resumed = run_train(make_config(tiny_model_dir, data, out, training={"max_steps": 6},
                                    output={"if_exists": "resume"}))
    assert resumed.losses == straight.losses
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_save_precision_is_applied(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    data = write_dataset(tmp_path / "data", n=2)
    run_train(make_config(tiny_model_dir, data, tmp_path / "run", training={"max_epochs": 1},
                          output={"save_precision": "fp16"}))
    assert {t.dtype for t in load_file(str(tmp_path / "run" / "lorakit.safetensors")).values()} == {torch.float16}


def test_a_failed_start_leaves_nothing_behind(tiny_model_dir, tmp_path):
    """An error found after the run folder was made (a corrupt image) removes it: the same command runs again."""
    data = write_dataset(tmp_path / "data", n=2)
    bad = data / "1_zkz shape" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match="001.png"):
        run_train(make_config(tiny_model_dir, data, out, training={"max_epochs": 1}))
    assert not out.exists()
    bad.unlink()
    bad.with_suffix(".txt").unlink()
    assert run_train(make_config(tiny_model_dir, data, out, training={"max_epochs": 1})).steps == 1


def test_missing_paths_are_named_before_anything_is_written(tmp_path):
    data = write_dataset(tmp_path / "data", n=1)
    (tmp_path / "model").mkdir()  # exists: each case has one missing path
    for sections, key in (({"model": {"base": str(tmp_path / "sd15.safetensors")}}, "model.base"),
                          ({"sample": {"prompts": str(tmp_path / "prompts.txt")}}, "sample.prompts"),
                          ({"data": {"reg_data": str(tmp_path / "reg")}}, "data.reg_data"),
                          ({"output": {"log_with": "tensorboard", "log_tracker_config": str(tmp_path / "t.toml")}},
                           "output.log_tracker_config")):
        cfg = make_config(tmp_path / "model", data, tmp_path / "run", **sections)
        with pytest.raises(ConfigError, match=f"{key}: .*: no such file or folder"):
            run_train(cfg)
        assert not (tmp_path / "run").exists()


def test_a_config_file_run_from_elsewhere_says_where_its_relative_paths_are(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """`lorakit train proj/config.toml` naming `photos` (beside the file) from another directory: relative paths
    are read from the current directory, as kohya reads them, and the error says the folder is beside the file."""
    project = tmp_path / "proj"
    write_dataset(project / "photos", n=2)
    (project / "config.toml").write_text(f'[data]\ntrain_data = "photos"\n[model]\nbase = "{tiny_model_dir}"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", "proj/config.toml", "--out", "run", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.train_data: photos: no such file or folder (relative paths are read from the current directory" \
        in err and f"run from {project}" in err
    assert not (tmp_path / "run").exists()
