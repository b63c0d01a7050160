"""CS-Fluctuation early stopping (seed paper "Early-stopping LoRA", section 3.2, Algorithm 1).

- ``series``: the curve as pure numpy functions (eq. 3-4), trailing windows, offsets and the lag;
- ``rules``: when to stop: ``SecondValley`` (the paper's, with a noise guard) or ``CalmRule``;
- ``cs``: eq. 2 over lorakit adapters (low-rank identities for LoRA) or (W, W0) pairs;
- ``monitor``: ``CSFluctuationMonitor`` (online), ``find_turning_point`` (offline, same answer);
- ``candidates``: real copies of the weights at candidate turning points;
- ``plot``: the paper-style figure;  ``hf``: a transformers ``TrainerCallback`` for PEFT LoRA models
  (imported on demand: ``from lorakit.earlystop.hf import CSFluctuationCallback``).
"""

from lorakit.earlystop.candidates import Candidate, CandidateStore
from lorakit.earlystop.cs import CSMeter, cs_native, cs_value, layer_cosines
from lorakit.earlystop.monitor import CSFluctuationMonitor, Decision, History, TurningPoint, find_turning_point
from lorakit.earlystop.plot import plot_cs_fluctuation
from lorakit.earlystop.rules import CalmRule, Detection, SecondValley, rule_from_dict
from lorakit.earlystop.series import (
    cs_fluctuation,
    csf_offset,
    first_difference,
    moving_average,
    moving_variance,
    sign_change_valleys,
    smoothed_slope,
    turning_point_lag,
)

__all__ = [
    "CSFluctuationMonitor",
    "CSMeter",
    "CalmRule",
    "Candidate",
    "CandidateStore",
    "Decision",
    "Detection",
    "History",
    "SecondValley",
    "TurningPoint",
    "cs_fluctuation",
    "cs_native",
    "cs_value",
    "csf_offset",
    "find_turning_point",
    "first_difference",
    "layer_cosines",
    "moving_average",
    "moving_variance",
    "plot_cs_fluctuation",
    "rule_from_dict",
    "sign_change_valleys",
    "smoothed_slope",
    "turning_point_lag",
]
