"""The online CS-Fluctuation monitor (Algorithm 1) and its offline twin.

Feed it one CS value per sample (every step, or every ``interval`` steps), and the update's size
(``CSMeter.read()`` gives both; the ``budget`` rule decides on the size)::

    monitor = CSFluctuationMonitor(window=steps_per_epoch, lr=1e-4)
    for step in ...:
        reading = meter.read()
        decision = monitor.update(step, reading.cs, epoch, update=reading.update)
        if decision.stop:
            # hand back the weights saved at decision.turning_point.step
            break

The window M and every index here count *samples* (updates), not steps; ``update`` records the step (and
epoch) of each sample so that the turning point comes back as a step.  The turning point refers to the
sample ``lag`` samples before the CSF valley (``series.turning_point_lag``; ``(3M-2)//2`` by default) and is
known when the rule confirms the valley, one sample after it at the earliest.  A rule on the update's size has
no lag: the size is known at the sample it belongs to.  The spectral size (``spectral=``) is given where it was
read (the trainer: epoch ends) and is NaN at the other samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lorakit.earlystop.rules import (
    SIZE_NAMES,
    SIZE_SERIES,
    Detection,
    Rule,
    SecondValley,
    rule_from_dict,
)
from lorakit.earlystop.series import (
    check_window,
    cs_fluctuation,
    csf_offset,
    moving_average,
    pad_to_samples,
    turning_point_lag,
)
from lorakit.errors import InvalidValueError

_STATE_VERSION = 1


@dataclass(frozen=True)
class TurningPoint:
    """Where to go back to.  ``step``/``epoch``/``index`` are those of the sample the valley refers to."""

    step: int
    epoch: int | None
    index: int  # position in the CS series
    valley_index: int  # the sample the CSF valley is filed under (trailing windows)
    found_at_step: int
    found_at_index: int
    csf: float | None  # CSF at the valley (None for a rule on the update's size)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """What the trainer should do after a sample: continue, or stop (and go back to ``turning_point``)."""

    stop: bool
    reason: str
    turning_point: TurningPoint | None = None

    @property
    def action(self) -> str:
        return "stop" if self.stop else "continue"


@dataclass
class History:
    """The series on the sample axis, for plots and reports (CSF is NaN before its first sample)."""

    window: int
    lr: float
    lag: int
    steps: np.ndarray
    epochs: list[int | None]
    cs: np.ndarray
    csf: np.ndarray
    turning_point: TurningPoint | None = None
    update: np.ndarray | None = None  # ‖ΔW‖/‖W‖ per sample (NaN where not recorded; None: never recorded)
    spectral: np.ndarray | None = None  # σ1(ΔW)/σ1(W) per sample, likewise

    def size(self, series: str) -> np.ndarray | None:
        """The recorded size series a size rule reads ("update" or "spectral")."""
        return self.update if series == "update" else self.spectral

    def ma_cs(self) -> np.ndarray:
        """MA(CS) on the sample axis (eq. 3, trailing), NaN for the first ``M - 1`` samples."""
        return pad_to_samples(moving_average(self.cs, self.window), self.window - 1, len(self.cs))

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window, "lr": self.lr, "lag": self.lag, "steps": self.steps.tolist(),
                "epochs": list(self.epochs), "cs": self.cs.tolist(),
                "csf": [None if math.isnan(v) else v for v in self.csf.tolist()],
                "turning_point": None if self.turning_point is None else self.turning_point.to_dict(),
                **{name: [None if math.isnan(v) else v for v in values.tolist()]
                   for name, values in (("update", self.update), ("spectral", self.spectral)) if values is not None}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        tp = data.get("turning_point")
        return cls(int(data["window"]), float(data["lr"]), int(data["lag"]),
                   np.asarray(data["steps"], dtype=np.int64), list(data["epochs"]),
                   np.asarray(data["cs"], dtype=np.float64),
                   np.asarray([math.nan if v is None else v for v in data["csf"]], dtype=np.float64),
                   None if tp is None else TurningPoint(**tp),
                   *(None if data.get(name) is None else  # histories from before the sizes were recorded
                     np.asarray([math.nan if v is None else v for v in data[name]], dtype=np.float64)
                     for name in SIZE_SERIES))


def _turning_point(found: Detection, lag: int, steps: list[int], epochs: list[int | None],
                   csf_at_valley: float | None) -> TurningPoint:
    index = max(0, found.csf_index - lag)
    return TurningPoint(step=int(steps[index]), epoch=epochs[index], index=index, valley_index=found.csf_index,
                        found_at_step=int(steps[found.decided_index]), found_at_index=found.decided_index,
                        csf=None if csf_at_valley is None else float(csf_at_valley), reason=found.reason)


def find_turning_point(cs: np.ndarray, window: int, lr: float = 1.0, rule: Rule | None = None,
                       alignment: str | int = "centre", steps: np.ndarray | None = None,
                       epochs: list[int | None] | None = None, update: np.ndarray | None = None,
                       spectral: np.ndarray | None = None) -> TurningPoint | None:
    """Offline: the turning point of a whole CS series, as the monitor would report it, or ``None``.

    ``steps``/``epochs`` label the samples (default: the sample index, no epochs); ``update`` is the update's
    size per sample, which a rule on it needs (``spectral``: the spectral size, NaN where not read).  Because
    the rules are online, running this on the prefix ``cs[:k+1]`` says whether the monitor has decided at
    sample ``k``.
    """
    cs = np.asarray(cs, dtype=np.float64)
    rule = rule or SecondValley()
    steps = list(range(len(cs))) if steps is None else [int(s) for s in steps]
    epochs = [None] * len(cs) if epochs is None else list(epochs)
    if rule.series in SIZE_SERIES:
        sizes = update if rule.series == "update" else spectral
        if sizes is None:
            raise ValueError(f"the {rule.name} rule reads {SIZE_NAMES[rule.series]}; this series has none")
        found = rule.find(np.asarray(sizes, dtype=np.float64), window)
        return None if found is None else _turning_point(found, 0, steps, epochs, None)
    csf = cs_fluctuation(cs, window, lr)
    offset = csf_offset(window)
    found = rule.find(csf, window, offset)
    if found is None:
        return None
    return _turning_point(found, turning_point_lag(window, alignment), steps, epochs,
                          csf[found.csf_index - offset])


class CSFluctuationMonitor:
    """Online CS-Fluctuation early stopping.

    ``window``: M in samples (the paper: steps per epoch, with a sample every step); ``lr``: the learning rate
    of eq. 4 (scales the curve only); ``rule``: ``SecondValley()`` (the paper's, default) or ``CalmRule()``;
    ``min_steps``: never ask to stop before this step (a turning point found earlier is kept and the stop
    comes at the first sample at or after it); ``report_only``: decide and report, never ask to stop;
    ``alignment``: which sample a valley refers to (``series.turning_point_lag``).
    """

    def __init__(self, window: int, lr: float = 1.0, rule: Rule | None = None, min_steps: int = 0,
                 report_only: bool = False, alignment: str | int = "centre") -> None:
        if not lr > 0:
            raise InvalidValueError(f"lr must be positive, got {lr}")
        self.window = check_window(window)
        self.lr = float(lr)
        self.rule = rule or SecondValley()
        self.min_steps = int(min_steps)
        self.report_only = bool(report_only)
        self.alignment = alignment
        # a valley of CSF describes the CS samples before it; the update's size, the sample it is read at
        self.lag = 0 if self.rule.series in SIZE_SERIES else turning_point_lag(self.window, alignment)
        self._offset = csf_offset(self.window)
        self._tracker = self.rule.tracker(self.window)
        self._steps: list[int] = []
        self._epochs: list[int | None] = []
        self._cs: list[float] = []
        self._update: list[float] = []  # ‖ΔW‖/‖W‖ per sample, NaN where not given
        self._spectral: list[float] = []  # σ1(ΔW)/σ1(W) per sample, NaN where not given (most samples)
        self._csf: list[float] = []  # from sample 3M-2 on
        # the tails of the intermediate series that the next value needs: MA (2), ∇MA (M), X (M)
        self._ma: list[float] = []
        self._slope: list[float] = []
        self._x: list[float] = []
        self.turning_point: TurningPoint | None = None

    # ---- feeding -----------------------------------------------------------------------------
    def update(self, step: int, cs: float, epoch: int | None = None, update: float | None = None,
               spectral: float | None = None) -> Decision:
        """Record the CS of ``step`` (after that step's update), the update's size ‖ΔW‖/‖W‖ and its spectral size
        σ1(ΔW)/σ1(W) where known, and say whether to stop."""
        step, cs = int(step), float(cs)
        if self.rule.series == "update" and (update is None or not math.isfinite(update)):
            raise ValueError(f"the {self.rule.name} rule needs the update's size ‖ΔW‖/‖W‖ at step {step}, got "
                             f"{update}")
        if self._steps and step <= self._steps[-1]:
            raise ValueError(f"steps must increase: got step {step} after step {self._steps[-1]}")
        if not math.isfinite(cs):
            # one NaN would poison the next 3M-1 CSF values; a NaN CS means the weights already are
            raise ValueError(f"CS at step {step} is {cs}: the adapter weights are not finite")
        self._steps.append(step)
        self._epochs.append(None if epoch is None else int(epoch))
        self._cs.append(cs)
        self._update.append(math.nan if update is None else float(update))
        self._spectral.append(math.nan if spectral is None else float(spectral))
        n = len(self._cs) - 1
        value = self._advance()
        if value is not None:
            self._csf.append(value)
        if self.turning_point is None:
            if self.rule.series in SIZE_SERIES:
                found = self._tracker.update(n, (self._update if self.rule.series == "update" else self._spectral)[-1])
                if found is not None:
                    self.turning_point = _turning_point(found, 0, self._steps, self._epochs, None)
            elif value is not None:
                found = self._tracker.update(n, value)
                if found is not None:
                    self.turning_point = _turning_point(found, self.lag, self._steps, self._epochs,
                                                        self._csf[found.csf_index - self._offset])
        return self._decision(step)

    def _advance(self) -> float | None:
        """The newest MA, ∇MA, X and CSF values from the newest sample (None until CSF is defined).

        Each is one ``np.mean``/``np.var`` over a 1-D window, which numpy computes exactly as it computes that
        window's row in ``series`` (a test checks the two curves bit for bit).
        """
        m = self.window
        if len(self._cs) < m:
            return None
        self._ma = [self._ma[-1], float(np.mean(self._cs[-m:]))] if self._ma else [float(np.mean(self._cs[-m:]))]
        if len(self._ma) < 2:
            return None
        self._slope = (self._slope + [self._ma[1] - self._ma[0]])[-m:]
        if len(self._slope) < m:
            return None
        self._x = (self._x + [float(np.mean(self._slope))])[-m:]
        if len(self._x) < m:
            return None
        return float(np.var(self._x)) / self.lr

    def _decision(self, step: int) -> Decision:
        tp = self.turning_point
        if tp is None:
            needed = self._offset + 1
            sizes = {"update": self._update, "spectral": self._spectral}.get(self.rule.series, [])
            waiting = self.rule.waiting(sizes)
            if waiting is not None:
                return Decision(False, waiting)
            if len(self._cs) < needed:
                return Decision(False, f"collecting samples: {len(self._cs)} of the {needed} that CS-Fluctuation "
                                       f"needs (3 windows of {self.window})")
            return Decision(False, "no turning point yet")
        where = f"step {tp.step}" + ("" if tp.epoch is None else f" (epoch {tp.epoch})")
        if self.report_only:
            return Decision(False, f"turning point at {where}, report only: {tp.reason}", tp)
        if step < self.min_steps:
            return Decision(False, f"turning point at {where}; not stopping before step {self.min_steps}", tp)
        return Decision(True, f"turning point at {where}: {tp.reason}; stopping at step {step}", tp)

    # ---- what is known -----------------------------------------------------------------------
    @property
    def history(self) -> History:
        n = len(self._cs)
        update, spectral = (np.asarray(v, dtype=np.float64) for v in (self._update, self._spectral))
        return History(self.window, self.lr, self.lag, np.asarray(self._steps, dtype=np.int64),
                       list(self._epochs), np.asarray(self._cs, dtype=np.float64),
                       pad_to_samples(np.asarray(self._csf), self._offset, n), self.turning_point,
                       update if np.isfinite(update).any() else None,
                       spectral if np.isfinite(spectral).any() else None)

    def earliest_candidate_step(self) -> int:
        """No step before this can still be the turning point: saved weights older than the last copy at or
        before it may be dropped.  Past the newest sample (``last step + 1``) when any future sample may."""
        if self.turning_point is not None:
            return self.turning_point.step
        n = len(self._cs)
        if self.rule.series in SIZE_SERIES:  # decided at the sample it reads: only the next samples can be it
            return (self._steps[-1] + 1) if self._steps else 0
        valley = self._tracker.earliest_candidate(n - 1) if n > self._offset else self._offset
        index = max(0, valley - self.lag)
        if index >= n:
            return (self._steps[-1] + 1) if self._steps else 0
        return self._steps[index]

    # ---- resuming ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"window": self.window, "lr": self.lr, "rule": self.rule.to_dict(), "min_steps": self.min_steps,
                "report_only": self.report_only, "alignment": self.alignment}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically; plain JSON types only."""
        return {"version": _STATE_VERSION, "config": self.config(), "steps": list(self._steps),
                "epochs": list(self._epochs), "cs": list(self._cs), "csf": list(self._csf),
                "update": [None if math.isnan(v) else v for v in self._update],
                "spectral": [None if math.isnan(v) else v for v in self._spectral],
                "tails": {"ma": list(self._ma), "slope": list(self._slope), "x": list(self._x)},
                "tracker": self._tracker.state_dict(),
                "turning_point": None if self.turning_point is None else self.turning_point.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise InvalidValueError(f"unknown monitor state version {state.get('version')!r}")
        mine, theirs = self.config(), state["config"]
        # min_steps/report_only may change on resume; the curve's definition may not
        for key in ("window", "lr", "rule", "alignment"):
            if mine[key] != theirs[key]:
                raise InvalidValueError(f"the saved monitor has {key}={theirs[key]!r}, this one {mine[key]!r}")
        self._steps = [int(s) for s in state["steps"]]
        self._epochs = [None if e is None else int(e) for e in state["epochs"]]
        self._cs = [float(v) for v in state["cs"]]
        saved = state.get("update") or [None] * len(self._cs)  # states from before the size was recorded
        self._update = [math.nan if v is None else float(v) for v in saved]
        saved = state.get("spectral") or [None] * len(self._cs)
        self._spectral = [math.nan if v is None else float(v) for v in saved]
        self._csf = [float(v) for v in state["csf"]]
        tails = state["tails"]
        self._ma, self._slope, self._x = ([float(v) for v in tails[k]] for k in ("ma", "slope", "x"))
        self._tracker = self.rule.tracker(self.window)
        self._tracker.load_state_dict(state["tracker"])
        tp = state["turning_point"]
        self.turning_point = None if tp is None else TurningPoint(**tp)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CSFluctuationMonitor:
        config = dict(state["config"])
        config["rule"] = rule_from_dict(config["rule"])
        monitor = cls(**config)
        monitor.load_state_dict(state)
        return monitor
