"""The tiny base model: Stable Diffusion 1.x architecture at a size a CPU can train and run.

Same structure as SD1.5 (so block maps, kohya key names and every pipeline work unchanged): a U-Net with
four down blocks (three with cross-attention), two layers per block, a mid block with cross-attention and
four up blocks; a KL autoencoder; a CLIP text encoder; SD1.x's noise schedule (or, for the continuation
runs of issue 3, the same betas with v-prediction at zero terminal SNR: ``V_SCHEDULE_OVERRIDES``).  Only
the widths are small.
Images are 64×64, latents 16×16×4 (the VAE downsamples by 4, not 8: at this size an 8× VAE could not keep
a star's points).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lorakit.world.tokenizer import MAX_LENGTH, build_tokenizer, learn_merges, world_words

RESOLUTION = 64
LATENT_SIZE = 16
TEXT_HIDDEN = 128

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN,
    # diffusers' historical name: in SD1.x configs this is the number of heads (SD1.5 uses 8).  Two heads
    # of width 16-32 here: 8 heads of width 4 made CPU attention 3× slower for nothing.
    attention_head_dim=2,
    norm_num_groups=16,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=RESOLUTION,
)

# SD1.x's schedule (scaled_linear, 0.00085..0.012, 1000 steps): samplers configured for SD work unchanged
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# The continuation runs' schedule (issue 3; not yet the shipped model's): v-prediction on SD1.x's betas
# rescaled to zero terminal SNR, sampled from the last timestep ("trailing"), as in Lin et al. 2024, "Common
# diffusion noise schedules and sample steps are flawed" (and SD 2.x's v-prediction).  Why: with SD1.x's
# schedule the noisiest training step still holds a trace of the image and the epsilon loss weighs the clean
# image there by SNR ~ 0.005, so the model reads the object's position from the starting noise and ignores
# "at the top left".  At zero terminal SNR the last step holds only noise and its v target is the clean image,
# so where the object goes must come from the prompt (with the text encoder's position probe in pretrain.py).
V_SCHEDULE_OVERRIDES = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")


def text_encoder_config(vocab_size: int, bos: int, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_HIDDEN * 4,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def build_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Fresh, randomly initialised components of the tiny model (deterministic for a seed).

    ``prediction_type="v_prediction"`` gives the zero-terminal-SNR v schedule (``V_SCHEDULE_OVERRIDES``)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unknown prediction type {prediction_type!r} (epsilon or v_prediction)")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer), tokenizer.bos_token_id,
                                                     tokenizer.eos_token_id))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    overrides = V_SCHEDULE_OVERRIDES if prediction_type == "v_prediction" else {}
    scheduler = DDIMScheduler(**{**SCHEDULER_CONFIG, **overrides})
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler)


def write_clip_vocab_files(tokenizer, folder: Path) -> None:
    """Also write CLIP's classic vocab.json + merges.txt, which older tools read instead of tokenizer.json."""
    merges = learn_merges(world_words())
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
