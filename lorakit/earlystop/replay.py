"""Replay turning-point rules on a recorded run (``History``), to compare them on the same runs.

The reports (the shapes world's ``curve-report``, the language-model experiment) replay the same set: the two
rules of ``early_stop.rule`` and the paper's without its noise guard, the CSF rules also with a doubled window
(fewer, wider CSF waves), the update-size budgets (Frobenius and spectral), and the update's growth stalling.
A window in epochs multiplies the recorded one (the trainer's default window is one epoch of CS samples).
"""

from __future__ import annotations

import numpy as np

from lorakit.earlystop.monitor import History, TurningPoint, find_turning_point
from lorakit.earlystop.rules import (
    SIZE_SERIES,
    CalmRule,
    GrowthStall,
    Rule,
    SecondValley,
    SpectralBudget,
    UpdateBudget,
)

#: name -> (rule, window in multiples of the recorded one)
COMPARED_RULES: dict[str, tuple[Rule, int]] = {
    "second-valley": (SecondValley(), 1), "second-valley-0": (SecondValley(prominence=0.0), 1),
    "calm": (CalmRule(), 1), "second-valley-2M": (SecondValley(), 2), "calm-2M": (CalmRule(), 2),
    "budget": (UpdateBudget(), 1), "spectral-budget": (SpectralBudget(), 1), "growth-stall": (GrowthStall(), 1),
}


def replay(history: History, rule: Rule, window_multiple: int = 1, alignment: str | int = "centre"
           ) -> TurningPoint | None:
    """The turning point ``rule`` finds on the recorded series (None: never, or a size rule on a run recorded
    before the update's size was kept)."""
    if rule.series in SIZE_SERIES and history.size(rule.series) is None:
        return None
    return find_turning_point(np.asarray(history.cs), history.window * window_multiple, history.lr, rule=rule,
                              alignment=alignment, steps=list(history.steps), epochs=list(history.epochs),
                              update=history.update, spectral=history.spectral)
