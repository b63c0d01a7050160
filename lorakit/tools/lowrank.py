"""Low-rank factorisation of a weight update ``ΔW``: the SVD, the choice of rank, the report.

``ΔW`` of a conv ``(out, in, kh, kw)`` is factorised as the matrix ``(out, in·kh·kw)``; the LoRA factors are then
``lora_down (r, in, kh, kw)`` (a k×k conv) and ``lora_up (out, r, 1, 1)``, LoCon's layout.

Where ``ΔW`` is already a product ``U·D`` of rank ``r`` (a LoRA, or a sum of LoRAs: the factors concatenated)
its SVD comes from the QR factorisations of ``U`` and ``Dᵀ`` and the SVD of the small ``r × r`` core, never
from the ``out × in`` matrix: ``U = Q₁R₁``, ``Dᵀ = Q₂R₂``, ``R₁R₂ᵀ = P Σ Qᵀ`` give ``ΔW = (Q₁P) Σ (Q₂Q)ᵀ``.

Rank choice (``RankRule``): a fixed rank, or per module as kohya's ``resize_lora.py`` does
(``sv_ratio``: keep singular values above ``σ₁ / param``; ``sv_fro``: the smallest rank keeping ``param`` of the
Frobenius norm; ``sv_cumulative``: the smallest rank keeping ``param`` of the sum of singular values), capped by
``rank`` when both are given.  ``clamp_quantile`` clamps the entries of the factors to the ``q`` quantile of
their magnitudes, as kohya's ``extract_lora_from_models.py`` does (``--clamp_quantile``), trading a little
accuracy for fewer outliers in half precision.

The SVD runs in float64: a full-rank factorisation then reproduces ``ΔW`` to the precision of its storage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorakit.tools import ToolError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
#: without a rule, singular values below this fraction of the largest are float noise and are dropped
LOSSLESS_TOLERANCE = 1e-7


@dataclass(frozen=True)
class Delta:
    """``ΔW`` of one module, as a dense matrix or as the product ``up @ down``; ``shape`` is the layer's weight.

    ``dense`` is ``(out, fan_in)``, ``up`` ``(out, r)``, ``down`` ``(r, fan_in)``, with ``fan_in = in·kh·kw``.
    ``bias``: the update of the layer's bias where the algorithm has one (LyCORIS's ``diff_b``, a norm layer's
    shift); only applying adapters reads it (``tools.apply``), a LoRA cannot carry it.
    """

    shape: tuple[int, ...]
    dense: torch.Tensor | None = None
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.up is None or self.down is None):
            raise ValueError("a Delta is either dense or a product up @ down")

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def is_product(self) -> bool:
        return self.dense is None

    @property
    def inner_rank(self) -> int | None:
        return None if self.up is None else int(self.up.shape[1])

    def matrix(self) -> torch.Tensor:
        """``ΔW`` as a ``(out, fan_in)`` matrix (materialised for a product)."""
        return self.dense if self.dense is not None else self.up @ self.down

    def weight(self) -> torch.Tensor:
        """``ΔW`` shaped like the layer's weight."""
        return self.matrix().reshape(self.shape)

    def scaled(self, factor: float) -> Delta:
        bias = None if self.bias is None else self.bias * factor
        if self.dense is not None:
            return Delta(self.shape, dense=self.dense * factor, bias=bias)
        return Delta(self.shape, up=self.up * factor, down=self.down, bias=bias)

    def __add__(self, other: Delta) -> Delta:
        if tuple(other.shape) != tuple(self.shape):
            raise ValueError(f"cannot add updates of shapes {self.shape} and {other.shape}")
        biases = [b.double() for b in (self.bias, other.bias) if b is not None]
        bias = sum(biases[1:], biases[0]) if biases else None
        if self.is_product and other.is_product:  # a sum of products is the product of concatenated factors
            up = torch.cat([self.up, other.up.to(self.up.dtype)], dim=1)
            return Delta(self.shape, up=up, down=torch.cat([self.down, other.down.to(self.down.dtype)], dim=0),
                         bias=bias)
        return Delta(self.shape, dense=self.matrix().double() + other.matrix().double(), bias=bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Delta:
        return cls(tuple(weight.shape), dense=weight.reshape(weight.shape[0], -1))


#: dense matrices with more elements than this (and one side at least twice the other) go through the Gram matrix
GRAM_ABOVE = 1 << 22


def dense_svd(a: torch.Tensor, gram_above: int = GRAM_ABOVE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense matrix in float64.

    A large, elongated matrix (SD1.5's 1280 × 11520 conv ΔW) goes through ``eigh(A Aᵀ)`` of its short side:
    about 15× faster than LAPACK's SVD on one CPU thread.  ``U`` is then a complete orthonormal basis, so a
    full-rank factorisation still reproduces ``A`` to float64 precision; singular values below ~1e-8·σ₁ lose
    relative accuracy, far below float32 data.
    """
    a = a.double()
    m, n = a.shape
    if m * n <= gram_above or max(m, n) < 2 * min(m, n):
        return torch.linalg.svd(a, full_matrices=False)
    tall = m > n
    b = a.T if tall else a  # rows <= columns
    evals, u = torch.linalg.eigh(b @ b.T)
    s = evals.flip(0).clamp_min(0).sqrt()
    u = u.flip(1)
    keep = s > (s[0] * 1e-12 if s.numel() else 0)
    vh = torch.where(keep[:, None], (u.T @ b) / torch.where(keep, s, 1.0)[:, None], 0.0)
    s = torch.where(keep, s, 0.0)
    return (vh.T, s, u.T) if tall else (u, s, vh)


def thin_svd(delta: Delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` (float64) with ``ΔW = U diag(S) Vh``; through QR and a small core for a product."""
    if not delta.is_product:
        return dense_svd(delta.dense)
    q1, r1 = torch.linalg.qr(delta.up.double())
    q2, r2 = torch.linalg.qr(delta.down.double().T)
    p, s, qh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    return q1 @ p, s, qh @ q2.T


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: ``rank`` (fixed, or the cap of a dynamic rule), ``dynamic`` + ``param``.

    Neither given: lossless (every singular value above float noise).
    """

    rank: int | None = None
    dynamic: str | None = None
    param: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 0:
            raise ToolError(f"rank must be >= 0, got {self.rank}")
        if self.dynamic is not None:
            if self.dynamic not in DYNAMIC_METHODS:
                raise ToolError(f"unknown dynamic method {self.dynamic!r}; use one of {', '.join(DYNAMIC_METHODS)}")
            if self.param is None:
                raise ToolError(f"--dynamic {self.dynamic} needs --param")
            if not math.isfinite(self.param):
                raise ToolError(f"--param must be a finite number, got {self.param}")
            if self.dynamic == "sv_ratio" and self.param < 1:
                raise ToolError(f"sv_ratio keeps singular values above σ1 / param: param must be >= 1, got "
                                f"{self.param}")
            if self.dynamic in ("sv_fro", "sv_cumulative") and not 0 < self.param <= 1:
                raise ToolError(f"{self.dynamic} keeps a fraction: param must lie in (0, 1], got {self.param}")
        elif self.param is not None:
            raise ToolError("--param needs --dynamic")

    @property
    def lossless(self) -> bool:
        return self.rank is None and self.dynamic is None

    def choose(self, s: torch.Tensor) -> int:
        """The rank to keep for singular values ``s`` (descending); 0 when ``ΔW`` is zero."""
        s = s.double()
        if s.numel() == 0 or float(s[0]) == 0.0:
            return 0
        if self.dynamic is None:
            if self.rank is None:
                return int((s > s[0] * LOSSLESS_TOLERANCE).sum())
            return min(self.rank, s.numel())
        if self.dynamic == "sv_ratio":
            k = int((s > s[0] / self.param).sum())
        elif self.dynamic == "sv_fro":
            kept = torch.sqrt(torch.cumsum(s**2, 0) / (s**2).sum())
            k = int((kept < self.param - 1e-12).sum()) + 1
        else:
            kept = torch.cumsum(s, 0) / s.sum()
            k = int((kept < self.param - 1e-12).sum()) + 1
        k = max(1, min(k, s.numel()))
        return k if self.rank is None else min(k, self.rank)

    def describe(self) -> str:
        if self.dynamic is not None:
            cap = f", at most {self.rank}" if self.rank is not None else ""
            return f"{self.dynamic} {self.param:g}{cap}"
        return "lossless" if self.rank is None else f"rank {self.rank}"


@dataclass
class ModuleReport:
    """What a factorisation kept of one module's ``ΔW``."""

    name: str
    shape: tuple[int, ...]
    rank: int
    #: the rank it had before (factor width of a LoRA, or the matrix's smaller side for a dense ΔW)
    rank_in: int
    #: retained fraction of ``‖ΔW‖²_F`` from the singular values (``Σ σᵢ²`` kept / all)
    energy: float
    #: ``‖ΔW − ΔW'‖_F / ‖ΔW‖_F`` of what was written (clamping included)
    fro_error: float
    #: ``max |ΔW − ΔW'| / max |ΔW|``
    max_error: float
    #: ``‖ΔW‖²_F``, to weigh totals
    norm2: float
    note: str = ""


@dataclass
class Factors:
    """``ΔW ≈ up @ down``: ``up (out, r)``, ``down (r, fan_in)``, float64; the report says what was kept."""

    up: torch.Tensor
    down: torch.Tensor
    shape: tuple[int, ...]
    report: ModuleReport

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])


def _clamp(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    k = max(1, min(values.numel(), math.ceil(quantile * values.numel())))
    high = float(values.kthvalue(k).values)  # kthvalue: no size limit, unlike torch.quantile
    return up.clamp(-high, high), down.clamp(-high, high)


def factorize(delta: Delta, rule: RankRule, *, name: str = "", clamp_quantile: float | None = None,
              dtype: torch.dtype = torch.float64) -> Factors:
    """The rank-``r`` factors of ``ΔW`` that ``rule`` chooses, split evenly (``√σ`` on each side).

    ``dtype``: the precision the factors will be stored in; they are rounded to it, so the errors in the report
    include storage rounding (an estimate of its size: the file rounds them again after folding in its alpha).
    """
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise ToolError(f"clamp quantile must lie in (0, 1], got {clamp_quantile}")
    u, s, vh = thin_svd(delta)
    rank = rule.choose(s)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if clamp_quantile is not None and clamp_quantile < 1 and rank > 0:
        up, down = _clamp(up, down, clamp_quantile)
    up, down = up.to(dtype).double(), down.to(dtype).double()
    norm2 = float((s**2).sum())
    energy = float((s[:rank] ** 2).sum()) / norm2 if norm2 > 0 else 1.0
    target = delta.matrix().double()
    error = target - up @ down
    fro = float(error.norm() / target.norm()) if norm2 > 0 else 0.0
    peak = float(target.abs().max()) if target.numel() else 0.0
    max_error = float(error.abs().max()) / peak if peak > 0 else 0.0
    rank_in = delta.inner_rank if delta.inner_rank is not None else min(delta.rows, delta.cols)
    report = ModuleReport(name, tuple(delta.shape), rank, rank_in, energy, fro, max_error, norm2)
    return Factors(up, down, tuple(delta.shape), report)


def lora_tensors(factors: Factors, alpha: float | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """kohya LoRA/LoCon tensors (``lora_down.weight``, ``lora_up.weight``, ``alpha``) for the factors.

    ``alpha`` None: ``alpha = rank`` (scale 1).  Otherwise the factors are divided by ``√(alpha / rank)`` each, so
    that ``(alpha / rank) · up @ down`` is still ``ΔW``.
    """
    rank = factors.rank
    alpha = float(rank) if alpha is None else float(alpha)
    scale = alpha / rank
    up, down = factors.up / math.sqrt(scale), factors.down / math.sqrt(scale)
    shape = factors.shape
    if len(shape) == 4:
        down = down.reshape(rank, *shape[1:])
        up = up.reshape(shape[0], rank, 1, 1)
    return {"lora_down.weight": down.to(dtype).contiguous(), "lora_up.weight": up.to(dtype).contiguous(),
            "alpha": torch.tensor(alpha, dtype=dtype)}


# ---- reports -----------------------------------------------------------------------------------------------

@dataclass
class Totals:
    modules: int
    energy: float  # ‖ΔW‖²-weighted: the share of the whole update's energy kept
    mean_fro_error: float
    max_fro_error: float
    max_error: float
    ranks: tuple[int, int, int] = field(default=(0, 0, 0))  # min, median, max


def totals(reports: Sequence[ModuleReport]) -> Totals:
    if not reports:
        return Totals(0, 1.0, 0.0, 0.0, 0.0)
    norm2 = sum(r.norm2 for r in reports)
    energy = sum(r.energy * r.norm2 for r in reports) / norm2 if norm2 > 0 else 1.0
    ranks = sorted(r.rank for r in reports)
    return Totals(len(reports), energy, sum(r.fro_error for r in reports) / len(reports),
                  max(r.fro_error for r in reports), max(r.max_error for r in reports),
                  (ranks[0], ranks[len(ranks) // 2], ranks[-1]))


def report_table(reports: Sequence[ModuleReport]) -> str:
    """One line per module: name, shape, rank before → after, retained energy, errors."""
    width = max([len(r.name) for r in reports] + [6])
    lines = [f"{'module':<{width}}  {'shape':<18} {'rank':>11}  {'energy':>10}  {'fro err':>9}  {'max err':>9}"]
    for r in reports:
        shape = "x".join(str(d) for d in r.shape)
        lines.append(f"{r.name:<{width}}  {shape:<18} {r.rank_in:>5} -> {r.rank:<3} {r.energy:>10.6f}  "
                     f"{r.fro_error:>9.2e}  {r.max_error:>9.2e}" + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def totals_line(reports: Sequence[ModuleReport]) -> str:
    t = totals(reports)
    lo, mid, hi = t.ranks
    return (f"{t.modules} modules, ranks {lo}..{hi} (median {mid}); retained energy {t.energy:.6f} of ‖ΔW‖²; "
            f"relative Frobenius error mean {t.mean_fro_error:.2e}, max {t.max_fro_error:.2e}; "
            f"max element error {t.max_error:.2e} of max |ΔW|")
