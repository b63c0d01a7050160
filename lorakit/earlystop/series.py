"""CS-Fluctuation as pure functions of the CS series (numpy in, numpy out), to read beside the paper.

Notation: ``cs[n]`` is the n-th CS sample (one per step, or one every ``interval`` steps); ``M`` is the
window, in samples.  Every window here is *trailing*: the value at sample ``n`` uses samples up to ``n`` and
none after, so it is known at sample ``n`` (the authors' code does the same).  The paper writes the same
windows looking ahead (eq. 3 sums from ``j`` to ``j + M``); the numbers are identical, only the index they
are filed under differs, and that shift is the lag below.

Each function returns the ``valid`` part of its result (no padding): element ``k`` of the output belongs to
sample ``k + offset``, with the offsets

==========================  ===============================  =================
quantity                    definition                       first sample
==========================  ===============================  =================
``MA(CS)``  (eq. 3)         mean of ``cs[n-M+1 .. n]``        ``M - 1``
``∇MA(CS)``                 ``MA[n] - MA[n-1]``               ``M``
``X = MA(∇MA(CS))``         mean of ``∇MA[n-M+1 .. n]``       ``2M - 1``
``CSF``     (eq. 4)         ``Var(X[n-M+1 .. n]) / lr``       ``3M - 2``
==========================  ===============================  =================

So ``CSF[n]`` is a function of exactly the ``3M - 1`` samples ``cs[n-3M+2 .. n]``.  (``X[n]`` simplifies to
``(MA[n] - MA[n-M]) / M``: the slope of the smoothed CS over one window.)

Lag.  A valley of CSF at sample ``v`` describes the CS behaviour over ``cs[v-3M+2 .. v]``.  lorakit files the
turning point under the *centre* of that span, ``v - (3M-2)/2`` (≈ ``v - 1.5M``): it is the group delay of the
three length-``M`` windows, and for a series symmetric in time about ``t`` the CSF is symmetric about
``t + (3M-2)/2``, so a calm patch centred on step ``t`` gives a turning point at ``t``.  Other choices, kept
as options: ``"start"`` (``v - (3M-2)``: the paper's look-ahead indexing of eq. 3-4, and what the authors'
code means to save), ``"end"`` (``v``).  Algorithm 1's ``j - M`` counts one window of the three.  The
valley itself is only known once the curve has turned up again (the next sample at least, more with a
noise guard), so the run stops at least ``lag + 1`` samples after the turning point.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

ALIGNMENTS = ("centre", "start", "end")


def _as_series(values: np.ndarray | list[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"a series is one-dimensional, got shape {x.shape}")
    return x


def check_window(window: int) -> int:
    if int(window) != window or window < 2:
        # M = 1 makes the variance of eq. 4 a variance of one sample: CSF would be 0 everywhere
        raise ValueError(f"the window M must be an integer >= 2, got {window}")
    return int(window)


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Eq. 3, trailing: ``out[k] = mean(x[k : k+M])``, filed under sample ``k + M - 1``; length ``n - M + 1``.

    Each window is summed on its own (no running sum), so a constant series gives an exactly constant
    average, and the value for one window does not depend on how much of the series is passed in.
    """
    x = _as_series(x)
    if len(x) < window:
        return np.empty(0)
    return sliding_window_view(x, window).mean(axis=-1)


def first_difference(x: np.ndarray) -> np.ndarray:
    """``∇x[n] = x[n] - x[n-1]``, filed under the later sample; length ``n - 1``."""
    return np.diff(_as_series(x))


def moving_variance(x: np.ndarray, window: int) -> np.ndarray:
    """Population variance over each trailing window (the ``1/M Σ (X - X̄)²`` of eq. 4); length ``n - M + 1``."""
    x = _as_series(x)
    if len(x) < window:
        return np.empty(0)
    return sliding_window_view(x, window).var(axis=-1)


def smoothed_slope(cs: np.ndarray, window: int) -> np.ndarray:
    """``X = MA(∇ MA(CS))``: element ``k`` belongs to sample ``k + 2M - 1``; length ``n - 2M + 1``."""
    m = check_window(window)
    return moving_average(first_difference(moving_average(cs, m)), m)


def cs_fluctuation(cs: np.ndarray, window: int, lr: float = 1.0) -> np.ndarray:
    """Eq. 4: ``CSF = Var_M(X) / lr``; element ``k`` belongs to sample ``k + 3M - 2``; length ``n - 3M + 2``.

    Dividing by the (constant) learning rate scales the curve and moves none of its valleys.
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    m = check_window(window)
    return moving_variance(smoothed_slope(cs, m), m) / lr


def csf_offset(window: int) -> int:
    """The sample the first CSF value belongs to: ``3M - 2`` (so ``3M - 1`` samples are needed)."""
    return 3 * check_window(window) - 2


def turning_point_lag(window: int, alignment: str | int = "centre") -> int:
    """Samples between a CSF valley (filed under its trailing sample ``v``) and the sample it refers to.

    ``"centre"``: ``(3M-2) // 2``, the centre of the span ``cs[v-3M+2 .. v]`` (for odd M the centre falls
    between two samples; the later one is taken); ``"start"``: ``3M - 2``; ``"end"``: 0; an int: that many
    samples.
    """
    m = check_window(window)
    if isinstance(alignment, (int, np.integer)) and not isinstance(alignment, bool):
        if alignment < 0:
            raise ValueError(f"a lag cannot be negative, got {alignment}")
        return int(alignment)
    if alignment == "centre":
        return (3 * m - 2) // 2
    if alignment == "start":
        return 3 * m - 2
    if alignment == "end":
        return 0
    raise ValueError(f"alignment must be one of {ALIGNMENTS} or a number of samples, got {alignment!r}")


def pad_to_samples(values: np.ndarray, offset: int, n: int) -> np.ndarray:
    """A ``valid`` series placed on the sample axis: NaN before ``offset`` (where it is not defined yet)."""
    out = np.full(n, np.nan)
    values = _as_series(values)[: max(0, n - offset)]
    out[offset : offset + len(values)] = values
    return out


def sign_change_valleys(y: np.ndarray) -> np.ndarray:
    """Indices ``k`` where ``∇y`` turns from − to + (the paper's valleys, Algorithm 1 line 6), no noise guard.

    ``∇y[k] < 0`` and the next non-zero difference after it is ``> 0``: a flat bottom counts once, at its
    first sample (the authors' code skips a flat bottom altogether; lorakit does not).
    """
    d = first_difference(y)
    nonzero = np.flatnonzero(d != 0)
    signs = np.sign(d[nonzero])
    # a − followed (after any zeros) by a +; the valley is the sample after the last falling step
    turns = np.flatnonzero((signs[:-1] < 0) & (signs[1:] > 0))
    return nonzero[turns] + 1
