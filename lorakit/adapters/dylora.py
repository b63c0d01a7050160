"""DyLoRA: a LoRA trained so that its first ``n`` ranks work on their own, for every multiple ``n`` of a block size.

Each training forward samples ``b`` uniformly from ``1 … rank / block_size`` and runs the LoRA truncated to
``n = b · block_size`` ranks with the scale ``alpha / n``: exactly what a reader of the file cut to rank ``n``
applies (kohya's keys, the same ``alpha``).  Only block ``b`` learns in that step; the blocks before it take
part detached, so each block learns what the ones before it leave out (the DyLoRA paper's "frozen" mode,
LyCORIS's too).  Outside training it is the full-rank LoRA, and its file is a plain LoRA file
(``lora_down.weight``, ``lora_up.weight``, ``alpha``) that loads as ``lora`` everywhere; cutting it to rank ``n``
is truncating the factors (``lorakit resize --rank n`` does that for files whose metadata says DyLoRA).

LyCORIS's ``DyLoraModule`` differs in two ways not followed here: it scales a step with ``b + 1`` blocks by
``alpha / (b + 1)`` (a block count, not a rank), so with ``block_size > 1`` it trains at ``block_size`` times
the strength its own file is read back with; and its ``load_state_dict`` returns without loading anything, so
it cannot load a DyLoRA file back.

The sampled rank is a Python integer drawn per module and forward (``torch.randint`` on the CPU): a graph
break under ``torch.compile``, once per adapted layer and step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.adapters.base import AdapterFormatError, BaseLayer
from lorakit.adapters.lora import LoRA
from lorakit.errors import InvalidValueError


class DyLoRA(LoRA):
    algorithm = "dylora"
    aliases = ()
    display_name = "DyLoRA"
    file_keys = ()  # its files are plain LoRA files
    lycoris_algo = "dylora"
    #: what a file of this algorithm is detected as
    file_algorithm = "lora"

    def __init__(self, base: BaseLayer, rank: int = 4, alpha: float | None = None, multiplier: float = 1.0, *,
                 block_size: int = 4, dropout: float = 0.0, rank_dropout: float = 0.0,
                 rank_dropout_scale: bool = False, module_dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, multiplier, dropout=dropout, rank_dropout=rank_dropout,
                         rank_dropout_scale=rank_dropout_scale, module_dropout=module_dropout)
        block_size = int(block_size)
        if block_size < 1 or self.rank % block_size:
            raise InvalidValueError(f"DyLoRA: rank {self.rank} must be a positive multiple of block_size "
                                    f"{block_size}")
        self.block_size = block_size
        #: tests and evaluation pin the training rank here (a multiple of block_size); None: sample it
        self.train_rank: int | None = None

    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """A LoRA file's rank and alpha (DyLoRA has no Tucker or DoRA variant; its block size is the run's)."""
        arguments = LoRA.file_arguments(base, tensors)
        if arguments["use_tucker"] or arguments["dora"]:
            raise AdapterFormatError("lora_mid.weight/dora_scale: DyLoRA trains plain LoRA modules, this one has a "
                                     "Tucker core or DoRA")
        return {"rank": arguments["rank"], "alpha": arguments["alpha"]}

    def sample_rank(self) -> int:
        if self.train_rank is not None:
            return self.train_rank
        blocks = self.rank // self.block_size
        return self.block_size * int(torch.randint(1, blocks + 1, ()).item())

    def _truncated(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:n]``, ``B[:, :n]`` with everything before the last block detached."""
        down, up = self.lora_down.weight, self.lora_up.weight
        k = n - self.block_size
        down = torch.cat([down[:k].detach(), down[k:n]]) if k else down[:n]
        up = torch.cat([up[:, :k].detach(), up[:, k:n]], dim=1) if k else up[:, :n]
        return down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.training:
            return super().forward(x)
        n = self.sample_rank()
        down, up = self._truncated(n)
        y = self.frozen_forward(x, self.base.bias)
        h = x if x.dtype == down.dtype else x.to(down.dtype)
        if self.kind == "linear":
            h = F.linear(h, down)
        else:
            conv = self.base
            h = F.conv2d(h, down, None, conv.stride, conv.padding, conv.dilation)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, training=True)
        if self.rank_dropout > 0:
            shape = (h.shape[0], n, 1, 1) if self.kind == "conv" else (h.shape[0],) + (1,) * (h.dim() - 2) + (n,)
            h = h * self._rank_mask(shape, h)
        if self.module_dropout > 0:
            up = up * self._module_keep(up)
        d = self._up(h, up)
        return torch.add(y, d if d.dtype == y.dtype else d.to(y.dtype), alpha=self._alpha_value / n * self.multiplier)
