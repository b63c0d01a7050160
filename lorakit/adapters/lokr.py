"""LoKr: ``ΔW = multiplier · (alpha / rank) · w1 ⊗ w2`` with ``w1 = C`` small and ``w2 = B A`` (or full).

``out = a·b`` and ``in = c·d`` are split by ``factorization(dim, factor)`` (``functional.py``): the smaller
factor goes to ``w1`` ``(a, c)``, the larger to ``w2`` ``(b, d[, kh, kw])``.  File keys (LyCORIS) and shapes:

- ``lokr_w1`` ``(a, c)``, or ``lokr_w1_a`` ``(a, r)`` + ``lokr_w1_b`` ``(r, c)`` (``decompose_both``);
- ``lokr_w2`` ``(b, d[, kh, kw])`` (full), or ``lokr_w2_a`` ``(b, r)`` + ``lokr_w2_b`` ``(r, d·kh·kw)``, or
  Tucker (k×k convs): ``lokr_w2_a`` ``(r, b)`` (transposed!), ``lokr_w2_b`` ``(r, d)``, ``lokr_t2``
  ``(r, r, kh, kw)``;
- ``alpha``; optional ``dora_scale``.

LyCORIS's rules, kept so that files match: ``w2`` is full when ``full_matrix`` or when
``rank ≥ max(b, d) / 2``; ``w1`` is decomposed only with ``decompose_both`` and ``rank < max(a, c) / 2``;
when both halves are full there is no rank and the scale is 1 (LyCORIS then writes ``alpha = rank``, and
readers ignore alpha).  Init: ``w1`` (or its factors), ``w2_a`` and ``t2`` Kaiming-uniform (a = √5); the
zero factor is ``lokr_w2`` (full) or ``lokr_w2_b``.

``forward`` picks, from the input's shape, the cheaper of two exact paths: ``x ↦ (w1 ⊗ w2) x`` as a
Kronecker-structured chain that never builds ``ΔW`` (``w2`` on each input group, ``w1`` across groups; with a
low-rank ``w2`` the groups are mixed at rank r: ``kron_lowrank_linear``/``kron_lowrank_conv2d``), or ``ΔW``
built and fused into one matmul/conv with ``W0``.  ``bypass=True`` (LyCORIS's ``bypass_mode``) always takes
the chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.adapters.base import (
    AdapterFormatError,
    AdapterShapeError,
    BaseLayer,
    alpha_from_file,
    layer_kind,
    prefer_factorised,
)
from lorakit.adapters.functional import (
    factorization,
    kron_conv2d,
    kron_linear,
    kron_lowrank_conv2d,
    kron_lowrank_linear,
    kron_weight,
    lora_weight,
)
from lorakit.adapters.lowrank import LowRankAdapter, dora_options


@dataclass(frozen=True)
class KronLayout:
    """How ``W (a·b, c·d[, kh, kw])`` is split, and which halves are low-rank."""

    a: int
    b: int
    c: int
    d: int
    w1: str  # "full" | "lowrank"
    w2: str  # "full" | "lowrank" | "tucker"


def kron_layout(out_features: int, in_features: int, kernel: tuple[int, ...], rank: int, factor: int = -1,
                decompose_both: bool = False, full_matrix: bool = False, use_tucker: bool = False,
                unbalanced_factorization: bool = False) -> KronLayout:
    """LyCORIS's choice of factor shapes and modes for a new LoKr module."""
    a, b = factorization(out_features, factor)
    c, d = factorization(in_features, factor)
    if unbalanced_factorization:  # LyCORIS swaps only the output split
        a, b = b, a
    w1 = "lowrank" if decompose_both and not full_matrix and rank < max(a, c) / 2 else "full"
    if full_matrix or rank >= max(b, d) / 2:
        w2 = "full"
    elif use_tucker and any(k != 1 for k in kernel):
        w2 = "tucker"
    else:
        w2 = "lowrank"
    return KronLayout(a, b, c, d, w1, w2)


