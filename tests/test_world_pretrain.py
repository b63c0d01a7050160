"""The pretraining script of the built-in model: recipe options, continuation runs, exact resume."""

from __future__ import annotations

import pytest
import torch

from lorakit.world.model import build_components
from lorakit.world.pretrain import (
    DiffusionRecipe,
    _reuse_earlier_run,
    _reuse_model_folder,
    atomic_torch_save,
    capped_v_weights,
    caption_background_labels,
    caption_position_labels,
    load_checkpoint,
    train_diffusion,
)
from lorakit.world.render import BACKGROUNDS, POSITIONS

NONE = len(POSITIONS)


def test_caption_position_labels_name_the_cell_or_none():
    names = list(POSITIONS)
    captions = ["a small red circle at the top left, white background",  # natural caption
                "red circle, small, bottom, dotted background",  # tags
                "a picture of a large blue square in the center on a gray background",
                "a cross on the right",
                "a small red circle, white background",  # position left out
                ""]  # the unconditional caption
    expected = [names.index("top left"), names.index("bottom"), names.index("center"), names.index("right"),
                NONE, NONE]
    assert caption_position_labels(captions).tolist() == expected


def test_caption_background_labels_name_the_background_or_none():
    captions = ["a small red circle at the top left, white background",  # natural caption
                "a picture of a large blue square in the center on a dotted background",  # other template
                "red circle, small, bottom, black background",  # tags
                "a small red circle at the top left",  # background left out
                ""]
    expected = [BACKGROUNDS.index("white"), BACKGROUNDS.index("dotted"), BACKGROUNDS.index("black"),
                len(BACKGROUNDS), len(BACKGROUNDS)]
    assert caption_background_labels(captions).tolist() == expected


def fake_latents(count: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"mean": torch.randn(count, 4, 16, 16, generator=g).half(),
            "std": (0.1 * torch.rand(count, 4, 16, 16, generator=g)).half(),
            "object": torch.arange(count), "background": torch.arange(count) % 5}


def run(folder, steps: int, recipe: DiffusionRecipe, prediction_type: str = "v_prediction") -> dict:
    c = build_components(0, prediction_type)
    train_diffusion(c, fake_latents(), 1.0, folder, steps, 4, recipe, seed=3, log=lambda record: None)
    return load_checkpoint(folder / "unet_checkpoint.pt")


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_continuation_with_the_probes_resumes_exactly(tmp_path, prediction_type):
    start = build_components(1)  # "an earlier run": other weights than build_components(0)
    init = [p.detach().clone() for p in list(start["unet"].parameters()) + list(start["text_encoder"].parameters())]
    recipe = DiffusionRecipe(lr=1e-3, warmup_steps=1, init_ema=init, high_noise_fraction=0.5,
                             position_loss_weight=1.0, background_loss_weight=1.0)
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    straight = run(tmp_path / "straight", 3, recipe, prediction_type)
    run(tmp_path / "resumed", 2, recipe, prediction_type)
    resumed = run(tmp_path / "resumed", 3, recipe, prediction_type)  # picks up the step-2 checkpoint
    assert straight["step"] == resumed["step"] == 3
    assert "position_probe" in straight and "background_probe" in straight
    for a, b in zip(straight["ema"], resumed["ema"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # it started from the given weights (EMA 0.999 barely moves in 3 steps) and did train
    moved = [float((e - i).abs().max()) for e, i in zip(straight["ema"], init, strict=True)]
    assert 0 < max(moved) < 0.01


def test_continuation_reuses_the_earlier_runs_vae_and_latents(tmp_path):
    earlier, new = tmp_path / "earlier", tmp_path / "new"
    earlier.mkdir()
    new.mkdir()
    atomic_torch_save({"ema": [torch.ones(2)], "step": 8}, earlier / "ema_000008.pt")
    with pytest.raises(SystemExit, match="vae_checkpoint.pt is missing"):
        _reuse_earlier_run(earlier / "ema_000008.pt", new)
    atomic_torch_save({"model": {}, "step": 1}, earlier / "vae_checkpoint.pt")
    atomic_torch_save(fake_latents(), earlier / "latents.pt")
    ema = _reuse_earlier_run(earlier / "ema_000008.pt", new)
    assert torch.equal(ema[0], torch.ones(2))
    assert (new / "vae_checkpoint.pt").is_file() and (new / "latents.pt").is_file()
    with pytest.raises(SystemExit, match="no such snapshot"):
        _reuse_earlier_run(earlier / "ema_999999.pt", new)


def test_continuation_from_a_model_folder_starts_from_its_weights_and_keeps_its_vae(tmp_path):
    from lorakit.models import builtin_model_path
    from lorakit.world.pretrain import train_vae

    out = tmp_path / "run"
    out.mkdir()
    ema = _reuse_model_folder(builtin_model_path(), out, build_components(0), vae_steps=3000)
    shipped = build_components(0)
    fresh = [p.detach() for p in list(shipped["unet"].parameters()) + list(shipped["text_encoder"].parameters())]
    assert len(ema) == len(fresh) and any(not torch.equal(a, b) for a, b in zip(ema, fresh, strict=True))
    from diffusers import AutoencoderKL

    vae_state = load_checkpoint(out / "vae_checkpoint.pt")
    assert vae_state["step"] == 3000
    reference = AutoencoderKL.from_pretrained(builtin_model_path() / "vae").state_dict()
    for name, tensor in reference.items():
        assert torch.equal(vae_state["model"][name], tensor), name
    # the VAE stage counts as finished: train_vae loads it and trains nothing
    vae = build_components(0)["vae"]
    train_vae(vae, out, 3000, 2, 1e-3, 0, log=lambda record: None)
    assert torch.equal(vae.state_dict()["encoder.conv_in.weight"], reference["encoder.conv_in.weight"])


def test_continuation_from_a_folder_that_is_not_a_model_says_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(SystemExit, match="no text_encoder, vae/"):
        _reuse_model_folder(tmp_path, tmp_path, build_components(0), vae_steps=1)


def test_capped_v_weights_weigh_the_clean_image_by_min_snr_plus_one():
    alphas_cumprod = torch.tensor([0.999, 0.5, 0.0])  # SNR 999, 1, 0 (zero terminal SNR)
    w = capped_v_weights(torch.tensor([0, 1, 2]), alphas_cumprod, cap=5.0)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # the v loss weighs the clean image by SNR + 1; times w that becomes min(SNR, 5) + 1
    torch.testing.assert_close(w * (snr + 1), torch.tensor([6.0, 2.0, 1.0]))
