"""GLoRA (generalised LoRA, LyCORIS's form): ``ΔW = multiplier · (alpha / rank) · (W0 A + B)`` with two low-rank
pairs, ``A = a1 a2`` (``in × in``, acting on the input side of ``W0``) and ``B = b1 b2`` (a LoRA update).

File keys (LyCORIS) and shapes for ``W0`` of ``(out, in[, kh, kw])``:

==========  =================  ==================
key         Linear             Conv2d k×k
==========  =================  ==================
a1.weight   (in, r)            (in, r, 1, 1)
a2.weight   (r, in)            (r, in, 1, 1)
b1.weight   (out, r)           (out, r, 1, 1)
b2.weight   (r, in)            (r, in, kh, kw)
bm.weight   —                  (r, r, kh, kw), Tucker: b2 is then (r, in, 1, 1)
==========  =================  ==================

plus ``alpha``.  For a conv, ``W0 A`` contracts ``A`` with the input-channel axis of ``W0`` at every kernel
position.  Init (LyCORIS): ``a1``, ``b1`` Kaiming-uniform (a = √5), ``a2``, ``b2`` zeros, so ``ΔW = 0``.

``forward`` never builds ``ΔW``: ``(W0 + γ W0 A + γ B) x = W0 (x + γ a1 a2 x) + γ b1 b2 x``: two rank-r chains
on the input and one pass of the frozen layer (a 1×1 channel mix commutes with the conv, padding included).

LyCORIS's own GLoRA never builds the Tucker core: its constructor sets ``use_tucker = use_tucker and all(k ==
1)`` and then asks for ``use_tucker and any(k != 1)``, which is never true, so ``bm`` is unreachable there and
``make_module_from_state_dict`` cannot load a file that has it.  lorakit reads and writes ``bm`` (the math of
``tucker_weight_from_conv``, as LoRA's ``lora_mid``) when asked with ``use_tucker``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.adapters.base import BaseLayer, alpha_from_file, require
from lorakit.adapters.functional import lora_weight
from lorakit.adapters.lowrank import Factor, LowRankAdapter

_FUSE = (torch.float32, torch.float64)


class GLoRA(LowRankAdapter):
    algorithm = "glora"
    display_name = "GLoRA"
    file_keys = ("a1.weight", "a2.weight")
    rank_keys = ("a2.weight",)
    width_keys = ("a2.weight",)
    tucker_key = "bm.weight"

    def __init__(self, base: BaseLayer, rank: int = 4, alpha: float | None = None, multiplier: float = 1.0, *,
                 use_tucker: bool = False, dropout: float = 0.0, rank_dropout: float = 0.0,
                 rank_dropout_scale: bool = False, module_dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, multiplier, dropout=dropout, rank_dropout=rank_dropout,
                         rank_dropout_scale=rank_dropout_scale, module_dropout=module_dropout)
        r, n_in, n_out, kernel = self.rank, self.in_features, self.out_features, self.kernel_size
        device = base.weight.device
        one = (1, 1) if self.kind == "conv" else ()
        self.tucker = bool(use_tucker) and any(k != 1 for k in kernel)
        self.a1 = Factor(n_in, r, *one, device=device)
        self.a2 = Factor(r, n_in, *one, device=device)
        self.b1 = Factor(n_out, r, *one, device=device)
        if self.tucker:
            self.b2 = Factor(r, n_in, 1, 1, device=device)
            self.bm = Factor(r, r, *kernel, device=device)
            torch.nn.init.kaiming_uniform_(self.bm.weight, a=math.sqrt(5))
        else:
            self.b2 = Factor(r, n_in, *kernel, device=device)
            self.bm = None
        torch.nn.init.kaiming_uniform_(self.a1.weight, a=math.sqrt(5))
        torch.nn.init.kaiming_uniform_(self.b1.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.a2.weight)
        torch.nn.init.zeros_(self.b2.weight)

    def _downs(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``a2``, ``b2`` with the rank dropout of this step on their rank axis (one mask per step, shared by the
        batch, as LyCORIS's)."""
        a2, b2 = self.a2.weight, self.b2.weight
        if train and self.rank_dropout > 0:
            shape = (self.rank,) + (1,) * (a2.dim() - 1)
            a2 = a2 * self._rank_mask(shape, a2)
            b2 = b2 * self._rank_mask((self.rank,) + (1,) * (b2.dim() - 1), b2)
        return a2, b2

    def _update(self, scale: float, train: bool) -> torch.Tensor:
        a2, b2 = self._downs(train)
        n_in, r = self.in_features, self.rank
        w0 = self.original_weight
        a = self.a1.weight.reshape(n_in, r) @ a2.reshape(r, n_in)  # (in, in)
        w0a = torch.einsum("oi...,ij->oj...", w0.to(a.dtype), a)
        b = lora_weight(b2, self.b1.weight, None if self.bm is None else self.bm.weight)
        return (w0a + b.reshape(w0a.shape)) * scale

    def _chain(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None,
               spatial: bool) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(F.linear(x, down), up)
        conv = self.base
        if not spatial:  # the input-side pair: 1×1 convs
            return F.conv2d(F.conv2d(x, down), up)
        if mid is None:
            h = F.conv2d(x, down, None, conv.stride, conv.padding, conv.dilation)
        else:
            h = F.conv2d(F.conv2d(x, down), mid, None, conv.stride, conv.padding, conv.dilation)
        return F.conv2d(h, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return super().forward(x)
        train = self.training
        a2, b2 = self._downs(train)
        scale = self.scale * self.multiplier
        h = x if x.dtype == a2.dtype else x.to(a2.dtype)
        da = self._chain(h, a2, self.a1.weight, None, spatial=False)
        db = self._chain(h, b2, self.b1.weight, None if self.bm is None else self.bm.weight, spatial=True)
        if train and self.module_dropout > 0:
            keep = self._module_keep(da)
            da, db = da * keep, db * keep
        if train and self.dropout > 0:
            da = F.dropout(da, self.dropout, training=True)
            db = F.dropout(db, self.dropout, training=True)
        b0 = self.base.bias
        if x.dtype in _FUSE and x.dtype == da.dtype:
            # W0 (x + γ A x) + b in one pass of the frozen layer
            y = self.frozen_forward(torch.add(x, da, alpha=scale), b0)
        else:  # half precision: x + γ A x would round the update away; the update gets its own pass
            y = self.frozen_forward(x, b0) + self.frozen_forward((da * scale).to(x.dtype), None)
        return torch.add(y, db if db.dtype == y.dtype else db.to(y.dtype), alpha=scale)

    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        for key in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"):
            require(tensors, key, cls.algorithm)
        rank = int(tensors["a2.weight"].shape[0])
        return {"rank": rank, "alpha": alpha_from_file(tensors, rank), "use_tucker": "bm.weight" in tensors}
