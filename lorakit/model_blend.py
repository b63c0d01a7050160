"""One whole model's weights put into another of the same kind: all the way (``lorakit eval`` judging a fine-tuned
model against its base) or a share of the way (``lorakit merge MODEL:0.3``, kohya's merge_models weighted sum).

Every floating-point tensor of the U-Net, the text encoder(s) and the VAE: ``W ← W0 + m·(W_other − W0)``, with
``W0`` the weights as they were before (kept by ``weights_copy``, put back by ``put_back``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.models import BaseModel, load_base_model


class ModelMismatchError(LorakitError, ValueError):
    """The other model is not of the same kind (architecture or prediction type); the message names it."""


def model_parts(model: BaseModel) -> dict[str, nn.Module]:
    """The model's parts by name: "U-Net", "text encoder" (SDXL: "text encoder 1", "text encoder 2"), "VAE"."""
    several = len(model.text_encoders) > 1
    return {"U-Net": model.unet,
            **{f"text encoder{f' {i + 1}' if several else ''}": te for i, te in enumerate(model.text_encoders)},
            "VAE": model.vae}


def weights_copy(model: BaseModel) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every floating-point tensor of the model, by part."""
    return {name: {k: v.detach().clone() for k, v in part.state_dict().items() if v.is_floating_point()}
            for name, part in model_parts(model).items()}


def load_like(path: str | os.PathLike, like: BaseModel) -> BaseModel:
    """The model at ``path`` (a single file or a diffusers folder), refused unless it has ``like``'s tensors, shapes
    and prediction type."""
    other = load_base_model(str(path))
    if other.prediction_type != like.prediction_type:
        raise ModelMismatchError(f"{path} predicts {other.prediction_type}, the base model {like.prediction_type}: "
                                 "their weights mean different things")
    mine, theirs = model_parts(like), model_parts(other)
    if set(mine) != set(theirs):
        raise ModelMismatchError(f"{path} has parts {', '.join(theirs)}, the base model {', '.join(mine)}: "
                                 "not the same architecture")
    for name, part in mine.items():
        their_state = theirs[name].state_dict()
        for key, tensor in part.state_dict().items():
            if key not in their_state or their_state[key].shape != tensor.shape:
                found = tuple(their_state[key].shape) if key in their_state else "nothing"
                raise ModelMismatchError(f"{path}: its {name} has {found} at {key}, the base model "
                                         f"{tuple(tensor.shape)}: not the same architecture")
    return other


@torch.no_grad()
def move_towards(model: BaseModel, other: BaseModel, start: dict[str, dict[str, torch.Tensor]],
                 share: float = 1.0) -> None:
    """``W ← W + share·(W_other − W_start)`` for every tensor of ``start`` (``weights_copy`` of the model before):
    the difference is ``other``'s from the weights as they were, whatever the model holds now."""
    theirs = model_parts(other)
    for name, part in model_parts(model).items():
        their_state = theirs[name].state_dict()
        for key, tensor in part.state_dict().items():
            if key in start[name]:
                base = start[name][key]
                tensor.add_((their_state[key].to(base.dtype) - base).mul_(share).to(tensor.dtype))


@torch.no_grad()
def put_back(model: BaseModel, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    """The weights of ``saved`` (``weights_copy``) copied back into the model."""
    for name, part in model_parts(model).items():
        state = part.state_dict()
        for key, tensor in saved[name].items():
            state[key].copy_(tensor)
