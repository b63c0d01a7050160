"""Eq. 2: ``CS = (1/N) Σ_i cos(vec ΔW_i, vec W_i)`` over the N adapted layers (``W_i`` the frozen weight).

Any adapter works through ``delta_weight()``.  Plain LoRA/LoCon never forms ``ΔW = γ B A``: with ``A`` as
``(r, in·k·k)`` and ``B`` as ``(out, r)``,

    <BA, W> = Σ (Bᵀ W) ⊙ A          (an ``r × in·k·k`` product)
    ‖BA‖²   = Σ (BᵀB) ⊙ (A Aᵀ)      (two ``r × r`` Gram matrices)

and ``‖W‖`` is computed once per layer by ``CSMeter``.  Two more algorithms have exact short forms:

- (IA)^3, ``ΔW = γ W ⊙ v`` along rows (or columns): ``<ΔW, W> = γ Σ v_o ‖W_o‖²`` and
  ``‖ΔW‖² = γ² Σ v_o² ‖W_o‖²``, from the row (column) norms of the frozen ``W``, which ``CSMeter`` caches;
- LoKr, ``ΔW = γ w1 ⊗ w2``: ``<ΔW, W> = γ Σ_ac w1[a,c] <w2, W_(a,c)>`` over the blocks of ``W``, and
  ``‖ΔW‖² = γ² ‖w1‖² ‖w2‖²``: one pass over ``W`` and no ``W``-sized temporary.

A Tucker core, DoRA, LoHa and full fall back to ``delta_weight()``.  The cost that remains is one read of
every adapted ``W`` per call (``r × out × in`` multiply-adds for LoRA), so the trainer's
``early_stop.interval`` is the knob for how often to pay it.  A zero update (every LoRA at initialisation) has
cosine 0, not NaN.  All sums run in float32 at least, on the weights' device, with one host sync per call.

The spectral size σ1(ΔW)/σ1(W0) (``CSMeter.read(spectral=True)``, for the ``spectral_budget`` rule) is exact:
σ1(γBA)² is the largest eigenvalue of the r×r product (BᵀB)(AAᵀ) for LoRA, σ1(w1 ⊗ w2) = σ1(w1) σ1(w2) for
LoKr, and an SVD of ``delta_weight()`` for the rest; σ1(W0) is computed once.  An SVD per layer is too much for
every step, so the trainer reads it at epoch ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.adapters.base import Adapter
from lorakit.adapters.ia3 import IA3
from lorakit.adapters.lokr import LoKr


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@dataclass(frozen=True)
class CSReading:
    """One sample of what ΔW and W say: CS (eq. 2) and the update's size, the mean over layers of ‖ΔW‖ / ‖W‖
    (the same sums, so it costs nothing more; the ``budget`` rule reads it); the spectral size, the mean of
    σ1(ΔW) / σ1(W), where it was asked for (``spectral_budget``)."""

    cs: float
    update: float
    spectral: float | None = None


@torch.no_grad()
def spectral_norm(matrix: torch.Tensor) -> torch.Tensor:
    """σ1 of a weight or update, a conv kernel flattened to ``out × in·k·k`` (float32 at least)."""
    m = matrix.detach().reshape(matrix.shape[0], -1)
    return torch.linalg.matrix_norm(m.to(_compute_dtype(m)), ord=2)


def spectral_ratio(top_delta: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
    """σ1(ΔW) / σ1(W); 0 where W is zero."""
    safe = torch.where(top_weight > 0, top_weight, torch.ones_like(top_weight))
    return torch.where(top_weight > 0, top_delta / safe, torch.zeros_like(top_delta))


def relative_update(delta_sq: torch.Tensor, weight_sq: torch.Tensor) -> torch.Tensor:
    """``‖ΔW‖ / ‖W‖`` from the two sums; 0 where ``W`` is zero."""
    safe = torch.where(weight_sq > 0, weight_sq, torch.ones_like(weight_sq))
    return torch.where(weight_sq > 0, torch.sqrt(delta_sq.clamp_min(0.0) / safe), torch.zeros_like(delta_sq))


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
    dot = torch.dot((b.T @ w).reshape(-1), a.reshape(-1))
    delta_sq = torch.dot((b.T @ b).reshape(-1), (a @ a.T).reshape(-1)).clamp_min(0.0)
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
def lowrank_spectral_norm(down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """σ1(scale · up @ down) from r×r Grams, never building the product (conv factors flattened)."""
    rank = down.shape[0]
    a = down.reshape(rank, -1).double()
    b = up.reshape(up.shape[0], rank).double()
    # (BᵀB)(AAᵀ) is similar to a symmetric PSD matrix: its eigenvalues are real, ≥ 0, and σ(BA)²
    top = torch.linalg.eigvals((b.T @ b) @ (a @ a.T)).real.max().clamp_min(0.0)
    return top.sqrt() * abs(scale)


@torch.no_grad()
def delta_spectral_norm(adapter: Adapter, fast: bool = True) -> torch.Tensor:
    """σ1(ΔW) of one adapter: from r×r Grams for LoRA, from the Kronecker factors for LoKr, else an SVD of ΔW."""
    form = _short_form(adapter) if fast else "dense"
    if form == "lowrank":
        return lowrank_spectral_norm(*_lowrank_factors(adapter))
    if form == "kron":
        gamma = float(adapter.scale) * float(adapter.multiplier)
        return spectral_norm(adapter._w1()) * spectral_norm(adapter._w2()) * abs(gamma)
    return spectral_norm(adapter.delta_weight())


def _short_form(adapter: Adapter) -> str:
    """Which exact short form of the terms applies: 'lowrank', 'ia3', 'kron' or 'dense'."""
    if _lowrank_factors(adapter) is not None:
        return "lowrank"
    if isinstance(adapter, IA3):
        return "ia3"
    if isinstance(adapter, LoKr) and adapter.dora_scale is None:
        return "kron"
    return "dense"


@torch.no_grad()
def ia3_norms(adapter: Adapter) -> torch.Tensor:
    """``‖W0‖²`` per output row, or per input column when the (IA)^3 adapter scales inputs (a vector)."""
    w = frozen_weight(adapter)
    w = w.to(_compute_dtype(w))
    axes = [d for d in range(w.dim()) if d != (1 if adapter.scales_input else 0)]
    return w.square().sum(dim=axes)


@torch.no_grad()
def ia3_terms(adapter: Adapter, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<ΔW, W0>, ‖ΔW‖²)`` of (IA)^3 (``ΔW = m · W0 ⊙ v``) from the cached norms of ``W0``."""
    v = adapter.weight.reshape(-1).to(norms.dtype)
    m = float(adapter.multiplier)
    return torch.dot(v, norms) * m, torch.dot(v * v, norms) * (m * m)


