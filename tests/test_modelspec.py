"""ModelSpec entries (``modelspec.*``): what model managers, ComfyUI nodes and model sites read from a file."""

from __future__ import annotations

import datetime

import pytest
from test_train import write_dataset

from lorakit.cli import main
from lorakit.formats import read_adapter
from lorakit.modelspec import modelspec_metadata

NOON = datetime.datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=datetime.UTC)


def test_an_adapter_is_described_as_kohya_describes_an_sd1_lora():
    entries = modelspec_metadata("lora", title="my_style", resolution=(512, 512), prediction_type="epsilon",
                                 triggers=["zkz", "", "zkz", "vlx"], now=NOON)
    assert entries == {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "my_style", "modelspec.resolution": "512x512",
        "modelspec.date": "2026-12-06T12:00:00+00:00", "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": "zkz, vlx"}


def test_sd2_adapters_and_embeddings_name_sd2_as_kohya_does():
    """kohya's architectures for SD2.x (512 ε; 768 v), and its ss_base_model_version ("_v" for v-prediction)."""
    from lorakit.metadata import base_model_fields
    from lorakit.modelspec import as_embedding

    base = modelspec_metadata("lora", title="t", resolution=(512, 512), prediction_type="epsilon", family="sd2")
    v = modelspec_metadata("lora", title="t", resolution=(768, 768), prediction_type="v_prediction", family="sd2")
    assert base["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert as_embedding(v, "zkz")["modelspec.architecture"] == "stable-diffusion-v2-768-v/textual-inversion"
    assert base_model_fields("sd2", "epsilon") == {"base_model_version": "sd_v2", "v2": True}
    assert base_model_fields("sd2", "v_prediction")["base_model_version"] == "sd_v2_v"
    assert base_model_fields("sd1", "v_prediction") == {"base_model_version": "sd_v1_v", "v2": False}


def test_optional_entries_appear_only_when_set():
    entries = modelspec_metadata("textual-inversion", title="t", resolution=(768, 512),
                                 prediction_type="v_prediction", clip_skip=2, timesteps=(100, 900),
                                 user={"title": "Mine", "author": "me", "tags": "style, paint", "license": None,
                                       "description": ""}, now=NOON)
    assert entries["modelspec.title"] == "Mine" and entries["modelspec.author"] == "me"
    assert entries["modelspec.tags"] == "style, paint" and "modelspec.license" not in entries
    assert "modelspec.description" not in entries and "modelspec.trigger_phrase" not in entries
    assert entries["modelspec.resolution"] == "768x512" and entries["modelspec.prediction_type"] == "v"
    assert entries["modelspec.encoder_layer"] == "2" and entries["modelspec.timestep_range"] == "100,900"
    with pytest.raises(ValueError, match="unknown ModelSpec entries"):
        modelspec_metadata("lora", title="t", resolution=(8, 8), prediction_type="epsilon", user={"titel": "x"})


def test_a_trained_adapter_carries_the_users_entries(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir),
                 "--out", str(out), "--no-progress", "--epochs", "1", "--name", "star_style", "--early-stop", "off",
                 "--set", "output.metadata_author=Ada", "--set", "output.metadata_license=CreativeML Open RAIL-M",
                 "--set", "training.min_timestep=200", "--clip-skip", "2"]) == 0
    meta = read_adapter(out / "star_style.safetensors").metadata
    assert meta["modelspec.title"] == "star_style" and meta["modelspec.author"] == "Ada"
    assert meta["modelspec.license"] == "CreativeML Open RAIL-M" and meta["modelspec.trigger_phrase"] == "zkz"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.timestep_range"] == "200,1000"
    assert meta["modelspec.encoder_layer"] == "2" and meta["ss_output_name"] == "star_style"
    date = datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert abs((datetime.datetime.now(datetime.UTC) - date).total_seconds()) < 600
    capsys.readouterr()
    assert main(["inspect", str(out / "star_style.safetensors")]) == 0
    assert "  modelspec.title: star_style" in capsys.readouterr().out  # lorakit inspect lists them too
    # how the result describes itself may change when the run is resumed (it changes no training)
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--epochs", "2",
                 "--set", "output.metadata_author=Ada Lovelace"]) == 0
    assert read_adapter(out / "star_style.safetensors").metadata["modelspec.author"] == "Ada Lovelace"
