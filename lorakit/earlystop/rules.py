"""Turning-point rules on the CSF curve: each is a small config (frozen dataclass) and an online tracker.

A rule's tracker takes the CSF values one at a time (``update(index, value)``, ``index`` = the CS sample the
value belongs to) and returns a ``Detection`` the first time it decides.  The offline function ``rule.find``
runs the same tracker over a whole curve, so online and offline can never disagree.

``SecondValley`` is the paper's rule (Algorithm 1): the turning point is the second valley of CSF; the first
one is the under-fitted start.  Its noise guard (``prominence``) is a hysteresis on the curve: with
``h = prominence · (max - min of CSF so far)``,

- a *peak* is confirmed once the curve has fallen more than ``h`` below its highest point since the last
  valley (the series start counts as a possible peak);
- a *valley* is confirmed once the curve, after a confirmed peak, has risen more than ``h`` above its lowest
  point since that peak; the valley is that lowest point, and it is known at the sample that rose past it.

So a wiggle counts only when it is deeper than a fraction of the curve's range on *both* sides.  With
``prominence = 0`` this is exactly the paper's "∇CSF changes from − to +" (``series.sign_change_valleys``).
``min_distance`` (in windows M) additionally ignores a valley closer than that to the previous counted one.
The range is the curve's own history, so the guard protects everything after a large swing (the paper's
setting: CS moves fast while B grows from zero, which sets the range early); a curve that starts quiet has
only noise in its range, and there noise wiggles still count.

``CalmRule`` is an alternative that reads the paper's claim directly ("when CS-Fluctuation becomes small"):
the turning point is the first sample of the first stretch of ``patience · M`` samples during which CSF stays
below ``threshold`` times its running maximum.  It does not depend on counting waves.

``UpdateBudget`` reads another thing ΔW and W tell, from the same sums as CS: the update's size, the mean over
layers of ‖ΔW‖ / ‖W‖.  The turning point is the first sample where it reaches ``budget``: an adapter that has
moved its layers that far has learned what it will and starts to overwrite the base model.  Unlike CSF, the size
grows fast exactly when a run breaks the model (a high learning rate), so the rule stops a breakdown within its
first epoch and lets a slow learner run until its update has grown (``docs/early_stopping.md`` has the
measurements it was chosen on, and where it misses).

``SpectralBudget`` is the same rule on the spectral size, the mean over layers of σ1(ΔW) / σ1(W): how far a
layer moves any one input, whatever the update's rank (the Frobenius size of a LoHa's rank-r² or a LoKr's
Kronecker update is spread over many directions, each moved a little).  It costs an SVD-sized computation per
layer, so the trainer reads it at epoch ends only, and the rule decides there.

``GrowthStall`` reads the same size differently: not how large it is but whether it still grows.  At the end of
each window (one epoch by default) it compares the size with the size ``span`` windows before; the turning point
is the first window end where it grew by less than ``growth`` per window (the adapter has little left to learn),
or where it reached ``cap`` (a run breaking the model).  A growth rate does not depend on the size's scale, which
changes with the learning rate, the rank and the model; the cap does.

A rule says which series it reads (``series``): ``"csf"``, ``"update"`` or ``"spectral"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from lorakit.errors import InvalidValueError


@dataclass(frozen=True)
class Detection:
    """A rule's decision: the CSF sample the turning point sits at, and the sample at which it became known."""

    csf_index: int
    decided_index: int
    reason: str


class Tracker(Protocol):
    def update(self, index: int, value: float) -> Detection | None: ...

    def earliest_candidate(self, index: int) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: the series a size rule reads: no lag, decided at the sample the size belongs to
SIZE_SERIES = ("update", "spectral")


