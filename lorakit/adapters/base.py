"""The adapter protocol every algorithm of the LoRA family implements.

An adapter wraps one frozen base layer (``nn.Linear`` or ``nn.Conv2d``) holding ``W0`` (+ bias) and adds a
trained update ``ΔW``.  Everything else in lorakit (CS-Fluctuation, merging, block weights, SVD extraction,
file I/O) talks to adapters only through this class:

- ``delta_weight()``: ``ΔW`` shaped like ``W0``, the scale (``multiplier * alpha / rank``) included;
- ``delta_bias()``: the update of the bias, or ``None`` (only (IA)^3 on outputs and ``full`` have one);
- ``forward(x)``: equals ``F.linear/F.conv2d(x, W0 + delta_weight(), b + delta_bias())``; each algorithm
  picks its cheapest correct path;
- ``merge()`` / ``unmerge()``: bake the update into the base layer and take it out again;
- ``file_tensors()`` / ``from_file_tensors()``: the tensors under one module prefix of a kohya/LyCORIS
  ``.safetensors`` file (``lora_down.weight``, ``hada_w1_a``, ``alpha``, ...), both ways.

Parameters and buffers of an adapter are named exactly as the keys of the file format, so
``file_tensors()`` is the adapter's own state minus the base layer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

BaseLayer = nn.Linear | nn.Conv2d


class AdapterShapeError(ValueError):
    """A tensor does not fit the layer it is meant for (the message names the key and both shapes)."""


def layer_kind(base: nn.Module) -> str:
    """'linear' or 'conv' for the layers adapters can wrap; a clear error for anything else."""
    if isinstance(base, nn.Linear):
        return "linear"
    if isinstance(base, nn.Conv2d):
        return "conv"
    raise TypeError(f"adapters wrap nn.Linear or nn.Conv2d layers, not {type(base).__name__}")


class Adapter(nn.Module):
    """Base class: a frozen layer plus an update ``ΔW``.  Subclasses implement ``delta_weight``.

    Subclasses set ``algorithm`` (the name used in files and on the command line) and ``file_keys``
    (the tensor names, relative to the module prefix, by which a file is recognised as theirs).
    """

    algorithm: ClassVar[str] = ""
    #: keys whose presence identifies this algorithm in a file (any one of them is enough)
    file_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: BaseLayer, multiplier: float = 1.0) -> None:
        super().__init__()
        self.kind = layer_kind(base)
        base.requires_grad_(False)
        self.base = base
        # a plain float: changing it at run time must not trigger recompilation or autograd bookkeeping
        self.multiplier = float(multiplier)
        self.merged = False

    # ---- the layer being adapted -------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def base_bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features if self.kind == "linear" else self.base.in_channels

    @property
    def out_features(self) -> int:
        return self.base.out_features if self.kind == "linear" else self.base.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return () if self.kind == "linear" else tuple(self.base.kernel_size)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's operation with another weight (stride, padding, ... of the base layer)."""
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        conv = self.base
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    # ---- the protocol ------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` shaped like ``W0``, scale and multiplier included."""
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        """The update of the bias, or ``None`` when the algorithm leaves the bias alone."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path: materialise ``ΔW``.  Algorithms override it with something cheaper."""
        if self.merged:
            return self.base(x)
        weight = self.base_weight + self.delta_weight().to(self.base_weight.dtype)
        bias = self.base_bias
        delta_b = self.delta_bias()
        if delta_b is not None:
            bias = delta_b.to(weight.dtype) if bias is None else bias + delta_b.to(bias.dtype)
        return self.base_forward(x, weight, bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base layer; ``forward`` then runs the base layer alone."""
        if self.merged:
            return
        self._merged_delta = self.delta_weight().to(self.base_weight.dtype)
        self._merged_delta_bias = self.delta_bias()
        self.base_weight.add_(self._merged_delta)
        if self._merged_delta_bias is not None:
            self._add_to_bias(self._merged_delta_bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take out exactly what ``merge`` added (the multiplier may have changed since)."""
        if not self.merged:
            return
        self.base_weight.sub_(self._merged_delta)
        if self._merged_delta_bias is not None:
            self._add_to_bias(-self._merged_delta_bias)
        del self._merged_delta, self._merged_delta_bias
        self.merged = False

    def _add_to_bias(self, delta: torch.Tensor) -> None:
        if self.base.bias is None:
            self.base.bias = nn.Parameter(torch.zeros_like(delta, dtype=self.base_weight.dtype),
                                          requires_grad=False)
        self.base.bias.add_(delta.to(self.base.bias.dtype))

    # ---- files -------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors under the key names of the file format, detached, on their device."""
        return {k: v.detach() for k, v in self.state_dict().items() if not k.startswith("base.")}

    @classmethod
    def from_file_tensors(cls, base: BaseLayer, tensors: dict[str, torch.Tensor],
                          multiplier: float = 1.0) -> Adapter:
        """Build an adapter over ``base`` from the tensors of one module in a file.

        Raises ``AdapterShapeError`` naming the key when a tensor does not fit ``base``.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"algorithm={self.algorithm}, multiplier={self.multiplier}, merged={self.merged}"


def check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ``AdapterShapeError`` naming ``key`` when ``tensor`` is not of shape ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise AdapterShapeError(f"{key}: shape {tuple(tensor.shape)} does not fit the layer, "
                                f"expected {tuple(expected)}")


def alpha_from_file(tensors: dict[str, torch.Tensor], rank: int) -> float:
    """kohya/LyCORIS convention: a missing or zero ``alpha`` means ``alpha = rank`` (scale 1)."""
    alpha = tensors.get("alpha")
    if alpha is None:
        return float(rank)
    value = float(alpha.float().reshape(-1)[0])
    return float(rank) if value == 0 else value
