"""OFT: orthogonal fine-tuning, ``W' = R · W0`` with ``R`` block-diagonal orthogonal, so ``ΔW = (R − I) · W0``.

``R`` has ``block_num`` blocks of ``block_size × block_size`` (``block_size · block_num = out``), each the
Cayley transform of a skew-symmetric matrix built from a free parameter ``B`` (``oft_blocks[k]``):
``P = Bᵀ − B``, ``R_k = (I + P)(I − P)⁻¹``.  (LyCORIS writes ``Q = B − Bᵀ``, ``(I + Q)(I − Q)⁻¹`` and applies
its transpose to the weight's row blocks; that transpose is our ``R_k``, so the files mean the same.)  ``B = 0``
gives ``R = I``: a fresh adapter changes nothing.  Rotating the rows of ``W0`` keeps the angles between its
neurons (the hyperspherical energy), which is why people pick OFT for stability.

Options, as LyCORIS's ``diag-oft``:

- ``rank`` is LyCORIS's ``lora_dim``: the largest block size wanted, split as ``factorization(out, rank)``
  (``block_size ≤ block_num``);
- ``constraint`` (file key ``alpha``): when ``> 0``, ``P`` is scaled down so that ``‖P‖_F ≤ constraint · out``
  over all blocks together (LyCORIS's COFT bound); ``0`` means unconstrained;
- ``rescaled`` (file key ``rescale``, ``(out, 1[, 1, 1])``, init ones): ``W' = s ⊙ (R W0)`` row by row.

Multiplier ``m``: ``ΔW = m · (s ⊙ R W0 − W0)`` (linear in ``m`` like every other adapter; without ``rescale``
this is LyCORIS's ``(m R + (1 − m) I) W0 − W0`` exactly; with it, LyCORIS leaves ``s`` unscaled, so the two
agree at ``m = 1`` only).  File keys: ``oft_blocks`` ``(block_num, block_size, block_size)``, ``alpha`` (the
constraint, not a rank scale), optional ``rescale``.

``forward`` never builds ``ΔW``: ``W' x = s ⊙ R (W0 x)``, so it runs the frozen layer and rotates its output
channels block by block (``out · block_size`` multiply-adds per position on top of the frozen layer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import Adapter, AdapterShapeError, BaseLayer, require
from lorakit.adapters.functional import factorization
from lorakit.errors import InvalidValueError


def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """``R = (I + P)(I − P)⁻¹`` with ``P = Bᵀ − B`` for each ``B`` of ``blocks`` (``(..., b, b)``), in float32+.

    ``constraint > 0`` caps ``‖P‖_F`` (over the whole tensor) at ``constraint``; a ``torch.where`` rather than a
    Python ``if`` on the norm keeps it free of data-dependent control flow.
    """
    dtype = torch.promote_types(blocks.dtype, torch.float32)
    b = blocks.to(dtype)
    p = b.transpose(-1, -2) - b
    if constraint > 0:
        norm = torch.linalg.vector_norm(p) + 1e-8  # LyCORIS's epsilon, so the cap is the same
        p = p * torch.where(norm > constraint, constraint / norm, torch.ones_like(norm))
    eye = torch.eye(p.shape[-1], dtype=dtype, device=p.device)
    # (I − P)⁻¹ and (I + P) commute: solve instead of inverting
    return torch.linalg.solve(eye - p, eye + p)


def rotate_rows(r: torch.Tensor, z: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply the block-diagonal ``R`` (``(k, b, b)``) to axis ``axis`` of ``z`` (of size ``k·b``)."""
    k, b, _ = r.shape
    z = z.movedim(axis, -1)
    out = torch.einsum("kij,...kj->...ki", r, z.reshape(*z.shape[:-1], k, b))
    return out.reshape(z.shape).movedim(-1, axis)


