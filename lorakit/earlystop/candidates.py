"""Real copies of the trained weights at candidate turning points.

The turning point is only known ``lag`` samples or more after it happened, so the weights it refers to must
have been copied when they were current.  (The authors' code queued references to the live network, so what
it "saved from 3M-1 intervals earlier" was the current weights.)  Copies are detached clones on ``device``
(CPU by default); ``prune`` drops those that can no longer be the turning point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Candidate:
    step: int
    epoch: int | None
    tensors: dict[str, torch.Tensor]


def copy_tensors(named: Iterable[tuple[str, torch.Tensor]], device: str | torch.device | None = "cpu",
                 ) -> dict[str, torch.Tensor]:
    """Independent copies (``clone`` even when already on ``device``: never a view of a live tensor)."""
    out = {}
    for name, tensor in named:
        t = tensor.detach()
        out[name] = t.to(device, copy=True) if device is not None else t.clone()
    return out


class CandidateStore:
    """Weight copies keyed by step; ``nearest(step)`` finds the one to hand back."""

    def __init__(self, device: str | torch.device | None = "cpu") -> None:
        self.device = device
        self._items: list[Candidate] = []  # in increasing step order

    def __len__(self) -> int:
        return len(self._items)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self._items]

    def add(self, step: int, named: Iterable[tuple[str, torch.Tensor]], epoch: int | None = None) -> None:
        if self._items and step <= self._items[-1].step:
            if step == self._items[-1].step:  # e.g. an epoch end that is also an interval step
                self._items[-1] = Candidate(step, epoch, copy_tensors(named, self.device))
                return
            raise ValueError(f"candidates must be added in step order: {step} after {self._items[-1].step}")
        self._items.append(Candidate(int(step), epoch, copy_tensors(named, self.device)))

    def prune(self, earliest_step: int) -> None:
        """Drop copies that cannot be nearest to a turning point at or after ``earliest_step``: keep the last
        copy at or before it and everything after."""
        keep_from = 0
        for i, c in enumerate(self._items):
            if c.step <= earliest_step:
                keep_from = i
        del self._items[:keep_from]

    def nearest(self, step: int) -> Candidate | None:
        """The copy closest to ``step`` (ties: the earlier one), or ``None`` when empty."""
        if not self._items:
            return None
        return min(self._items, key=lambda c: (abs(c.step - step), c.step))