class Rule(Protocol):
    name: ClassVar[str]
    #: what the tracker is fed: "csf" (CS-Fluctuation), "update" (‖ΔW‖ / ‖W‖) or "spectral" (σ1(ΔW) / σ1(W))
    series: ClassVar[str]

    def tracker(self, window: int) -> Tracker: ...

    def find(self, csf: np.ndarray, window: int, offset: int = 0) -> Detection | None: ...

    def to_dict(self) -> dict[str, Any]: ...

    def waiting(self, sizes: Sequence[float]) -> str | None: ...

    def undecided(self, sizes: np.ndarray | None, window: int) -> str: ...


def _last_read(sizes: Sequence[float]) -> float | None:
    """The latest recorded size (the spectral size is read at epoch ends only: the samples between are NaN)."""
    return next((v for v in reversed(sizes) if not math.isnan(v)), None)


def _run(tracker: Tracker, csf: np.ndarray, offset: int) -> Detection | None:
    for k, value in enumerate(np.asarray(csf, dtype=np.float64)):
        found = tracker.update(offset + k, float(value))
        if found is not None:
            return found
    return None


class _RuleMethods:
    """What every rule does the same way given its ``tracker``: the offline run and the config dict."""

    def find(self, values: np.ndarray, window: int, offset: int = 0) -> Detection | None:
        """The detection on a whole series (``values[k]`` belongs to sample ``offset + k``), or ``None``."""
        return _run(self.tracker(window), values, offset)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    def waiting(self, sizes: Sequence[float]) -> str | None:
        """What the rule waits for while it has not decided, given the series it reads so far (``sizes``; empty
        for a rule on CS-Fluctuation); None: the monitor says how far CS-Fluctuation got instead."""
        return None

    def undecided(self, sizes: np.ndarray | None, window: int) -> str:
        """Why the rule found no turning point by the end of a run, in numbers a user can act on; ``sizes`` is the
        whole recorded series the rule reads (None for CS-Fluctuation), ``window`` the samples per window."""
        return f"the {self.name.replace('_', '-')} rule found no turning point in the CS-Fluctuation curve"


# ---- the paper's rule --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecondValley(_RuleMethods):
    """The ``valley``-th valley of CSF (2 in the paper), with the noise guard described in the module doc.

    ``prominence``: fraction of the running range a wiggle must exceed on both sides to count (0 = none);
    ``min_distance``: a valley closer than this many windows to the previous counted one is ignored.
    """

    name: ClassVar[str] = "second_valley"
    series: ClassVar[str] = "csf"
    valley: int = 2
    prominence: float = 0.05
    min_distance: float = 0.0

    def __post_init__(self) -> None:
        if self.valley < 1:
            raise InvalidValueError(f"valley counts from 1, got {self.valley}")
        if not 0 <= self.prominence < 1:
            raise InvalidValueError(f"prominence is a fraction of the range in [0, 1), got {self.prominence}")
        if self.min_distance < 0:
            raise InvalidValueError(f"min_distance cannot be negative, got {self.min_distance}")

    def tracker(self, window: int) -> ValleyTracker:
        return ValleyTracker(self, window)

    def valleys(self, csf: np.ndarray, window: int, offset: int = 0) -> list[tuple[int, int]]:
        """All counted valleys of a curve as ``(valley_index, known_at_index)``, for plots and tests."""
        # the same tracker told to count every valley (it never reaches len(csf) + 1 of them)
        tracker = ValleyTracker(SecondValley(len(csf) + 1, self.prominence, self.min_distance), window)
        _run(tracker, csf, offset)
        return [tuple(v) for v in tracker.counted]


