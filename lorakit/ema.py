"""An exponential moving average of the trained weights (``training.ema_decay``; OneTrainer's and diffusers'
``--use_ema``): what a run hands back is the average of its last steps' weights rather than the last step's,
which smooths out the last updates' noise.

After each optimizer step, ``average ← d · average + (1 − d) · weights``, with diffusers' warm-up of the decay,
``d = min(ema_decay, (1 + n) / (10 + n))`` at the n-th update (0 at the first, so the average starts at the
weights; without it the first weights, random for an adapter's up matrices, would linger for thousands of steps).
The average is kept in float32 whatever the weights' dtype (a bf16 average loses updates of (1 − d) · Δ below its
rounding), beside the weights on their device.

Training itself follows the live weights (and so does CS-Fluctuation, which reads the training's own updates);
everything the run hands back or judges uses the average: checkpoints, the result, samples, validation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch


class TrainedTensors(Protocol):
    """What a training method gives (lorakit.methods.TrainingMethod): its trained tensors by name, and a way back."""

    def trained_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


def ema_decay_at(decay: float, update: int) -> float:
    """The decay of the ``update``-th update (0-based): diffusers' warm-up ``(1 + n) / (10 + n)``, at most
    ``decay``; 0 at the first, so the average starts at the weights."""
    return 0.0 if update == 0 else min(decay, (1 + update) / (10 + update))


class WeightAverage:
    """The moving average of named tensors (a method's ``trained_tensors()``: live references)."""

    def __init__(self, tensors: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.average = {name: t.detach().float().clone() for name, t in tensors.items() if t.is_floating_point()}

    @torch.no_grad()
    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        """Move the average towards the weights as they are after this optimizer step."""
        d = ema_decay_at(self.decay, self.updates)
        names = list(self.average)
        current = [tensors[n].detach().float() for n in names]
        torch._foreach_lerp_([self.average[n] for n in names], current, 1.0 - d)
        self.updates += 1

    def tensors_like(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The averaged tensors under the weights' names, float32 (the ones not averaged, such as integer
        buffers, as they are)."""
        return {name: self.average.get(name, t) for name, t in tensors.items()}

    def copy_to(self, method: TrainedTensors) -> None:
        """Write the average into the method's weights (in their dtype), for good: the run's end hands it back."""
        method.load_trained_tensors(self.tensors_like(method.trained_tensors()))

    @contextmanager
    def applied(self, method: TrainedTensors) -> Iterator[None]:
        """The method's weights hold the average for the while (sampling, validation), then their own again."""
        kept = {name: t.detach().clone() for name, t in method.trained_tensors().items()}
        self.copy_to(method)
        try:
            yield
        finally:
            method.load_trained_tensors(kept)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay}

    def load(self, state: dict, average: dict[str, torch.Tensor]) -> None:
        """A resumed run's average: its count of updates (the warm-up) and its tensors (the checkpoint's)."""
        self.updates = int(state["updates"])
        for name, value in average.items():
            if name in self.average:
                self.average[name].copy_(value)
