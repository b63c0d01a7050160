"""``lorakit train --dry-run``: the run checked as the trainer checks it, its data and steps said, and nothing loaded
or written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_train import write_dataset

import lorakit.models
import lorakit.train  # imported before any patch: it keeps its own name for load_base_model
from lorakit.cli import main
from lorakit.models import load_base_model, native_resolution, save_single_file_checkpoint


def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded the model's weights")

    monkeypatch.setattr(lorakit.models, "load_base_model", refuse)
    monkeypatch.setattr(lorakit.train, "load_base_model", refuse)


def test_a_dry_run_says_what_would_be_trained_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_dataset(tmp_path / "data", n=6)
    (next(data.rglob("001.txt"))).unlink()  # an image without its caption file
    out = tmp_path / "run"
    _no_loading(monkeypatch)
    assert main(["train", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--dry-run",
                 "--batch-size", "2", "--epochs", "4", "--max-steps", "10", "--trigger", "zkz",
                 "--set", "training.save_every_n_epochs=2", "--set", "training.save_every_n_steps=2"]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert "made for 64×64 (from its configs)" in text
    assert "1 folder, 6 images (1_zkz shape: 6 × 1) = 6 samples/epoch" in text
    assert "1 image without a caption file: trained with the folder's words" in text
    assert "  001.png: 'zkz shape'" in text  # the caption it will train with: the folder's words
    assert "training: 3 steps per epoch × 4 epochs = 10 steps (training.max_steps 10)" in text
    assert "1_zkz shape: white background (5)" in text  # tag frequency, as kohya counts it
    # steps 2, 4 and 8: step 6 ends epoch 2, saved as the epoch's; step 10 is the last, saved as the epoch's too
    assert "checkpoints: every 2 epochs and the last; a step checkpoint every 2 steps (3 checkpoints)" in text

    # a resume is checked as the resume would check it: a setting it may not change is refused
    flags = ["train", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "2"]
    monkeypatch.undo()
    assert main([*flags, "--epochs", "1", "--no-progress", "--early-stop", "off"]) == 0
    _no_loading(monkeypatch)
    capsys.readouterr()
    assert main([*flags, "--epochs", "2", "--resume", "--dry-run", "--early-stop", "off"]) == 0
    assert f"resume: continues the run in {out}" in capsys.readouterr().out
    assert main([*flags, "--epochs", "2", "--resume", "--dry-run", "--early-stop", "off", "--rank", "4"]) == 2
    assert "--resume: these settings differ" in capsys.readouterr().err


def test_a_dry_run_stops_on_what_the_run_would_stop_on(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_dataset(tmp_path / "data", n=3)
    (next(data.rglob("002.png"))).write_bytes(b"not a png")
    _no_loading(monkeypatch)
    flags = ["train", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"), "--dry-run"]
    assert main([*flags, "--data", str(data)]) == 2
    assert "002.png" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # a setting that needs held-out images, without any
    assert main([*flags, "--data", str(write_dataset(tmp_path / "ok", n=3)), "--set",
                 "training.validate_every_n_epochs=1"]) == 2
    assert "no image is held out for validation" in capsys.readouterr().err
    # prior preservation: its class images are drawn when the run starts, so the check says so and counts without
    ok = str(tmp_path / "ok")
    assert main([*flags, "--data", ok, "--set", "data.num_class_images=4"]) == 0  # the class from the folder's name
    assert "4 class images of 'shape' would be drawn first" in capsys.readouterr().out
    plain = tmp_path / "plain"  # a plain folder names no class: the prompt must be given, as the run would say
    plain.mkdir()
    for png in (tmp_path / "ok").rglob("*.png"):
        (plain / png.name).write_bytes(png.read_bytes())
    assert main([*flags, "--data", str(plain), "--trigger", "zkz", "--set", "data.num_class_images=4"]) == 2
    assert "needs data.class_prompt" in capsys.readouterr().err
    assert main([*flags, "--data", ok, "--set", "data.num_class_images=4", "--set", "data.class_prompt=a shape"]) == 0
    assert "note: prior preservation: 4 class images of 'a shape' would be drawn first" in capsys.readouterr().out
    # the class images a first run drew (reg/1_a shape/) are counted where they are: only the missing are drawn
    reg = tmp_path / "reg"
    for png in list((tmp_path / "ok").rglob("*.png"))[:3]:
        (reg / "1_a shape").mkdir(parents=True, exist_ok=True)
        (reg / "1_a shape" / png.name).write_bytes(png.read_bytes())
    flags_reg = [*flags, "--data", ok, "--reg-data", str(reg), "--set", "data.class_prompt=a shape"]
    assert main([*flags_reg, "--set", "data.num_class_images=4"]) == 0
    assert "note: prior preservation: 1 class image of 'a shape' would be drawn first" in capsys.readouterr().out
    assert main([*flags_reg, "--set", "data.num_class_images=3"]) == 0
    said = capsys.readouterr().out
    assert "would be drawn" not in said and "3 reg images" in said


def test_a_dry_run_reads_the_adapter_a_run_starts_from_as_the_run_reads_it(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """--network-weights given a run folder (or a pickle) was said "checked" by the dry run, and "no such file" by
    the run; both now read it alike and name the file to give."""
    data = write_dataset(tmp_path / "data", n=3)
    run = tmp_path / "earlier"
    run.mkdir()
    (run / "config.toml").write_text("")
    adapter = run / "lorakit.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_a.alpha": torch.tensor(2.0)}, str(adapter))
    _no_loading(monkeypatch)
    flags = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*flags, "--dry-run", "--network-weights", str(run)]) == 2
    assert f"network.weights: {run}: is a folder, not a file" in (err := capsys.readouterr().err)
    assert f"its result is {adapter}" in err
    assert main([*flags, "--dry-run", "--network-weights", str(adapter)]) == 0
    assert f"the adapter starts from {adapter} (1 module, checked" in capsys.readouterr().out
    assert main([*flags, "--network-weights", str(run)]) == 2  # the run itself: the same words, nothing written
    assert f"network.weights: {run}: is a folder, not a file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_dry_run_reads_the_sample_prompts_and_a_run_refuses_a_bad_file_before_the_model_loads(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The prompt file was read only once the model had loaded: a dry run passed a file the run then stopped on."""
    data = write_dataset(tmp_path / "data", n=3)
    good, bad, copied = (tmp_path / f"{name}.txt" for name in ("good", "bad", "copied"))
    good.write_text("a zkz shape --d 3\n# a comment\na red circle --w 64\n")
    bad.write_text("a zkz shape --zz 3\n")
    copied.write_text("a zkz shape, <lora:mychar:0.7>, red\n")  # a prompt copied from A1111
    _no_loading(monkeypatch)
    flags = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*flags, "--dry-run", "--sample-prompts", str(good), "--set", "sample.every_n_epochs=2",
                 "--set", "sample.at_first=true"]) == 0
    assert f"samples: 2 prompts ({good}) drawn every 2 epochs, before the first step" in capsys.readouterr().out
    assert main([*flags, "--dry-run", "--sample-prompts", str(bad)]) == 2
    assert f"{bad} line 1: unknown option --zz" in capsys.readouterr().err
    for dry in (["--dry-run"], []):  # the run itself stops before it loads the model (which is refused here)
        assert main([*flags, *dry, "--sample-prompts", str(copied)]) == 2
        err = capsys.readouterr().err
        assert f"{copied} line 1: <lora:mychar:0.7> is A1111's prompt syntax for loading an adapter" in err
        assert "(mychar.safetensors:0.7)" in err and "a run draws its samples with the adapter it trains" in err
    assert not (tmp_path / "run").exists()