class LoKr(LowRankAdapter):
    algorithm = "lokr"
    aliases = ("kron",)  # LyCORIS's module name
    display_name = "LoKr"
    file_keys = ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")
    rank_keys = ("lokr_w2_b", "lokr_w1_b")  # none when both halves are full: no rank, scale 1

    def __init__(self, base: BaseLayer, rank: int = 4, alpha: float | None = None, multiplier: float = 1.0, *,
                 factor: int = -1, decompose_both: bool = False, full_matrix: bool = False,
                 use_tucker: bool = False, unbalanced_factorization: bool = False, bypass: bool = False,
                 dora: bool = False, wd_on_out: bool = False, dropout: float = 0.0, rank_dropout: float = 0.0,
                 rank_dropout_scale: bool = False, module_dropout: float = 0.0,
                 layout: KronLayout | None = None, use_scalar: bool = False) -> None:
        """``use_scalar``: LyCORIS's option: the zero-initialised factor (``lokr_w2`` or ``lokr_w2_b``) starts random
        too, and a trained scalar that starts at 0 multiplies the update (folded into ``lokr_w1``/``lokr_w1_a`` in
        the file, as LyCORIS writes it)."""
        layer_kind(base)
        n_out, n_in, *kernel = base.weight.shape
        kernel = tuple(kernel)
        if layout is None:
            layout = kron_layout(n_out, n_in, kernel, int(rank), int(factor), decompose_both, full_matrix,
                                 use_tucker, unbalanced_factorization)
            if layout.w1 == layout.w2 == "full":
                alpha = rank  # as LyCORIS writes it: no rank, scale 1
        super().__init__(base, rank, alpha, multiplier, dora=dora, wd_on_out=wd_on_out, dropout=dropout,
                         rank_dropout=rank_dropout, rank_dropout_scale=rank_dropout_scale,
                         module_dropout=module_dropout)
        self.layout = layout
        self.bypass = bool(bypass)
        a, b, c, d, r = layout.a, layout.b, layout.c, layout.d, self.rank
        device = base.weight.device

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, device=device))

        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
            self.register_parameter(name, None)
        if layout.w1 == "full":
            self.lokr_w1 = param(a, c)
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        else:
            self.lokr_w1_a, self.lokr_w1_b = param(a, r), param(r, c)
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        if layout.w2 == "full":
            self.lokr_w2 = param(b, d, *kernel)
            if use_scalar:
                nn.init.kaiming_uniform_(self.lokr_w2, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lokr_w2)
        else:
            if layout.w2 == "tucker":
                self.lokr_w2_a, self.lokr_w2_b, self.lokr_t2 = param(r, b), param(r, d), param(r, r, *kernel)
                nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            else:
                self.lokr_w2_a, self.lokr_w2_b = param(b, r), param(r, d * math.prod(kernel))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            if use_scalar:
                nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lokr_w2_b)
        if use_scalar:
            self._use_scalar("", "lokr_w1" if layout.w1 == "full" else "lokr_w1_a")

    @property
    def scale(self) -> float:
        """``alpha / rank``, or 1 when both halves are full (no rank: LyCORIS and ComfyUI ignore alpha)."""
        if self.layout.w1 == "full" and self.layout.w2 == "full":
            return 1.0
        return self._alpha_value / self.rank

    # ---- the two halves --------------------------------------------------------------------------
    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:
        """``(b, d[, kh, kw])``."""
        if self.lokr_w2 is not None:
            return self.lokr_w2
        lay, kernel = self.layout, self.kernel_size
        if self.lokr_t2 is not None:  # core (r, r, kh, kw), w2_a (r, b), w2_b (r, d)
            return torch.einsum("ijhw,ib,jd->bdhw", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return lora_weight(self.lokr_w2_b, self.lokr_w2_a).reshape(lay.b, lay.d, *kernel)

    def _update(self, scale: float, train: bool) -> torch.Tensor:
        weight = kron_weight(self._w1(), self._w2(), scale)
        if train and self.rank_dropout > 0:
            weight = weight * self._row_mask(weight)
        return weight

    # ---- forward -------------------------------------------------------------------------------
    def factorised_for(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` takes the Kronecker chain (a function of shapes only)."""
        if self.kind == "conv" and x.dim() != 4:
            return False  # the chain regroups batched (N, C, H, W) inputs only
        if self.forward_path != "auto":
            return self.forward_path == "factorised"
        if self.bypass:
            return True
        lay, r, k = self.layout, self.rank, math.prod(self.kernel_size)
        n_out, n_in = self.out_features, self.in_features
        if lay.w2 == "full":
            per_position = n_in * k * lay.b + n_out * lay.c
        elif lay.w2 == "tucker":
            per_position = r * n_in + r * r * k * lay.c + r * lay.a * lay.c + r * n_out
        else:
            per_position = r * n_in * k + r * lay.a * lay.c + r * n_out
        size = n_out * n_in * k
        # building ΔW: the Kronecker product forward, the gradients of both halves backward (~4·size)
        return prefer_factorised(self.positions(x), per_position, 4 * size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.dora_scale is not None or not self.factorised_for(x):
            return super().forward(x)
        y = self.frozen_forward(x, self.base.bias)
        w1 = self._w1() * (self.scale * self.multiplier)  # the scale rides on the smallest tensor
        train = self.training
        if train and self.module_dropout > 0:
            w1 = w1 * self._module_keep(w1)
        dtype = (self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_b).dtype
        h = x if x.dtype == dtype else x.to(dtype)
        conv = self.base
        if self.lokr_w2 is not None:
            if self.kind == "linear":
                d = kron_linear(h, w1, self.lokr_w2)
            else:
                d = kron_conv2d(h, w1, self.lokr_w2, conv.stride, conv.padding, conv.dilation)
        elif self.kind == "linear":
            d = kron_lowrank_linear(h, w1, self.lokr_w2_a, self.lokr_w2_b)
        elif self.lokr_t2 is not None:  # Tucker: w2_a (r, b) and w2_b (r, d) are stored transposed
            d = kron_lowrank_conv2d(h, w1, self.lokr_w2_a.T, self.lokr_w2_b[:, :, None, None], self.lokr_t2,
                                    conv.stride, conv.padding, conv.dilation)
        else:
            kernel = self.lokr_w2_b.reshape(self.rank, self.layout.d, *self.kernel_size)
            d = kron_lowrank_conv2d(h, w1, self.lokr_w2_a, kernel, None, conv.stride, conv.padding, conv.dilation)
        return self._add_factorised_update(y, d, train)

    # ---- files ---------------------------------------------------------------------------------
    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        layer_kind(base)  # a clear error for layers adapters cannot wrap
        n_out, n_in, *kernel = base.weight.shape
        layout, rank = _layout_from_file(tensors, n_out, n_in, tuple(kernel))
        # with both halves full there is no rank: the scale is 1 whatever alpha says; keep alpha for the file
        return {"rank": rank, "alpha": alpha_from_file(tensors, rank), "layout": layout, **dora_options(base, tensors)}


def _layout_from_file(tensors: dict[str, torch.Tensor], n_out: int, n_in: int,
                      kernel: tuple[int, ...]) -> tuple[KronLayout, int]:
    """Read the factor shapes and modes from a file's keys; check that ``w1 ⊗ w2`` covers the layer.

    Errors name the keys the offending sizes were read from.
    """
    ranks = []
    if "lokr_w1" in tensors:
        w1, (a, c), a_key, c_key = "full", tensors["lokr_w1"].shape[:2], "lokr_w1", "lokr_w1"
    elif "lokr_w1_a" in tensors and "lokr_w1_b" in tensors:
        w1, a, c = "lowrank", tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]
        a_key, c_key = "lokr_w1_a", "lokr_w1_b"
        ranks.append(("lokr_w1_b", tensors["lokr_w1_b"].shape[0]))
    else:
        raise AdapterFormatError(f"lokr_w1: missing (nor lokr_w1_a + lokr_w1_b), found {sorted(tensors)}")
    if "lokr_w2" in tensors:
        w2, (b, d), b_key, d_key = "full", tensors["lokr_w2"].shape[:2], "lokr_w2", "lokr_w2"
    elif "lokr_w2_a" in tensors and "lokr_w2_b" in tensors:
        w2_a, w2_b = tensors["lokr_w2_a"], tensors["lokr_w2_b"]
        b_key, d_key = "lokr_w2_a", "lokr_w2_b"
        ranks.append(("lokr_w2_b", w2_b.shape[0]))
        if "lokr_t2" in tensors:  # Tucker: w2_a is (r, b)
            w2, b, d = "tucker", w2_a.shape[1], w2_b.shape[1]
        else:
            columns, k = w2_b.shape[1], math.prod(kernel)
            if columns % k:
                raise AdapterShapeError(f"lokr_w2_b: shape {tuple(w2_b.shape)} does not fit a {kernel} kernel")
            w2, b, d = "lowrank", w2_a.shape[0], columns // k
    else:
        raise AdapterFormatError(f"lokr_w2: missing (nor lokr_w2_a + lokr_w2_b), found {sorted(tensors)}")
    if a * b != n_out:
        raise AdapterShapeError(f"{a_key}/{b_key}: {a} × {b} output rows, the layer has {n_out}")
    if c * d != n_in:
        raise AdapterShapeError(f"{c_key}/{d_key}: {c} × {d} input columns, the layer has {n_in}")
    if len({r for _, r in ranks}) > 1:
        raise AdapterShapeError(f"{ranks[0][0]}/{ranks[1][0]}: the two halves have different ranks {ranks}")
    rank = ranks[0][1] if ranks else 1
    return KronLayout(a, b, c, d, w1, w2), int(rank)
