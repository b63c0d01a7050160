"""The denoising loss of latent diffusion training, with the options people use.

- epsilon or v-prediction targets (whatever the model was trained with);
- noise offset (Guttenberg's trick for very dark/bright images): ``noise += offset · N(0, 1)`` per channel;
- multi-resolution ("pyramid") noise (Whitaker): noise at ever coarser random scales, upsampled and added with
  weights ``discount^i``, then scaled back to unit variance (kohya's ``multires_noise_iterations``/``_discount``);
- input perturbation (Ning et al. 2023, kohya's ``ip_noise_gamma``): the U-Net sees latents noised with
  ``noise + γ · N(0, 1)`` while the target stays ``noise``;
- Min-SNR-γ weighting (Hang et al. 2023): per-timestep weight ``min(SNR, γ) / SNR`` for ε-prediction and
  ``min(SNR, γ) / (SNR + 1)`` for v-prediction;
- debiased estimation (Yu et al. 2024, kohya's ``debiased_estimation_loss``): weight ``1 / √SNR`` for
  ε-prediction, ``1 / (SNR + 1)`` for v-prediction, SNR capped at 1000 (it is infinite at t = 0);
- prior preservation (DreamBooth): regularization samples weighted by ``prior_loss_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorakit.errors import InvalidValueError

#: what a U-Net can be trained to predict (the targets ``add_training_noise`` builds)
PREDICTION_TYPES = ("epsilon", "v_prediction")


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
                       ip_noise_gamma: float = 0.0) -> NoisedBatch:
    """Draw noise and timesteps (from ``generator``, so a step is reproducible) and build the target.  An option
    left off draws nothing, so the other draws stay what they were without it."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    if noise_offset:
        offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype)
        noise = noise + noise_offset * offset.to(latents.device)
    if multires_iterations:
        noise = multires_noise(noise, generator, multires_iterations, multires_discount)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(latents.device)
    seen = noise
    if ip_noise_gamma:  # the input is noised a little more than the target says
        extra = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        seen = noise + ip_noise_gamma * extra
    noisy = scheduler.add_noise(latents, seen, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise InvalidValueError(f"unknown prediction type {prediction_type!r} (epsilon or v_prediction)")
    return NoisedBatch(noisy, timesteps, target)


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def debiased_weight(scheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = torch.clamp(alphas_cumprod / (1 - alphas_cumprod), max=1000.0)
    return 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / snr.sqrt()


def diffusion_loss(prediction: torch.Tensor, batch: NoisedBatch, scheduler, prediction_type: str,
                   min_snr_gamma: float | None = None, is_reg: torch.Tensor | None = None,
                   prior_loss_weight: float = 1.0, debiased: bool = False) -> torch.Tensor:
    """Mean squared error per sample, weighted (Min-SNR, debiased estimation, prior preservation), averaged over
    the batch."""
    per_sample = F.mse_loss(prediction.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = torch.ones_like(per_sample)
    if min_snr_gamma:
        weights = weights * min_snr_weight(scheduler, batch.timesteps, min_snr_gamma, prediction_type)
    if debiased:
        weights = weights * debiased_weight(scheduler, batch.timesteps, prediction_type)
    if is_reg is not None and bool(is_reg.any()):
        weights = torch.where(is_reg.to(weights.device), weights * prior_loss_weight, weights)
    return (per_sample * weights).mean()
