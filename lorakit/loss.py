"""The denoising loss of latent diffusion training, with the options people use.

- epsilon or v-prediction targets (whatever the model was trained with);
- noise offset (Guttenberg's trick for very dark/bright images): ``noise += offset · N(0, 1)`` per channel, its
  strength drawn at random or grown with the latents' mean (kohya's ``noise_offset_random_strength``,
  ``adaptive_noise_scale``);
- multi-resolution ("pyramid") noise (Whitaker): noise at ever coarser random scales, upsampled and added with
  weights ``discount^i``, then scaled back to unit variance (kohya's ``multires_noise_iterations``/``_discount``);
- input perturbation (Ning et al. 2023, kohya's ``ip_noise_gamma``): the U-Net sees latents noised with
  ``noise + γ · N(0, 1)`` while the target stays ``noise``;
- Min-SNR-γ weighting (Hang et al. 2023): per-timestep weight ``min(SNR, γ) / SNR`` for ε-prediction and
  ``min(SNR, γ) / (SNR + 1)`` for v-prediction;
- debiased estimation (Yu et al. 2024, kohya's ``debiased_estimation_loss``): weight ``1 / √SNR`` for
  ε-prediction, ``1 / (SNR + 1)`` for v-prediction, SNR capped at 1000 (it is infinite at t = 0);
- kohya's ``v_pred_like_loss`` λ (ε-prediction): weight ``1 + λ (SNR + 1) / SNR``, the squared ε error plus λ
  times a v-prediction-like one; ``scale_v_pred_loss_like_noise_pred`` (v-prediction): weight ``SNR / (SNR + 1)``,
  so each timestep weighs as in ε-prediction (SNR capped at 1000 in both, as kohya does);
- kohya's alpha mask: each element's error weighted by the image's opacity there;
- prior preservation (DreamBooth): regularization samples weighted by ``prior_loss_weight``;
- the pseudo-Huber loss (Khrapov et al. 2024, kohya's ``loss_type = "huber"``/``"smooth_l1"``): ``2c(√(d² + c²) −
  c)`` (``huber``; ``smooth_l1`` without the leading ``c``) instead of ``d²``, with ``c`` constant, decaying
  exponentially over the timesteps, or from the noise level (``huber_schedule = "snr"``: ``(1 − c₀) / (1 + σ_t)²
  + c₀``), so noisy (large-error) samples weigh less than in the squared error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorakit.errors import InvalidValueError

#: what a U-Net can be trained to predict (the targets ``add_training_noise`` builds)
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: kohya's loss types and Huber schedules
LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass
class NoisedBatch:
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def multires_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int,
                   discount: float) -> torch.Tensor:
    """``noise`` plus ``iterations`` layers of coarser noise: layer i is drawn at 1 / r^i of the size (r uniform
    in [2, 4) per layer, as Whitaker's pyramid noise), upsampled bilinearly and weighted ``discount^i``; the sum
    is scaled back to unit standard deviation.  Stops early once a layer is a single pixel wide or high."""
    b, c, h, w = noise.shape
    total = noise.clone()
    for i in range(1, iterations + 1):
        r = 2 + 2 * float(torch.rand((), generator=generator))
        size = (max(1, int(h / r ** i)), max(1, int(w / r ** i)))
        coarse = torch.randn((b, c, *size), generator=generator, dtype=noise.dtype).to(noise.device)
        total += F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if min(size) == 1:
            break
    return total / total.std()


def add_training_noise(scheduler, latents: torch.Tensor, generator: torch.Generator, prediction_type: str,
                       noise_offset: float = 0.0, *, multires_iterations: int = 0, multires_discount: float = 0.3,
                       ip_noise_gamma: float = 0.0, timestep_range: tuple[int | None, int | None] = (None, None),
                       noise_offset_random_strength: bool = False, adaptive_noise_scale: float | None = None,
                       ip_noise_gamma_random_strength: bool = False) -> NoisedBatch:
    """Draw noise and timesteps (from ``generator``, so a step is reproducible) and build the target.  An option
    left off draws nothing, so the other draws stay what they were without it.  ``timestep_range``: kohya's
    [min_timestep, max_timestep), None for the schedule's ends.  ``noise_offset_random_strength`` /
    ``ip_noise_gamma_random_strength``: the strength is drawn uniformly below the given one, once per batch;
    ``adaptive_noise_scale``: the offset grows with each channel's |mean latent| (kohya's three options)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    if noise_offset:
        strength: float | torch.Tensor = noise_offset
        if noise_offset_random_strength:
            strength = noise_offset * float(torch.rand((), generator=generator))
        if adaptive_noise_scale is not None:  # brighter or darker images get a larger offset, never below 0
            strength = torch.clamp(strength + adaptive_noise_scale * latents.mean(dim=(2, 3), keepdim=True).abs(),
                                   min=0.0)
        offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype)
        noise = noise + strength * offset.to(latents.device)
    if multires_iterations:
        noise = multires_noise(noise, generator, multires_iterations, multires_discount)
    length = scheduler.config.num_train_timesteps
    low, high = timestep_range
    low, high = 0 if low is None else low, length if high is None else high
    if not 0 <= low < high <= length:
        raise InvalidValueError(f"timesteps [{low}, {high}): must lie within the schedule's 0..{length} and not be "
                                "empty (training.min_timestep / max_timestep)")
    timesteps = torch.randint(low, high, (b,), generator=generator)
    timesteps = timesteps.to(latents.device)
    seen = noise
    if ip_noise_gamma:  # the input is noised a little more than the target says
        gamma = ip_noise_gamma * float(torch.rand((), generator=generator)) if ip_noise_gamma_random_strength \
            else ip_noise_gamma
        extra = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        seen = noise + gamma * extra
    noisy = scheduler.add_noise(latents, seen, timesteps)
    return NoisedBatch(noisy, timesteps, prediction_target(scheduler, latents, noise, timesteps, prediction_type))


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """What the U-Net is trained to predict: the noise (ε) or the velocity (v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise InvalidValueError(f"unknown prediction type {prediction_type!r} (epsilon or v_prediction)")


def noise_at(scheduler, latents: torch.Tensor, generator: torch.Generator, prediction_type: str,
             timestep: int) -> NoisedBatch:
    """Plain noise from ``generator`` at one fixed ``timestep`` for the whole batch (the validation loss):
    no offset, no multi-resolution layers, no input perturbation.  A timestep past the schedule's end is
    taken as its last."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    last = scheduler.config.num_train_timesteps - 1
    timesteps = torch.full((latents.shape[0],), min(timestep, last), dtype=torch.long, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return NoisedBatch(noisy, timesteps, prediction_target(scheduler, latents, noise, timesteps, prediction_type))


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def _capped_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return torch.clamp(alphas_cumprod / (1 - alphas_cumprod), max=1000.0)  # infinite at t = 0


def debiased_weight(scheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    snr = _capped_snr(scheduler, timesteps)
    return 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / snr.sqrt()


def v_pred_like_weight(scheduler, timesteps: torch.Tensor, share: float) -> torch.Tensor:
    snr = _capped_snr(scheduler, timesteps)
    return 1 + share * (snr + 1) / snr


def noise_pred_like_weight(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    snr = _capped_snr(scheduler, timesteps)
    return snr / (snr + 1)


def check_loss_options(options, prediction_type: str, num_timesteps: int) -> None:
    """Refuse loss options that mean nothing for this model (its prediction type, its schedule's length;
    ``options``: the trainer's ``[training]`` table), naming the option, before the first step."""
    for name in ("min_timestep", "max_timestep"):
        value = getattr(options, name)
        if value is not None and value > num_timesteps - (name == "min_timestep"):
            raise InvalidValueError(f"training.{name} = {value}: this model's schedule has {num_timesteps} timesteps "
                                    f"(0 to {num_timesteps - 1})")
    if options.v_pred_like_loss and prediction_type != "epsilon":
        raise InvalidValueError(
            f"training.v_pred_like_loss = {options.v_pred_like_loss}: it gives an ε-prediction model part of a "
            f"v-prediction loss, and this model predicts {prediction_type}; leave it at 0")
    if options.scale_v_pred_loss_like_noise_pred and prediction_type != "v_prediction":
        raise InvalidValueError(
            "training.scale_v_pred_loss_like_noise_pred weighs a v-prediction model's loss as an ε-prediction "
            f"model's, and this model predicts {prediction_type}; leave it off (or set model.prediction_type)")


def huber_c(scheduler, timesteps: torch.Tensor, schedule: str, c: float, scale: float = 1.0) -> torch.Tensor:
    """The pseudo-Huber parameter of each sample's timestep; ``scale`` (kohya's huber_scale) multiplies the constant
    and exponential schedules, as kohya's does (not the snr schedule)."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, c * scale)
    if schedule == "exponential":  # c·scale at the last timestep, scale at t = 0
        return torch.exp(math.log(c) * t / scheduler.config.num_train_timesteps) * scale
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    return (1 - c) / (1 + sigmas) ** 2 + c


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    c: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The error of each sample, averaged over its elements: squared, or pseudo-Huber with ``c`` per sample.
    ``mask`` (B, 1, H, W) in [0, 1] at any size (kohya's alpha mask, at the image's) weighs each element: it is
    averaged down to the prediction's size, and the mean still divides by every element, as kohya's does (a
    half-transparent image weighs half)."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        elements = F.mse_loss(prediction, target, reduction="none")
    else:
        c = c.reshape(-1, 1, 1, 1)
        smooth = torch.sqrt((prediction - target) ** 2 + c ** 2) - c
        elements = (2 * c if loss_type == "huber" else 2.0) * smooth
    if mask is not None:
        elements = elements * F.interpolate(mask.to(elements), size=elements.shape[2:], mode="area")
    return elements.mean(dim=(1, 2, 3))


def diffusion_loss(prediction: torch.Tensor, batch: NoisedBatch, scheduler, prediction_type: str,
                   min_snr_gamma: float | None = None, is_reg: torch.Tensor | None = None,
                   prior_loss_weight: float = 1.0, debiased: bool = False, loss_type: str = "l2",
                   huber_schedule: str = "snr", huber_c_value: float = 0.1, v_pred_like: float = 0.0,
                   scale_v_like_noise: bool = False, mask: torch.Tensor | None = None,
                   huber_scale: float = 1.0) -> torch.Tensor:
    """The error per sample (squared, or pseudo-Huber), weighted (Min-SNR, debiased estimation, v-prediction-
    like or ε-prediction-like weighting, prior preservation), averaged over the batch; ``mask``: see
    ``per_sample_loss``."""
    c = None if loss_type == "l2" else huber_c(scheduler, batch.timesteps, huber_schedule, huber_c_value,
                                               huber_scale)
    per_sample = per_sample_loss(prediction, batch.target, loss_type, c, mask)
    weights = torch.ones_like(per_sample)
    if min_snr_gamma:
        weights = weights * min_snr_weight(scheduler, batch.timesteps, min_snr_gamma, prediction_type)
    if debiased:
        weights = weights * debiased_weight(scheduler, batch.timesteps, prediction_type)
    if v_pred_like:
        weights = weights * v_pred_like_weight(scheduler, batch.timesteps, v_pred_like)
    if scale_v_like_noise:
        weights = weights * noise_pred_like_weight(scheduler, batch.timesteps)
    if is_reg is not None and bool(is_reg.any()):
        weights = torch.where(is_reg.to(weights.device), weights * prior_loss_weight, weights)
    return (per_sample * weights).mean()