class OFT(Adapter):
    algorithm = "oft"
    aliases = ("diag-oft", "diag_oft")  # LyCORIS's module name
    display_name = "OFT"
    file_keys = ("oft_blocks",)
    lycoris_algo = "diag-oft"
    #: a LyCORIS-style ``rank`` (its ``lora_dim``: the block size) is taken by ``make_adapter``
    takes_rank = True
    #: "factorised": rotate the frozen layer's output; "materialised": rotate W0 and run the layer once with
    #: it; "auto": whichever touches fewer values (``factorised_for``)
    forward_path: str = "auto"

    def __init__(self, base: BaseLayer, rank: int = 4, multiplier: float = 1.0, *, constraint: float = 0.0,
                 rescaled: bool = False, block_size: int | None = None, dropout: float = 0.0,
                 rank_dropout: float = 0.0, rank_dropout_scale: bool = False, module_dropout: float = 0.0,
                 alpha: float | None = None) -> None:
        super().__init__(base, multiplier, dropout=dropout, rank_dropout=rank_dropout,
                         rank_dropout_scale=rank_dropout_scale, module_dropout=module_dropout)
        del alpha  # the trainer's rank scale means nothing here; OFT's alpha is the constraint
        if int(rank) < 1:
            raise InvalidValueError(f"rank (OFT block size) must be a positive integer, got {rank}")
        if float(constraint) < 0:
            raise InvalidValueError(f"constraint must be >= 0, got {constraint}")
        self.block_size, self.block_num = self._layout(int(rank), block_size)
        device = base.weight.device
        self.constraint = float(constraint)
        self.register_buffer("alpha", torch.tensor(self.constraint, device=device))
        self._init_blocks(device)
        self.rescaled = bool(rescaled)
        if self.rescaled:
            ones = (1,) * (base.weight.dim() - 1)
            self.rescale = nn.Parameter(torch.ones(self.out_features, *ones, device=device))
        else:
            self.register_parameter("rescale", None)

    def _layout(self, rank: int, block_size: int | None) -> tuple[int, int]:
        if block_size is None:
            return factorization(self.out_features, rank)
        if self.out_features % block_size:
            raise AdapterShapeError(f"oft_blocks: block size {block_size} does not divide the layer's "
                                    f"{self.out_features} output channels")
        return block_size, self.out_features // block_size

    def _init_blocks(self, device: torch.device) -> None:
        b = self.block_size
        self.oft_blocks = nn.Parameter(torch.zeros(self.block_num, b, b, device=device))

    @property
    def bound(self) -> float:
        """The cap on ``‖P‖_F``: LyCORIS multiplies the stored constraint by the output width."""
        return self.constraint * self.out_features

    # ---- R -------------------------------------------------------------------------------------
    def rotation(self) -> torch.Tensor:
        """The blocks ``R_k`` of ``R`` (``(block_num, b, b)``, float32 or wider)."""
        return cayley(self.oft_blocks, self.bound)

    def rotate(self, z: torch.Tensor, axis: int) -> torch.Tensor:
        """``R z`` along ``axis`` (the output channels of ``W0`` or of ``W0 x``)."""
        return rotate_rows(self.rotation(), z, axis)

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``R W`` for a weight ``(out, ...)``: one batched matmul over the blocks of rows, no axis moves."""
        r = self.rotation()
        k, b, _ = r.shape
        return torch.bmm(r, w.reshape(k, b, -1)).reshape(w.shape)

    def _rescale_for(self, axis_last: bool) -> torch.Tensor:
        s = self.rescale.reshape(-1)
        return s if axis_last else s.reshape(-1, *(1,) * (self.base.weight.dim() - 2))

    # ---- ΔW ------------------------------------------------------------------------------------
    def _deltas(self, train: bool) -> tuple[torch.Tensor, None]:
        w0 = self.original_weight
        rotated = self.rotate_weight(w0.to(torch.promote_types(w0.dtype, torch.float32)))
        if self.rescale is not None:
            rotated = rotated * self.rescale
        delta = rotated - w0.to(rotated.dtype)
        if self.multiplier != 1:
            delta = delta * self.multiplier
        if train and self.rank_dropout > 0:
            delta = delta * self._row_mask(delta)
        return delta, None

    # ---- forward: rotate the frozen layer's weight, or its output --------------------------------------
    def factorised_for(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` rotates the layer's output rather than its weight (shapes only).

        R acts on output channels, so rotating W0 (in·k² values per channel) or W0 x (one value per output
        position per channel) gives the same y; the smaller is cheaper, and for a U-Net's convs and attention
        at training batch sizes that is the weight (BOFT: ~1.4x faster per step on the CPU, ~3x in sampling).
        """
        if self.forward_path != "auto":
            return self.forward_path == "factorised"
        return self.base.weight[0].numel() > self.positions(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return super().forward(x)
        train = self.training
        if not self.factorised_for(x) and not (train and self.dropout > 0):  # dropout acts on the output
            return self._weight_rotating_forward(x, train)
        axis = -1 if self.kind == "linear" else (1 if x.dim() == 4 else 0)
        z = self.frozen_forward(x, None)
        zf = z.to(torch.promote_types(z.dtype, torch.float32))
        rotated = self.rotate(zf, axis)
        if self.rescale is not None:
            rotated = rotated * self._rescale_for(axis == -1)
        plain = self.multiplier == 1 and not (train and (self.dropout > 0 or self.rank_dropout > 0
                                                        or self.module_dropout > 0))
        if plain:
            y = rotated
        else:
            d = rotated - zf
            if self.multiplier != 1:
                d = d * self.multiplier
            if train and self.rank_dropout > 0:  # output rows of ΔW
                rows = self._rank_mask((self.out_features,), d)
                d = d * (rows if axis == -1 else rows.reshape(-1, *(1,) * (z.dim() - axis - 1)))
            if train and self.module_dropout > 0:
                d = d * self._module_keep(d)
            if train and self.dropout > 0:
                d = F.dropout(d, self.dropout, training=True)
            y = zf + d
        y = y if y.dtype == z.dtype else y.to(z.dtype)
        bias = self.base.bias
        if bias is None:
            return y
        return y + (bias if axis == -1 else bias.reshape(-1, *(1,) * (z.dim() - axis - 1)))

    def _weight_rotating_forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """``y = (W0 + ΔW) x + b`` with ΔW from ``_deltas`` (multiplier and rank dropout on its rows included)."""
        delta, _ = self._deltas(train)
        if train and self.module_dropout > 0:
            delta = delta * self._module_keep(delta)
        w0 = self.base_weight
        weight = w0.to(delta.dtype) + delta
        return self.base_forward(x, weight if weight.dtype == x.dtype else weight.to(x.dtype), self.base.bias)

    # ---- files ---------------------------------------------------------------------------------
    @classmethod
    def matches(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether a module's tensors are this algorithm's (OFT and BOFT share the key ``oft_blocks``)."""
        return tensors["oft_blocks"].dim() == 3

    def _check_file_fit(self, tensors: dict[str, torch.Tensor], arguments: dict[str, Any]) -> None:
        blocks = tensors["oft_blocks"]  # (blocks, size, size); BOFT's (stages, blocks, size, size)
        if self.block_num != blocks.shape[-3]:
            raise AdapterShapeError(f"oft_blocks: {blocks.shape[-3]} blocks of {blocks.shape[-1]} do not cover "
                                    f"the layer's {self.out_features} output channels")

    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        blocks = require(tensors, "oft_blocks", cls.algorithm)
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            raise AdapterShapeError(f"oft_blocks: shape {tuple(blocks.shape)} is not (blocks, size, size)")
        size = int(blocks.shape[1])
        return {"rank": size, "block_size": size, "constraint": _constraint(tensors), "rescaled": "rescale" in tensors}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, blocks={self.block_num}x{self.block_size}, "
                f"constraint={self.constraint:g}, rescaled={self.rescaled}")


def _constraint(tensors: dict[str, torch.Tensor]) -> float:
    """The stored constraint (LyCORIS writes ``alpha`` as an int64 0 when unconstrained)."""
    alpha = tensors.get("alpha")
    return 0.0 if alpha is None else float(alpha.double().reshape(-1)[0])
