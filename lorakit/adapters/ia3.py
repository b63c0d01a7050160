"""(IA)^3: learned per-channel scales, ``W' = W0 · (1 + multiplier · v)`` (so ``ΔW = multiplier · W0 ⊙ v``).

File keys (LyCORIS): ``weight`` — ``(out,)`` for Linear, ``(1, out, 1, 1)`` for Conv2d (``in`` instead of
``out`` when ``on_input``) — and ``on_input``, a 0-dim integer tensor.  No ``alpha``.  ``v`` starts at zero.

LyCORIS scales the weight only: its merge and its default (non-bypass) training forward leave the bias
alone, and A1111 does the same, so ``delta_bias()`` is ``None``.  (LyCORIS's bypass forward scales the whole
output, bias included; we follow the merge, which is what every reader of the file applies.)

``forward`` never builds ``ΔW``: ``(W0 ⊙ v) x`` is ``v ⊙ (W0 x)`` (rows) or ``W0 (v ⊙ x)`` (input columns), so
the step costs the frozen matmul/conv plus an elementwise scale.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import Adapter, BaseLayer, require
from lorakit.adapters.functional import ia3_weight


class IA3(Adapter):
    algorithm = "ia3"
    display_name = "(IA)³"
    file_keys = ("on_input",)

    def __init__(self, base: BaseLayer, multiplier: float = 1.0, *, on_input: bool = False, dropout: float = 0.0,
                 rank_dropout: float = 0.0, rank_dropout_scale: bool = False,
                 module_dropout: float = 0.0) -> None:
        super().__init__(base, multiplier, dropout=dropout, rank_dropout=rank_dropout,
                         rank_dropout_scale=rank_dropout_scale, module_dropout=module_dropout)
        self.scales_input = bool(on_input)
        size = self.in_features if self.scales_input else self.out_features
        shape = (size,) if self.kind == "linear" else (1, size, 1, 1)
        self.weight = nn.Parameter(torch.zeros(shape, device=base.weight.device))
        # stored as in LyCORIS files: a 0-dim int64 tensor
        self.register_buffer("on_input", torch.tensor(int(self.scales_input), device=base.weight.device))

    def _deltas(self, train: bool) -> tuple[torch.Tensor, None]:
        weight = ia3_weight(self.original_weight, self.weight, self.scales_input, self.multiplier)
        if train and self.rank_dropout > 0:
            weight = weight * self._row_mask(weight)
        return weight, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        train = self.training
        if self.merged or (self.scales_input and train and (self.rank_dropout > 0 or self.dropout > 0)):
            return super().forward(x)  # merged, or row masks / output dropout that need W0 x apart
        # at strength 1 (training) the vector itself: one kernel fewer forward and backward on every layer
        v = self.weight if self.multiplier == 1 else self.weight * self.multiplier
        if train and self.module_dropout > 0:
            v = v * self._module_keep(v)
        if self.scales_input:  # W0 ((1 + v) ⊙ x) + b: one matmul/conv
            if self.kind == "conv":
                v = v.reshape(-1, 1, 1) if x.dim() == 3 else v
            if x.dtype in (torch.float32, torch.float64):
                h = x * (1 + v).to(x.dtype)
            else:  # 1 + v would round a small v away in half precision
                h = x + (x.to(v.dtype) * v).to(x.dtype)
            return self.frozen_forward(h, self.base.bias)
        z = self.frozen_forward(x, None)
        if self.kind == "conv":
            v = v.reshape(-1, 1, 1) if x.dim() == 3 else v
        if train and self.rank_dropout > 0:  # output rows of ΔW
            v = v * self._rank_mask(tuple(v.shape), v)
        bias = self.base.bias
        if bias is not None and self.kind == "conv":
            bias = bias.reshape(-1, 1, 1)
        if z.dtype == v.dtype and z.dtype in (torch.float32, torch.float64) and not (train and self.dropout > 0):
            # b + z ⊙ (1 + v) in one kernel
            return z * (1 + v) if bias is None else torch.addcmul(bias, z, 1 + v)
        d = z * v if z.dtype == v.dtype else z.to(v.dtype) * v
        if train and self.dropout > 0:
            d = F.dropout(d, self.dropout, training=True)
        y = z + d.to(z.dtype)
        return y if bias is None else y + bias

    @classmethod
    def from_file_tensors(cls, base: BaseLayer, tensors: dict[str, torch.Tensor],
                          multiplier: float = 1.0) -> IA3:
        adapter = cls(base, multiplier, **cls.file_arguments(base, tensors))
        adapter._load_file_tensors(tensors, skip=("on_input",))
        return adapter

    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        vector = require(tensors, "weight", cls.algorithm)
        flag = tensors.get("on_input")
        if flag is not None:
            return {"on_input": bool(int(flag.reshape(-1)[0]))}
        # not in the file: the vector's length tells, ties go to LyCORIS's default (outputs)
        return {"on_input": vector.numel() != base.weight.shape[0] and vector.numel() == base.weight.shape[1]}
