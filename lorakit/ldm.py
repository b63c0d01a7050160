"""Tensor names of the original single-file layout of Stable Diffusion 1.x and 2.x, written from diffusers' names.

A1111, ComfyUI, kohya and most model sites use the layout of the original (CompVis/LDM and Stability AI) code: one
file with ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE) and the text encoder: SD1.x's CLIP
under ``cond_stage_model.transformer.*`` (transformers' own names), SD2.x's OpenCLIP under
``cond_stage_model.model.*`` (OpenCLIP's names: one ``in_proj`` for q, k and v, ``ln_1``, ``mlp.c_fc``, ...).
This module maps a diffusers state dict to those names.  The other direction goes through diffusers' own
single-file converters (see ``lorakit.models``), so a file written here and read there checks one implementation
against the other.

Only names change, except in the VAE's mid-block attention, whose q/k/v/out projections are 1×1 convolutions
in the original and Linear layers in diffusers, and in OpenCLIP's attention, whose q, k and v are one tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2.x's text encoder
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's first text encoder (CLIP ViT-L)
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's second (OpenCLIP ViT-bigG)

# inside a U-Net ResNet block
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# inside a VAE ResNet block only the shortcut is renamed
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# inside the VAE's mid-block attention
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTENTION_CONVS = ("q", "k", "v", "proj_out")


def _layers_per_block(config: Mapping) -> int:
    n = config["layers_per_block"]
    if not isinstance(n, int):  # SD1.x has one number; per-block lists belong to other architectures
        raise ValueError(f"layers_per_block={n!r}: only SD1.x-style U-Nets (one int) can be written")
    return n


def unet_module_map(config: Mapping) -> dict[str, str]:
    """diffusers module path -> original module path, for every module of an SD1.x-structured U-Net (SD2.x's
    and SDXL's too: one number of layers per level, attention where the level has it)."""
    n = _layers_per_block(config)
    down, up = config["down_block_types"], config["up_block_types"]
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL's
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    # the original numbers its blocks flatly: input block 0 is conv_in, then n layers + 1 downsampler per level
    for i in range(len(down)):
        for j in range(n):
            block = f"input_blocks.{(n + 1) * i + j + 1}"
            names[f"down_blocks.{i}.resnets.{j}"] = f"{block}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"{block}.1"
        if i < len(down) - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(n + 1) * (i + 1)}.0.op"
    for i, kind in enumerate(up):
        for j in range(n + 1):
            block = f"output_blocks.{(n + 1) * i + j}"
            names[f"up_blocks.{i}.resnets.{j}"] = f"{block}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"{block}.1"
        if i < len(up) - 1:
            # the upsampler sits after the last layer's resnet (and attention, where the block has one)
            slot = 2 if "CrossAttn" in kind else 1
            names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{(n + 1) * i + n}.{slot}.conv"
    return names


