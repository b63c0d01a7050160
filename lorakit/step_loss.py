"""The loss of one batch: the training step's (random noise and timestep from the step's seed) and the held-out
images' validation loss (kohya's fixed timesteps and noise).  Both run the same prediction and loss function."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from accelerate import Accelerator

from lorakit.conditioning import Conditioning, ConditioningCache, encode_conditioning
from lorakit.config import TrainConfig
from lorakit.data.dataset import Batch
from lorakit.loss import NoisedBatch, add_training_noise, diffusion_loss, noise_at
from lorakit.methods import TrainingMethod
from lorakit.models import BaseModel
from lorakit.prompt_weights import uses_bracket_syntax

#: kohya's validation timesteps (train_network.py): the loss of each held-out batch is averaged over these
VALIDATION_TIMESTEPS = (10, 350, 500, 650, 990)


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """A seed for one optimizer step, independent of every other step's; ``micro``: the step's ``micro``-th batch
    under gradient accumulation (the first one's seed is the step's own)."""
    key = f"{seed}/{step}" if micro == 0 else f"{seed}/{step}/{micro}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def batch_latents(model: BaseModel, batch: Batch, generator: torch.Generator, step: int,
                  device: torch.device) -> torch.Tensor:
    """The batch's latents, scaled for the U-Net (float32): a draw from the cached distributions, or the VAE's
    encoding of its pixels (with a generator seeded from ``step``)."""
    if batch.latents is not None:
        latents = batch.sample_latents(generator)
    else:
        with torch.no_grad():
            pixels = batch.pixel_values.to(device, dtype=model.vae.dtype)
            latents = model.vae.encode(pixels).latent_dist.sample(generator.manual_seed(step_seed(-1, step)))
    return latents.to(device, dtype=torch.float32) * model.vae.config.scaling_factor


def encode_captions(cfg: TrainConfig, model: BaseModel, text_encoders, captions: list[str],
                    device: torch.device, cache: ConditioningCache | None = None) -> Conditioning:
    """The conditioning for training captions; with ``data.weighted_captions`` (kohya's), ``(word:1.2)`` weighs
    words as in sample prompts (``lorakit.prompt_weights``), else brackets are plain text.  With ``cache``
    (``data.cache_text_encoder_outputs``) each caption is encoded once, alone, and weighted by its own syntax."""
    def encode(texts: list[str]) -> Conditioning:
        weighted = cfg.data.weighted_captions and any(uses_bracket_syntax(c) for c in texts)
        return encode_conditioning(model, texts, weighted=weighted, clip_skip=cfg.model.clip_skip,
                                   max_token_length=cfg.model.max_token_length, device=device,
                                   text_encoders=text_encoders)

    if cache is not None:
        return cache.conditioning(captions, lambda text: encode([text]))
    return encode(captions)


def prediction_loss(cfg: TrainConfig, model: BaseModel, method: TrainingMethod, batch: Batch, noised: NoisedBatch,
                    accelerator: Accelerator, unet=None, text_encoders=None,
                    captions_cache: ConditioningCache | None = None) -> torch.Tensor:
    """The U-Net's prediction for ``noised`` under the batch's captions (from ``captions_cache`` when the run keeps
    one), and the run's loss of it."""
    unet = model.unet if unet is None else unet  # not `or`: a compiled module has no truth value
    device = accelerator.device
    options = cfg.training
    captions = [method.expand_prompt(c) for c in batch.captions]
    latents = noised.noisy_latents
    height, width = (side * model.vae_scale_factor for side in latents.shape[-2:])
    with accelerator.autocast():
        text = encode_captions(cfg, model, text_encoders, captions, device, captions_cache)
        prediction = unet(latents.to(model.dtype), noised.timesteps, text.states.to(model.dtype),
                          **text.unet_kwargs(height, width, model.dtype, batch.size_conditions)).sample
    return diffusion_loss(prediction, noised, model.noise_scheduler, model.prediction_type, options.min_snr_gamma,
                          batch.is_reg, options.prior_loss_weight, debiased=options.debiased_estimation_loss,
                          loss_type=options.loss_type, huber_schedule=options.huber_schedule,
                          huber_c_value=options.huber_c, huber_scale=options.huber_scale,
                          v_pred_like=options.v_pred_like_loss,
                          scale_v_like_noise=options.scale_v_pred_loss_like_noise_pred,
                          mask=None if batch.loss_masks is None else batch.loss_masks.to(device))


def compute_loss(cfg: TrainConfig, model: BaseModel, method: TrainingMethod, batch: Batch, step: int,
                 accelerator: Accelerator, unet=None, text_encoders=None,
                 captions_cache: ConditioningCache | None = None, micro: int = 0) -> torch.Tensor:
    """The loss of one training batch.  ``unet``/``text_encoders``: the modules to run (accelerate's wrappers in
    a distributed run, so gradients are synchronised); default the model's own.  ``micro``: the batch's place in
    its optimizer step under gradient accumulation (each draws its own noise and timesteps)."""
    generator = torch.Generator().manual_seed(step_seed(cfg.training.seed, step, micro))
    latents = batch_latents(model, batch, generator, step, accelerator.device)
    options = cfg.training
    noised = add_training_noise(model.noise_scheduler, latents, generator, model.prediction_type,
                                options.noise_offset, multires_iterations=options.multires_noise_iterations,
                                multires_discount=options.multires_noise_discount,
                                ip_noise_gamma=options.ip_noise_gamma,
                                timestep_range=(options.min_timestep, options.max_timestep),
                                noise_offset_random_strength=options.noise_offset_random_strength,
                                adaptive_noise_scale=options.adaptive_noise_scale,
                                ip_noise_gamma_random_strength=options.ip_noise_gamma_random_strength)
    return prediction_loss(cfg, model, method, batch, noised, accelerator, unet, text_encoders, captions_cache)


def validation_loss(cfg: TrainConfig, model: BaseModel, method: TrainingMethod, batches: Iterable[Batch],
                    accelerator: Accelerator, seed: int, max_batches: int | None = None,
                    captions_cache: ConditioningCache | None = None) -> float | None:
    """The held-out images' loss: each batch at each of kohya's ``VALIDATION_TIMESTEPS`` with noise drawn from
    (``seed``, batch) — the same every call, so the values of one run are comparable — without the noise
    augmentations (offset, multi-resolution, input perturbation) or any dropout; the mean over batches and
    timesteps.  None when there is no batch.  Gradients are not kept, and the modules' modes are restored."""
    modules = [model.unet, *model.text_encoders]
    modes = [m.training for m in modules]
    losses = []
    try:
        for m in modules:
            m.eval()  # adapter, rank and module dropout off
        with torch.no_grad():
            for k, batch in enumerate(batches):
                if max_batches is not None and k >= max_batches:
                    break
                generator = torch.Generator().manual_seed(step_seed(seed, -1 - k))
                latents = batch_latents(model, batch, generator, -1 - k, accelerator.device)
                for t in VALIDATION_TIMESTEPS:
                    noised = noise_at(model.noise_scheduler, latents, generator, model.prediction_type, t)
                    with method.scaled(batch.network_multiplier):
                        losses.append(float(prediction_loss(cfg, model, method, batch, noised, accelerator,
                                                            captions_cache=captions_cache)))
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return sum(losses) / len(losses) if losses else None
