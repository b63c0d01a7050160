"""``lorakit eval`` and ``lorakit report`` end to end on the built-in model: 2 checkpoints (base + one epoch),
3 prompts, 1 seed, 4 sampler steps; and bad input: a clear error naming the file, nothing written."""

from __future__ import annotations

import json
import re

import pytest
from eval_helpers import lora_tensors, write_run
from safetensors.torch import save_file

from lorakit.cli import main

# the extractor tests' tiny CLIP / DINOv2 folders (fixtures) and VGG19-shaped weights
from test_evaluate_extractors import _vgg_state, clip_folder, dino_folder  # noqa: F401, E402  isort: skip

PROMPTS_TOML = """
concept = "zkz"
trigger = "zkz shape"

[[prompts]]
type = "train"
text = "a large red {trigger} in the center, white background"
seed = 1
expected = { shape = "star", color = "red", position = "center", background = "white" }

[[prompts]]
type = "alter"
text = "a large blue {trigger} in the center, white background"
seed = 2
expected = { shape = "star", color = "blue", position = "center", background = "white" }
changes = ["color"]

[[prompts]]
type = "agnostic"
text = "a large green circle at the top, black background"
seed = 3
expected = { shape = "circle", color = "green", position = "top", background = "black" }
"""


@pytest.fixture
def concept_data(tmp_path_factory):
    from lorakit.world.concept import write_concept_dataset

    folder = tmp_path_factory.mktemp("zkz")
    write_concept_dataset(folder)
    return folder


def test_eval_end_to_end_writes_metrics_and_report_and_caches(tmp_path, concept_data, capsys):
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    out = tmp_path / "out"
    argv = ["eval", str(run), "--prompts", str(prompts), "--out", str(out), "--steps", "4", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "2 checkpoints × 3 prompts × 1 seed(s) = 6 images (6 generated" in text
    assert {p.name for p in out.iterdir()} == {"metrics.json", "metrics.csv", "report.html", "cache"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["label"] for c in metrics["checkpoints"]] == ["base", "run/e1"]
    assert metrics["runs"][0]["turning_epoch"] == 1
    # the world's exact metrics and the generic ones on the reader's embedding
    assert set(metrics["metrics"]["train"]["run/e1"]) >= {"world.fidelity", "world.success", "fidelity[world-reader]"}
    assert "world.leak" in metrics["metrics"]["agnostic"]["base"]
    assert metrics["setup"]["data images"] == 15
    assert metrics["best"] in ("base", "run/e1")
    html = (out / "report.html").read_text()
    assert "images: alter prompts" in html and "a large blue zkz shape" in html
    # the second call makes no image
    assert main(argv) == 0
    assert "(0 generated; 6 from the cache" in capsys.readouterr().out
    # another evaluation into the same folder does not replace this one unasked
    before = (out / "metrics.json").read_text()
    assert main([*argv, "--seeds", "2"]) == 2
    assert "holds an evaluation of other checkpoints or settings" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before
    assert main([*argv, "--seeds", "2", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["setup"]["seeds"] == 2
    capsys.readouterr()
    # lorakit report on the run: a page from the folder alone
    assert main(["report", str(run)]) == 0
    said = capsys.readouterr().out
    assert (run / "report.html").is_file() and "wrote" in said
    assert re.search(r": \d+ sample grids?, \d+ tables?, \d+ charts?\n", said) and " 1 tables" not in said
    assert main(["report", str(run)]) == 0  # its own page again: replaced
    notes = tmp_path / "notes.html"
    notes.write_text("<html>my notes</html>")
    assert main(["report", str(run), "--out", str(notes)]) == 2  # the user's file: not unasked
    assert "not a page lorakit wrote" in capsys.readouterr().err and notes.read_text() == "<html>my notes</html>"
    assert main(["report", str(run), "--out", str(notes), "--overwrite"]) == 0 and "lorakit" in notes.read_text()


def test_step_checkpoints_are_compared_when_asked_and_placed_between_the_epochs(tmp_path, concept_data, capsys):
    """training.save_every_n_steps' checkpoints: left out (and said so) by default; with --step-checkpoints
    compared, charted at step / steps per epoch, and named by their step in the ranking."""
    run = write_run(tmp_path / "run", epochs=1, data=concept_data, step_checkpoints=(2,))
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    argv = ["eval", str(run), "--steps", "4", "--quiet"]
    # said before anything else is read (here, a prompt file that is not there stops the call next)
    assert main([*argv, "--prompts", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "epochs")]) == 2
    assert "run also holds 1 step checkpoint(s), not compared (--step-checkpoints" in capsys.readouterr().out
    argv += ["--prompts", str(prompts)]
    assert main([*argv, "--out", str(tmp_path / "out"), "--step-checkpoints"]) == 0
    assert "step checkpoint(s), not compared" not in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [(c["label"], c["epoch"], c["step"]) for c in metrics["checkpoints"]] == [
        ("base", 0, None), ("run/s2", 0.5, 2), ("run/e1", 1, None)]
    html = (tmp_path / "out" / "report.html").read_text()
    assert '<td class="label info">0.5 (step 2)</td>' in html and "sN a step checkpoint" in html


def test_a_run_with_a_validation_folder_is_judged_on_its_held_out_images_too(tmp_path, concept_data, capsys):
    """The run's data.validation_data (or --held-out) gives the held-out fidelity and the memorisation gap."""
    import tomllib

    from lorakit.world.concept import write_images
    from lorakit.world.render import ObjectSpec, Scene

    held = tmp_path / "held"
    write_images(held / "1_zkz shape", [Scene((ObjectSpec("star", "blue", "large", "top"),), "black", seed=5)],
                 ["a large blue zkz shape at the top, black background"])
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    config = (run / "config.toml").read_text().replace("[data]\n", f"[data]\nvalidation_data = \"{held}\"\n", 1)
    assert tomllib.loads(config)["data"]["validation_data"] == str(held)
    (run / "config.toml").write_text(config)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    out = tmp_path / "out"
    assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--quiet",
                 "--no-base"]) == 0
    assert "memorisation[world-reader] on train: run/e1 " in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["setup"]["held-out images"] == 1 and metrics["setup"]["data images"] == 15
    row = metrics["metrics"]["train"]["run/e1"]
    assert row["memorisation[world-reader]"] == pytest.approx(
        row["fidelity[world-reader]"] - row["heldout_fidelity[world-reader]"])
    capsys.readouterr()
    assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "o2"), "--quiet",
                 "--held-out", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--held-out" in err and "nowhere: no such folder" in err


