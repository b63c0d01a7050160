"""Tiny models built from configs, and adapter helpers, for the tests (not a test module; conftest's fixtures
use them too)."""

from __future__ import annotations

import copy
import functools

import torch

SD15_TE = dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
               projection_dim=768)


def build_tiny_unet(seed: int = 0):
    """A small UNet2DConditionModel with the SD1.x block structure (4 levels, 2 layers per block).

    Built once per seed and copied: diffusers' weight init is slow on a busy CPU.
    """
    return copy.deepcopy(_tiny_unet(seed))


def build_tiny_text_encoder(seed: int = 0):
    return copy.deepcopy(_tiny_text_encoder(seed))


@functools.cache
def _tiny_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64), norm_num_groups=16, cross_attention_dim=32,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


@functools.cache
def _tiny_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            vocab_size=100, max_position_embeddings=16, projection_dim=32,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 5, 32, generator=g))


def randomize(network, seed: int = 0, scale: float = 0.1) -> None:
    """Give every adapter tensor random non-zero values (fresh adapters have a zero factor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for key, p in adapter.named_parameters():
                if not key.startswith("base."):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def build_tiny_sd2_components(seed: int = 0) -> dict:
    """The built-in model's sizes with SD2.x's kinds of layer (random weights): an OpenCLIP-style text encoder
    (gelu), a U-Net whose transformers project with Linear layers, a tokenizer padding with "!" as SD2's does."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from lorakit.world.model import UNET_CONFIG, build_components

    c = build_components(seed)
    torch.manual_seed(seed + 1)
    config = copy.deepcopy(c["text_encoder"].config)
    config.hidden_act = "gelu"
    c["text_encoder"] = CLIPTextModel(config).eval()
    c["unet"] = UNet2DConditionModel(**{**UNET_CONFIG, "use_linear_projection": True}).eval()
    c["tokenizer"].pad_token = "!"
    return c


def build_tiny_sdxl_components(seed: int = 0) -> dict:
    """A tiny model of SDXL's kinds (random weights): CLIP-L-like and OpenCLIP-bigG-like text encoders whose
    penultimate states are joined for the cross-attention, the second's projected pooled output and the image
    size as the U-Net's added conditioning ("text_time"), no attention in the first level, Linear projections."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from lorakit.world.model import LATENT_SIZE, TEXT_HIDDEN, build_components

    c = build_components(seed)
    torch.manual_seed(seed + 2)
    config = copy.deepcopy(c["text_encoder"].config)
    config.hidden_act, config.hidden_size, config.intermediate_size, config.projection_dim = "gelu", 64, 256, 48
    tokenizer_2 = copy.deepcopy(c["tokenizer"])
    tokenizer_2.pad_token = "!"
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), norm_num_groups=16,
        cross_attention_dim=TEXT_HIDDEN + config.hidden_size, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + config.projection_dim)
    return dict(c, unet=unet.eval(), text_encoder_2=CLIPTextModelWithProjection(config).eval(),
                tokenizer_2=tokenizer_2)


def export_sdxl_pipeline(c: dict, folder) -> None:
    """A diffusers SDXL folder of ``build_tiny_sdxl_components``'s parts."""
    from diffusers import StableDiffusionXLPipeline

    from lorakit.world.model import write_clip_vocab_files

    pipe = StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
                                     tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=c["unet"],
                                     scheduler=c["scheduler"], add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        write_clip_vocab_files(c[sub], folder / sub)
