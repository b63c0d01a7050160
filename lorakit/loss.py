"""The denoising loss of latent diffusion training, with the options people use.

- epsilon or v-prediction targets (whatever the model was trained with);
- noise offset (Guttenberg's trick for very dark/bright images): ``noise += offset · N(0, 1)`` per channel;
- Min-SNR-γ weighting (Hang et al. 2023): per-timestep weight ``min(SNR, γ) / SNR`` for ε-prediction and
  ``min(SNR, γ) / (SNR + 1)`` for v-prediction;
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


def add_training_noise(scheduler, latents: torch.Tensor, generator: torch.Generator, prediction_type: str,
                       noise_offset: float = 0.0) -> NoisedBatch:
    """Draw noise and timesteps (from ``generator``, so a step is reproducible) and build the target."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    if noise_offset:
        offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype)
        noise = noise + noise_offset * offset.to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
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


def diffusion_loss(prediction: torch.Tensor, batch: NoisedBatch, scheduler, prediction_type: str,
                   min_snr_gamma: float | None = None, is_reg: torch.Tensor | None = None,
                   prior_loss_weight: float = 1.0) -> torch.Tensor:
    """Mean squared error per sample, weighted (Min-SNR, prior preservation), averaged over the batch."""
    per_sample = F.mse_loss(prediction.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = torch.ones_like(per_sample)
    if min_snr_gamma:
        weights = weights * min_snr_weight(scheduler, batch.timesteps, min_snr_gamma, prediction_type)
    if is_reg is not None and bool(is_reg.any()):
        weights = torch.where(is_reg.to(weights.device), weights * prior_loss_weight, weights)
    return (per_sample * weights).mean()