@torch.no_grad()
def kron_terms(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<ΔW, W0>, ‖ΔW‖²)`` of LoKr (``ΔW = γ w1 ⊗ w2``) without forming the Kronecker product."""
    weight = frozen_weight(adapter)
    dtype = _compute_dtype(weight)
    w1, w2 = adapter._w1().to(dtype), adapter._w2().to(dtype)
    (a, c), b, d = w1.shape, w2.shape[0], w2.shape[1]
    blocks = weight.to(dtype).reshape(a, b, c, d, -1)  # W[a·b + i, c·d + j, ...] = blocks[a, i, c, j, ...]
    per_block = torch.einsum("aicjk,ijk->ac", blocks, w2.reshape(b, d, -1))
    gamma = float(adapter.scale) * float(adapter.multiplier)
    return (per_block * w1).sum() * gamma, w1.square().sum() * w2.square().sum() * (gamma * gamma)


@torch.no_grad()
def adapter_terms(adapter: Adapter, fast: bool = True,
                  cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<ΔW, W0>, ‖ΔW‖²)`` of one adapter: an exact short form when one applies (and ``fast``).

    ``cache``: the (IA)^3 norms of ``ia3_norms(adapter)`` when the caller keeps them.
    """
    form = _short_form(adapter) if fast else "dense"
    if form == "lowrank":
        down, up, scale = _lowrank_factors(adapter)
        return lowrank_terms(down, up, frozen_weight(adapter), scale)
    if form == "ia3":
        return ia3_terms(adapter, ia3_norms(adapter) if cache is None else cache)
    if form == "kron":
        return kron_terms(adapter)
    return dense_terms(adapter.delta_weight(), frozen_weight(adapter))