@dataclass
class ValleyTracker:
    rule: SecondValley
    window: int
    rising: bool = True  # looking for a peak (the series start is a peak candidate)
    extreme: float = 0.0  # highest point since the last valley, or lowest since the last peak
    extreme_index: int = -1  # -1: no value seen yet
    low: float = 0.0  # running range of the curve
    high: float = 0.0
    counted: list[list[int]] = field(default_factory=list)  # [valley_index, known_at_index]

    def update(self, index: int, value: float) -> Detection | None:
        if len(self.counted) >= self.rule.valley:
            return None  # decided already; later values change nothing
        if self.extreme_index < 0:
            self.extreme, self.extreme_index, self.low, self.high = value, index, value, value
            return None
        self.low, self.high = min(self.low, value), max(self.high, value)
        margin = self.rule.prominence * (self.high - self.low)
        if self.rising:
            if value > self.extreme:
                self.extreme, self.extreme_index = value, index
            elif value < self.extreme - margin:  # fell far enough: the highest point was a peak
                self.rising, self.extreme, self.extreme_index = False, value, index
        else:
            if value < self.extreme:
                self.extreme, self.extreme_index = value, index
            elif value > self.extreme + margin:  # rose far enough: the lowest point was a valley
                valley = self.extreme_index
                self.rising, self.extreme, self.extreme_index = True, value, index
                return self._count(valley, index)
        return None

    def _count(self, valley: int, index: int) -> Detection | None:
        if self.counted and valley - self.counted[-1][0] < self.rule.min_distance * self.window:
            return None
        self.counted.append([valley, index])
        if len(self.counted) < self.rule.valley:
            return None
        guard = f", prominence {self.rule.prominence:g}" if self.rule.prominence else ", no noise guard"
        return Detection(valley, index, f"valley {len(self.counted)} of CS-Fluctuation at sample {valley} "
                                        f"(known at sample {index}{guard})")

    def earliest_candidate(self, index: int) -> int:
        """No sample before this can still become the turning point (for dropping saved weights)."""
        if len(self.counted) >= self.rule.valley:
            return self.counted[self.rule.valley - 1][0]
        # the next valley is the lowest point of the current or a later descent
        return self.extreme_index if (not self.rising and self.extreme_index >= 0) else index

    def state_dict(self) -> dict[str, Any]:
        return {"rising": self.rising, "extreme": self.extreme, "extreme_index": self.extreme_index,
                "low": self.low, "high": self.high, "counted": [list(v) for v in self.counted]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rising = bool(state["rising"])
        self.extreme, self.extreme_index = float(state["extreme"]), int(state["extreme_index"])
        self.low, self.high = float(state["low"]), float(state["high"])
        self.counted = [[int(a), int(b)] for a, b in state["counted"]]


# ---- an alternative: the first lasting calm --------------------------------------------------------


@dataclass(frozen=True)
class CalmRule(_RuleMethods):
    """The first sample of the first ``patience · M`` samples in a row with CSF below ``threshold × max so far``."""

    name: ClassVar[str] = "calm"
    series: ClassVar[str] = "csf"
    threshold: float = 0.1
    patience: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise InvalidValueError(f"threshold is a fraction of the running maximum in (0, 1), got {self.threshold}")
        if self.patience <= 0:
            raise InvalidValueError(f"patience must be positive, got {self.patience}")

    def tracker(self, window: int) -> CalmTracker:
        return CalmTracker(self, window)


@dataclass
class CalmTracker:
    rule: CalmRule
    window: int
    peak: float = 0.0
    calm_since: int = -1  # first sample of the current calm stretch, -1 when not calm
    decided: bool = False

    def update(self, index: int, value: float) -> Detection | None:
        if self.decided:
            return None
        self.peak = max(self.peak, value)
        # strictly below: a curve that is 0 everywhere (constant CS) is never "calm after a peak"
        if value < self.rule.threshold * self.peak:
            if self.calm_since < 0:
                self.calm_since = index
            if index - self.calm_since + 1 >= math.ceil(self.rule.patience * self.window):
                self.decided = True
                return Detection(self.calm_since, index,
                                 f"CS-Fluctuation below {self.rule.threshold:g} of its maximum from sample "
                                 f"{self.calm_since} for {self.rule.patience:g} windows (known at sample {index})")
        else:
            self.calm_since = -1
        return None

    def earliest_candidate(self, index: int) -> int:
        return self.calm_since if self.calm_since >= 0 else index

    def state_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "calm_since": self.calm_since, "decided": self.decided}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.peak, self.calm_since, self.decided = float(state["peak"]), int(state["calm_since"]), bool(
            state["decided"])


