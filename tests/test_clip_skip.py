"""Clip skip as kohya and A1111 count it: training conditions the U-Net on the layer sampling reads, the files
say which, and `sample`/`eval` use what an adapter was trained with unless told otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import make_config, run_train, write_dataset

from lorakit.cli import main
from lorakit.config import ConfigError
from lorakit.formats import read_adapter
from lorakit.models import encode_prompt_ids, load_base_model


def pixels(folder):
    """The first image `lorakit sample` wrote into ``folder``."""
    return np.asarray(Image.open(next(folder.glob("000-*.png"))))


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "data")


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_n_is_the_text_encoder_without_its_last_n_minus_1_layers(tiny_model_dir, clip_skip):
    """What "clip skip" means (kohya, A1111): the text encoder as if its last N - 1 layers were not there, its
    final layer norm still applied; 1 is the encoder as it is."""
    import copy

    model = load_base_model(tiny_model_dir)
    ids = model.tokenizer(["a zkz star on grass"], padding="max_length", truncation=True,
                          max_length=model.tokenizer.model_max_length, return_tensors="pt").input_ids
    shorter = copy.deepcopy(model.text_encoder)
    layers = getattr(shorter, "text_model", shorter).encoder.layers
    del layers[len(layers) - (clip_skip - 1):]
    with torch.no_grad():
        ours = encode_prompt_ids(model.text_encoder, ids, clip_skip)
        expected = shorter(ids)[0]
        last = model.text_encoder(ids)[0]
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours, last) == (clip_skip == 1)


def test_a_run_with_clip_skip_2_trains_on_it_and_says_so_in_its_files(tiny_model_dir, dataset, tmp_path):
    runs, said = {}, {}
    for skip in (1, 2):
        runs[skip] = tmp_path / f"skip{skip}"
        said[skip] = run_train(make_config(tiny_model_dir, dataset, runs[skip], training={"max_epochs": 1},
                                           model={"clip_skip": skip})).summary
    # where people sample, the run says how to sample it (an adapter sampled without its clip skip looks off)
    assert "trained with clip skip 2: sample with it too (A1111: Settings > Clip skip 2; ComfyUI: a CLIP Set Last " \
        "Layer node at -2; diffusers: clip_skip=1;" in said[2]
    assert "clip skip" not in said[1]
    one, two = (read_adapter(runs[s] / "lorakit.safetensors") for s in (1, 2))
    assert one.metadata["ss_clip_skip"] == "None" and two.metadata["ss_clip_skip"] == "2"  # kohya's spelling
    assert any(not torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)  # the same seed, other text
    assert 'clip_skip = 2' in (runs[2] / "config.toml").read_text()


def test_a_clip_skip_the_text_encoder_has_no_layer_for_is_refused_before_anything_is_written(tiny_model_dir,
                                                                                             dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"model.clip_skip: clip skip 5: the text encoder of .* has 4 layers"):
        run_train(make_config(tiny_model_dir, dataset, tmp_path / "run", model={"clip_skip": 5}))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="model.clip_skip must be a positive integer"):
        make_config(tiny_model_dir, dataset, tmp_path / "run", model={"clip_skip": 0}).validate()


def test_sample_uses_the_clip_skip_the_adapter_was_trained_with(tiny_model_dir, dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run_train(make_config(tiny_model_dir, dataset, run, training={"max_epochs": 1}, model={"clip_skip": 2}))
    adapter = str(run / "lorakit.safetensors")
    flags = ["--model", str(tiny_model_dir), "--prompt", "a zkz star --d 1", "--steps", "2"]
    assert main(["sample", adapter, *flags, "--out", str(tmp_path / "trained")]) == 0
    assert "clip skip 2, as the adapters were trained (--clip-skip to change)" in capsys.readouterr().out
    for skip in ("2", "1"):
        assert main(["sample", adapter, *flags, "--clip-skip", skip, "--out", str(tmp_path / skip)]) == 0

    assert np.array_equal(pixels(tmp_path / "trained"), pixels(tmp_path / "2"))
    assert not np.array_equal(pixels(tmp_path / "trained"), pixels(tmp_path / "1"))
    # two adapters trained differently: the user chooses
    other = tmp_path / "other"
    run_train(make_config(tiny_model_dir, dataset, other, training={"max_epochs": 1}))
    capsys.readouterr()
    assert main(["sample", adapter, str(other / "lorakit.safetensors"), *flags, "--out", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err
    assert "trained with different clip skips" in err and "choose one with --clip-skip N" in err


def test_eval_image_keys_change_only_for_another_clip_skip_or_token_length():
    """Images an earlier eval cached (before clip skip and max token length existed) keep their keys; another
    clip skip or token length gets new ones."""
    import hashlib
    from dataclasses import asdict

    from lorakit.evaluate.generate import ImageCache, ImageJob, SamplerSettings
    from lorakit.evaluate.prompts import EvalPrompt

    job = ImageJob(0, EvalPrompt("a zkz star", "trigger"), repeat=0, seed=3)
    before = {k: v for k, v in asdict(SamplerSettings()).items() if k not in ("clip_skip", "max_token_length")}
    old_key = hashlib.sha256(json.dumps({"base": "b", "checkpoint": "c", "prompt": "a zkz star", "negative": "",
                                         "seed": 3, **before}, sort_keys=True).encode()).hexdigest()[:32]
    assert ImageCache.key("b", "c", job, SamplerSettings()) == old_key
    assert ImageCache.key("b", "c", job, SamplerSettings(clip_skip=2)) != old_key
    assert ImageCache.key("b", "c", job, SamplerSettings(max_token_length=150)) != old_key


def test_eval_judges_checkpoints_with_the_clip_skip_they_were_trained_with(tmp_path, capsys):
    from eval_helpers import write_run
    from safetensors.torch import load_file, save_file
    from test_cli_eval import PROMPTS_TOML

    run = write_run(tmp_path / "run", epochs=1)
    for file in run.glob("checkpoints/*/trained.safetensors"):
        save_file(load_file(str(file)), str(file), metadata={"ss_epoch": "1", "ss_clip_skip": "2"})
    (tmp_path / "prompts.toml").write_text(PROMPTS_TOML)
    flags = ["--prompts", str(tmp_path / "prompts.toml"), "--steps", "2", "--no-base", "--quiet"]
    assert main(["eval", str(run), "--out", str(tmp_path / "trained"), *flags]) == 0
    assert "lorakit eval: clip skip 2, as the adapters were trained" in capsys.readouterr().out
    assert main(["eval", str(run), "--out", str(tmp_path / "last"), "--clip-skip", "1", *flags]) == 0
    setups = [json.loads((tmp_path / name / "metrics.json").read_text())["setup"] for name in ("trained", "last")]
    assert [s["clip skip"] for s in setups] == [2, 1]
    assert setups[0]["generated"] == setups[1]["generated"] > 0  # other keys: nothing taken from the other's cache


# ---- kohya's max_token_length: prompts read in chunks of 75 tokens ----------------------------------------------

LONG = ", ".join(f"red star number {i} on green grass" for i in range(20))  # far more than 75 tokens


@pytest.mark.parametrize("length", [150, 225])
def test_long_prompts_are_read_in_chunks_of_75_and_joined_as_kohya_joins_them(tiny_model_dir, length):
    from lorakit.models import prompt_token_counts, tokenize_prompts

    model = load_base_model(tiny_model_dir)
    tok = model.tokenizer
    assert prompt_token_counts(tok, [LONG])[0] > 225
    ids = tokenize_prompts(tok, [LONG, "a zkz star"], length)
    chunks = length // 75
    assert ids.shape == (2, chunks, 77)
    assert (ids[:, :, 0] == tok.bos_token_id).all() and (ids[:, :, -1] == tok.eos_token_id).all()
    plain = tok([LONG], add_special_tokens=False).input_ids[0]
    assert ids[0, :, 1:-1].reshape(-1).tolist() == plain[:75 * chunks]  # the prompt's tokens, in order
    with torch.no_grad():
        joined = encode_prompt_ids(model.text_encoder, ids, clip_skip=2)
        each = [encode_prompt_ids(model.text_encoder, ids[:, k], clip_skip=2) for k in range(chunks)]
        short = encode_prompt_ids(model.text_encoder, tokenize_prompts(tok, ["a zkz star"]), clip_skip=2)
    assert joined.shape == (2, 2 + 75 * chunks, model.text_encoder.config.hidden_size)
    expected = torch.cat([each[0][:, :1], *[e[:, 1:-1] for e in each], each[-1][:, -1:]], dim=1)
    torch.testing.assert_close(joined, expected, rtol=0, atol=0)
    # a short prompt's first 76 states are those of the plain 77-token reading
    torch.testing.assert_close(joined[1:, :76], short[:, :76], rtol=1e-6, atol=1e-6)


def test_a_run_says_which_captions_are_cut_and_reads_them_whole_with_a_longer_limit(tiny_model_dir, dataset,
                                                                                    tmp_path, capsys):
    long_caption = next(dataset.rglob("*.txt"))
    long_caption.write_text(LONG)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red star --s 2\n{LONG} --s 2\n")
    assert main(["train", "--data", str(dataset), "--model", str(tiny_model_dir), "--out", str(tmp_path / "cut"),
                 "--max-steps", "1", "--no-progress", "--sample-prompts", str(prompts)]) == 0
    said = capsys.readouterr().out
    assert "note: 1 of" in said and "captions are longer than the 75 tokens the text encoder reads" in said
    assert "model.max_token_length = 150 reads more" in said
    assert "note: 1 of 2 sample prompts are longer than the 75 tokens the text encoder reads and are cut there " \
           "(the longest, " in said  # the samples drawn during training are cut as the captions are
    out = tmp_path / "whole"
    assert main(["train", "--data", str(dataset), "--model", str(tiny_model_dir), "--out", str(out),
                 "--max-steps", "1", "--no-progress", "--set", "model.max_token_length=225"]) == 0
    said = capsys.readouterr().out
    assert "captions are longer than the 225 tokens" in said and "reads more" not in said
    assert read_adapter(out / "lorakit.safetensors").metadata["ss_max_token_length"] == "225"
    # sampling reads prompts as the adapter was trained to
    flags = ["--model", str(tiny_model_dir), "--prompt", f"{LONG} --d 1", "--steps", "2"]
    assert main(["sample", str(out / "lorakit.safetensors"), *flags, "--out", str(tmp_path / "s225")]) == 0
    said = capsys.readouterr().out
    assert "max token length 225, as the adapters were trained (--max-token-length to change)" in said
    assert "1 of 1 prompts are longer than the 225 tokens" in said and "reads more" not in said  # LONG: 309
    assert main(["sample", str(out / "lorakit.safetensors"), *flags, "--max-token-length", "75",
                 "--out", str(tmp_path / "s75")]) == 0
    said = capsys.readouterr().out
    assert "note: 1 of 1 prompts are longer than the 75 tokens" in said
    assert "; --max-token-length 150 reads more" in said

    assert not np.array_equal(pixels(tmp_path / "s225"), pixels(tmp_path / "s75"))


def test_a_wildcard_caption_is_measured_by_its_longest_line(tiny_model_dir, tmp_path):
    """With enable_wildcard each step reads one line, so the note counts a line, not the lines joined."""
    from data_helpers import data, make_folder

    from lorakit.models import prompt_token_counts
    from lorakit.train import long_captions_note

    model = load_base_model(tiny_model_dir)
    short = "zkz, a red circle, " * 3
    make_folder(tmp_path / "1_zkz shape", 1, captions={0: f"{short}\n{short}"})
    assert long_captions_note(model, data(tmp_path / "1_zkz shape", enable_wildcard=True, trigger="zkz"), 75) is None
    make_folder(tmp_path / "1_zkz shape", 1, captions={0: f"{short}\n{LONG}"})
    d = data(tmp_path / "1_zkz shape", enable_wildcard=True, trigger="zkz")
    note = long_captions_note(model, d, 75)
    first, second = d.records[0].caption.split("\n")
    longest, joined = prompt_token_counts(model.tokenizer, [second, d.records[0].caption])
    assert joined > longest
    assert f"{longest} tokens" in note and "1 of 1 captions" in note


def test_weighted_captions_are_measured_by_their_words(tiny_model_dir, tmp_path):
    """With weighted_captions the brackets and weights are no tokens: a caption whose words fit is not long."""
    from data_helpers import data, make_folder

    from lorakit.train import long_captions_note

    model = load_base_model(tiny_model_dir)
    caption = ", ".join(["(red circle:1.1)"] * 12)  # 35 tokens of words, over 100 with the brackets
    make_folder(tmp_path / "1_zkz shape", 1, captions={0: caption})
    assert "captions are longer" in long_captions_note(model, data(tmp_path / "1_zkz shape", trigger="zkz"), 75)
    weighted = data(tmp_path / "1_zkz shape", trigger="zkz", weighted_captions=True)
    assert long_captions_note(model, weighted, 75) is None
