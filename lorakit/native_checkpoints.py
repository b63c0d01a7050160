"""A native fine-tuning run's checkpoint (``checkpoints/epoch-NNNN/trained.safetensors`` of ``--method native``): the
trained U-Net parameters under their diffusers names, and the text encoder's under ``TEXT_ENCODER_PREFIX`` where it
trained too (SDXL's second under ``text_encoder_2.``).  Not a model a client loads: ``lorakit eval`` applies it to
the base model, ``lorakit merge`` bakes it into a whole model file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lorakit.checkpoint_names import METHOD_KEY, TEXT_ENCODER_PREFIXES
from lorakit.errors import LorakitError


class NativeCheckpointError(LorakitError, ValueError):
    """A native checkpoint that cannot be read, or does not fit the model; the message names the file."""


def is_native_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a native fine-tuning checkpoint, from its header's metadata (nothing else is read)."""
    from lorakit.file_kinds import read_header

    try:
        return read_header(path)[1].get(METHOD_KEY) == "native"
    except Exception:  # not safetensors, missing, truncated: not one
        return False


TextEncoders = torch.nn.Module | Sequence[torch.nn.Module]


def model_parameters(unet: torch.nn.Module, text_encoders: TextEncoders) -> dict[str, torch.nn.Parameter]:
    """Every parameter a native checkpoint may hold, under the name it has there (``text_encoders``: the model's
    one, or SDXL's two)."""
    encoders = [text_encoders] if isinstance(text_encoders, torch.nn.Module) else list(text_encoders)
    return {**dict(unet.named_parameters()),
            **{f"{prefix}{n}": p for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, encoders, strict=False)
               for n, p in encoder.named_parameters()}}


def read_native_checkpoint(path: str | os.PathLike, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, each checked against the parameter of that name and shape in ``params``
    (``model_parameters``)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own error types
        raise NativeCheckpointError(f"{path}: cannot be read as safetensors: {err}") from None
    for name, value in tensors.items():
        if name not in params:
            raise NativeCheckpointError(f"{path}: does not fit the base model: {name!r} is no U-Net or text-encoder "
                                        "parameter")
        if tuple(params[name].shape) != tuple(value.shape):
            raise NativeCheckpointError(f"{path}: does not fit the base model: {name!r} has shape "
                                        f"{tuple(value.shape)}, the model's {tuple(params[name].shape)}")
    return tensors


@torch.no_grad()
def apply_native_checkpoint(path: str | os.PathLike, unet: torch.nn.Module, text_encoder: TextEncoders,
                            multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """Put the checkpoint's weights into the model: ``W0 + multiplier·(W − W0)`` (1: the trained weights exactly,
    0.5: halfway from the base model).  Returns the replaced base weights, to put back with ``restore``."""
    params = model_parameters(unet, text_encoder)
    tensors = read_native_checkpoint(path, params)
    saved = {n: params[n].detach().clone() for n in tensors}
    for name, value in tensors.items():
        target = value.to(params[name].dtype)
        if multiplier != 1.0:  # in float32: a half-precision base would round the difference away
            base = saved[name].float()
            target = (base + multiplier * (value.float() - base)).to(params[name].dtype)
        params[name].copy_(target)
    return saved


@torch.no_grad()
def restore(saved: dict[str, torch.Tensor], unet: torch.nn.Module, text_encoder: TextEncoders) -> None:
    """Put back the base weights ``apply_native_checkpoint`` returned."""
    params = model_parameters(unet, text_encoder)
    for name, value in saved.items():
        params[name].copy_(value)