# ---- beyond the paper: the update's size -----------------------------------------------------------


@dataclass(frozen=True)
class _SizeBudget(_RuleMethods):
    """A budget on one of the size series: the first sample where it reaches ``budget`` (no lag)."""

    name: ClassVar[str]
    series: ClassVar[str]
    budget: float

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise InvalidValueError(f"budget is a size of ΔW relative to W, above 0; got {self.budget}")

    def tracker(self, window: int) -> BudgetTracker:
        return BudgetTracker(self)

    def waiting(self, sizes: Sequence[float]) -> str | None:
        last = _last_read(sizes)
        what = "the update's size" if self.series == "update" else "the spectral size"
        if last is None:
            return f"{what} is read at epoch ends" if self.series == "spectral" else f"{what} is not read yet"
        return f"{what} {last:.4g}{' (last read)' if self.series == 'spectral' else ''} is under the budget"

    def undecided(self, sizes: np.ndarray | None, window: int) -> str:
        # a budget is a property of the model and data: how far the run got towards it tells whether more epochs
        # or another budget is needed
        recorded = np.asarray([] if sizes is None else sizes, dtype=np.float64)
        recorded = recorded[~np.isnan(recorded)]
        if not len(recorded):
            return f"the {self.name.replace('_', '-')} rule had no size reading to decide on"
        largest = f" (largest {recorded.max():.3g})" if recorded.max() > recorded[-1] else ""
        return (f"{SIZE_NAMES[self.series]} was {recorded[-1]:.3g} at the end, {recorded[-1] / self.budget:.0%} of its "
                f"budget {self.budget:g}{largest}; the budget was set on the shapes world (docs/early_stopping.md)")


@dataclass(frozen=True)
class UpdateBudget(_SizeBudget):
    """The first sample where the mean over layers of ‖ΔW‖ / ‖W‖ reaches ``budget``."""

    name: ClassVar[str] = "budget"
    series: ClassVar[str] = "update"
    budget: float = 0.1


@dataclass(frozen=True)
class SpectralBudget(_SizeBudget):
    """The first sample where the mean over layers of σ1(ΔW) / σ1(W) reaches ``budget`` (the trainer reads it at
    epoch ends; samples without it are NaN and never decide)."""

    name: ClassVar[str] = "spectral_budget"
    series: ClassVar[str] = "spectral"
    budget: float = 0.25


#: how each size series is named in a turning point's reason and in errors
SIZE_NAMES = {"update": "the update's size ‖ΔW‖/‖W‖", "spectral": "the update's spectral size σ1(ΔW)/σ1(W)"}


@dataclass
class BudgetTracker:
    rule: _SizeBudget
    decided: bool = False

    def update(self, index: int, value: float) -> Detection | None:
        if self.decided or not value >= self.rule.budget:  # a NaN (no size recorded) never decides
            return None
        self.decided = True
        return Detection(index, index, f"{SIZE_NAMES[self.rule.series]} reached {value:.4g} at sample {index} "
                                       f"(budget {self.rule.budget:g})")

    def earliest_candidate(self, index: int) -> int:
        return index

    def state_dict(self) -> dict[str, Any]:
        return {"decided": self.decided}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decided = bool(state["decided"])


# ---- beyond the paper: the update stops growing -------------------------------------------------------


