"""LoRA for Linear layers and LoCon for Conv2d: ``ΔW = multiplier · (alpha / rank) · B A``.

File keys (kohya/LyCORIS): ``lora_down.weight`` (A), ``lora_up.weight`` (B), ``alpha``; optional
``lora_mid.weight`` (Tucker core) and ``dora_scale``.  Shapes for ``W0`` of ``(out, in[, kh, kw])``:

==============  ==================  ==================  ==================
layer           lora_down           lora_mid            lora_up
==============  ==================  ==================  ==================
Linear          (r, in)             —                   (out, r)
Conv2d k×k      (r, in, kh, kw)     —                   (out, r, 1, 1)
Conv2d Tucker   (r, in, 1, 1)       (r, r, kh, kw)      (out, r, 1, 1)
==============  ==================  ==================  ==================

For a conv, A is a k×k conv with the base layer's stride/padding/dilation and B a 1×1 conv; with Tucker,
A and B are 1×1 and the core carries the kernel.  Init: A (and the core) Kaiming-uniform with a = √5
(as nn.Linear, kohya and LyCORIS), B zeros.  ``forward`` runs the low-rank path and never builds ``ΔW``.
DoRA needs ``‖W0 + γBA‖`` per output row (or input column); its forward gets it from thin products,
``‖W0‖² + 2γ ⟨B, W0 Aᵀ⟩ + γ² ⟨B, B AAᵀ⟩`` row by row, and applies the ratio to the output (or input) of the
low-rank path, so it builds no ``W``-sized tensor with a gradient either (Tucker cores and training-time
dropouts take the materialised path).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.adapters.base import BaseLayer, alpha_from_file, require
from lorakit.adapters.functional import lora_weight
from lorakit.adapters.lowrank import Factor, LowRankAdapter, dora_options

# key names other tools use for the same two matrices (PEFT / diffusers), read as kohya's
_KEY_ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


class LoRA(LowRankAdapter):
    algorithm = "lora"
    aliases = ("locon",)  # LyCORIS's module name
    display_name = "LoRA"
    file_keys = ("lora_up.weight", "lora_down.weight", *_KEY_ALIASES)  # kohya's and PEFT's names
    rank_keys = ("lora_down.weight", "lora_A.weight")
    width_keys = ("lora_down.weight", "lora_A.weight")
    tucker_key = "lora_mid.weight"

    def __init__(self, base: BaseLayer, rank: int = 4, alpha: float | None = None, multiplier: float = 1.0, *,
                 use_tucker: bool = False, dora: bool = False, wd_on_out: bool = False, dropout: float = 0.0,
                 rank_dropout: float = 0.0, rank_dropout_scale: bool = False,
                 module_dropout: float = 0.0, frozen_down: bool = False, use_scalar: bool = False) -> None:
        """``frozen_down``: LoRA-FA (kohya's ``networks.lora_fa``): the down matrix (A, and a Tucker core) keeps
        its random start and only the up matrix learns; the file is an ordinary LoRA.  ``use_scalar``: LyCORIS's
        option: B starts random too, times a trained scalar that starts at 0 (folded into B in the file)."""
        super().__init__(base, rank, alpha, multiplier, dora=dora, wd_on_out=wd_on_out, dropout=dropout,
                         rank_dropout=rank_dropout, rank_dropout_scale=rank_dropout_scale,
                         module_dropout=module_dropout)
        r, n_in, n_out, kernel = self.rank, self.in_features, self.out_features, self.kernel_size
        device = base.weight.device
        # Tucker only means something for a spatial kernel (LyCORIS ignores it on 1×1 convs too)
        self.tucker = bool(use_tucker) and any(k != 1 for k in kernel)
        if self.kind == "linear":
            self.lora_down = Factor(r, n_in, device=device)
            self.lora_up = Factor(n_out, r, device=device)
            self.lora_mid = None
        elif self.tucker:
            self.lora_down = Factor(r, n_in, 1, 1, device=device)
            self.lora_mid = Factor(r, r, *kernel, device=device)
            self.lora_up = Factor(n_out, r, 1, 1, device=device)
        else:
            self.lora_down = Factor(r, n_in, *kernel, device=device)
            self.lora_up = Factor(n_out, r, 1, 1, device=device)
            self.lora_mid = None
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.lora_mid is not None:
            torch.nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        if use_scalar:
            torch.nn.init.kaiming_uniform_(self.lora_up.weight, a=math.sqrt(5))
            self._use_scalar("lora_up", "weight")
        else:
            torch.nn.init.zeros_(self.lora_up.weight)
        self.frozen_down = bool(frozen_down)
        if self.frozen_down:
            for factor in (self.lora_down, self.lora_mid):
                if factor is not None:
                    factor.weight.requires_grad_(False)

    # ---- ΔW ----------------------------------------------------------------------------------
    def _update(self, scale: float, train: bool) -> torch.Tensor:
        up = self.lora_up.weight * scale
        if train and self.rank_dropout > 0:
            # in weight space the rank mask is shared by the batch (the low-rank forward draws one per sample)
            up = up * self._rank_mask((1, self.rank) + (1,) * (up.dim() - 2), up)
        mid = None if self.lora_mid is None else self.lora_mid.weight
        return lora_weight(self.lora_down.weight, up, mid)

    # ---- forward -------------------------------------------------------------------------------
    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` (through the Tucker core when there is one), in the factors' dtype."""
        down = self.lora_down.weight
        h = x if x.dtype == down.dtype else x.to(down.dtype)
        if self.kind == "linear":
            return F.linear(h, down)
        conv = self.base
        if self.lora_mid is None:
            return F.conv2d(h, down, None, conv.stride, conv.padding, conv.dilation)
        return F.conv2d(F.conv2d(h, down), self.lora_mid.weight, None, conv.stride, conv.padding, conv.dilation)

    def _up(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.linear(h, up) if self.kind == "linear" else F.conv2d(h, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dora_scale is not None:
            dropouts = self.training and (self.dropout > 0 or self.rank_dropout > 0 or self.module_dropout > 0)
            if self.merged or self.lora_mid is not None or dropouts:
                return super().forward(x)
            if self.multiplier == 0:  # strength 0 is the base layer, bit for bit
                return self.frozen_forward(x, self.base.bias)
            return self._dora_forward(x)
        if self.merged:
            return super().forward(x)
        y = self.frozen_forward(x, self.base.bias)
        h = self._down(x)
        up, scale = self.lora_up.weight, self.scale * self.multiplier
        if self.training:
            h, up = self._train_dropouts(h, up)
        if self.kind == "linear" and h.dtype == y.dtype:
            # one addmm does B·h, the scale and the residual add: y + scale · h Bᵀ
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.T, alpha=scale)
            return out.reshape(y.shape)
        d = self._up(h, up)
        return torch.add(y, d if d.dtype == y.dtype else d.to(y.dtype), alpha=scale)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear/conv(x, W0 + ΔW)`` for DoRA without building ``W0 + γBA`` (see the module docstring)."""
        magnitude = self.dora_scale
        dtype = torch.promote_types(magnitude.dtype, torch.float32)
        n_out, r, gamma = self.out_features, self.rank, self.scale
        w0 = self.base_weight
        w = w0.reshape(n_out, -1).to(dtype)
        a = self.lora_down.weight.reshape(r, -1).to(dtype)
        b = self.lora_up.weight.reshape(n_out, r).to(dtype)
        eps = torch.finfo(dtype).eps
        if self.wd_on_out:  # one norm per output row
            sq = (w.square().sum(1) + (2 * gamma) * (b * (w @ a.T)).sum(1)
                  + (gamma * gamma) * ((b @ (a @ a.T)) * b).sum(1))
        else:  # one norm per input column (for a conv: per input channel, over its kernel positions)
            sq = (w.square().sum(0) + (2 * gamma) * (a * (b.T @ w)).sum(0)
                  + (gamma * gamma) * (a * ((b.T @ b) @ a)).sum(0))
            sq = sq.reshape(self.in_features, -1).sum(1)
        ratio = magnitude.reshape(-1).to(dtype) / sq.clamp_min(eps * eps).sqrt()
        # strength m: W0 + m·(W' − W0) (A1111, ComfyUI), so W0 is scaled by 1 + m·(ratio − 1) and the update by
        # m·ratio; m = 0 gives the base layer exactly
        m = self.multiplier
        base_ratio = ratio if m == 1 else (ratio - 1) * m + 1
        update_ratio = ratio if m == 1 else ratio * m
        if self.kind == "conv":
            base_ratio, update_ratio = base_ratio.reshape(-1, 1, 1), update_ratio.reshape(-1, 1, 1)
        if self.wd_on_out:  # base_ratio ⊙ W0 x + update_ratio ⊙ γ B A x + b
            z = self.base_forward(x, w0, None)
            d = self._up(self._down(x), self.lora_up.weight)
            z = z if z.dtype == d.dtype else z.to(d.dtype)
            y = z * base_ratio + (gamma * d) * update_ratio
            y = y if y.dtype == x.dtype else y.to(x.dtype)
            bias = self.base.bias
            return y if bias is None else y + (bias if self.kind == "linear" else bias.reshape(-1, 1, 1))
        # W0 (base_ratio ⊙ x) + γ B A (update_ratio ⊙ x) + b
        xd = x.to(dtype)
        h = xd * base_ratio
        y = self.base_forward(h if h.dtype == x.dtype else h.to(x.dtype), w0, self.base.bias)
        hu = h if m == 1 else xd * update_ratio
        d = self._up(self._down(hu), self.lora_up.weight)
        return torch.add(y, d if d.dtype == y.dtype else d.to(y.dtype), alpha=gamma)

    def _train_dropouts(self, h: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kohya's order: dropout on the rank-r activations, then a per-sample rank mask; module dropout
        zeroes the up weight, so nothing here branches on random values."""
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, training=True)
        if self.rank_dropout > 0:
            # one mask per sample, shared over its tokens or pixels; an unbatched input is one sample
            if self.kind == "linear":  # (batch, ..., r), or (r,)
                shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,) if h.dim() > 1 else (self.rank,)
            else:  # (batch, r, h, w), or (r, h, w)
                shape = (h.shape[0], self.rank, 1, 1) if h.dim() == 4 else (self.rank, 1, 1)
            h = h * self._rank_mask(shape, h)
        if self.module_dropout > 0:
            up = up * self._module_keep(up)
        return h, up

    # ---- files ---------------------------------------------------------------------------------
    @classmethod
    def from_file_tensors(cls, base: BaseLayer, tensors: dict[str, torch.Tensor],
                          multiplier: float = 1.0) -> LoRA:
        return super().from_file_tensors(base, {_KEY_ALIASES.get(k, k): v for k, v in tensors.items()}, multiplier)

    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        tensors = {_KEY_ALIASES.get(k, k): v for k, v in tensors.items()}
        rank = require(tensors, "lora_down.weight", cls.algorithm).shape[0]
        require(tensors, "lora_up.weight", cls.algorithm)
        return {"rank": rank, "alpha": alpha_from_file(tensors, rank), "use_tucker": "lora_mid.weight" in tensors,
                **dora_options(base, tensors)}
