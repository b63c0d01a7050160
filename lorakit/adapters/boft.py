"""BOFT: butterfly orthogonal fine-tuning, ``W' = s ⊙ (R_m ⋯ R_1) W0`` with each ``R_i`` a block-diagonal orthogonal
matrix acting on the channels in a butterfly order, so ``ΔW = s ⊙ B W0 − W0`` with ``B = R_m ⋯ R_1``.

Stage ``i`` (``0 ≤ i < m``) pairs channels ``2^i · b/2`` apart: the ``out`` channels, seen as ``(groups, 2, k)``
with ``k = 2^i · b/2``, are reordered to ``(groups, k, 2)``, cut into ``block_num`` blocks of ``b``, each
rotated by its own Cayley block, and put back in order.  ``m`` stages of ``b × b`` blocks reach every channel
(``block_num`` a power of two, ``m = log2(block_num) + 1``): a dense orthogonal ``B`` from ``m · out · b``
parameters, where OFT's single stage mixes only within blocks.

Sizes, as LyCORIS's ``boft``: ``rank`` (its ``lora_dim``) bounds the block size ``b``, the largest even divisor
of ``out`` with ``b ≤ rank`` and ``out / b`` a power of two (none: the layer cannot take BOFT at that rank).
File keys: ``oft_blocks`` ``(m, block_num, b, b)`` (four axes; OFT's have three), ``alpha`` (the constraint,
``‖P‖_F ≤ alpha · out`` over all stages together), optional ``rescale`` ``(out, 1[, 1, 1])``.

Each Cayley block is LyCORIS's ``(I + Q)(I − Q)⁻¹`` with ``Q = B − Bᵀ`` applied as is (its OFT module applies
the transpose; see ``oft.py``).  Multiplier ``m``: ``ΔW = m · (s ⊙ B W0 − W0)``, linear as every adapter's;
LyCORIS interpolates each stage toward the identity instead (``m R_i + (1 − m) I``), which agrees at
``m = 1``.  ``forward`` runs the frozen layer and applies the butterfly to its output channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.adapters.base import AdapterShapeError, BaseLayer, require
from lorakit.adapters.oft import OFT, _constraint, cayley, rotate_rows
from lorakit.errors import InvalidValueError


def butterfly_split(dimension: int, rank: int = -1) -> tuple[int, int] | None:
    """``(block_size, block_num)``: the largest even ``b ≤ rank`` dividing ``dimension`` with ``dimension / b`` a
    power of two (``rank = -1``: no bound); ``None`` when there is none (LyCORIS's ``power2factorization``)."""
    bound = dimension if rank < 0 else rank
    best = None
    for b in range(2, min(bound, dimension) + 1, 2):
        n = dimension // b
        if dimension % b == 0 and n & (n - 1) == 0:
            best = b
    return None if best is None else (best, dimension // best)


def butterfly_stages(block_num: int) -> int:
    """Stages needed to connect ``block_num`` blocks: one more than the bits of ``block_num − 1``."""
    return bin(block_num - 1).count("1") + 1


def apply_butterfly(rotations: torch.Tensor, z: torch.Tensor, axis: int) -> torch.Tensor:
    """``R_m ⋯ R_1 z`` along ``axis``; ``rotations`` is ``(m, block_num, b, b)``."""
    b = rotations.shape[-1]
    z = z.movedim(axis, -1)
    for i in range(rotations.shape[0]):
        k = 2 ** i * (b // 2)
        z = z.unflatten(-1, (-1, 2, k)).transpose(-1, -2).flatten(-3)  # channel pairs k apart become neighbours
        z = rotate_rows(rotations[i], z, -1)
        z = z.unflatten(-1, (-1, k, 2)).transpose(-1, -2).flatten(-3)  # back to the channel order
    return z.movedim(-1, axis)


class BOFT(OFT):
    algorithm = "boft"
    aliases = ("butterfly-oft",)
    display_name = "BOFT"
    file_keys = ("oft_blocks",)
    lycoris_algo = "boft"

    def __init__(self, base: BaseLayer, rank: int = 8, multiplier: float = 1.0, *, stages: int | None = None,
                 **options) -> None:
        self._stages = stages
        super().__init__(base, rank, multiplier, **options)

    def _layout(self, rank: int, block_size: int | None) -> tuple[int, int]:
        split = butterfly_split(self.out_features, rank if block_size is None else block_size)
        if split is None or (block_size is not None and split[0] != block_size):
            raise InvalidValueError(f"BOFT cannot split the {self.out_features} output channels of this layer "
                                    f"into even blocks of at most {rank} whose count is a power of two")
        return split

    def _init_blocks(self, device: torch.device) -> None:
        most = butterfly_stages(self.block_num)
        stages = most if self._stages is None else int(self._stages)
        if not 1 <= stages <= most:
            raise AdapterShapeError(f"oft_blocks: {stages} butterfly stages, this layer takes 1 to {most}")
        b = self.block_size
        self.stages = stages
        self.oft_blocks = nn.Parameter(torch.zeros(stages, self.block_num, b, b, device=device))

    def rotation(self) -> torch.Tensor:
        """The Cayley blocks of every stage, ``(m, block_num, b, b)``, as LyCORIS applies them."""
        return cayley(self.oft_blocks.transpose(-1, -2), self.bound)

    def rotate(self, z: torch.Tensor, axis: int) -> torch.Tensor:
        return apply_butterfly(self.rotation(), z, axis)

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``B W`` for a weight ``(out, ...)``, as ``apply_butterfly`` along axis 0 but with each stage's channel
        shuffle done as one row gather (the shuffle back and the next stage's shuffle composed into one):
        ~3 ops per stage instead of ~12, which is most of a BOFT step's cost on small layers."""
        r = self.rotation()
        gathers = self._row_gathers(w.device)
        flat = w.reshape(self.out_features, -1)
        for i in range(r.shape[0]):
            flat = flat.index_select(0, gathers[i])
            flat = torch.bmm(r[i], flat.reshape(self.block_num, self.block_size, -1)).reshape(flat.shape)
        return flat.index_select(0, gathers[-1]).reshape(w.shape)

    def _row_gathers(self, device: torch.device) -> list[torch.Tensor]:
        """Row indices: entry i (i < m) takes rows from stage i−1's order (the channel order for i = 0) into
        stage i's; the last entry takes stage m−1's order back to the channel order."""
        cached = getattr(self, "_gathers", None)
        if cached is None or cached[0].device != device:
            channels = torch.arange(self.out_features)
            b = self.block_size
            orders = [channels.unflatten(0, (-1, 2, 2 ** i * (b // 2))).transpose(-1, -2).flatten()
                      for i in range(self.stages)]  # stage i's order: row j holds channel orders[i][j]
            inverses = [torch.argsort(o) for o in orders]
            cached = [orders[0]] + [inverses[i - 1][orders[i]] for i in range(1, self.stages)] + [inverses[-1]]
            cached = [g.to(device) for g in cached]
            self._gathers = cached
        return cached

    @classmethod
    def matches(cls, tensors: dict[str, torch.Tensor]) -> bool:
        return tensors["oft_blocks"].dim() == 4

    @classmethod
    def from_file_tensors(cls, base: BaseLayer, tensors: dict[str, torch.Tensor],
                          multiplier: float = 1.0) -> BOFT:
        try:
            return super().from_file_tensors(base, tensors, multiplier)
        except InvalidValueError as error:  # the layer's channels do not split into the file's blocks
            raise AdapterShapeError(f"oft_blocks: shape {tuple(tensors['oft_blocks'].shape)} does not fit the layer: "
                                    f"{error}") from error

    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        blocks = require(tensors, "oft_blocks", cls.algorithm)
        if blocks.dim() != 4 or blocks.shape[2] != blocks.shape[3]:
            raise AdapterShapeError(f"oft_blocks: shape {tuple(blocks.shape)} is not (stages, blocks, size, size)")
        size = int(blocks.shape[2])
        return {"rank": size, "block_size": size, "stages": int(blocks.shape[0]), "constraint": _constraint(tensors),
                "rescaled": "rescale" in tensors}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stages={self.stages}"