def vae_module_map(config: Mapping) -> dict[str, str]:
    """diffusers module path -> original module path, for every module of an SD-style KL autoencoder."""
    n = _layers_per_block(config)
    levels = len(config["block_out_channels"])
    names = {name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                     "quant_conv", "post_quant_conv")}
    names |= {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        names |= {f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
                  f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
                  f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"}
    for i in range(levels):
        for j in range(n):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        # the original decoder counts its levels from the lowest resolution up, diffusers from the top down
        level = levels - 1 - i
        for j in range(n + 1):
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{level}.block.{j}"
        if i < levels - 1:
            names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
            names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return names


def is_sdxl_unet(config: Mapping) -> bool:
    """Whether a diffusers U-Net config is SDXL's kind: conditioned on pooled text and the image size."""
    return config.get("addition_embed_type") == "text_time"


def ldm_module_path(path: str, modules: Mapping[str, str]) -> str:
    """A diffusers U-Net module path under its original name (``unet_module_map``'s ``modules``):
    'down_blocks.1.attentions.0.proj_in' -> 'input_blocks.4.1.proj_in' (SD1.x/SDXL)."""
    if path in modules:
        return modules[path]
    module, rest = _split(path, modules)
    if ".resnets." in module:
        rest = _rename_inner(rest, _UNET_RESNET)
    return f"{modules[module]}.{rest}"


def kohya_unet_names(config: Mapping) -> dict[str, str] | None:
    """The module map kohya names a U-Net's adapters by: SDXL's original (LDM) names, as kohya's SDXL scripts
    and A1111/ComfyUI's SDXL LoRAs use; None for SD1.x/2.x, which kohya names by diffusers paths."""
    return unet_module_map(config) if is_sdxl_unet(config) else None


def _split(key: str, modules: Mapping[str, str]) -> tuple[str, str]:
    """(module, rest) for the longest module path in ``modules`` that ``key`` starts with."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            return module, ".".join(parts[cut:])
    raise KeyError(key)


def _rename_inner(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers U-Net state dict under original names (``model.diffusion_model.`` prefix included)."""
    modules = unet_module_map(config)
    out = {}
    for key, tensor in state_dict.items():
        try:
            module, rest = _split(key, modules)
        except KeyError:
            raise ValueError(f"U-Net tensor {key!r} has no place in the original single-file layout") from None
        if ".resnets." in module:
            rest = _rename_inner(rest, _UNET_RESNET)
        out[UNET_PREFIX + modules[module] + "." + rest] = tensor
    return out


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under original names (``first_stage_model.`` prefix included)."""
    modules = vae_module_map(config)
    out = {}
    for key, tensor in state_dict.items():
        try:
            module, rest = _split(key, modules)
        except KeyError:
            raise ValueError(f"VAE tensor {key!r} has no place in the SD1.x single-file layout") from None
        if ".resnets." in module:
            rest = _rename_inner(rest, _VAE_RESNET)
        elif ".attentions." in module:
            rest = _rename_inner(rest, _VAE_ATTENTION)
            if rest.split(".")[0] in _VAE_ATTENTION_CONVS and rest.endswith("weight") and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # Linear (out, in) -> 1×1 conv (out, in, 1, 1)
        out[VAE_PREFIX + modules[module] + "." + rest] = tensor
    return out


def text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = TEXT_ENCODER_PREFIX
                        ) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict under original names (``prefix``: SDXL's first encoder has its own).

    The original keeps the ``text_model.`` level that transformers >= 5.6 no longer has, so it is put back.
    ``position_ids`` is written as SD1.x files carry it: loaders built on older transformers expect it.
    """
    out = {}
    for key, tensor in state_dict.items():
        inner = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + inner] = tensor
    positions = out.get(prefix + "text_model.embeddings.position_embedding.weight")
    if positions is not None:
        out.setdefault(prefix + "text_model.embeddings.position_ids",
                       torch.arange(positions.shape[0], dtype=torch.int64)[None])
    return out


def text_encoder_from_ldm(checkpoint: Mapping[str, torch.Tensor], model_keys: set[str],
                          prefix: str = TEXT_ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    """The text-encoder tensors of an original-layout checkpoint, named as in a model with ``model_keys``.

    Accepts files with and without the ``text_model.`` level (both exist in the wild) and drops
    ``position_ids`` when the model has no such buffer.
    """
    wrapped = any(k.startswith("text_model.") for k in model_keys)
    out = {}
    for key, tensor in checkpoint.items():
        if not key.startswith(prefix):
            continue
        inner = key[len(prefix):].removeprefix("text_model.")
        name = "text_model." + inner if wrapped else inner
        if name.endswith("position_ids") and name not in model_keys:
            continue
        out[name] = tensor
    return out


# ------------------------------------------------------------------------------------ SD2.x's OpenCLIP encoder
# transformers' name inside a layer -> OpenCLIP's (q/k/v are handled apart: they are one in_proj there)
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def text_encoder_layout(checkpoint: Mapping[str, torch.Tensor]) -> str | None:
    """"clip" (SD1.x, ``cond_stage_model.transformer.*``), "open_clip" (SD2.x, ``cond_stage_model.model.*``),
    "sdxl" (``conditioner.embedders.0.transformer.*`` and ``.1.model.*``), or None when the checkpoint has no text
    encoder of these layouts."""
    if any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in checkpoint) and any(
            k.startswith(SDXL_CLIP_PREFIX) for k in checkpoint):
        return "sdxl"
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in checkpoint):
        return "open_clip"
    if any(k.startswith(TEXT_ENCODER_PREFIX) for k in checkpoint):
        return "clip"
    return None


