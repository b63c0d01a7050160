"""Eq. 2: ``CS = (1/N) Σ_i cos(vec ΔW_i, vec W_i)`` over the N adapted layers (``W_i`` the frozen weight).

Any adapter works through ``delta_weight()``.  Plain LoRA/LoCon never forms ``ΔW = γ B A``: with ``A`` as
``(r, in·k·k)`` and ``B`` as ``(out, r)``,

    <BA, W> = Σ (Bᵀ W) ⊙ A          (an ``r × in·k·k`` product)
    ‖BA‖²   = Σ (BᵀB) ⊙ (A Aᵀ)      (two ``r × r`` Gram matrices)

and ``‖W‖`` is computed once per layer by ``CSMeter``.  A Tucker core or DoRA falls back to ``delta_weight()``.
A zero update (every LoRA at initialisation) has cosine 0, not NaN.  All sums run in float32 at least, on the
weights' device, with one host sync per call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lorakit.adapters.base import Adapter


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def cosine_from_terms(dot: torch.Tensor, delta_sq: torch.Tensor, weight_sq: torch.Tensor) -> torch.Tensor:
    """``<ΔW, W> / (‖ΔW‖ ‖W‖)`` from the three sums; 0 where ``ΔW`` or ``W`` is zero."""
    denom = torch.sqrt(delta_sq * weight_sq)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    # the Gram form of ‖BA‖² can round a hair below the true value: keep the result a cosine
    return torch.where(denom > 0, dot / safe, torch.zeros_like(dot)).clamp(-1.0, 1.0)


@torch.no_grad()
def dense_terms(delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<ΔW, W>, ‖ΔW‖²)`` from a materialised ``ΔW`` shaped like ``W``."""
    dtype = _compute_dtype(weight)
    d, w = delta.reshape(-1).to(dtype), weight.reshape(-1).to(dtype)
    return torch.dot(d, w), torch.dot(d, d)


@torch.no_grad()
def lowrank_terms(down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                  scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<γBA, W>, ‖γBA‖²)`` without forming ``BA``.

    ``down`` (A) is ``(r, in)`` or ``(r, in, kh, kw)``; ``up`` (B) is ``(out, r)`` or ``(out, r, 1, 1)``;
    ``weight`` is ``(out, in)`` or ``(out, in, kh, kw)`` (a conv kernel is flattened the way ``BA`` is).
    """
    dtype = _compute_dtype(weight)
    rank = down.shape[0]
    a = down.reshape(rank, -1).to(dtype)
    b = up.reshape(up.shape[0], rank).to(dtype)
    w = weight.reshape(weight.shape[0], -1).to(dtype)
    if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
        raise ValueError(f"low-rank factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit a weight of "
                         f"shape {tuple(weight.shape)}")
    dot = ((b.T @ w) * a).sum()
    delta_sq = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)
    return dot * scale, delta_sq * (scale * scale)


def frozen_weight(adapter: Adapter) -> torch.Tensor:
    """``W0``: the pretrained weight, also while the adapter is merged into its base layer."""
    return getattr(adapter, "original_weight", adapter.base_weight)


def _lowrank_factors(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A, B, γ)`` when ``ΔW = γ B A`` exactly (LoRA/LoCon without Tucker core or DoRA), else ``None``."""
    down, up = getattr(adapter, "lora_down", None), getattr(adapter, "lora_up", None)
    if down is None or up is None or getattr(adapter, "lora_mid", None) is not None:
        return None
    if getattr(adapter, "dora_scale", None) is not None:
        return None
    scale = getattr(adapter, "scale", None)
    if scale is None:
        return None
    return down.weight, up.weight, float(scale) * float(adapter.multiplier)


@torch.no_grad()
def adapter_terms(adapter: Adapter, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<ΔW, W0>, ‖ΔW‖²)`` of one adapter: the low-rank identities when they apply (and ``fast``)."""
    weight = frozen_weight(adapter)
    factors = _lowrank_factors(adapter) if fast else None
    if factors is not None:
        return lowrank_terms(*factors[:2], weight, factors[2])
    return dense_terms(adapter.delta_weight(), weight)


def _adapter_list(adapters: Any) -> list[Adapter]:
    # a network (``.adapters``), a name → adapter mapping (``nn.ModuleDict`` too), or any iterable
    if hasattr(adapters, "adapters"):
        adapters = adapters.adapters
    if isinstance(adapters, Mapping) or hasattr(adapters, "values"):
        adapters = adapters.values()
    return list(adapters)


@torch.no_grad()
def layer_cosines(adapters: Iterable[Adapter] | Mapping[str, Adapter], fast: bool = True) -> torch.Tensor:
    """``cos(vec ΔW_i, vec W_i)`` per adapter, as a float tensor (on the first adapter's device)."""
    found = _adapter_list(adapters)
    if not found:
        raise ValueError("CS needs at least one adapter")
    out = []
    for adapter in found:
        dot, delta_sq = adapter_terms(adapter, fast)
        w = frozen_weight(adapter).reshape(-1).to(dot.dtype)
        out.append(cosine_from_terms(dot, delta_sq, torch.dot(w, w)))
    device = out[0].device
    return torch.stack([c.to(device=device, dtype=torch.float64) for c in out])


def cs_value(adapters: Iterable[Adapter] | Mapping[str, Adapter], fast: bool = True) -> float:
    """Eq. 2 over ``adapters`` (a list, a name → adapter mapping, or a network with ``.adapters``)."""
    return float(layer_cosines(adapters, fast).mean())


@torch.no_grad()
def cs_native(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Eq. 2 for native fine-tuning: pairs of (trained ``W``, saved pretrained copy ``W0``), ``ΔW = W - W0``."""
    out = []
    for weight, original in pairs:
        dot, delta_sq = dense_terms(weight.detach() - original.to(weight.device, weight.dtype), original)
        w = original.reshape(-1).to(dot.dtype)
        out.append(cosine_from_terms(dot, delta_sq, torch.dot(w, w)).to(torch.float64).cpu())
    if not out:
        raise ValueError("CS needs at least one weight pair")
    return float(torch.stack(out).mean())


class CSMeter:
    """``cs_value`` for a fixed set of adapters, with each ``‖W0‖²`` computed once (``W0`` is frozen).

    Call it after an optimiser step: ``cs = meter()``.
    """

    def __init__(self, adapters: Iterable[Adapter] | Mapping[str, Adapter], fast: bool = True) -> None:
        self.adapters = _adapter_list(adapters)
        if not self.adapters:
            raise ValueError("CS needs at least one adapter")
        self.fast = fast
        with torch.no_grad():
            self._weight_sq = []
            for adapter in self.adapters:
                w = frozen_weight(adapter).reshape(-1)
                w = w.to(_compute_dtype(w))
                self._weight_sq.append(torch.dot(w, w))

    @torch.no_grad()
    def layer_cosines(self) -> torch.Tensor:
        out = []
        for adapter, weight_sq in zip(self.adapters, self._weight_sq, strict=True):
            dot, delta_sq = adapter_terms(adapter, self.fast)
            out.append(cosine_from_terms(dot, delta_sq, weight_sq.to(dot.dtype)))
        device = out[0].device
        return torch.stack([c.to(device=device, dtype=torch.float64) for c in out])

    def __call__(self) -> float:
        return float(self.layer_cosines().mean())