@dataclass(frozen=True)
class GrowthStall(_RuleMethods):
    """At the end of each window of M samples (the trainer's default window: one epoch), the update's size
    ‖ΔW‖/‖W‖ grew by less than ``growth`` per window over the last ``span`` windows, or it reached ``cap``.

    ``growth``: the per-window growth rate below which the update counts as stalled, from
    ``(s_now / s_span_windows_ago) ** (1 / span) - 1``; ``cap``: the size at which the rule stops whatever the
    growth (a run that breaks the model grows its update far past it in its first windows).
    """

    name: ClassVar[str] = "growth_stall"
    series: ClassVar[str] = "update"
    growth: float = 0.07
    span: int = 2
    cap: float = 0.175

    def __post_init__(self) -> None:
        if not self.growth > 0:
            raise InvalidValueError(f"growth is a rate per window above 0, got {self.growth}")
        if isinstance(self.span, bool) or not isinstance(self.span, int) or self.span < 1:
            raise InvalidValueError(f"span counts windows from 1, got {self.span!r}")
        if not self.cap > 0:
            raise InvalidValueError(f"cap is a size of ΔW relative to W, above 0; got {self.cap}")

    def tracker(self, window: int) -> GrowthTracker:
        return GrowthTracker(self, window)

    def waiting(self, sizes: Sequence[float]) -> str | None:
        last = _last_read(sizes)
        return "the update's size is not read yet" if last is None else f"the update's size {last:.4g} is still growing"

    def undecided(self, sizes: np.ndarray | None, window: int) -> str:
        ends = [] if sizes is None else list(sizes[window - 1::window])
        rate = self.rate(ends)
        if rate is None:
            return (f"the growth-stall rule compares the update's size over {self.span} windows of "
                    f"{window} samples; the run ended after {len(ends)}")
        return (f"{SIZE_NAMES[self.series]} was still growing by {rate:.1%} per window at the end (the rule stops "
                f"below {self.growth:.1%}, or at the cap {self.cap:g}; it reached {ends[-1]:.3g})")

    def rate(self, ends: list[float] | np.ndarray) -> float | None:
        """The growth per window over the last ``span`` of the window-end sizes ``ends`` (None before there are
        ``span + 1`` of them, or from a size of 0)."""
        if len(ends) <= self.span or not ends[-1 - self.span] > 0:
            return None
        return float((ends[-1] / ends[-1 - self.span]) ** (1 / self.span) - 1)


@dataclass
class GrowthTracker:
    rule: GrowthStall
    window: int
    ends: list[float] = field(default_factory=list)  # the size at the end of each window so far
    decided: bool = False

    def update(self, index: int, value: float) -> Detection | None:
        # only a window's last sample counts: the growth is measured window to window (epoch to epoch)
        if self.decided or (index + 1) % self.window or math.isnan(value):
            return None
        self.ends.append(value)
        found = None
        rate = self.rule.rate(self.ends)
        if value >= self.rule.cap:
            found = f"reached {value:.4g} (cap {self.rule.cap:g})"
        elif rate is not None and rate < self.rule.growth:
            found = (f"grew by {rate:.1%} per window over the last {self.rule.span} (below "
                     f"{self.rule.growth:.1%}), to {value:.4g}")
        if found is None:
            return None
        self.decided = True
        return Detection(index, index, f"{SIZE_NAMES[self.rule.series]} {found} at sample {index}")

    def earliest_candidate(self, index: int) -> int:
        return index

    def state_dict(self) -> dict[str, Any]:
        return {"ends": list(self.ends), "decided": self.decided}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ends, self.decided = [float(v) for v in state["ends"]], bool(state["decided"])


RULES: dict[str, type] = {SecondValley.name: SecondValley, CalmRule.name: CalmRule, UpdateBudget.name: UpdateBudget,
                          SpectralBudget.name: SpectralBudget, GrowthStall.name: GrowthStall}


def rule_from_dict(config: dict[str, Any]) -> SecondValley | CalmRule | UpdateBudget | SpectralBudget | GrowthStall:
    """Rebuild a rule from ``rule.to_dict()`` (used by state dicts and the transformers callback)."""
    config = dict(config)
    name = config.pop("name")
    if name not in RULES:
        raise InvalidValueError(f"unknown turning-point rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name](**config)
