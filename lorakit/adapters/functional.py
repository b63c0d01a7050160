"""The math of the LoRA family as plain functions, to read beside the papers.

Shapes: ``W`` is ``(out, in)`` for Linear and ``(out, in, kh, kw)`` for Conv2d.  ``scale`` is a Python
float (``multiplier * alpha / rank``, or part of it); it is folded into the smallest factor so that it costs
one small kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---- LoRA / LoCon ------------------------------------------------------------------------------------


def lora_weight(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """``ΔW = B A`` (``up @ down``); with a Tucker core ``ΔW[o,c] = Σ up[o,i] mid[i,j] down[j,c]``.

    ``down`` is ``(r, in)`` / ``(r, in, kh, kw)`` (Tucker: ``(r, in, 1, 1)``), ``up`` ``(out, r[, 1, 1])``,
    ``mid`` ``(r, r, kh, kw)``.  The result has ``down``'s trailing shape (or ``mid``'s kernel).
    """
    out, rank = up.shape[0], up.shape[1]
    if mid is None:
        weight = up.reshape(out, rank) @ down.reshape(down.shape[0], -1)
        return weight.reshape(out, *down.shape[1:])
    return torch.einsum("ijhw,oi,jc->ochw", mid, up.reshape(out, rank), down.reshape(down.shape[0], -1))


# ---- LoHa --------------------------------------------------------------------------------------------


def _half(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """One factor of the Hadamard product: ``a @ b`` (``(out, r) @ (r, in·k·k)``), or the Tucker form
    ``Σ t[i,j,h,w] a[i,o] b[j,c]`` with ``a`` ``(r, out)``, ``b`` ``(r, in)`` (LyCORIS's layout)."""
    if t is None:
        return a @ b
    return torch.einsum("ijhw,io,jc->ochw", t, a, b)


def _half_grads(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None):
    """Gradients of ``<g, _half(a, b, t)>`` with respect to ``a``, ``b``, ``t``."""
    if t is None:
        return g @ b.T, a.T @ g, None
    tb = torch.einsum("ijhw,jc->ichw", t, b)
    ga = torch.einsum("ochw,io->ichw", g, a)
    return (torch.einsum("ochw,ichw->io", g, tb), torch.einsum("ichw,ijhw->jc", ga, t),
            torch.einsum("ichw,jc->ijhw", ga, b))


class _HadamardProduct(torch.autograd.Function):
    """``scale · (P1 ⊙ P2)`` that saves only the factors: backward rebuilds ``P1`` and ``P2``.

    Plain autograd keeps both full-size products alive until backward (two extra ``W``-sized tensors per
    layer); rebuilding them costs two small matmuls instead (LyCORIS's idea, written anew).
    """

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, t1, t2, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b, t1, t2)
        ctx.scale = scale
        return _half(w1a, w1b, t1) * _half(w2a, w2b, t2) * scale

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b, t1, t2 = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = _half_grads(grad * _half(w2a, w2b, t2), w1a, w1b, t1)
        g2 = _half_grads(grad * _half(w1a, w1b, t1), w2a, w2b, t2)
        return g1[0], g1[1], g2[0], g2[1], g1[2], g2[2], None