def open_clip_stand_ins(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an SD2.x file holds beyond the 23 layers diffusers keeps, for a model that was never read from one,
    from its encoder under OpenCLIP's names (``open_clip_names``): OpenCLIP's last layer (SD2.x conditions on the
    one before, so its values are never used: a copy of the layer before, as kohya writes it), the projection and
    logit scale of CLIP's contrastive head (unused: identity, 100)."""
    blocks = f"{OPEN_CLIP_PREFIX}transformer.resblocks."
    n = 1 + max(int(k[len(blocks):].split(".")[0]) for k in named if k.startswith(blocks))
    last = f"{blocks}{n - 1}."
    extras = {f"{blocks}{n}." + k[len(last):]: t.detach().clone() for k, t in named.items() if k.startswith(last)}
    width = named[OPEN_CLIP_PREFIX + "positional_embedding"].shape[1]
    extras[OPEN_CLIP_PREFIX + "text_projection"] = torch.eye(width)
    extras[OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052)  # ln 100, where CLIP's training clamps it
    return extras


def open_clip_names(state_dict: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX
                    ) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict (SD2.x's encoder; SDXL's second, with its projection) under
    OpenCLIP's names, ``prefix`` included; q, k and v of each layer concatenated into OpenCLIP's ``in_proj`` (in
    that order), the projection transposed (OpenCLIP multiplies by it from the right).  ``position_ids`` is
    dropped: OpenCLIP has none."""
    plain = {k.removeprefix("text_model."): t for k, t in state_dict.items()}
    out = {}
    for key, tensor in plain.items():
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.t()
        elif key.startswith("encoder.layers."):
            index, rest = key.removeprefix("encoder.layers.").split(".", 1)
            block = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]  # weight or bias
                parts = [plain[f"encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[block + f"attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue  # part of in_proj, written with q
            else:
                out[block + _rename_inner(rest, _OPEN_CLIP_LAYER)] = tensor
        elif not key.endswith("position_ids"):
            raise ValueError(f"text-encoder tensor {key!r} has no place in OpenCLIP's single-file layout")
    return out


def text_encoder_to_open_clip(state_dict: Mapping[str, torch.Tensor],
                              carried: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """SD2.x's text encoder as its single files hold it: ``open_clip_names`` plus the tensors diffusers does not
    keep (the last layer, the contrastive head): ``carried``, those of the file the model was read from
    (``open_clip_extras``), or else stand-ins (``open_clip_stand_ins``)."""
    named = open_clip_names(state_dict)
    return {**named, **(dict(carried) if carried else open_clip_stand_ins(named))}


def sdxl_text_encoders_to_ldm(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor],
                              carried: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """SDXL's two text encoders as its single files hold them: the first as CLIP's original names under
    ``conditioner.embedders.0.transformer.``, the second under OpenCLIP's (``conditioner.embedders.1.model.``)
    with its projection and the contrastive head's logit scale: ``carried`` from the file the model was read from,
    else CLIP's ln 100."""
    head = dict(carried) if carried else {SDXL_OPEN_CLIP_PREFIX + "logit_scale": torch.tensor(4.6052)}
    return {**text_encoder_to_ldm(first, SDXL_CLIP_PREFIX), **open_clip_names(second, SDXL_OPEN_CLIP_PREFIX), **head}


def open_clip_extras(checkpoint: Mapping[str, torch.Tensor], kept_layers: int, prefix: str = OPEN_CLIP_PREFIX,
                     projected: bool = False) -> dict[str, torch.Tensor]:
    """The OpenCLIP tensors of a file that a ``kept_layers``-layer transformers encoder does not hold: the layers
    after them and the contrastive head (only its logit scale for an encoder with a projection, ``projected``:
    SDXL's second), under their own names, to be written back as they came."""
    head = ("logit_scale",) if projected else ("text_projection", "logit_scale")
    out = {}
    for key, tensor in checkpoint.items():
        if not key.startswith(prefix):
            continue
        inner = key[len(prefix):]
        if inner.startswith("transformer.resblocks."):
            if int(inner.split(".")[2]) >= kept_layers:
                out[key] = tensor
        elif inner in head:
            out[key] = tensor
    return out


def text_encoder_from_open_clip(checkpoint: Mapping[str, torch.Tensor], model: torch.nn.Module,
                                prefix: str = OPEN_CLIP_PREFIX
                                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The text-encoder tensors of an SD2.x file (SDXL's second encoder: ``prefix``), named as in ``model`` (a
    transformers CLIPTextModel, or CLIPTextModelWithProjection, which keeps the projection), through diffusers'
    converter; and apart, under the file's names, the ones ``model`` does not hold (the layers after its last and
    the rest of the contrastive head: ``open_clip_extras``), which a file written back carries."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    projected = hasattr(model, "text_projection")
    own = {k: t for k, t in checkpoint.items() if k.startswith(prefix)}
    extras = open_clip_extras(own, model.config.num_hidden_layers, prefix, projected)
    converted = convert_open_clip_checkpoint(model, {k: t for k, t in own.items() if k not in extras}, prefix)
    wrapped = any(k.startswith("text_model.") for k in model.state_dict())
    out = {}
    for key, tensor in converted.items():
        if key == "text_projection.weight" and not projected:
            continue
        name = key if wrapped else key.removeprefix("text_model.")
        out[name] = tensor
    return out, extras
