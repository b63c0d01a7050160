"""Full (native) fine-tuning stored as a difference: ``ΔW = multiplier · diff``, ``Δb = multiplier · diff_b``.

File keys (LyCORIS): ``diff`` shaped like ``W0``, ``diff_b`` shaped like the bias (only when the layer has
one, or when the file brings one).  No ``alpha``.  Both start at zero.  LyCORIS's FullModule has applied the
multiplier twice in some versions; here it is applied once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.adapters.base import Adapter, BaseLayer, require


class Full(Adapter):
    algorithm = "full"
    display_name = "full (native ΔW)"
    file_keys = ("diff",)
    updates_bias = True

    def __init__(self, base: BaseLayer, multiplier: float = 1.0, *, train_bias: bool = True,
                 dropout: float = 0.0, rank_dropout: float = 0.0, rank_dropout_scale: bool = False,
                 module_dropout: float = 0.0) -> None:
        super().__init__(base, multiplier, dropout=dropout, rank_dropout=rank_dropout,
                         rank_dropout_scale=rank_dropout_scale, module_dropout=module_dropout)
        self.diff = nn.Parameter(torch.zeros_like(base.weight, dtype=torch.float32))
        if train_bias and base.bias is not None:
            self.diff_b = nn.Parameter(torch.zeros_like(base.bias, dtype=torch.float32))
        else:
            self.register_parameter("diff_b", None)

    def _deltas(self, train: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.multiplier
        dw = self.diff if m == 1 else self.diff * m
        db = self.diff_b if self.diff_b is None or m == 1 else self.diff_b * m
        if train and self.rank_dropout > 0:  # output units, weight rows and bias together (as LyCORIS)
            rows = self._rank_mask((dw.shape[0],), dw)
            dw = dw * rows.reshape(-1, *([1] * (dw.dim() - 1)))
            db = None if db is None else db * rows
        return dw, db

    @classmethod
    def from_file_tensors(cls, base: BaseLayer, tensors: dict[str, torch.Tensor],
                          multiplier: float = 1.0) -> Full:
        require(tensors, "diff", cls.algorithm)
        adapter = cls(base, multiplier, train_bias=False)
        if "diff_b" in tensors:  # a bias update is kept even for a layer without bias (merge creates one)
            adapter.diff_b = nn.Parameter(torch.zeros(base.weight.shape[0], device=base.weight.device))
        adapter._load_file_tensors(tensors)
        return adapter

    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        require(tensors, "diff", cls.algorithm)
        return {"train_bias": "diff_b" in tensors}
