"""The training loss and its noise options: what each option changes, and that an option left off changes nothing
(the same draws, so runs made before it existed resume and reproduce exactly)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lorakit.loss import (
    add_training_noise,
    debiased_weight,
    diffusion_loss,
    huber_c,
    min_snr_weight,
    multires_noise,
    noise_pred_like_weight,
    per_sample_loss,
    v_pred_like_weight,
)

SCHEDULER = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)


def _latents(b=4, seed=0):
    return torch.randn((b, 4, 32, 32), generator=torch.Generator().manual_seed(seed))


def test_without_options_the_noise_timesteps_and_target_are_the_plain_draws():
    latents = _latents()
    got = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(7), "epsilon")
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (4,), generator=g)
    assert torch.equal(got.target, noise) and torch.equal(got.timesteps, timesteps)
    assert torch.equal(got.noisy_latents, SCHEDULER.add_noise(latents, noise, timesteps))


def test_random_and_adaptive_strengths_are_kohyas_formulas_on_the_steps_own_draws():
    latents = _latents() + torch.tensor([0.5, -1.0, 0.0, 2.0]).reshape(1, 4, 1, 1)  # channels of other means
    got = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(7), "epsilon", 0.1,
                             noise_offset_random_strength=True, adaptive_noise_scale=0.05)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    strength = 0.1 * float(torch.rand((), generator=g)) + 0.05 * latents.mean(dim=(2, 3), keepdim=True).abs()
    offset = torch.randn((4, 4, 1, 1), generator=g)
    torch.testing.assert_close(got.target, noise + strength * offset)
    assert strength.shape == (4, 4, 1, 1) and float(strength[:, 3].min()) > float(strength[:, 2].max())

    got = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(7), "epsilon", ip_noise_gamma=0.1,
                             ip_noise_gamma_random_strength=True)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (4,), generator=g)
    gamma = 0.1 * float(torch.rand((), generator=g))
    seen = noise + gamma * torch.randn(latents.shape, generator=g)
    assert torch.equal(got.target, noise) and torch.equal(got.timesteps, timesteps)
    torch.testing.assert_close(got.noisy_latents, SCHEDULER.add_noise(latents, seen, timesteps))


def test_the_strength_options_need_the_strength_they_change():
    from lorakit.config import ConfigError, TrainConfig

    for option, value in (("noise_offset_random_strength", True), ("adaptive_noise_scale", 0.05),
                          ("ip_noise_gamma_random_strength", True)):
        cfg = TrainConfig()
        setattr(cfg.training, option, value)
        with pytest.raises(ConfigError, match=f"training.{option}"):
            cfg.validate()
    cfg = TrainConfig()
    cfg.training.noise_offset, cfg.training.adaptive_noise_scale = 0.05, 0.01
    cfg.validate()


def test_a_timestep_range_draws_only_from_it_and_the_full_range_is_the_plain_draw():
    latents = _latents(b=256)
    got = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(3), "epsilon",
                             timestep_range=(200, 400))
    assert int(got.timesteps.min()) >= 200 and int(got.timesteps.max()) < 400
    assert len(set(got.timesteps.tolist())) > 100  # spread over the range
    plain = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(3), "epsilon")
    full = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(3), "epsilon",
                              timestep_range=(0, 1000))
    assert torch.equal(plain.timesteps, full.timesteps)
    with pytest.raises(ValueError, match="min_timestep / max_timestep"):
        add_training_noise(SCHEDULER, latents, torch.Generator(), "epsilon", timestep_range=(900, 1200))


def test_timestep_options_are_checked_before_the_run():
    from lorakit.config import ConfigError, TrainConfig

    cfg = TrainConfig()
    cfg.training.min_timestep, cfg.training.max_timestep = 500, 500
    with pytest.raises(ConfigError, match=r"training.min_timestep.*below training.max_timestep \(500\)"):
        cfg.validate()
    cfg.training.min_timestep, cfg.training.max_timestep = -1, None
    with pytest.raises(ConfigError, match="training.min_timestep"):
        cfg.validate()
    cfg.training.min_timestep, cfg.training.max_timestep = 100, 800
    cfg.validate()
    from lorakit.loss import check_loss_options

    check_loss_options(cfg.training, "epsilon", 1000)
    cfg.training.max_timestep = 1200  # beyond the schedule: known only once the model is loaded
    with pytest.raises(ValueError, match="training.max_timestep = 1200: this model's schedule has 1000 timesteps"):
        check_loss_options(cfg.training, "epsilon", 1000)


def test_multires_noise_has_unit_variance_and_more_low_frequency_power_than_white_noise():
    white = torch.randn((64, 4, 32, 32), generator=torch.Generator().manual_seed(1))
    pyramid = multires_noise(white, torch.Generator().manual_seed(2), iterations=6, discount=0.3)
    assert float(pyramid.std()) == pytest.approx(1.0, abs=1e-5)
    # the mean of a 32×32 white-noise patch has variance 1/1024; the coarse layers (weights 0.3, 0.09, ...) make
    # it about 5 times larger, and the finest scales weaker: neighbouring pixels correlate
    assert float(pyramid.mean(dim=(2, 3)).var()) > 3 * float(white.mean(dim=(2, 3)).var())
    shifted = (pyramid[..., 1:] * pyramid[..., :-1]).mean()
    assert float(shifted) > 0.03 > 10 * abs(float((white[..., 1:] * white[..., :-1]).mean()))
    again = multires_noise(white, torch.Generator().manual_seed(2), iterations=6, discount=0.3)
    assert torch.equal(pyramid, again)  # drawn from the step's generator: reproducible


def test_input_perturbation_noises_the_input_more_but_keeps_the_target():
    latents = _latents()
    plain = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(3), "epsilon")
    perturbed = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(3), "epsilon",
                                   ip_noise_gamma=0.1)
    assert torch.equal(perturbed.target, plain.target) and torch.equal(perturbed.timesteps, plain.timesteps)
    assert not torch.equal(perturbed.noisy_latents, plain.noisy_latents)
    # what was added is √(1 - ᾱ_t) · γ · N(0, 1): its spread is γ times the noise's
    sigma = (1 - SCHEDULER.alphas_cumprod[plain.timesteps]).sqrt().reshape(-1, 1, 1, 1)
    extra = (perturbed.noisy_latents - plain.noisy_latents) / sigma
    assert float(extra.std()) == pytest.approx(0.1, rel=0.05)


def test_the_loss_weights_follow_their_formulas():
    t = torch.tensor([0, 10, 500, 999])
    abar = SCHEDULER.alphas_cumprod[t]
    snr = abar / (1 - abar)
    torch.testing.assert_close(debiased_weight(SCHEDULER, t, "epsilon"), 1 / snr.clamp(max=1000).sqrt())
    torch.testing.assert_close(debiased_weight(SCHEDULER, t, "v_prediction"), 1 / (snr.clamp(max=1000) + 1))
    torch.testing.assert_close(min_snr_weight(SCHEDULER, t, 5.0, "epsilon"), snr.clamp(max=5.0) / snr)
    capped = snr.clamp(max=1000)
    torch.testing.assert_close(v_pred_like_weight(SCHEDULER, t, 0.2), 1 + 0.2 * (capped + 1) / capped)
    torch.testing.assert_close(noise_pred_like_weight(SCHEDULER, t), capped / (capped + 1))
    assert bool((v_pred_like_weight(SCHEDULER, t, 0.2).diff() > 0).all())  # the noisier, the more
    latents = _latents()
    batch = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(4), "epsilon")
    prediction = batch.target + 0.1 * torch.randn(batch.target.shape, generator=torch.Generator().manual_seed(5))
    per_sample = ((prediction - batch.target) ** 2).mean(dim=(1, 2, 3))
    weights = debiased_weight(SCHEDULER, batch.timesteps, "epsilon")
    got = diffusion_loss(prediction, batch, SCHEDULER, "epsilon", debiased=True)
    torch.testing.assert_close(got, (per_sample * weights).mean())
    torch.testing.assert_close(diffusion_loss(prediction, batch, SCHEDULER, "epsilon"), per_sample.mean())
    got = diffusion_loss(prediction, batch, SCHEDULER, "epsilon", v_pred_like=0.3)
    torch.testing.assert_close(got, (per_sample * v_pred_like_weight(SCHEDULER, batch.timesteps, 0.3)).mean())
    got = diffusion_loss(prediction, batch, SCHEDULER, "v_prediction", scale_v_like_noise=True)
    torch.testing.assert_close(got, (per_sample * noise_pred_like_weight(SCHEDULER, batch.timesteps)).mean())


def test_the_pseudo_huber_loss_is_quadratic_for_small_errors_linear_for_large_and_scheduled_by_noise():
    c = torch.tensor([0.1])
    small, large = torch.full((1, 1, 2, 2), 1e-3), torch.full((1, 1, 2, 2), 10.0)
    zero = torch.zeros_like(small)
    # 2c(√(d² + c²) − c) ≈ d² for d ≪ c, ≈ 2c·|d| for d ≫ c
    assert float(per_sample_loss(small, zero, "huber", c)) == pytest.approx(1e-6, rel=1e-2)
    assert float(per_sample_loss(large, zero, "huber", c)) == pytest.approx(2 * 0.1 * (10.0 - 0.1), rel=1e-3)
    assert float(per_sample_loss(large, zero, "smooth_l1", c)) == pytest.approx(2 * (10.0 - 0.1), rel=1e-3)
    assert float(per_sample_loss(large, zero, "l2")) == pytest.approx(100.0)
    t = torch.tensor([0, 500, 999])
    snr = huber_c(SCHEDULER, t, "snr", 0.1)
    assert float(snr[0]) > 0.9 and float(snr[-1]) == pytest.approx(0.1, abs=0.01)  # c₀ + (1 − c₀)/(1 + σ)²
    assert (snr[:-1] > snr[1:]).all()  # noisier timesteps: a smaller c, so large errors weigh less
    exponential = huber_c(SCHEDULER, t, "exponential", 0.1)
    assert float(exponential[0]) == 1.0 and float(exponential[-1]) == pytest.approx(0.1, rel=0.01)
    assert torch.equal(huber_c(SCHEDULER, t, "constant", 0.1), torch.full((3,), 0.1))
    # kohya's huber_scale multiplies the constant and exponential schedules, not the snr one
    torch.testing.assert_close(huber_c(SCHEDULER, t, "constant", 0.1, 3.0), torch.full((3,), 0.3))
    torch.testing.assert_close(huber_c(SCHEDULER, t, "exponential", 0.1, 3.0), 3.0 * exponential)
    assert torch.equal(huber_c(SCHEDULER, t, "snr", 0.1, 3.0), snr)
    latents = _latents()
    batch = add_training_noise(SCHEDULER, latents, torch.Generator().manual_seed(4), "epsilon")
    prediction = batch.target + torch.randn(batch.target.shape, generator=torch.Generator().manual_seed(5))
    expected = per_sample_loss(prediction, batch.target, "huber", huber_c(SCHEDULER, batch.timesteps, "snr", 0.1))
    got = diffusion_loss(prediction, batch, SCHEDULER, "epsilon", loss_type="huber")
    torch.testing.assert_close(got, expected.mean())
    assert float(got) < float(diffusion_loss(prediction, batch, SCHEDULER, "epsilon"))


def test_a_run_with_the_noise_options_records_them_and_refuses_two_low_frequency_tricks(tiny_model_dir, tmp_path):
    from test_train import make_config, run_train, write_dataset

    from lorakit.config import ConfigError
    from lorakit.formats import read_adapter

    data = write_dataset(tmp_path / "data")
    training = {"max_epochs": 1, "multires_noise_iterations": 6, "multires_noise_discount": 0.3,
                "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True, "debiased_estimation_loss": True,
                "loss_type": "huber"}
    run_train(make_config(tiny_model_dir, data, tmp_path / "run", training=training))
    meta = read_adapter(tmp_path / "run" / "lorakit.safetensors").metadata
    assert (meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"], meta["ss_ip_noise_gamma"],
            meta["ss_debiased_estimation"], meta["ss_loss_type"], meta["ss_huber_schedule"]) == \
        ("6", "0.3", "0.1", "True", "huber", "snr")
    assert (meta["ss_ip_noise_gamma_random_strength"], meta["ss_noise_offset_random_strength"],
            meta["ss_adaptive_noise_scale"]) == ("True", "False", "None")
    with pytest.raises(ConfigError, match="training.noise_offset and training.multires_noise_iterations"):
        make_config(tiny_model_dir, data, tmp_path / "x",
                    training={"noise_offset": 0.05, "multires_noise_iterations": 6}).validate()
    with pytest.raises(ConfigError, match="training.ip_noise_gamma must be 0 or more"):
        make_config(tiny_model_dir, data, tmp_path / "x", training={"ip_noise_gamma": -0.1}).validate()


def test_zero_terminal_snr_rescales_the_schedule_as_diffusers_does_and_needs_v_prediction(tiny_model_dir):
    from lorakit.models import ModelLoadError, load_base_model

    model = load_base_model(tiny_model_dir)
    assert model.prediction_type == "epsilon" and float(model.noise_scheduler.alphas_cumprod[-1]) > 0
    with pytest.raises(ModelLoadError, match="zero terminal SNR needs a v-prediction model.*prediction_type"):
        model.set_schedule(zero_terminal_snr=True)
    before = model.noise_scheduler.alphas_cumprod.clone()
    model.set_schedule("v_prediction", zero_terminal_snr=True)
    abar = model.noise_scheduler.alphas_cumprod
    assert float(abar[-1]) == 0.0 and model.prediction_type == "v_prediction"
    # Lin et al.'s rescaling keeps the first step's signal and is a different schedule from there on
    torch.testing.assert_close(abar[0], before[0])
    assert bool((abar[1:] < before[1:]).all())
    assert model.scheduler_config["timestep_spacing"] == "trailing"  # samplers start from the pure-noise step
    rescaled = DDPMScheduler.from_config({**model.scheduler_config, "rescale_betas_zero_snr": False})
    torch.testing.assert_close(rescaled.alphas_cumprod, before)  # the same betas before rescaling


def test_a_zero_terminal_snr_run_trains_samples_and_records_it_and_loss_options_must_fit_the_model(
        tiny_model_dir, tmp_path):
    import json

    import numpy as np
    from PIL import Image
    from test_train import make_config, run_train, write_dataset

    from lorakit.errors import InvalidValueError
    from lorakit.formats import read_adapter

    data = write_dataset(tmp_path / "data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkz shape --d 1 --s 3\n")
    cfg = make_config(tiny_model_dir, data, tmp_path / "run",
                      training={"max_epochs": 1, "min_snr_gamma": 5.0, "debiased_estimation_loss": True,
                                "scale_v_pred_loss_like_noise_pred": True},
                      model={"prediction_type": "v_prediction", "zero_terminal_snr": True},
                      sample={"prompts": str(prompts)})
    run_train(cfg)
    meta = read_adapter(tmp_path / "run" / "lorakit.safetensors").metadata
    assert (meta["ss_zero_terminal_snr"], meta["ss_v_parameterization"],
            meta["ss_scale_v_pred_loss_like_noise_pred"]) == ("True", "True", "True")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(np.isfinite(losses))  # SNR 0 at the last step weighs nothing, never NaN
    grid = next((tmp_path / "run").rglob("*.png"))
    assert np.isfinite(np.asarray(Image.open(grid), dtype=float)).all()
    for model, training, wrong in (({}, {"scale_v_pred_loss_like_noise_pred": True}, "scale_v_pred"),
                                   ({"prediction_type": "v_prediction"}, {"v_pred_like_loss": 0.2},
                                    "v_pred_like_loss")):
        with pytest.raises(InvalidValueError, match=f"training.{wrong}"):
            run_train(make_config(tiny_model_dir, data, tmp_path / wrong, model=model,
                                  training={"max_epochs": 1, **training}))