def test_a_base_model_is_read_from_its_configs_and_shapes_only(tmp_path):
    tiny = load_base_model(None)
    single = save_single_file_checkpoint(tiny, tmp_path / "tiny.safetensors")
    assert native_resolution(single) == native_resolution(None) == tiny.resolution == 64
    # an SDXL checkpoint is refused from its tensor names, before any weight is read
    xl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4),
               "model.diffusion_model.label_emb.0.0.weight": torch.ones(4, 4)}, str(xl))
    with pytest.raises(lorakit.models.ModelLoadError, match="SDXL"):
        native_resolution(xl)
    with pytest.raises(lorakit.models.ModelLoadError, match="no such file"):
        native_resolution(tmp_path / "missing")
    (tmp_path / "empty").mkdir()  # a folder that is no model: said as loading says it, not a missing config file
    with pytest.raises(lorakit.models.ModelLoadError, match="empty: not a Stable Diffusion diffusers folder "
                                                           r"\(missing unet, vae, text_encoder\)"):
        native_resolution(tmp_path / "empty")
    # a lorakit run folder given as the model: what it holds instead
    from lorakit.run_manifest import RunManifest

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 4)}, str(run / "lorakit.safetensors"))
    RunManifest(run).add_files([run / "config.toml", run / "lorakit.safetensors"])
    with pytest.raises(lorakit.models.ModelLoadError, match="it is a lorakit run, whose results are adapters"):
        load_base_model(run)
    single.rename(run / "lorakit-native.safetensors")  # native fine-tuning's result: a model
    with pytest.raises(lorakit.models.ModelLoadError,
                       match=f"it is a lorakit run, and the model it trained is {run / 'lorakit-native.safetensors'}"):
        load_base_model(run)


