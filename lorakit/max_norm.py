"""Max-norm regularisation of an adapter network (kohya's ``--scale_weight_norms``).

After each optimizer step, every module whose update ``‖ΔW‖_F`` (scale ``alpha / rank`` included, the
multiplier not) is above the limit is scaled back onto it; the others are left exactly as they are.  kohya
splits the factor ``ratio = limit / ‖ΔW‖`` between ``lora_up`` and ``lora_down`` (``√ratio`` each) so that
neither factor shrinks alone.  The same holds for every algorithm whose ``ΔW`` is multilinear in its trainable
tensors, each appearing once: LoRA/LoCon (with a Tucker core: three factors), LoHa (``(w1a·w1b) ∘ (w2a·w2b)``,
four or six) and LoKr (``w1 ⊗ w2``, each maybe a product): each of the k factors is multiplied by
``ratio^(1/k)``.  DoRA is not (its magnitude renormalises the update), nor are the other algorithms.

A budget on the update's size (``early_stop.rule = "budget"`` / ``"spectral-budget"``) may never be reached
when the norms are capped below it: the limit is a size budget of its own, kept instead of stopped at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.adapters.base import Adapter
from lorakit.network import AdapterNetwork

#: the algorithms whose update is a product of their trainable tensors (kohya and LyCORIS apply it to these)
MAX_NORM_ALGORITHMS = ("lora", "loha", "lokr")


@dataclass(frozen=True)
class MaxNormReading:
    """What one application did: modules scaled back, and the mean and largest ‖ΔW‖ afterwards (kohya's
    "Keys Scaled", "Average key norm")."""

    keys_scaled: int
    mean_norm: float
    max_norm: float

    def to_record(self) -> dict[str, float]:
        return {"keys_scaled": self.keys_scaled, "mean_key_norm": self.mean_norm, "max_key_norm": self.max_norm}


def check_max_norm_supported(network: AdapterNetwork) -> None:
    """Raise ``ValueError`` naming the modules whose update max-norm cannot scale exactly."""
    refused = sorted({f"{a.algorithm}{' with DoRA' if getattr(a, 'dora_scale', None) is not None else ''}"
                      for a in _weight_updates(network) if not _scalable(a)})
    if refused:
        raise ValueError(f"max-norm regularisation scales LoRA/LoCon, LoHa and LoKr updates, not "
                         f"{', '.join(refused)} (their update is not a product of the trained tensors)")


def _weight_updates(network: AdapterNetwork) -> list[Adapter]:
    """The modules max-norm reads: all but the norm layers' updates (train_norm), which LyCORIS leaves alone too
    (its NormModule scales nothing)."""
    return [a for a in network.adapters.values() if a.kind != "norm"]


def _scalable(adapter: Adapter) -> bool:
    return adapter.algorithm in MAX_NORM_ALGORITHMS and getattr(adapter, "dora_scale", None) is None


def _factors(adapter: Adapter) -> list[torch.nn.Parameter]:
    return [p for name, p in adapter.named_parameters() if not name.startswith("base.")]


@torch.no_grad()
def update_norm(adapter: Adapter) -> torch.Tensor:
    """‖ΔW‖_F of one module at multiplier 1.  A plain LoRA's comes from its rank × rank Gram matrices
    (‖U D‖² = Σ (UᵀU) ∘ (D Dᵀ)), without forming the out × in product."""
    if adapter.algorithm == "lora" and adapter.lora_mid is None:
        up = adapter.lora_up.weight  # with use_scalar, the scalar times the up matrix
        up = up.reshape(up.shape[0], -1).double()
        down = adapter.lora_down.weight.reshape(up.shape[1], -1).double()
        squared = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0)
        return (squared.sqrt() * adapter.scale).float()
    multiplier = adapter.multiplier
    try:
        adapter.multiplier = 1.0
        return adapter.delta_weight().float().norm()
    finally:
        adapter.multiplier = multiplier


@torch.no_grad()
def apply_max_norm(network: AdapterNetwork, limit: float) -> MaxNormReading:
    """Scale every module whose ‖ΔW‖ exceeds ``limit`` back onto it (the direction of ΔW is kept)."""
    norms, scaled = [], 0
    for adapter in _weight_updates(network):
        norm = float(update_norm(adapter))
        if norm > limit:
            factors = _factors(adapter)
            share = (limit / norm) ** (1.0 / len(factors))
            for factor in factors:
                factor.mul_(share)
            scaled += 1
            norm = limit
        norms.append(norm)
    return MaxNormReading(scaled, sum(norms) / len(norms) if norms else 0.0, max(norms, default=0.0))