def _adapter_list(adapters: Any) -> list[Adapter]:
    # a network (``.adapters``), a name → adapter mapping (``nn.ModuleDict`` too), or any iterable
    if hasattr(adapters, "adapters"):
        adapters = adapters.adapters
    if isinstance(adapters, Mapping) or hasattr(adapters, "values"):
        adapters = adapters.values()
    # CS is the paper's reading of weight matrices; a norm layer's scale update (train_norm) is a vector of a
    # different kind, whose cosines would pull the mean away from it
    return [a for a in adapters if a.kind != "norm"]


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
def native_reading(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], spectral: bool = False) -> CSReading:
    """CS and the update's size for native fine-tuning: pairs of (trained ``W``, saved pretrained copy ``W0``),
    ``ΔW = W - W0``; with ``spectral``, the spectral size too (an SVD of every ΔW and W0: for epoch ends)."""
    cosines, sizes, tops = [], [], []
    for weight, original in pairs:
        delta = weight.detach() - original.to(weight.device, weight.dtype)
        dot, delta_sq = dense_terms(delta, original)
        w = original.reshape(-1).to(dot.dtype)
        weight_sq = torch.dot(w, w)
        cosines.append(cosine_from_terms(dot, delta_sq, weight_sq).to(torch.float64).cpu())
        sizes.append(relative_update(delta_sq, weight_sq).to(torch.float64).cpu())
        if spectral and original.dim() >= 2:  # a bias or norm weight has no singular values to speak of
            tops.append(spectral_ratio(spectral_norm(delta), spectral_norm(original)).to(torch.float64).cpu())
    if not cosines:
        raise ValueError("CS needs at least one weight pair")
    return CSReading(float(torch.stack(cosines).mean()), float(torch.stack(sizes).mean()),
                     float(torch.stack(tops).mean()) if tops else None)


def cs_native(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Eq. 2 for native fine-tuning: pairs of (trained ``W``, saved pretrained copy ``W0``), ``ΔW = W - W0``."""
    return native_reading(pairs).cs


class CSMeter:
    """``cs_value`` for a fixed set of adapters, with the frozen-weight terms computed once (``W0`` never
    changes): each ``‖W0‖²``, and the row/column norms (IA)^3 needs.

    Call it after an optimiser step: ``cs = meter()``.
    """

    def __init__(self, adapters: Iterable[Adapter] | Mapping[str, Adapter], fast: bool = True) -> None:
        self.adapters = _adapter_list(adapters)
        if not self.adapters:
            raise ValueError("CS needs at least one adapter")
        self.fast = fast
        self._weight_top: torch.Tensor | None = None  # σ1(W0) per layer, on the first spectral read
        with torch.no_grad():
            self._weight_sq = []
            self._cache: list[torch.Tensor | None] = []
            for adapter in self.adapters:
                w = frozen_weight(adapter).reshape(-1)
                w = w.to(_compute_dtype(w))
                self._weight_sq.append(torch.dot(w, w))
                form = _short_form(adapter) if fast else "dense"
                self._cache.append(ia3_norms(adapter) if form == "ia3" else None)

    @torch.no_grad()
    def layer_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer: the cosine of ΔW and W0, and ‖ΔW‖ / ‖W0‖ (float64, on the weights' device)."""
        dots, deltas = [], []
        for adapter, cache in zip(self.adapters, self._cache, strict=True):
            dot, delta_sq = adapter_terms(adapter, self.fast, cache)
            dots.append(dot.to(torch.float64))
            deltas.append(delta_sq.to(torch.float64))
        device = dots[0].device
        # one vectorised cosine for all layers instead of a handful of small kernels per layer
        weight_sq = torch.stack([w.to(device=device, dtype=torch.float64) for w in self._weight_sq])
        delta_sq = torch.stack([d.to(device) for d in deltas])
        return (cosine_from_terms(torch.stack([d.to(device) for d in dots]), delta_sq, weight_sq),
                relative_update(delta_sq, weight_sq))

    def layer_cosines(self) -> torch.Tensor:
        return self.layer_terms()[0]

    @torch.no_grad()
    def layer_spectral_sizes(self) -> torch.Tensor:
        """Per layer: σ1(ΔW) / σ1(W0) (float64, on the weights' device)."""
        if self._weight_top is None:
            self._weight_top = torch.stack([spectral_norm(frozen_weight(a)).to(torch.float64)
                                            for a in self.adapters])
        tops = torch.stack([delta_spectral_norm(a, self.fast).to(self._weight_top.device, torch.float64)
                            for a in self.adapters])
        return spectral_ratio(tops, self._weight_top)

    def read(self, spectral: bool = False) -> CSReading:
        """CS and the update's size in one pass (one host sync); with ``spectral``, the spectral size too
        (an SVD-sized computation per layer that is not a LoRA: read it at epoch ends, not every step)."""
        cosines, sizes = self.layer_terms()
        both = torch.stack([cosines.mean(), sizes.mean()]).cpu()
        top = float(self.layer_spectral_sizes().mean()) if spectral else None
        return CSReading(float(both[0]), float(both[1]), top)

    def __call__(self) -> float:
        return float(self.layer_cosines().mean())
