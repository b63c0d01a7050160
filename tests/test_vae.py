"""Another VAE for the base model (kohya's --vae): every file and folder form people have loads to the same
weights, one that does not fit is refused by name, and train, sample and eval use it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_train import write_dataset

from lorakit import ldm
from lorakit.cli import main
from lorakit.formats import read_adapter
from lorakit.models import ModelLoadError, load_base_model, save_single_file_checkpoint
from lorakit.vae import load_vae


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_base_model(tiny_model_dir)


@pytest.fixture(scope="module")
def other_vae(model):
    """The model's VAE with every weight moved: a "better" VAE of the same kind."""
    vae = copy.deepcopy(model.vae)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    vae.register_to_config(scaling_factor=0.5)  # a VAE's own factor: the base model's is kept
    return vae


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_vae_file_and_folder_form_loads_the_same_weights(model, other_vae, tmp_path):
    original = {k: v.contiguous() for k, v in ldm.vae_to_ldm(other_vae.state_dict(), other_vae.config).items()}
    forms = {"original layout": tmp_path / "vae-ft.safetensors", "bare": tmp_path / "bare.safetensors",
             "diffusers names": tmp_path / "diffusers.safetensors", "diffusers folder": tmp_path / "vae_folder",
             "pipeline folder": tmp_path / "pipeline"}
    save_file(original, str(forms["original layout"]))
    save_file({k.removeprefix(ldm.VAE_PREFIX): v for k, v in original.items()}, str(forms["bare"]))
    save_file({k: v.contiguous() for k, v in other_vae.state_dict().items()}, str(forms["diffusers names"]))
    other_vae.save_pretrained(forms["diffusers folder"])
    other_vae.save_pretrained(forms["pipeline folder"] / "vae")
    whole = copy.copy(model)
    whole.vae = other_vae
    forms["whole checkpoint"] = save_single_file_checkpoint(whole, tmp_path / "whole.safetensors")
    for form, path in forms.items():
        vae = load_vae(path, model.vae)
        assert _same_weights(vae, other_vae), form
        assert vae.config.scaling_factor == model.vae.config.scaling_factor, form  # the U-Net's latent space
        assert not vae.training and not any(p.requires_grad for p in vae.parameters()), form


def test_a_vae_that_does_not_fit_is_refused_by_name(model, tmp_path):
    from diffusers import AutoencoderKL

    wide = AutoencoderKL.from_config({**model.vae.config, "latent_channels": 8})
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ModelLoadError, match=r"wide: this VAE does not fit the base model \(latent_channels 8"):
        load_vae(tmp_path / "wide", model.vae)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelLoadError, match=r"wide\.safetensors: its tensors do not fit"):
        load_vae(tmp_path / "wide.safetensors", model.vae)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ModelLoadError, match=r"adapter\.safetensors: not"):
        load_vae(tmp_path / "adapter.safetensors", model.vae)
    with pytest.raises(ModelLoadError, match="no such VAE"):
        load_vae(tmp_path / "missing.safetensors", model.vae)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty: not a VAE folder"):
        load_vae(tmp_path / "empty", model.vae)


def test_train_and_sample_use_the_vae_and_the_result_names_it(tiny_model_dir, other_vae, tmp_path, capsys):
    vae_file = tmp_path / "better-vae.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.vae_to_ldm(other_vae.state_dict(), other_vae.config).items()},
              str(vae_file))
    data = write_dataset(tmp_path / "data")
    common = ["train", "--data", str(data), "--model", str(tiny_model_dir), "--max-steps", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "own")]) == 0
    assert main([*common, "--out", str(tmp_path / "other"), "--vae", str(vae_file)]) == 0
    own, other = (read_adapter(tmp_path / run / "lorakit.safetensors") for run in ("own", "other"))
    assert own.metadata["ss_vae_name"] == "None" and other.metadata["ss_vae_name"] == "better-vae.safetensors"
    # other latents, another adapter
    assert any(not torch.equal(own.tensors[k], other.tensors[k]) for k in own.tensors)
    import tomllib

    # the run's config keeps it, so a resumed run encodes with the same VAE
    assert tomllib.loads((tmp_path / "other" / "config.toml").read_text())["model"]["vae"] == str(vae_file)
    capsys.readouterr()

    flags = ["sample", "--model", str(tiny_model_dir), "--prompt", "a zkz star --d 1", "--steps", "2"]
    assert main([*flags, "--out", str(tmp_path / "s_own")]) == 0
    assert main([*flags, "--out", str(tmp_path / "s_other"), "--vae", str(vae_file)]) == 0
    assert f"with the VAE {vae_file}" in capsys.readouterr().out
    own_image, other_image = (np.asarray(Image.open(next((tmp_path / f).glob("000-*.png"))), dtype=float)
                              for f in ("s_own", "s_other"))
    assert np.abs(own_image - other_image).mean() > 1.0  # the same latents, decoded by another VAE
