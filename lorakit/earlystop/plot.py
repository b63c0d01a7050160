"""The paper's figure: CS (and MA(CS)) and CS-Fluctuation over training, the turning point dashed.

CS-Fluctuation is drawn at the step each value refers to (its sample minus the lag), the way the paper files
it; the dotted line marks where the turning point became known.

Drawn on a bare ``Figure`` with the Agg canvas (no pyplot: no global state, no GUI backend), written to a
temporary file beside ``path`` and moved into place, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorakit.atomic import atomic_write
from lorakit.earlystop.monitor import History, TurningPoint


def _history(history: History | Mapping[str, Any]) -> History:
    return history if isinstance(history, History) else History.from_dict(dict(history))


def plot_cs_fluctuation(history: History | Mapping[str, Any], path: str | os.PathLike,
                        turning_point: TurningPoint | int | None = None, *, x: str = "step",
                        title: str | None = None, budget: float | None = None,
                        budget_series: str = "update") -> Path:
    """Write the figure to ``path`` (PNG) and return it.

    ``history``: ``monitor.history`` or its ``to_dict()`` (e.g. read back from JSON); ``turning_point``: a
    ``TurningPoint``, a step, or ``None`` for the history's own; ``x``: ``"step"`` or ``"epoch"`` (fractional
    epochs from the steps, when the samples carry epochs).  When the history has the update's size, a second
    panel shows it, and the spectral size (read at epoch ends) where it was read; ``budget`` draws a size
    rule's budget on the series it reads (``budget_series``: "update" or "spectral").
    """
    h = _history(history)
    tp = h.turning_point if turning_point is None else turning_point
    tp_step = tp.step if isinstance(tp, TurningPoint) else tp
    found_step = tp.found_at_step if isinstance(tp, TurningPoint) else None

    steps = h.steps.astype(np.float64)
    to_x, label = (lambda s: s), "step"
    if x == "epoch":
        to_x, label = _epoch_axis(h), "epoch"
    elif x != "step":
        raise ValueError(f"x must be 'step' or 'epoch', got {x!r}")

    sizes = h.update if h.update is not None and np.isfinite(h.update).any() else None
    fig = Figure(figsize=(8, 5 if sizes is None else 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1) if sizes is None else fig.add_subplot(3, 1, (1, 2))
    xs = to_x(steps)
    ax.plot(xs, h.cs, color="tab:blue", alpha=0.35, lw=1, label="CS")
    ax.plot(xs, h.ma_cs(), color="tab:blue", lw=1.8, label=f"MA(CS), M={h.window}")
    ax.set_xlabel(label)
    ax.set_ylabel("cosine similarity (CS)", color="tab:blue")
    right = ax.twinx()
    # CSF is drawn at the step each value refers to (``lag`` samples before it is known), so that its valley
    # and the dashed turning-point line coincide, as in the paper's figures
    csf = np.full(len(h.csf), np.nan)
    shift = min(h.lag, len(h.csf))  # a run shorter than the lag has no CSF value to draw yet
    csf[: len(h.csf) - shift] = h.csf[shift:]
    if np.isfinite(csf).any():
        right.plot(xs, csf, color="tab:green", lw=1.8, label=f"CS-Fluctuation (drawn {h.lag} samples early)")
        right.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:  # an empty axis with made-up ticks would read as a flat CSF of 0
        right.plot([], [], color="tab:green", lw=1.8, label="CS-Fluctuation: none yet (the run is shorter than its "
                                                            "windows)")
        right.set_yticks([])
    right.set_ylabel(f"CS-Fluctuation (Var/lr, lr={h.lr:g})", color="tab:green")
    if tp_step is not None:
        ax.axvline(to_x(float(tp_step)), color="grey", ls="--", lw=1.5, label=f"turning point (step {tp_step})")
    if found_step is not None:
        ax.axvline(to_x(float(found_step)), color="grey", ls=":", lw=1, label=f"found at step {found_step}")
    if sizes is not None:
        below = fig.add_subplot(3, 1, 3, sharex=ax)
        below.plot(xs, sizes, color="tab:purple", lw=1.5, label="update size ‖ΔW‖/‖W‖ (mean over layers)")
        spectral = h.spectral if h.spectral is not None and np.isfinite(h.spectral).any() else None
        if spectral is not None:  # read at epoch ends only: markers where it was read
            read = np.isfinite(spectral)
            below.plot(xs[read], spectral[read], "o-", color="tab:brown", lw=1, ms=3,
                       label="spectral size σ1(ΔW)/σ1(W) (epoch ends)")
        if budget is not None:
            below.axhline(budget, color="tab:red" if budget_series == "update" else "tab:brown", ls="--", lw=1,
                          label=f"budget {budget:g} on the {budget_series} size")
        if tp_step is not None:
            below.axvline(to_x(float(tp_step)), color="grey", ls="--", lw=1.5)
        below.set_ylabel("update size")
        below.set_xlabel(label)
        below.legend(fontsize="small", loc="upper left")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small")
    ax.set_title(title or "CS-Fluctuation")
    return _save_atomic(fig, Path(path))


def plot_sample_scores(record: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """The sample stop's scores per epoch (``SampleStop.record()``: ``sample_scores.json``), their 3-epoch mean,
    the level the turning point had to reach and the turning point itself; written to ``path`` (PNG)."""
    from lorakit.earlystop.samples import smoothed

    scores = {int(k): float(v) for k, v in record["scores"].items()}
    epochs = sorted(scores)
    values = [scores[e] for e in epochs]
    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(epochs, values, "o", color="tab:orange", alpha=0.6, label=f"sample score ({record['scorer']}, "
                                                                       f"{record['images_per_epoch']} images)")
    ax.plot(epochs, smoothed(values), color="tab:orange", lw=1.8, label="3-epoch mean")
    tp = record.get("turning_point")
    if tp is not None:
        level = record["reach"] * tp["best"] if tp["best"] > 0 else tp["best"]
        ax.axhline(level, color="tab:red", ls=":", lw=1, label=f"{record['reach']:.0%} of the best mean")
        ax.axvline(tp["epoch"], color="grey", ls="--", lw=1.5, label=f"turning point (epoch {tp['epoch']})")
        ax.axvline(tp["found_at_epoch"], color="grey", ls=":", lw=1, label=f"decided at epoch {tp['found_at_epoch']}")
    ax.set_xlabel("epoch (0: the base model)")
    ax.set_ylabel("score (higher is better)")
    ax.legend(fontsize="small", loc="best")
    ax.set_title(title or "early stopping on the samples")
    return _save_atomic(fig, Path(path))


def _epoch_axis(h: History):
    """Map steps to fractional epochs by linear interpolation between the epoch changes of the samples."""
    known = [(float(s), e) for s, e in zip(h.steps, h.epochs, strict=True) if e is not None]
    if not known:
        raise ValueError("x='epoch' needs samples recorded with an epoch")
    # the last step seen in each epoch marks that epoch's end
    ends: dict[int, float] = {}
    for s, e in known:
        ends[e] = max(ends.get(e, s), s)
    epochs = sorted(ends)
    xp = [0.0] + [ends[e] for e in epochs]
    fp = [float(epochs[0] - 1)] + [float(e) for e in epochs]
    return lambda s: np.interp(s, xp, fp)


def _save_atomic(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
