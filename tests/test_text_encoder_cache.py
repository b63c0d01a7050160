"""data.cache_text_encoder_outputs (kohya's --cache_text_encoder_outputs): each caption encoded once, alone, for runs
whose text encoders stay frozen; refused where the encoders train or the captions change every step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import Interrupt, die_after_saving, make_config, run_train, write_dataset

from lorakit.checkpoints import RunFolder
from lorakit.conditioning import Conditioning, ConditioningCache
from lorakit.config import ConfigError
from lorakit.data.errors import DatasetError


def test_the_cache_encodes_each_caption_once_alone_and_stacks_rows_in_the_batch_order():
    asked: list[str] = []

    def encode_one(text: str) -> Conditioning:
        asked.append(text)
        value = float(len(text))
        return Conditioning(torch.full((1, 3, 2), value), torch.full((1, 4), -value))

    cache = ConditioningCache()
    first = cache.conditioning(["ab", "abc", "ab"], encode_one)
    second = cache.conditioning(["abc", "", "ab"], encode_one)
    assert asked == ["ab", "abc", ""] and len(cache) == 3
    assert first.states[:, 0, 0].tolist() == [2.0, 3.0, 2.0] and first.pooled[:, 0].tolist() == [-2.0, -3.0, -2.0]
    assert second.states.shape == (3, 3, 2) and second.states[:, 0, 0].tolist() == [3.0, 0.0, 2.0]


def test_a_cached_run_encodes_each_caption_once_and_trains_as_an_uncached_one(tiny_model_dir, tmp_path,
                                                                            monkeypatch, capsys):
    import lorakit.step_loss as step_loss

    data = write_dataset(tmp_path / "data", n=4, repeats=2)
    captions = sorted({p.read_text() for p in data.rglob("*.txt")})
    plain = run_train(make_config(tiny_model_dir, data, tmp_path / "plain"))
    encoded: list[list[str]] = []
    real = step_loss.encode_conditioning

    def spy(model, texts, **kwargs):  # the real encoding, recorded
        encoded.append(list(texts))
        return real(model, texts, **kwargs)

    monkeypatch.setattr(step_loss, "encode_conditioning", spy)
    capsys.readouterr()
    cached = run_train(make_config(tiny_model_dir, data, tmp_path / "cached",
                                   data={"cache_text_encoder_outputs": True}))
    assert "text-encoder outputs cached: each caption is encoded once" in capsys.readouterr().out
    assert sorted(t for texts in encoded for t in texts) == captions  # once each, ...
    assert all(len(texts) == 1 for texts in encoded)  # ... alone
    assert len(cached.losses) == len(plain.losses) == 8
    # the same training, up to the last bits of a caption encoded alone instead of beside another
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-7)


def test_a_resumed_cached_run_trains_exactly_as_a_straight_one(tiny_model_dir, tmp_path, monkeypatch):
    """The resumed run's cache starts empty, and each caption is first encoded in another batch than in the straight
    run: encoded alone, its row is the same bits."""
    data = write_dataset(tmp_path / "data", n=5)
    options = {"training": {"max_epochs": 3}, "data": {"cache_text_encoder_outputs": True}}
    straight = run_train(make_config(tiny_model_dir, data, tmp_path / "straight", **options))
    interrupted = tmp_path / "interrupted"
    original = die_after_saving(monkeypatch, 1)
    with pytest.raises(Interrupt):
        run_train(make_config(tiny_model_dir, data, interrupted, **options))
    monkeypatch.setattr(RunFolder, "save_checkpoint", original)
    resumed = run_train(make_config(tiny_model_dir, data, interrupted, output={"if_exists": "resume"}, **options))
    assert resumed.losses == straight.losses
    a, b = (load_file(str(folder / "lorakit.safetensors")) for folder in (tmp_path / "straight", interrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("sections", "named"), [
    ({"method": {"kind": "ti", "ti_token": "zkz"}}, "method.kind = 'ti'"),
    ({"method": {"kind": "pivotal", "ti_token": "zkz"}}, "method.kind = 'pivotal'"),
    ({"method": {"kind": "native", "native_text_encoder": True}}, "method.native_text_encoder = true"),
    ({"network": {"train_text_encoder": True}}, "network.train_text_encoder = true"),
])
def test_a_run_that_trains_a_text_encoder_is_refused_naming_the_setting(tmp_path, sections, named):
    cfg = make_config(Path("unused"), tmp_path, tmp_path / "out", **sections)
    cfg.data.cache_text_encoder_outputs = True
    with pytest.raises(ConfigError, match="data.cache_text_encoder_outputs") as err:
        cfg.validate()
    assert named in str(err.value)


@pytest.mark.parametrize("option", ["shuffle_caption", "caption_tag_dropout_rate"])
def test_captions_drawn_anew_every_step_are_refused_naming_the_folder(tiny_model_dir, tmp_path, option):
    from lorakit.data.dataset import TrainingData

    data = write_dataset(tmp_path / "data")
    cfg = make_config(tiny_model_dir, data, tmp_path / "out", data={option: True if option == "shuffle_caption"
                                                                     else 0.1, "cache_text_encoder_outputs": True})
    with pytest.raises(DatasetError, match=f"{option} cannot be used with cached text-encoder outputs") as err:
        TrainingData(cfg.data, default_resolution=64).check_captions_cacheable()
    assert "1_zkz shape" in str(err.value)
    cfg.data.caption_dropout_rate = 0.5  # dropout to "" adds one caption: allowed
    setattr(cfg.data, option, type(getattr(cfg.data, option))())
    TrainingData(cfg.data, default_resolution=64).check_captions_cacheable()


def test_the_command_refuses_a_shuffled_cache_before_anything_is_written(tiny_model_dir, tmp_path):
    """As a user runs it: one error line naming the option and the folder, exit 2, no run folder; the dry run
    refuses it too."""
    from lorakit.dry_run import dry_run

    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    settings = ["data.shuffle_caption=true", "data.keep_tokens=1", "data.cache_text_encoder_outputs=true"]
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--model", str(tiny_model_dir), "--data",
                           str(data), "--out", str(out), "--no-progress",
                           *(arg for setting in settings for arg in ("--set", setting))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("lorakit train: error:")]
    assert len(errors) == 1 and "shuffle_caption cannot be used with cached text-encoder outputs" in errors[0]
    assert "1_zkz shape" in errors[0] and "Traceback" not in done.stderr and not out.exists()
    cfg = make_config(tiny_model_dir, data, out, data={"shuffle_caption": True, "keep_tokens": 1,
                                                       "cache_text_encoder_outputs": True})
    with pytest.raises(DatasetError, match="shuffle_caption cannot be used with cached text-encoder outputs"):
        dry_run(cfg)
    cfg.data.shuffle_caption = False
    assert "text-encoder outputs cached: each caption is encoded once" in dry_run(cfg)