def loha_weight(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                t1: torch.Tensor | None = None, t2: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
    """``ΔW = scale · (w1a w1b) ⊙ (w2a w2b)`` (Tucker: each factor rebuilt from its core).

    Returns ``(out, in·kh·kw)`` without Tucker (reshape to ``W``'s shape), ``(out, in, kh, kw)`` with it.
    """
    return _HadamardProduct.apply(w1a, w1b, w2a, w2b, t1, t2, float(scale))


def khatri_rao_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: ``(n, p)``, ``(n, q)`` → ``(n, p·q)`` with ``out[k, i·q + j] = a[k, i] b[k, j]``."""
    return (a.unsqueeze(2) * b.unsqueeze(1)).reshape(a.shape[0], -1)


def khatri_rao_stack(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Every row of ``p`` times every row of ``q``: ``(m, n)``, ``(k, n)`` → ``(m·k, n)`` with
    ``out[i·k + j] = p[i] ⊙ q[j]``, the long axis ``n`` innermost (contiguous, and its backward reduces along a
    middle axis: ``khatri_rao_stack_grads``)."""
    return (p.unsqueeze(1) * q.unsqueeze(0)).reshape(p.shape[0] * q.shape[0], -1)


#: rank rows × columns from which ``khatri_rao_stack_grads`` runs one multiply-add per rank row on the CPU
#: (``benchmarks/loha_grads.py``: the crossover lay at 4,500-5,000 columns for 4 rows, 2,700 for 8, below
#: 1,440 for 16; at 8 rows × 5,120 columns, an SD U-Net feed-forward, the loop takes half the time)
KR_GRADS_LOOP_FROM = 20_000


def khatri_rao_stack_grads(grad: torch.Tensor, p: torch.Tensor,
                           q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``<grad, khatri_rao_stack(p, q)>`` with respect to ``p`` and ``q``."""
    m, k = p.shape[0], q.shape[0]
    g = grad.reshape(m, k, -1)
    if grad.device.type != "cpu" or max(m, k) * g.shape[-1] < KR_GRADS_LOOP_FROM:
        return (g * q.unsqueeze(0)).sum(1), (g * p.unsqueeze(1)).sum(0)
    # large: a broadcast product the size of grad, then a reduction along its middle axis, runs at a fraction
    # of the speed of m + k multiply-adds on rows (one launch each, no temporary)
    grad_p, grad_q = g[:, 0] * q[0], g[0] * p[0]
    for j in range(1, k):
        grad_p.addcmul_(g[:, j], q[j])
    for i in range(1, m):
        grad_q.addcmul_(g[i], p[i])
    return grad_p, grad_q


def loha_factors(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                 t1: torch.Tensor | None = None,
                 t2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LoHa's ``(w1a w1b) ⊙ (w2a w2b)`` as a rank-r² product ``U V`` (``U`` ``(out, r²)``, ``V`` ``(r², in·k·k)``).

    ``(A1 B1) ⊙ (A2 B2) = KR(A1, A2) KR(B1ᵀ, B2ᵀ)ᵀ`` with ``KR`` the row-wise Kronecker (Khatri-Rao) product:
    entry ``[o, c]`` is ``Σ_ij A1[o,i] A2[o,j] B1[i,c] B2[j,c]``.  Tucker (``t*`` ``(r, r, kh, kw)``, ``w*_a``
    ``(r, out)``, ``w*_b`` ``(r, in)``): ``V`` is ``(r², in)`` and a third factor, the core
    ``C[(i,i'), (j,j'), h, w] = t1[i,j,h,w] t2[i',j',h,w]``, sits between them; otherwise ``None``.
    """
    # V built in its own (r², columns) layout: contiguous, and its backward reduces along a middle axis
    # (KR(B1ᵀ, B2ᵀ)ᵀ through transposes was several times slower on the CPU)
    v = khatri_rao_stack(w1b, w2b)
    if t1 is None:
        return khatri_rao_rows(w1a, w2a), v, None
    r, _, kh, kw = t1.shape
    core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(r * r, r * r, kh, kw)
    return khatri_rao_rows(w1a.T, w2a.T), v, core


class _LoHaChain(torch.autograd.Function):
    """``base(x, W0, b) + scale · U (V x)`` for LoHa's rank-r² factors, as one autograd node.

    The same function as running ``loha_factors`` through autograd, with fewer and cheaper kernels (measured
    on the CPU: 25-35 % less time over the frozen layer on an SD U-Net's linears, the whole LoHa step 5 % faster):
    ``U`` is built as ``Uᵀ`` ``(r², out)`` and ``V`` as ``(r², in·k·k)``, so the products that build them and
    the reductions that differentiate them run along the long, contiguous axis; ``scale`` goes on the thin
    ``(positions, r²)`` side; the frozen and the adapter's input gradients meet in one buffer.  ``U`` and
    ``V`` are kept for backward (the plain autograd graph keeps them too).
    """

    @staticmethod
    def forward(ctx, x, w0, b, w1a, w1b, w2a, w2b, scale: float, conv):
        r = w1b.shape[0]
        a1t, a2t = w1a.t().contiguous(), w2a.t().contiguous()  # (r, out): the output axis innermost
        ut = khatri_rao_stack(a1t, a2t)  # Uᵀ[(i, j), o] = A1[o, i] A2[o, j]
        v = khatri_rao_stack(w1b, w2b)  # V[(i, j), c] = B1[i, c] B2[j, c]
        if conv is None:
            x2 = x.reshape(-1, x.shape[-1])
            y = torch.mm(x2, w0.t()) if b is None else torch.addmm(b, x2, w0.t())
            z = torch.mm(x2, v.t())
            y.addmm_(z, ut, alpha=scale)
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        else:
            stride, padding, dilation = conv
            y = F.conv2d(x, w0, b, stride, padding, dilation)
            z = F.conv2d(x, v.reshape(r * r, *w0.shape[1:]), None, stride, padding, dilation)
            n, z3 = y.shape[0], z.reshape(y.shape[0], r * r, -1)
            if y.is_contiguous():  # in place through a view
                y.view(n, y.shape[1], -1).baddbmm_(ut.t().expand(n, -1, -1), z3, alpha=scale)
            else:  # e.g. channels-last: a reshape would copy, and the in-place add would be lost
                y = y + torch.matmul(ut.t(), z3).reshape(y.shape) * scale
        ctx.save_for_backward(x, w0, a1t, a2t, w1b, w2b, ut, v, z)
        ctx.scale, ctx.conv = scale, conv
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w0, a1t, a2t, w1b, w2b, ut, v, z = ctx.saved_tensors
        scale, conv = ctx.scale, ctx.conv
        r = a1t.shape[0]
        want_x = ctx.needs_input_grad[0]
        grad_x = None
        if conv is None:
            g = grad.reshape(-1, grad.shape[-1])
            gz = torch.mm(g, ut.t()).mul_(scale)  # (positions, r²)
            gut = torch.mm(z.t(), g).mul_(scale)  # (r², out)
            gv = torch.mm(gz.t(), x.reshape(-1, x.shape[-1]))
            if want_x:
                grad_x = torch.mm(g, w0).addmm_(gz, v).reshape(x.shape)
        else:
            stride, padding, dilation = conv
            n = grad.shape[0]
            g, z3 = grad.reshape(n, grad.shape[1], -1), z.reshape(n, r * r, -1)
            gz = torch.matmul(ut, g).mul_(scale)  # (n, r², positions)
            gut = torch.mm(z3[0], g[0].t()) if n == 1 else torch.bmm(z3, g.transpose(1, 2)).sum(0)
            gut.mul_(scale)
            gx_z, gv, _ = torch.ops.aten.convolution_backward(
                gz.reshape(z.shape), x, v.reshape(r * r, *w0.shape[1:]), None, stride, padding, dilation,
                False, [0, 0], 1, [want_x, True, False])
            if want_x:
                grad_x = torch.ops.aten.convolution_backward(
                    grad, x, w0, None, stride, padding, dilation, False, [0, 0], 1, [True, False, False])[0]
                grad_x.add_(gx_z)
        grad_a1t, grad_a2t = khatri_rao_stack_grads(gut, a1t, a2t)
        grad_w1b, grad_w2b = khatri_rao_stack_grads(gv, w1b, w2b)
        return grad_x, None, None, grad_a1t.t(), grad_w1b, grad_a2t.t(), grad_w2b, None, None


def loha_chain(x: torch.Tensor, w0: torch.Tensor, b: torch.Tensor | None, w1a: torch.Tensor, w1b: torch.Tensor,
               w2a: torch.Tensor, w2b: torch.Tensor, scale: float,
               conv: tuple[list[int], list[int], list[int]] | None = None) -> torch.Tensor:
    """``F.linear(x, W0, b)`` (or ``F.conv2d`` with ``conv = (stride, padding, dilation)``) plus LoHa's update
    ``scale · (w1a w1b) ⊙ (w2a w2b)`` applied as its rank-r² chain, never building ``ΔW``.

    Plain LoHa only (no Tucker cores), every tensor of one floating dtype, a batched conv input, integer
    padding; ``W0`` and ``b`` get no gradient.  Differentiable in ``x`` and the four factors.
    """
    return _LoHaChain.apply(x, w0, b, w1a, w1b, w2a, w2b, float(scale), conv)


# ---- LoKr --------------------------------------------------------------------------------------------


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension = u · v`` with ``u ≤ v`` the way LyCORIS does (``u`` goes to ``w1``, ``v`` to ``w2``).

    - ``factor > 0`` dividing ``dimension``: ``(min(f, p/f), max(f, p/f))``;
    - otherwise (``factor = -1`` means no bound): ``u`` = the largest divisor with
      ``u ≤ min(factor, √dimension)``, ``v = dimension / u``  (the seed paper's formula).

    So 320 → (16, 20) at f = -1 and (4, 80) at f = 4; 100 at f = 20 → (5, 20), not (10, 10).
    """
    if factor > 0 and dimension % factor == 0:
        other = dimension // factor
        return (factor, other) if factor <= other else (other, factor)
    bound = dimension if factor < 0 else factor
    best = 1
    for u in range(1, math.isqrt(dimension) + 1):
        if u > bound:
            break
        if dimension % u == 0:
            best = u
    return best, dimension // best


def kron_weight(w1: torch.Tensor, w2: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``ΔW = scale · w1 ⊗ w2``; ``w1`` is ``(a, c)``, ``w2`` ``(b, d[, kh, kw])`` → ``(a·b, c·d[, kh, kw])``."""
    w1 = w1 * scale if scale != 1 else w1
    if w2.dim() > 2:
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
    return torch.kron(w1, w2.contiguous())  # torch.kron views its inputs: an einsum result would fail


def kron_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x @ (w1 ⊗ w2)ᵀ`` without building the product: ``vec(w1 X w2ᵀ)`` with ``X`` = ``x`` as ``(c, d)``."""
    a, c = w1.shape
    b, d = w2.shape
    h = x.reshape(*x.shape[:-1], c, d) @ w2.T  # (..., c, b)
    return torch.matmul(w1, h).reshape(*x.shape[:-1], a * b)


def kron_conv2d(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """``conv2d(x, w1 ⊗ w2)`` without building the product: ``w2`` convolves each of the ``c`` channel
    groups of ``x``, then ``w1`` mixes the groups (``(a, c)`` applied as a matmul)."""
    n, _, height, width = x.shape
    a, c = w1.shape
    h = F.conv2d(x.reshape(n * c, -1, height, width), w2, None, stride, padding, dilation)
    b, oh, ow = h.shape[1:]
    h = torch.matmul(w1, h.reshape(n, c, b * oh * ow))  # (n, a, b·oh·ow)
    return h.reshape(n, a * b, oh, ow)


def kron_lowrank_linear(x: torch.Tensor, w1: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
    """``x @ (w1 ⊗ (w2a w2b))ᵀ`` through the rank: ``w2b`` ``(r, d)`` reduces each of the ``c`` input groups to
    ``r`` values, ``w1`` ``(a, c)`` mixes the groups, ``w2a`` ``(b, r)`` expands (``(w1 ⊗ w2a)(I ⊗ w2b)``)."""
    a, c = w1.shape
    b = w2a.shape[0]
    lead = x.shape[:-1]
    h = x.reshape(*lead, c, w2b.shape[1]) @ w2b.T  # (..., c, r)
    h = torch.matmul(w1, h)  # (..., a, r)
    return (h @ w2a.T).reshape(*lead, a * b)


def kron_lowrank_conv2d(x: torch.Tensor, w1: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                        core: torch.Tensor | None, stride, padding, dilation) -> torch.Tensor:
    """``conv2d(x, w1 ⊗ W2)`` with ``W2`` low-rank, never built: ``w2b`` (a conv ``(r, d, kh, kw)``, or with a
    Tucker ``core`` ``(r, r, kh, kw)`` a 1×1 conv ``(r, d, 1, 1)`` followed by the core) runs on each of the
    ``c`` channel groups, ``w1`` ``(a, c)`` mixes the groups at rank ``r``, ``w2a`` ``(b, r)`` expands."""
    n, _, height, width = x.shape
    a, c = w1.shape
    b = w2a.shape[0]
    h = x.reshape(n * c, -1, height, width)
    if core is None:
        h = F.conv2d(h, w2b, None, stride, padding, dilation)
    else:
        h = F.conv2d(F.conv2d(h, w2b), core, None, stride, padding, dilation)
    r, oh, ow = h.shape[1:]
    h = torch.matmul(w1, h.reshape(n, c, r * oh * ow)).reshape(n, a, r, oh * ow)
    return torch.matmul(w2a, h).reshape(n, a * b, oh, ow)  # (b, r) @ (n, a, r, P) -> (n, a, b, P)


# ---- DoRA --------------------------------------------------------------------------------------------


def weight_norm(weight: torch.Tensor, on_out: bool = True) -> torch.Tensor:
    """‖W‖ per output row (``on_out``, LyCORIS's default) or per input column, broadcastable to ``W``:
    ``(out, 1[, 1, 1])`` or ``(1, in[, 1, 1])``."""
    ones = [1] * (weight.dim() - 2)
    if on_out:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], 1, *ones)
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norms.reshape(1, weight.shape[1], *ones)


def dora_weight(weight: torch.Tensor, magnitude: torch.Tensor, multiplier: float = 1.0,
                on_out: bool = True) -> torch.Tensor:
    """``W' = W · m / ‖W‖`` with ``W = W0 + ΔW``.  A ``multiplier`` other than 1 enters as LyCORIS's
    ``W · (mult · (m/‖W‖ − 1) + 1)`` (at 0 that is ``W0 + ΔW``, not ``W0``); lorakit's adapters call it with 1
    and scale ``W' − W0`` instead, as A1111 and ComfyUI do.

    The norm is clamped at machine epsilon (LyCORIS adds it) so that a zero row stays finite while
    ``W' = W0`` holds exactly at initialisation (``m = ‖W0‖``, ``ΔW = 0``).
    """
    ratio = magnitude / weight_norm(weight, on_out).clamp_min(torch.finfo(weight.dtype).eps)
    if multiplier != 1:
        ratio = (ratio - 1) * multiplier + 1
    return weight * ratio


# ---- (IA)^3 ------------------------------------------------------------------------------------------


def ia3_weight(weight: torch.Tensor, vector: torch.Tensor, on_input: bool, scale: float = 1.0) -> torch.Tensor:
    """``ΔW = scale · W0 ⊙ v``: (IA)^3's ``W0 · (1 + v)`` minus ``W0``, ``v`` along output rows (or input
    columns when ``on_input``).  The bias is left alone, as in LyCORIS's merge and A1111."""
    ones = [1] * (weight.dim() - 2)
    v = vector.reshape(1, -1, *ones) if on_input else vector.reshape(-1, 1, *ones)
    return weight * (v * scale if scale != 1 else v)
