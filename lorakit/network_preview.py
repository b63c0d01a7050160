"""The network a run would make, built on the meta device from the base model's configs: what ``lorakit train
--dry-run`` says of it (its modules, norm-layer updates, trainable parameters), and every error its making gives
(a glob naming no module, a preset selecting none, a rank a layer cannot take) before a weight is loaded.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lorakit.config import TrainConfig
from lorakit.models import text_encoder_on_meta


def meta_model(configs: Path) -> SimpleNamespace:
    """The U-Net and text encoder(s) a config folder describes, on the meta device (no memory, no weights), with
    what a network reads of a base model (``unet``, ``text_encoders``, ``is_sdxl``)."""
    sdxl = (configs / "text_encoder_2").is_dir()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
    encoders = [text_encoder_on_meta(CLIPTextModel, configs / "text_encoder")]
    if sdxl:
        encoders.append(text_encoder_on_meta(CLIPTextModelWithProjection, configs / "text_encoder_2"))
    return SimpleNamespace(unet=unet, text_encoders=tuple(encoders), is_sdxl=sdxl)


def network_preview(cfg: TrainConfig, configs: Path) -> str:
    """The line the trainer says of its network, for the model ``configs`` describes (an adapter or pivotal run;
    ``network.weights`` is read for ranks only, as its values go into real weights)."""
    from lorakit.methods import AdapterMethod

    method = AdapterMethod(cfg, meta_model(configs), start_file=False)
    return method.summary()
