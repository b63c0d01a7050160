"""LoHa: ``ΔW = multiplier · (alpha / rank) · (w1_a w1_b) ⊙ (w2_a w2_b)`` (rank of ΔW up to r²).

File keys (LyCORIS): ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``alpha``; Tucker variant for
k×k convs adds ``hada_t1``, ``hada_t2``; optional ``dora_scale``.  Shapes for ``W0`` of ``(out, in[, kh, kw])``:

- plain (Linear and convs): ``w*_a`` ``(out, r)``, ``w*_b`` ``(r, in·kh·kw)`` (conv kernels flattened);
- Tucker: ``w*_a`` ``(r, out)`` (transposed!), ``w*_b`` ``(r, in)``, ``t*`` ``(r, r, kh, kw)``.

Init (LyCORIS): ``w1_b``, ``w2_b`` normal std 1; ``w1_a`` normal std 0.1; ``w2_a`` zeros (ΔW = 0);
Tucker cores normal std 0.1.  ``ΔW`` is built through a custom autograd function that rebuilds the two
full-size products in backward instead of storing them.

``forward`` picks, from the input's shape, the cheaper of two exact paths: the Hadamard product of two
rank-r matrices is the rank-r² product ``U V`` of their row-wise Khatri-Rao factors
(``functional.loha_factors``), applied to the input as two thin matmuls/convs without building ``ΔW``
(cheap when few positions meet a large kernel: the deep levels of a U-Net), or ``ΔW`` materialised and
fused into one matmul/conv with ``W0`` (cheap when many positions meet a small weight).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import (
    AdapterShapeError,
    BaseLayer,
    alpha_from_file,
    prefer_factorised,
    require,
)
from lorakit.adapters.functional import loha_chain, loha_factors, loha_weight
from lorakit.adapters.lowrank import LowRankAdapter, dora_options


class LoHa(LowRankAdapter):
    algorithm = "loha"
    display_name = "LoHa"
    file_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    rank_keys = ("hada_w1_b",)
    width_keys = ("hada_w1_b",)
    tucker_key = "hada_t1"

    def __init__(self, base: BaseLayer, rank: int = 4, alpha: float | None = None, multiplier: float = 1.0, *,
                 use_tucker: bool = False, dora: bool = False, wd_on_out: bool = False, dropout: float = 0.0,
                 rank_dropout: float = 0.0, rank_dropout_scale: bool = False,
                 module_dropout: float = 0.0, use_scalar: bool = False) -> None:
        """``use_scalar``: LyCORIS's option: ``hada_w2_a`` starts random too, and a trained scalar that starts at 0
        multiplies the update (folded into ``hada_w1_a`` in the file, as LyCORIS writes it)."""
        super().__init__(base, rank, alpha, multiplier, dora=dora, wd_on_out=wd_on_out, dropout=dropout,
                         rank_dropout=rank_dropout, rank_dropout_scale=rank_dropout_scale,
                         module_dropout=module_dropout)
        r, n_in, n_out, kernel = self.rank, self.in_features, self.out_features, self.kernel_size
        device = base.weight.device
        self.tucker = bool(use_tucker) and any(k != 1 for k in kernel)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, device=device))

        if self.tucker:
            self.hada_w1_a, self.hada_w1_b = param(r, n_out), param(r, n_in)
            self.hada_w2_a, self.hada_w2_b = param(r, n_out), param(r, n_in)
            self.hada_t1, self.hada_t2 = param(r, r, *kernel), param(r, r, *kernel)
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            columns = n_in * math.prod(kernel)
            self.hada_w1_a, self.hada_w1_b = param(n_out, r), param(r, columns)
            self.hada_w2_a, self.hada_w2_b = param(n_out, r), param(r, columns)
            self.register_parameter("hada_t1", None)
            self.register_parameter("hada_t2", None)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        if use_scalar:
            nn.init.normal_(self.hada_w2_a, std=0.1)
            self._use_scalar("", "hada_w1_a")
        else:
            nn.init.zeros_(self.hada_w2_a)

    def _update(self, scale: float, train: bool) -> torch.Tensor:
        weight = loha_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                             self.hada_t1, self.hada_t2, scale).reshape(self.weight_shape)
        if train and self.rank_dropout > 0:
            weight = weight * self._row_mask(weight)
        return weight

    # ---- forward ---------------------------------------------------------------------------------
    def factorised_for(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` takes the rank-r² path (a function of shapes only)."""
        if self.forward_path != "auto":
            return self.forward_path == "factorised"
        r2, n_out, n_in, k = self.rank ** 2, self.out_features, self.in_features, math.prod(self.kernel_size)
        per_position = r2 * (n_in + r2 * k + n_out) if self.tucker else r2 * (n_in * k + n_out)
        size = n_out * n_in * k
        # building ΔW: two rank-r products forward, rebuilt and differentiated backward (~8 r·size), plus about
        # six W-sized elementwise passes, each worth ~10 multiply-adds (measured on the CPU: 64·size)
        return prefer_factorised(self.positions(x), per_position, (8 * self.rank + 64) * size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.dora_scale is not None or not self.factorised_for(x):
            return super().forward(x)
        if self._plain_chain(x):
            base = self.base
            conv = None if self.kind == "linear" else (list(base.stride), list(base.padding), list(base.dilation))
            return loha_chain(x, self.base_weight, base.bias, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a,
                              self.hada_w2_b, self.scale * self.multiplier, conv)
        y = self.frozen_forward(x, self.base.bias)
        u, v, core = loha_factors(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                                  self.hada_t1, self.hada_t2)
        u = u * (self.scale * self.multiplier)
        train = self.training
        if train and self.module_dropout > 0:
            u = u * self._module_keep(u)
        h = x if x.dtype == v.dtype else x.to(v.dtype)
        if self.kind == "linear":
            d = F.linear(F.linear(h, v), u)
        else:
            conv = self.base
            if core is None:
                h = F.conv2d(h, v.reshape(v.shape[0], *self.weight_shape[1:]), None, conv.stride, conv.padding,
                             conv.dilation)
            else:
                h = F.conv2d(F.conv2d(h, v[:, :, None, None]), core, None, conv.stride, conv.padding,
                             conv.dilation)
            d = F.conv2d(h, u[:, :, None, None])
        return self._add_factorised_update(y, d, train)

    def _plain_chain(self, x: torch.Tensor) -> bool:
        """Whether the factorised forward can run as ``functional.loha_chain`` (no Tucker core)."""
        return not self.tucker and self._chain_applies(x, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a,
                                                       self.hada_w2_b)

    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        for key in cls.file_keys:
            require(tensors, key, cls.algorithm)
        rank = tensors["hada_w1_b"].shape[0]
        tucker = "hada_t1" in tensors
        if tucker != ("hada_t2" in tensors):
            raise AdapterShapeError("hada_t1/hada_t2: a Tucker LoHa needs both cores")
        return {"rank": rank, "alpha": alpha_from_file(tensors, rank), "use_tucker": tucker,
                **dora_options(base, tensors)}