def test_images_a_validation_split_held_out_are_judged_as_held_out_not_as_training_data(tmp_path, concept_data,
                                                                                        capsys):
    """The split is drawn again from the run's config as the trainer drew it: those images leave the fidelity
    reference and become the held-out set."""
    from lorakit.data import DataConfig, TrainingData

    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    config = (run / "config.toml").read_text().replace("validation_split = 0.0", "validation_split = 0.2")
    (run / "config.toml").write_text(config)
    from lorakit.config import load_config
    from lorakit.evaluate.checkpoints import read_run, split_held_out

    seed = load_config(run / "config.toml").training.seed
    data = TrainingData(DataConfig(train_data=str(concept_data), validation_split=0.2, resolution=64), seed=seed)
    assert len(data.held_out) == 3  # 15 images: kohya keeps ceil(15 × 0.8) = 12
    assert split_held_out(read_run(run)) == {data.records[i].path.resolve() for i in data.held_out}
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    out = tmp_path / "out"
    assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--quiet",
                 "--no-base"]) == 0
    setup = json.loads((out / "metrics.json").read_text())["setup"]
    assert (setup["data images"], setup["held-out images"], setup["held out"]) == (12, 3, "3 by validation_split")


def test_the_run_page_shows_what_eval_measured_and_where_the_turning_point_ranks(tmp_path, concept_data, capsys):
    """`lorakit eval RUN --out RUN-eval` (the folder the trainer's summary suggests), then `lorakit report RUN`:
    the run's page gets the eval's ranking first, its charts, the best checkpoint and the turning point's rank;
    --eval names another folder; a folder with no metrics.json is refused by name."""
    from lorakit.evaluate.pipeline import result_from_dict

    run = write_run(tmp_path / "run", epochs=2, turning_epoch=2, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    assert main(["report", str(run)]) == 0  # before any eval: the run alone
    alone = (run / "report.html").read_text()
    for inside in (run, run / "eval"):  # the eval's report.html would replace the run's own page
        assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(inside), "--quiet"]) == 2
        assert f"--out {inside}: inside the run {run} being judged" in capsys.readouterr().err
    assert (run / "report.html").read_text() == alone and not (run / "eval").exists()
    pages = tmp_path / "pages"  # a folder with someone's own report.html: not an evaluation's to replace unasked
    pages.mkdir()
    (pages / "report.html").write_text("my page")
    assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(pages), "--quiet"]) == 2
    assert f"--out {pages}: holds report.html, which no evaluation wrote there" in capsys.readouterr().err
    assert (pages / "report.html").read_text() == "my page"
    assert "ranking: the checkpoints compared" not in alone and "measured by lorakit eval" not in alone
    beside = tmp_path / "run-eval"
    assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(beside), "--steps", "2", "--quiet"]) == 0
    result = result_from_dict(json.loads((beside / "metrics.json").read_text()))
    rank = result.ranking().index("run/e2") + 1
    assert capsys.readouterr().out.endswith(f"next:\n  on the run's page, with where its turning point ranks: "
                                            f"lorakit report {run}\n")  # it finds run-eval itself
    assert main(["report", str(run)]) == 0
    said = capsys.readouterr().out
    assert f"measured by lorakit eval ({beside}, its page with the images: {beside}/report.html): best " in said
    assert f"the turning point's checkpoint (epoch 2) ranks {rank} of 3 there" in said
    page = (run / "report.html").read_text()
    assert page.index("ranking: the checkpoints compared") < page.index("training: per epoch")
    assert page.count("<figure>") > alone.count("<figure>")  # the metric charts joined the loss and CS charts
    # the run trained again into the same folder: the eval's numbers are not its own, and the page says so
    epoch2 = run / "checkpoints" / "epoch-0002" / "trained.safetensors"
    kept = epoch2.read_bytes()
    save_file(lora_tensors(0.9, seed=7), str(epoch2), metadata={"ss_epoch": "2"})
    assert main(["report", str(run)]) == 0
    said = capsys.readouterr().out
    assert f"not shown: the eval in {beside} measured checkpoints that have changed since (run/e2" in said
    assert "ranking: the checkpoints compared" not in (run / "report.html").read_text()
    epoch2.write_bytes(kept)
    elsewhere = tmp_path / "elsewhere"
    beside.rename(elsewhere)
    assert main(["report", str(run)]) == 0 and "measured by lorakit eval" not in capsys.readouterr().out
    assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(elsewhere), "--steps", "2",
                 "--quiet"]) == 0  # the same call again: every image from the cache
    assert capsys.readouterr().out.endswith(f"lorakit report {run} --eval {elsewhere}\n")
    assert main(["report", str(run), "--eval", str(elsewhere)]) == 0
    assert f"measured by lorakit eval ({elsewhere}" in capsys.readouterr().out
    # several evals (other prompts, other seeds): each joins the page under its folder's name, in the order given
    import shutil

    shutil.copytree(elsewhere, tmp_path / "second")
    assert main(["report", str(run), "--eval", str(elsewhere), "--eval", str(tmp_path / "second")]) == 0
    said = capsys.readouterr().out
    assert said.count("measured by lorakit eval (") == 2 and f"({tmp_path / 'second'}, its page" in said
    page = (run / "report.html").read_text()
    assert page.index("elsewhere: ranking: the checkpoints compared") < \
        page.index("second: ranking: the checkpoints compared") < page.index("training: per epoch")
    assert main(["report", str(run), "--eval", str(tmp_path)]) == 2
    assert f"--eval {tmp_path}: no metrics.json there" in capsys.readouterr().err
    # a summary.json cut short: the page still joins the eval, without the turning point's rank, and says why
    (run / "summary.json").write_text('{"method": "lora",')
    assert main(["report", str(run), "--eval", str(elsewhere)]) == 0
    said = capsys.readouterr().out
    assert "the run's summary is not shown" in said and f"measured by lorakit eval ({elsewhere}" in said
    assert "the turning point's checkpoint" not in said


