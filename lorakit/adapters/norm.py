"""An update of a normalisation layer's own scale and shift: LyCORIS's ``train_norm`` (its ``NormModule``).

``W' = W0 + multiplier · w_norm`` and ``b' = b0 + multiplier · b_norm`` for a LayerNorm or GroupNorm, where ``W0``
and ``b0`` are the layer's learned per-channel scale and shift.  File keys (LyCORIS): ``w_norm`` shaped like the
scale, ``b_norm`` like the shift (absent when the layer has none); no ``alpha``, no rank.  Both start at zero.
A1111 (``network_norm.py``) and ComfyUI add them to the layer's weight and bias exactly so.

A LyCORIS network trained with ``train_norm=True`` carries these beside its LoRA/LoHa/... modules, one per norm
layer of the blocks it adapts; ``lorakit.network.create_network`` places them the same way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import FUSE_DTYPES, Adapter, norm_kind, require

NormLayer = nn.LayerNorm | nn.GroupNorm


class Norm(Adapter):
    algorithm = "norm"
    display_name = "norm layer (train_norm)"
    file_keys = ("w_norm",)
    updates_bias = True
    trains_layers = False

    def __init__(self, base: NormLayer, multiplier: float = 1.0, *, with_bias: bool | None = None,
                 rank_dropout: float = 0.0, rank_dropout_scale: bool = False, module_dropout: float = 0.0) -> None:
        """``with_bias``: whether to update the shift (default: when the layer has one)."""
        super().__init__(base, multiplier, rank_dropout=rank_dropout, rank_dropout_scale=rank_dropout_scale,
                         module_dropout=module_dropout)
        like = base.weight
        self.w_norm = nn.Parameter(torch.zeros(like.shape, dtype=torch.float32, device=like.device))
        if base.bias is not None if with_bias is None else with_bias:
            self.b_norm = nn.Parameter(torch.zeros(like.shape, dtype=torch.float32, device=like.device))
        else:
            self.register_parameter("b_norm", None)

    @staticmethod
    def wrapped_kind(base: nn.Module) -> str:
        return norm_kind(base)

    def _deltas(self, train: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.multiplier
        dw = self.w_norm if m == 1 else self.w_norm * m
        db = self.b_norm if self.b_norm is None or m == 1 else self.b_norm * m
        if train and self.rank_dropout > 0:  # channels, scale and shift together (as LyCORIS)
            keep = self._rank_mask(tuple(dw.shape), dw)
            dw = dw * keep
            db = None if db is None else db * keep
        return dw, db

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
        norm = self.base
        if isinstance(norm, nn.GroupNorm):
            return F.group_norm(x, norm.num_groups, weight, bias, norm.eps)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)

    def _forward_with_delta(self, x: torch.Tensor, dw: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor:
        w0, b0 = self.base.weight, self.base.bias
        if x.dtype == w0.dtype == dw.dtype and w0.dtype in FUSE_DTYPES:
            bias = b0 if db is None else (db if b0 is None else b0 + db)
            return self.base_forward(x, w0 + dw, bias)
        # in half precision W0 + ΔW would round a small update away: the layer is affine in its scale and shift,
        # so the update is the normalised input times ΔW (+ Δb), added to the frozen layer's own output
        y = self.base_forward(x, w0, b0)
        normalised = self.base_forward(x, None, None).to(dw.dtype)
        d = normalised * self._per_channel(dw, x)
        if db is not None:
            d = d + self._per_channel(db, x)
        return y + d.to(y.dtype)

    def _per_channel(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A scale/shift shaped to broadcast over ``x`` (GroupNorm's channels are axis 1, LayerNorm's the last)."""
        if isinstance(self.base, nn.GroupNorm):
            return t.reshape(t.shape + (1,) * (x.dim() - 2))
        return t

    @classmethod
    def file_arguments(cls, base: NormLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        require(tensors, "w_norm", cls.algorithm)
        # a shift update is kept even for a layer without a shift (merging creates one)
        return {"with_bias": "b_norm" in tensors}
