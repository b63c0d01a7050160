"""Another VAE for a base model (kohya's ``--vae``): people train and sample SD1.x with a better autoencoder
than the one a checkpoint ships (``vae-ft-mse-840000-ema-pruned.safetensors`` and its like).

The file may be a VAE alone in the original layout (with or without the ``first_stage_model.`` prefix), a whole
original-layout checkpoint (its VAE is taken), a VAE state dict in diffusers' names, a diffusers VAE folder, or a
pipeline folder with ``vae/``.  It must have the base model's architecture; the base model's scaling factor is
kept (it belongs to the latent space the U-Net was trained in).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from diffusers import AutoencoderKL

from lorakit.models import BaseModel, ModelLoadError, read_checkpoint

_DIFFUSERS_KEY = "encoder.down_blocks."


def load_vae(spec: str | Path, like: AutoencoderKL) -> AutoencoderKL:
    """The VAE in ``spec``, with ``like``'s architecture, dtype and scaling factor (raises ModelLoadError naming
    the file and what does not fit)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        vae = _from_folder(path)
    elif path.is_file():
        vae = _from_file(path, like)
    else:
        raise ModelLoadError(f"{path}: no such VAE file or folder (lorakit never downloads models)")
    for what in ("latent_channels", "block_out_channels", "layers_per_block", "in_channels"):
        # a config read from JSON holds lists where one built in Python holds tuples
        mine, theirs = (list(c[what]) if isinstance(c[what], (list, tuple)) else c[what]
                        for c in (vae.config, like.config))
        if mine != theirs:
            raise ModelLoadError(f"{path}: this VAE does not fit the base model ({what} {mine} here, {theirs} in the "
                                 "model's own VAE); SD1.x, SD2.x and SDXL share one kind of VAE (SDXL's weights "
                                 "and latent scale are its own), and this is another")
    vae.register_to_config(scaling_factor=like.config.scaling_factor)
    if vae.dtype != like.dtype:  # only then: diffusers warns about every .to(dtype=...)
        vae.to(dtype=like.dtype)
    return vae.to(device=like.device).eval().requires_grad_(False)


def use_vae(model: BaseModel, spec: str | Path | None) -> None:
    """Swap ``model``'s VAE for the one in ``spec`` (None: keep its own)."""
    if spec:
        model.vae = load_vae(spec, model.vae)


def _from_folder(path: Path) -> AutoencoderKL:
    subfolder = None if (path / "config.json").is_file() else "vae"
    if subfolder and not (path / "vae" / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a VAE folder (no config.json, and no vae/ with one)")
    try:
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load this VAE folder: {e}") from e


def _from_file(path: Path, like: AutoencoderKL) -> AutoencoderKL:
    tensors, _ = read_checkpoint(path)  # safetensors, or torch.load(weights_only=True): never unpickled
    if any(key.startswith(_DIFFUSERS_KEY) for key in tensors):
        vae = AutoencoderKL.from_config(like.config)
        try:
            vae.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise ModelLoadError(f"{path}: its tensors do not fit an autoencoder of the base model's kind: {e}") from e
        return vae
    with tempfile.TemporaryDirectory() as config:  # diffusers' converter reads the architecture from a folder
        like.save_config(Path(config) / "vae")
        try:
            vae = AutoencoderKL.from_single_file(tensors, config=config, subfolder="vae", local_files_only=True)
        except Exception as e:  # shape mismatches and missing keys surface as assorted errors inside diffusers
            raise ModelLoadError(f"{path}: not a VAE of the base model's kind (nor a checkpoint with one): "
                                 f"{type(e).__name__}: {e}") from e
    empty = [key for key, tensor in vae.state_dict().items() if tensor.is_meta]
    if empty:  # diffusers leaves what the file lacks on the meta device without a word
        raise ModelLoadError(f"{path}: not a whole VAE: {len(empty)} tensors missing, e.g. {empty[0]}")
    return vae


def vae_name(spec: str | Path | None) -> str:
    """What kohya records as ``ss_vae_name``: the file's (or folder's) name, "None" without one."""
    return Path(spec).name if spec else "None"