def test_ctrl_c_during_generation_keeps_the_images_and_the_same_command_continues(tmp_path, concept_data, capsys):
    """A real `lorakit eval` process interrupted with Ctrl-C once its first images are cached: it says where they
    are and how to continue, and the same command then makes only the images that are missing. While it runs,
    the same command from this process is refused: --out is locked across processes."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_train_faults import _sigint_as_in_a_terminal

    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    out = tmp_path / "out"
    # 2 checkpoints × 3 prompts × 12 seeds, 8 at a time: Ctrl-C arrives long before the last of 9 batches
    args = ["eval", str(run), "--prompts", str(prompts), "--out", str(out), "--steps", "4", "--seeds", "12",
            "--batch-size", "8", "--quiet"]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_in_a_terminal,
                            env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    def cached() -> list[Path]:  # finished images, not the hidden temporary file of one being written
        return [p for p in (out / "cache").rglob("*.png") if not p.name.startswith(".")]

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not cached():
        time.sleep(0.02)
    assert proc.poll() is None, f"the eval ended before its first image: {proc.communicate()[1][-2000:]}"
    # the same call in a second process while the first writes: refused, the first's folder left to it
    assert main(args) == 2 and f"{out} is in use by another lorakit command" in capsys.readouterr().err
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert f"the images made so far are kept in {out / 'cache'}: the same command continues" in stderr
    assert not (out / "metrics.json").exists()  # nothing half-measured is written
    kept = len(cached())
    assert 0 < kept < 72 and len(list((out / "cache").rglob("*.png"))) == kept  # no temporary file left
    assert main(args) == 0
    assert f"({72 - kept} generated, " in (text := capsys.readouterr().out) and f"; {kept} from the cache" in text


def test_bad_input_is_a_clear_error_naming_the_file_and_nothing_is_written(tmp_path, concept_data, capsys):
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    good = tmp_path / "prompts.toml"
    good.write_text(PROMPTS_TOML)
    out = tmp_path / "out"

    def fails(*args: str) -> str:
        assert main(["eval", *args, "--out", str(out), "--steps", "4", "--quiet"]) == 2
        assert not out.exists()
        return capsys.readouterr().err

    # sampling rounds a side down to what the model draws, so the results would record a size they were not made at
    assert "--size 33: this model draws sides that are multiples of 32; give 32 or 64" in \
        fails(str(run), "--prompts", str(good), "--size", "33")
    bad_prompts = tmp_path / "bad.toml"
    bad_prompts.write_text(PROMPTS_TOML.replace('type = "alter"', 'type = "altar"'))
    assert "bad.toml" in fails(str(run), "--prompts", str(bad_prompts))

    tensors = lora_tensors(0.1, seed=0)
    name = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[name] = tensors[name][:-1].contiguous()
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong))
    assert "wrong.safetensors" in fails(str(wrong), "--prompts", str(good))

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    assert "not-a-model" in fails(str(run), "--prompts", str(good), "--extractor", f"clip={not_a_model}")

    empty = write_run(tmp_path / "empty-run", epochs=0)
    assert "empty-run" in fails(str(empty), "--prompts", str(good))

    # no prompt file and nothing to make default prompts from (an adapter file alone has no dataset)
    assert "no --prompts" in fails(str(wrong))
    with pytest.raises(SystemExit):  # argparse refuses it, naming the option (tests/test_cli.py)
        main(["eval", str(run), "--prompts", str(good), "--seeds", "0", "--out", str(out)])
    assert "argument --seeds: must be a whole number of 1 or more" in capsys.readouterr().err and not out.exists()


def test_without_a_prompt_file_the_prompts_come_from_the_dataset_captions(tmp_path, concept_data, capsys):
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    out = tmp_path / "out"
    assert main(["eval", str(run), "--out", str(out), "--steps", "4", "--no-base", "--quiet",
                 "--extractor", "world-reader"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["setup"]["prompts"] == "captions"
    assert metrics["setup"]["trigger"] == "zkz shape"  # from the kohya folder name "10_zkz shape"
    assert [c["label"] for c in metrics["checkpoints"]] == ["run/e1"]
    assert "train" in metrics["metrics"] and "agnostic" in metrics["metrics"]
    assert metrics["best"] is None  # one checkpoint: nothing to rank
    assert "wrote" in capsys.readouterr().out
    # a run that trained on caption templates is judged on them
    from lorakit.config import load_config, to_toml

    cfg = load_config(run / "config.toml")
    cfg.data.caption_templates = "object"
    (run / "config.toml").write_text(to_toml(cfg))
    assert main(["eval", str(run), "--out", str(tmp_path / "templated"), "--steps", "2", "--no-base", "--quiet",
                 "--extractor", "world-reader"]) == 0
    assert "a photo of a zkz" in (tmp_path / "templated" / "report.html").read_text()


def test_a_prompt_longer_than_the_text_encoder_reads_is_said_to_be_cut(tmp_path, concept_data, capsys):
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    long = ", ".join(f"red {{trigger}} number {i} on green grass" for i in range(12))
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML + f'\n[[prompts]]\ntype = "agnostic"\ntext = "{long}"\n')
    assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--no-base", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "lorakit eval: note: 1 of 4 prompts are longer than the 75 tokens the text encoder reads and are cut " \
           "there (the longest, " in said and "--max-token-length 150 reads more" in said


def test_images_without_caption_files_are_captioned_as_the_trainer_captioned_them(tmp_path, capsys):
    """A plain folder (named like a date) of caption-less photos trained with --trigger/--class: the trainer
    captioned every image "xyz ball", so eval's default prompts come from that, not "the dataset has no captions";
    in kohya layout an image without a caption file is its folder's "<trigger> <class>"."""
    from PIL import Image

    from lorakit.config import load_config, to_toml
    from lorakit.evaluate.checkpoints import dataset_images

    photos = tmp_path / "2026-12-05 photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(photos / f"img {i}.jpg")
    run = write_run(tmp_path / "run", epochs=1, data=photos)
    cfg = load_config(run / "config.toml")
    cfg.data.trigger, cfg.data.class_word = "xyz", "ball"
    (run / "config.toml").write_text(to_toml(cfg))
    out = tmp_path / "out"
    assert main(["eval", str(run), "--out", str(out), "--steps", "2", "--no-base", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["setup"]["prompts"] == "captions" and metrics["setup"]["trigger"] == "xyz"
    assert "<td class=\"label\">xyz ball</td>" in (out / "report.html").read_text()  # the train prompts' row
    capsys.readouterr()

    kohya = tmp_path / "kohya"
    (kohya / "5_zkz star").mkdir(parents=True)
    (kohya / "1_a date 20261205").mkdir()
    for folder, name in ((kohya / "5_zkz star", "a"), (kohya / "5_zkz star", "b"), (kohya / "1_a date 20261205", "c")):
        Image.new("RGB", (64, 64)).save(folder / f"{name}.png")
    (kohya / "5_zkz star" / "b.txt").write_text("zkz star, red\n")
    assert [c for _, c in dataset_images(kohya, "unused")] == ["a date 20261205", "zkz star", "zkz star, red"]
    assert [c for _, c in dataset_images(photos)] == ["", "", ""]  # no run to say what the trainer used
    assert [c for _, c in dataset_images(photos, "xyz ball")] == ["xyz ball"] * 3
    # a run trained on caption templates (data.caption_templates): its images are the templates, in turn, with
    # the trigger the trainer filled in (the folder's, or the run's data.trigger)
    assert [c for _, c in dataset_images(kohya, templates="style")] == [
        "a painting in the style of a", "a picture in the style of zkz", "an artwork in the style of zkz"]
    assert [c for _, c in dataset_images(photos, templates="object", trigger="xyz")] == [
        "a photo of a xyz", "a picture of the xyz", "a close-up photo of a xyz"]


def test_the_dataset_is_read_as_the_trainer_reads_it(tmp_path, capsys):
    """``lorakit eval RUN`` crashed with a traceback on a macOS ``._a.png`` beside the images (the trainer skips
    it), read captions with their BOM, and compared samples with images the trainer never saw: sideways photos
    (no EXIF turn) and transparent cut-outs on black (the trainer puts them on white)."""
    from PIL import Image

    from lorakit.commands.eval import _dataset_rgb
    from lorakit.evaluate.checkpoints import dataset_images

    kohya = tmp_path / "kohya"
    folder = kohya / "5_zkz star"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / ".ipynb_checkpoints" / "old.png")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # an AppleDouble file: no image
    upright = Image.new("RGB", (48, 64), (200, 10, 10))
    exif = upright.getexif()
    exif[0x0112] = 6  # stored turned: a viewer (and the trainer) turns it back
    upright.save(folder / "a.jpg", exif=exif)
    cut_out = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    cut_out.paste((10, 200, 10, 255), (16, 16, 48, 48))
    cut_out.save(folder / "b.png")
    Image.new("RGB", (64, 64)).save(folder / "c.png")
    (folder / "a.txt").write_bytes("\ufeffzkz star, red\r\nsecond line\r\n".encode())
    (folder / "b.txt").write_text("\n")  # empty: the folder's words, as the trainer does
    pairs = dataset_images(kohya)
    assert [(p.name, c) for p, c in pairs] == [("a.jpg", "zkz star, red"), ("b.png", "zkz star"), ("c.png", "zkz star")]
    images = _dataset_rgb(pairs)
    assert [im.size for im in images] == [(64, 48), (64, 64), (64, 64)]
    assert images[1].getpixel((0, 0)) == (255, 255, 255) and images[1].getpixel((32, 32)) == (10, 200, 10)

    (folder / "c.png").write_bytes(b"not a png")  # spoilt after training: said, naming it, before any image is made
    run = write_run(tmp_path / "run", epochs=1, data=kohya)
    out = tmp_path / "out"
    assert main(["eval", str(run), "--out", str(out), "--steps", "2", "--quiet"]) == 2
    assert f"{folder / 'c.png'}: cannot read this image" in capsys.readouterr().err and not out.exists()


def test_a_run_trained_from_a_dataset_toml_is_judged_on_its_images_and_captions(tmp_path, capsys):
    """A kohya dataset TOML as the run's data: eval found no folder, so it had no images to compare with and no
    captions to make prompts from, and asked for --data."""
    from PIL import Image

    from lorakit.evaluate.checkpoints import dataset_images

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 90, 200)).save(images / f"{i}.png")
    (images / "0.caption").write_text("zkz shape, blue\n")
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\ncaption_extension = ".caption"\n[[datasets]]\nresolution = 64\n'
                    f'[[datasets.subsets]]\nimage_dir = "{images}"\nclass_tokens = "zkz shape"\n')
    assert [(p.name, c) for p, c in dataset_images(toml)] == [("0.png", "zkz shape, blue"), ("1.png", "zkz shape"),
                                                              ("2.png", "zkz shape")]
    run = write_run(tmp_path / "run", epochs=1, data=toml)
    out = tmp_path / "out"
    assert main(["eval", str(run), "--out", str(out), "--steps", "2", "--no-base", "--quiet", "--trigger", "zkz"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["setup"]["prompts"] == "captions" and metrics["setup"]["data images"] == 3
    assert metrics["setup"]["data"] == str(toml)
    capsys.readouterr()


def test_a_runs_images_are_captioned_with_its_own_caption_settings(tmp_path):
    """A run that read `.caption` files (kohya's caption_extension): eval read `.txt` beside the images, found none,
    and captioned them with the folder's words only."""
    from PIL import Image

    from lorakit.config import load_config, to_toml
    from lorakit.evaluate.checkpoints import discover, run_dataset_images

    folder = tmp_path / "data" / "3_zkz shape"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (90 * i, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(f"zkz shape, tag{i}\n")
    run = write_run(tmp_path / "run", epochs=1, data=tmp_path / "data")
    cfg = load_config(run / "config.toml")
    cfg.data.caption_extension = ".caption"
    (run / "config.toml").write_text(to_toml(cfg))
    _, runs = discover([run])
    assert [(p.name, c) for p, c in run_dataset_images(runs[0])] == [("0.png", "zkz shape, tag0"),
                                                                     ("1.png", "zkz shape, tag1")]
    cfg.data.train_data = str(tmp_path / "gone")  # data no longer there: None, and eval falls back to --data
    (run / "config.toml").write_text(to_toml(cfg))
    assert run_dataset_images(discover([run])[1][0]) is None


def test_eval_with_clip_dinov2_and_vgg_models_from_local_folders(tmp_path, concept_data, clip_folder,  # noqa: F811
                                                                 dino_folder, capsys):  # noqa: F811
    """The generic path with real transformers models: tiny random CLIP and DINOv2 saved with save_pretrained and
    a small VGG19-shaped weights file, the same code path a user's local models take."""
    vgg = tmp_path / "vgg19.safetensors"
    save_file(_vgg_state({0: 4, 5: 4, 10: 4, 19: 4, 28: 4}), str(vgg))
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    out = tmp_path / "out"
    assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--quiet",
                 "--extractor", f"clip={clip_folder}", "--extractor", f"dinov2={dino_folder}",
                 "--extractor", f"vgg19={vgg}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"fidelity[clip]", "clip_score[clip]", "fidelity[dinov2]", "centroid_dist[dinov2]"} <= set(
        metrics["alter"]["run/e1"])
    assert "style_loss[vgg19]" in metrics["agnostic"]["run/e1"]
    assert metrics["agnostic"]["base"]["style_loss[vgg19]"] == 0.0  # the base model against itself
    assert not any(k.startswith("world.") for k in metrics["alter"]["run/e1"])  # no world reader chosen
    capsys.readouterr()


def test_a_run_is_judged_on_the_base_model_it_was_trained_on(tmp_path, concept_data, capsys):
    """Without --model, eval uses the base model named in the runs' config.toml (it used the built-in model,
    so a LoRA for the user's SD model was judged on the wrong model or refused as not fitting); runs trained on
    different models, or on one that is gone, are refused before anything is made."""
    from lorakit.config import load_config, to_toml
    from lorakit.models import builtin_model_path

    def trained_on(run, base):
        cfg = load_config(run / "config.toml")
        cfg.model.base = str(base)
        (run / "config.toml").write_text(to_toml(cfg))
        return run

    run = trained_on(write_run(tmp_path / "run", epochs=1, data=concept_data), builtin_model_path())
    out = tmp_path / "out"
    assert main(["eval", str(run), "--out", str(out), "--steps", "4", "--no-base", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert f"base model {builtin_model_path()}, the one the runs were trained on" in said
    assert json.loads((out / "metrics.json").read_text())["setup"]["extractors"] == "world-reader"

    other = trained_on(write_run(tmp_path / "other", epochs=1, data=concept_data), tmp_path / "gone-model")
    assert main(["eval", str(other), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert f"trained on {tmp_path / 'gone-model'}, which is not there (moved?)" in capsys.readouterr().err
    assert main(["eval", str(run), str(other), "--out", str(tmp_path / "o3"), "--quiet"]) == 2
    assert "the runs were trained on different base models" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_a_run_trained_on_top_of_base_weights_is_judged_on_that_model(tmp_path, concept_data, capsys):
    """model.base_weights (kohya's --base_weights) were merged into the model the run trained on: eval merges them
    too, keys its images on them (the same cache makes them anew), and refuses runs that disagree on them."""
    from lorakit.config import load_config, to_toml

    style = next((write_run(tmp_path / "style", epochs=1, data=concept_data) / "checkpoints").rglob("*.safetensors"))
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    argv = ["eval", str(run), "--prompts", str(prompts), "--steps", "4", "--no-base", "--quiet",
            "--cache", str(tmp_path / "cache")]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert "base weights" not in capsys.readouterr().out
    cfg = load_config(run / "config.toml")
    cfg.model.base_weights, cfg.model.base_weights_multiplier = [str(style)], [0.5]
    (run / "config.toml").write_text(to_toml(cfg))
    assert main([*argv, "--out", str(tmp_path / "on-style")]) == 0
    said = capsys.readouterr().out
    assert re.search(rf"lorakit eval: base weights, as the runs were trained: {re.escape(str(style))} at 0.5: "
                     r"(\d+) of \1 modules merged", said), said
    assert "(3 generated, " in said and "0 from the cache" in said, said  # other images than the plain model's
    other = write_run(tmp_path / "other", epochs=1, data=concept_data)
    assert main(["eval", str(run), str(other), "--out", str(tmp_path / "both"), "--quiet"]) == 2
    assert "the runs were trained on top of different base weights" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()


def test_eval_keeps_freed_memory_before_the_models_load(tmp_path, concept_data, monkeypatch):
    """Denoising steps free and take back the same buffers: eval asks malloc to keep them, once its arguments are
    checked and before any model loads (tests/test_host_memory.py tests what that does)."""
    import lorakit.evaluate.extractors
    from lorakit import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or False)

    def stop(*args, **kwargs):
        assert calls == [1]
        raise KeyError("stopped where the extractors load")

    monkeypatch.setattr(lorakit.evaluate.extractors, "load_extractor", stop)
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    with pytest.raises(KeyError, match="stopped where the extractors load"):
        main(["eval", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--quiet"])
    assert calls == [1]


def test_a_run_is_judged_with_the_vae_it_was_trained_with(tmp_path, concept_data, capsys):
    """Without --vae, eval decodes with the VAE in the runs' config.toml (kohya's --vae): the images are other
    images than the model's own VAE makes, cached under other keys."""
    import torch

    from lorakit import ldm
    from lorakit.config import load_config, to_toml
    from lorakit.models import load_base_model

    vae = load_base_model(None).vae
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    vae_file = tmp_path / "better-vae.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.vae_to_ldm(vae.state_dict(), vae.config).items()}, str(vae_file))
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)

    def trained_with(path):
        cfg = load_config(run / "config.toml")
        cfg.model.vae = path
        (run / "config.toml").write_text(to_toml(cfg))

    trained_with(str(vae_file))
    cache = tmp_path / "cache"
    argv = ["eval", str(run), "--steps", "2", "--no-base", "--quiet", "--cache", str(cache)]
    assert main([*argv, "--out", str(tmp_path / "with")]) == 0
    said = capsys.readouterr().out
    assert f"VAE {vae_file}, the one the runs were trained with (--vae chooses another)" in said
    images, generated = map(int, re.search(r"= (\d+) images \((\d+) generated", said).groups())
    assert images == generated > 0
    assert json.loads((tmp_path / "with" / "metrics.json").read_text())["runs"][0]["settings"]["vae"] == \
        str(vae_file)
    trained_with(None)
    assert main([*argv, "--out", str(tmp_path / "without")]) == 0
    said = capsys.readouterr().out
    assert "VAE" not in said and f"= {images} images ({images} generated" in said  # nothing reused
    assert len(list(cache.rglob("*.png"))) == 2 * images
    trained_with(str(tmp_path / "gone.safetensors"))
    assert main([*argv, "--out", str(tmp_path / "gone")]) == 2
    assert "trained with " + str(tmp_path / "gone.safetensors") + ", which is not there" in capsys.readouterr().err


def test_textual_inversion_runs_and_embedding_files_are_judged_beside_an_adapter(tmp_path, concept_data, capsys):
    """A TI run's token read as training read it (its vectors, in every checkpoint's prompts but not the base
    model's), beside an adapter run and a loose embedding file in one call; prompts without the token are drawn
    exactly as by the base model, so the embedding never leaks into them."""
    from eval_helpers import base_model
    from test_evaluate_generate import write_embedding_run

    model = base_model()
    square = model.text_encoder.get_input_embeddings().weight[
        model.tokenizer("square", add_special_tokens=False).input_ids].detach().clone()
    ti = write_embedding_run(tmp_path / "ti", square)  # zkz := the model's own "square"
    save_file({"clip_l": square}, str(tmp_path / "mine.safetensors"), metadata={"lorakit_ti_token": "zkz"})
    adapter = write_run(tmp_path / "lora", epochs=1, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML.replace('trigger = "zkz shape"', 'trigger = "zkz"'))
    out = tmp_path / "out"
    assert main(["eval", str(ti), str(adapter), str(tmp_path / "mine.safetensors"), "--prompts", str(prompts),
                 "--out", str(out), "--steps", "4", "--quiet"]) == 0
    assert "4 checkpoints × 3 prompts" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(c["label"], c["kind"]) for c in metrics["checkpoints"]] == [
        ("base", "base"), ("ti/e1", "embedding"), ("lora/e1", "adapter"), ("mine", "embedding")]
    # 12 images, 8 different ones: the base model's 3, the adapter's 3 (it changes every prompt), the embedding's
    # 2 with the token (its agnostic prompt draws the base model's image); the file (the same vectors, its token
    # in its metadata) draws the run's images again
    from PIL import Image

    images = sorted((out / "cache").rglob("*.png"))
    assert len(images) == 12 and len({Image.open(f).tobytes() for f in images}) == 8
    assert metrics["metrics"]["agnostic"]["ti/e1"] == metrics["metrics"]["agnostic"]["base"]
    assert "textual inversion" in (out / "report.html").read_text()
    # the run's page takes the ranking in: its checkpoints are the ones measured (the token is part of their hash);
    # its per-epoch table has no CS column: textual inversion has no adapter weights for it
    (ti / "log.jsonl").write_text("".join(json.dumps({"step": s, "epoch": 1, "loss": 0.1}) + "\n" for s in (1, 2)))
    assert main(["report", str(ti), "--eval", str(out)]) == 0
    said, page = capsys.readouterr().out, (ti / "report.html").read_text()
    assert "changed since" not in said and "ranking" in page
    assert "training: per epoch" in page and "CS at epoch end" not in page


def test_an_embedding_given_to_eval_is_read_by_every_checkpoint_and_the_base_model(tmp_path, concept_data, capsys):
    """--embedding FILE (a negative embedding the prompts name, say) joins every checkpoint, the base model too:
    here "circle" holds the model's own "square", so the circle prompt draws exactly what the square prompt draws,
    for the base model and the adapter alike; the images are cached under keys of their own, the setup names it."""
    from eval_helpers import base_model
    from PIL import Image

    model = base_model()
    square = model.text_encoder.get_input_embeddings().weight[
        model.tokenizer("square", add_special_tokens=False).input_ids].detach().clone()
    save_file({"emb_params": square}, str(tmp_path / "circle.safetensors"))
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML + '\n[[prompts]]\ntype = "agnostic"\ntext = "a large green square at the top, '
                       'black background"\nseed = 3\n')  # the circle prompt's seed
    argv = ["eval", str(run), "--prompts", str(prompts), "--steps", "4", "--quiet", "--cache", str(tmp_path / "c")]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert main([*argv, "--out", str(tmp_path / "with"), "--embedding", str(tmp_path / "circle.safetensors")]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "images (" in line]
    assert len(said) == 2 and "8 images (8 generated" in said[1]  # none from the first call's cache
    setup = json.loads((tmp_path / "with" / "metrics.json").read_text())["setup"]
    assert setup["embeddings"] == f"{tmp_path / 'circle.safetensors'} (circle)"
    # 2 checkpoints × 4 prompts per call, 16 files; without the embedding 8 different images, and with it the
    # same 8 again: the prompts without "circle" are untouched, and the circle prompt draws the square's image
    pngs = sorted((tmp_path / "c").rglob("*.png"))
    assert len(pngs) == 16 and len({Image.open(f).tobytes() for f in pngs}) == 8
    # one word cannot stand for two embeddings: an --embedding called as a compared embedding's token is refused
    from test_evaluate_generate import write_embedding_run

    ti = write_embedding_run(tmp_path / "ti", square)
    save_file({"emb_params": square}, str(tmp_path / "zkz.safetensors"))
    assert main(["eval", str(ti), "--prompts", str(prompts), "--out", str(tmp_path / "clash"), "--embedding",
                 str(tmp_path / "zkz.safetensors")]) == 2
    assert "it is called 'zkz', as ti/e1's embedding is" in capsys.readouterr().err
    assert not (tmp_path / "clash").exists()


def test_a_textual_inversion_run_on_a_plain_folder_gets_default_prompts_around_its_token(tmp_path, capsys):
    """A TI run that names its token only in method.ti_token (a plain folder whose captions hold it): without
    --prompts, the default prompts are built around that token, as its captions use it."""
    import torch
    from eval_helpers import base_model
    from PIL import Image
    from test_evaluate_generate import write_embedding_run

    from lorakit.config import load_config, to_toml

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), (200 * (i == 0), 0, 200 * (i == 1))).save(photos / f"{i}.png")
        (photos / f"{i}.txt").write_text(f"a {color} zkz on a white background")
    width = base_model().text_encoder.get_input_embeddings().weight.shape[1]
    run = write_embedding_run(tmp_path / "ti", torch.ones(1, width))
    cfg = load_config(run / "config.toml")
    cfg.data.train_data = str(photos)
    (run / "config.toml").write_text(to_toml(cfg))
    out = tmp_path / "out"
    assert main(["eval", str(run), "--out", str(out), "--steps", "2", "--no-base", "--quiet"]) == 0
    setup = json.loads((out / "metrics.json").read_text())["setup"]
    assert (setup["prompts"], setup["trigger"]) == ("captions", "zkz")
    assert "a blue zkz on a white background" in (out / "report.html").read_text()


def test_a_whole_fine_tuned_model_is_judged_beside_the_adapter_it_holds(tmp_path, concept_data, capsys):
    """A fine-tuned model as one file (kohya's DreamBooth output; here the built-in model with a LoRA baked in):
    judged as a checkpoint of its own, it draws what the LoRA draws applied to the base; the base model is left
    as it was."""
    import copy

    import torch
    from eval_helpers import base_model

    from lorakit.models import save_single_file_checkpoint
    from lorakit.tools.merge import bake

    lora = tmp_path / "lora.safetensors"
    save_file(lora_tensors(0.3, seed=4), str(lora))
    tuned = copy.deepcopy(base_model())
    bake(tuned, [str(lora)])
    model_file = save_single_file_checkpoint(tuned, tmp_path / "tuned.safetensors")
    before = {k: v.clone() for k, v in base_model().unet.state_dict().items()}
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    out = tmp_path / "out"
    assert main(["eval", str(model_file), str(lora), "--prompts", str(prompts), "--out", str(out), "--steps", "4",
                 "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(c["label"], c["kind"]) for c in metrics["checkpoints"]] == [
        ("base", "base"), ("tuned", "model"), ("lora", "adapter")]
    assert "fine-tuned model" in (out / "report.html").read_text()
    assert all(torch.equal(v, before[k]) for k, v in base_model().unet.state_dict().items())
    # applied as eval applies it, the model's U-Net is the base's with the LoRA; put back exactly after
    from test_tools import unet_out

    from lorakit.evaluate.checkpoints import EvalCheckpoint
    from lorakit.evaluate.generate import applied
    from lorakit.formats import load_network

    model = base_model()
    with_lora = copy.deepcopy(model)
    load_network(lora, with_lora.unet, with_lora.text_encoder)
    with applied(model, EvalCheckpoint("tuned", "model", model_file, "h")):
        torch.testing.assert_close(unet_out(model), unet_out(with_lora), atol=1e-4, rtol=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())


def test_a_whole_model_of_another_kind_is_refused_naming_it_and_where_a_base_goes(tmp_path, concept_data, capsys,
                                                                                  tiny_sdxl_dir):
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    out = tmp_path / "out"
    assert main(["eval", str(tiny_sdxl_dir), "--prompts", str(prompts), "--out", str(out), "--steps", "4",
                 "--quiet"]) == 2  # an SDXL model beside the built-in SD1-kind base
    err = capsys.readouterr().err.splitlines()[-1]
    assert str(tiny_sdxl_dir) in err and "not the same architecture" in err and "give it as --model" in err
    assert not (out / "metrics.json").exists()


def test_an_out_folder_another_command_is_writing_is_refused_and_left_as_it_was(tmp_path, concept_data, capsys):
    """Two evals writing one --out at once would leave one's metrics beside the other's page: the second is
    refused while the first holds the folder (a lock the kernel drops when its process ends, also on kill -9)."""
    from lorakit.checkpoints import FolderLock

    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["eval", str(run), "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--quiet"]
    held = FolderLock(out)  # as another process's eval holds it (flock: per open file, so this process too)
    try:
        assert main(argv) == 2
        assert "is in use by another lorakit command" in capsys.readouterr().err
        assert list(out.iterdir()) == []
    finally:
        held.release()
    assert main(argv) == 0 and (out / "metrics.json").is_file()


def test_an_out_folder_made_for_a_call_interrupted_before_its_first_image_is_not_left_behind(
        tmp_path, concept_data, capsys, monkeypatch):
    import lorakit.evaluate.generate as generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C before the first image is stored

    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS_TOML)
    monkeypatch.setattr(generate, "generate_all", interrupted)
    fresh = tmp_path / "fresh"
    assert main(["eval", str(run), "--prompts", str(prompts), "--out", str(fresh), "--steps", "2", "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err and not fresh.exists()


def test_a_data_folder_or_a_folder_of_a_run_given_as_a_run_says_what_to_give(tmp_path, concept_data, capsys):
    run = write_run(tmp_path / "run", epochs=1, data=concept_data)
    out = tmp_path / "out"
    assert main(["eval", str(run / "checkpoints"), "--out", str(out), "--quiet"]) == 2
    assert f"inside the run {run}: lorakit eval {run} ..." in capsys.readouterr().err
    assert main(["eval", str(concept_data), "--out", str(out), "--quiet"]) == 2
    assert f"holds training images (kohya layout): give the run trained on them, or adapter files with --data " \
           f"{concept_data}" in capsys.readouterr().err
    assert not out.exists()
