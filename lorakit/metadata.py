"""kohya's ``ss_*`` metadata, the one builder: adapter files (``lorakit.formats``), the trainer and the dataset
all make their ``ss_*`` entries here, so a name is spelled once and a typo is an error, not a silent gap.

Values become strings as kohya writes them: strings as they are, tables and lists as JSON, everything else
with ``str`` (``str(True) == "True"``).  lorakit's own entries are ``lorakit_*`` and are not built here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import lorakit

#: what kohya / LyCORIS record about a network, and about training, each stored as ss_<name>
NETWORK_FIELDS = ("network_module", "network_dim", "network_alpha", "network_args", "base_model_version", "v2",
                  "v_parameterization", "zero_terminal_snr")
TRAINING_FIELDS = (
    "learning_rate", "unet_lr", "text_encoder_lr", "num_epochs", "max_train_epochs", "epoch", "steps",
    "max_train_steps", "num_train_images", "num_reg_images", "num_batches_per_epoch", "batch_size_per_device",
    "total_batch_size", "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps", "optimizer",
    "mixed_precision", "seed", "resolution", "clip_skip", "noise_offset", "min_snr_gamma", "max_grad_norm",
    "network_dropout", "output_name", "session_id", "training_started_at", "training_finished_at",
    "training_comment", "sd_model_name", "sd_model_hash", "new_sd_model_hash", "vae_name", "tag_frequency",
    "dataset_dirs", "reg_dataset_dirs", "caption_dropout_rate", "shuffle_caption", "keep_tokens", "flip_aug",
    "color_aug", "cache_latents", "enable_bucket", "bucket_no_upscale", "min_bucket_reso", "max_bucket_reso",
    "bucket_info",
    "prior_loss_weight", "scale_weight_norms", "multires_noise_iterations", "multires_noise_discount",
    "ip_noise_gamma", "debiased_estimation", "max_token_length", "loss_type", "huber_schedule", "huber_c",
    "huber_scale",
    "v_pred_like_loss", "scale_v_pred_loss_like_noise_pred", "masked_loss",
    "noise_offset_random_strength", "ip_noise_gamma_random_strength", "adaptive_noise_scale",
    "validation_seed", "validation_split", "max_validation_steps", "validate_every_n_epochs",
    "validate_every_n_steps", "resize_interpolation",
)
FIELDS = NETWORK_FIELDS + TRAINING_FIELDS

#: lorakit's package version, under a key of its own (``lorakit_version`` is never anything else)
VERSION_KEY = "lorakit_version"


def base_model_fields(family: str, prediction_type: str) -> dict[str, Any]:
    """``ss_metadata`` arguments that name the base model as kohya does: ``base_model_version`` "sd_v1" or "sd_v2"
    (``family`` "sd1" / "sd2"), with "_v" for a v-prediction model (kohya's ``get_model_version_str_for_sd1_sd2``),
    or SDXL's "sdxl_base_v1-0" (kohya's SDXL scripts write it whatever the model predicts); and ``v2``."""
    if family == "sdxl":
        return {"base_model_version": "sdxl_base_v1-0", "v2": False}
    version = {"sd1": "sd_v1", "sd2": "sd_v2"}[family] + ("_v" if prediction_type == "v_prediction" else "")
    return {"base_model_version": version, "v2": family == "sd2"}


#: how an adapter was trained to read prompts: kohya's entry, and its value when kohya wrote "None" (not set)
TEXT_SETTINGS = {"clip_skip": ("ss_clip_skip", 1), "max_token_length": ("ss_max_token_length", 75)}
#: kohya's max_token_length: the 75 tokens CLIP reads between BOS and EOS, or 150 / 225 read in chunks of 75
TOKEN_LENGTHS = (75, 150, 225)


def trained_text_setting(metadata: Mapping[str, str], name: str) -> int | None:
    """The clip skip or max token length (``name``) an adapter was trained with, from kohya's ``ss_*`` entry (a
    number, or "None": kohya's default); None when the file does not say.  An SDXL file's clip skip says nothing:
    kohya's SDXL scripts record the option and ignore it (each encoder's penultimate layer is read)."""
    key, default = TEXT_SETTINGS[name]
    value = metadata.get(key)
    if value is None:
        return None
    if name == "clip_skip" and metadata.get("ss_base_model_version", "").startswith("sdxl"):
        return default
    if value == "None":
        return default
    return int(value) if value.isdigit() and int(value) > 0 else None


def metadata_value(value: Any) -> str:
    """A metadata value as kohya writes it."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value)
    return str(value)  # kohya's convention: str(True) == 'True', str(None) == 'None'


def ss_metadata(**fields: Any) -> dict[str, str]:
    """kohya ``ss_*`` entries from keyword arguments (``learning_rate=1e-4, tag_frequency={...}``).

    Unknown names are an error, so a typo does not silently vanish from the file.  ``None`` values are left
    out (pass ``"None"`` to write kohya's spelling of an unset option).
    """
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown training metadata {unknown}; known: {', '.join(FIELDS)}")
    return {f"ss_{k}": metadata_value(v) for k, v in fields.items() if v is not None}


def version_metadata() -> dict[str, str]:
    return {VERSION_KEY: lorakit.__version__}