def test_the_built_in_job_is_checked_without_leaving_its_images_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _no_loading(monkeypatch)
    assert main(["train", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "1 folder, 15 images (10_zkz shape: 15 × 10) = 150 samples/epoch" in text
    assert "rendered for this check in a temporary folder" in text and list(tmp_path.iterdir()) == []


def test_a_dry_run_of_textual_inversion_on_templates_says_what_trains_and_what_may_stop_it(tmp_path, monkeypatch,
                                                                                             capsys):
    """Caption templates shown as such (not 16 lines as one caption, no template "tags"); textual inversion's early
    stop is off, having no adapter weights to read, unless it stops on the samples."""
    monkeypatch.chdir(tmp_path)
    _no_loading(monkeypatch)
    assert main(["train", "--method", "ti", "--set", "data.caption_templates=object", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "15 images trained with caption templates (object), one drawn per step, not their captions" in text
    assert "000.png: one of 16 templates, e.g. 'a photo of a zkz'" in text and "most frequent tags" not in text
    assert "early stopping: off (textual inversion has no adapter weights to watch" in text
    assert main(["train", "--method", "ti", "--set", "early_stop.samples=world", "--dry-run"]) == 0
    assert "early stopping: on the samples (world)" in capsys.readouterr().out
    # method.ti_weights is read as the run reads it: its vectors counted, a wrong count refused
    save_file({"clip_l": torch.zeros(2, 32)}, str(tmp_path / "start.safetensors"))
    flags = ["train", "--method", "ti", "--set", "method.ti_weights=start.safetensors", "--dry-run"]
    assert main([*flags, "--set", "method.ti_vectors=2"]) == 0
    assert "textual inversion starts from start.safetensors (2 vectors of size 32 per token" in capsys.readouterr().out
    assert main(flags) == 2
    assert "holds 2 vector(s) per token, but method.ti_vectors is 1" in capsys.readouterr().err


def test_a_dry_run_checks_the_sample_stop_without_loading_its_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """early_stop.samples = "clip=PATH": the folder is checked from its config alone (this one holds no weights, so
    loading it would fail), the prompt file read and its prompts checked, as the trainer would."""
    import json

    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    prompts = tmp_path / "p.toml"
    prompts.write_text('trigger = "zkz shape"\ntrain = ["a {trigger}"]\nalter = ["a blue {trigger}", '
                       '"a {trigger} on the left"]\nagnostic = ["a circle"]\n')
    _no_loading(monkeypatch)
    flags = ["train", "--model", str(tiny_model_dir), "--data", str(write_dataset(tmp_path / "data", n=3)), "--out",
             str(tmp_path / "run"), "--dry-run", "--set", f"early_stop.sample_prompts={json.dumps(str(prompts))}"]
    assert main([*flags, "--set", f"early_stop.samples={json.dumps(f'clip={clip}')}"]) == 0
    assert ("early stop on the samples: the 'clip' scorer, 3 prompts × 1 seed drawn and scored at every epoch end"
            in capsys.readouterr().out)  # the agnostic prompt is not read
    missing = tmp_path / "none"
    assert main([*flags, "--set", f"early_stop.samples={json.dumps(f'clip={missing}')}"]) == 2
    assert f"{missing}: no such folder" in capsys.readouterr().err
    prompts.write_text('trigger = "zkz shape"\ntrain = ["a {trigger}"]\n')
    assert main([*flags, "--set", f"early_stop.samples={json.dumps(f'clip={clip}')}"]) == 2
    assert "the clip sample scorer needs alter or style prompts" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_no_model_is_named_by_the_command_as_a_user_runs_it(tmp_path):
    """`lorakit train --model FOLDER --dry-run` on a folder that holds no model: one line that names the folder and
    what it lacks, exit 2, nothing written (a subprocess, as a user runs it)."""
    import subprocess
    import sys

    empty = tmp_path / "my_model"
    empty.mkdir()
    data = write_dataset(tmp_path / "data", n=2)
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--model", str(empty), "--data", str(data),
                           "--out", str(tmp_path / "run"), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"lorakit train: error: {empty}: not a Stable Diffusion diffusers "
                                                    "folder (missing unet, vae, text_encoder)")
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists() and list(empty.iterdir()) == []


def test_a_dry_run_makes_the_network_on_the_meta_device_and_says_what_the_run_trains(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    """The network line counts what the run itself makes (the same modules on the loaded model), and an error in
    making it (a glob naming no module) stops the check, with no weight loaded either way."""
    import re

    from test_train import make_config

    from lorakit.methods import AdapterMethod

    data = write_dataset(tmp_path / "data", n=2)
    flags = ["train", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
             "--dry-run", "--preset", "full", "--set", "network.args={train_norm = true}",
             "--set", 'network.exclude=["up_blocks.3"]']
    _no_loading(monkeypatch)
    assert main(flags) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("network: "))
    modules, norms = map(int, re.search(r"(\d+) unet modules \((\d+) of them norm layers", line).groups())
    monkeypatch.undo()
    cfg = make_config(tiny_model_dir, data, tmp_path / "run", network={"preset": "full", "rank": 8, "alpha": 8.0,
                                                                       "args": {"train_norm": True},
                                                                       "exclude": ["up_blocks.3"]})
    method = AdapterMethod(cfg, load_base_model(str(tiny_model_dir)), start_file=False)
    names = method.network.names("unet")
    assert modules == len(names) and norms == sum(method.network[n].kind == "norm" for n in names)
    assert not any(n.startswith("lora_unet_up_blocks_3_") for n in names)
    _no_loading(monkeypatch)
    assert main([*flags[:-1], 'network.exclude=["up_blocks.9"]']) == 2
    assert "network.exclude: 'up_blocks.9' names no module of the model" in capsys.readouterr().err


def test_a_textual_inversion_token_is_checked_against_the_vocabulary_before_the_model_loads(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A token the tokenizer holds as a single token is refused by the dry run and by the run before the model
    loads (the run refused it once the model had loaded, the dry run not at all); a whole word of the vocabulary
    ('star</w>') trains but is said: the new token then stands for the concept wherever the word is written."""
    from lorakit.config import ConfigError, TrainConfig
    from lorakit.methods import check_ti_token
    from lorakit.models import SD15_CONFIG, load_clip_tokenizer

    clip = (load_clip_tokenizer(SD15_CONFIG),)  # CLIP's own vocabulary, as SD1.5 has it
    cfg = TrainConfig()
    cfg.method.kind = "ti"
    for token, vectors, expected in (("zkz", 1, None), ("zkz", 3, None), ("sks", 1, "'sks' is a word"),
                                     ("dog", 1, "already in the tokenizer's vocabulary")):
        cfg.method.ti_token, cfg.method.ti_vectors = token, vectors
        try:
            said = check_ti_token(cfg, clip)
        except ConfigError as err:
            said = str(err)
        assert (said is None) if expected is None else (expected in said), (token, said)

    data = write_dataset(tmp_path / "data", n=2)
    tokenizer = load_clip_tokenizer(tiny_model_dir)
    single = next(t for t in ("art", "ar", "st", "a") if t in tokenizer.get_vocab())
    assert "star</w>" in tokenizer.get_vocab() and "star" not in tokenizer.get_vocab()
    _no_loading(monkeypatch)
    flags = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
             "--method", "ti"]
    for dry in (["--dry-run"], []):  # the run itself refuses it before loading the model (refused here)
        assert main([*flags, *dry, "--set", f"method.ti_token={single}"]) == 2
        assert f"token {single!r} (or one of ['{single}']) is already in the" in capsys.readouterr().err
    assert main([*flags, "--dry-run", "--set", "method.ti_token=star"]) == 0
    assert "note: textual inversion: 'star' is a word of the model's vocabulary" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_a_dry_run_refuses_the_output_folders_the_run_refuses(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The dry run said "checked" for --out the data folder, or a folder of the user's files; the run then
    refused it. It gives the run's refusals now, touching nothing. A run folder inside the data is refused too (the
    next run read it as a badly named image folder)."""
    data = write_dataset(tmp_path / "data", n=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"irreplaceable")
    _no_loading(monkeypatch)
    flags = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--dry-run"]
    for out, extra, said in ((data, [], "is the folder this run reads its images from"),
                             (data / "run", ["--overwrite"], f"is inside {data}, the folder this run reads its images"),
                             (mine, [], "already holds files"),
                             (mine, ["--overwrite"], "is not a lorakit run folder"),
                             (mine, ["--resume"], "nothing to resume there")):
        assert main([*flags, "--out", str(out), *extra]) == 2
        assert said in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["photo.png"]
    assert main([*flags, "--out", str(tmp_path / "new")]) == 0 and not (tmp_path / "new").exists()
