"""CS-Fluctuation early stopping (seed paper "Early-stopping LoRA", section 3.2, Algorithm 1).

- ``series``: the curve as pure numpy functions (eq. 3-4), trailing windows, offsets and the lag;
- ``rules``: when to stop: ``SecondValley`` (the paper's, with a noise guard), ``CalmRule``, ``UpdateBudget``
  (the update's size ‖ΔW‖/‖W‖, beyond the paper), ``SpectralBudget`` (σ1(ΔW)/σ1(W), read at epoch ends) or
  ``GrowthStall`` (that size stops growing from epoch to epoch, or reaches a cap);
- ``cs``: eq. 2 over lorakit adapters (low-rank identities for LoRA) or (W, W0) pairs, and the update's size;
- ``monitor``: ``CSFluctuationMonitor`` (online), ``find_turning_point`` (offline, same answer);
- ``samples``: stopping on the samples instead (beyond the paper): ``SamplePlateau`` over per-epoch scores of
  the images a registered sample scorer reads (``register_sample_scorer``; the shapes world registers one);
- ``candidates``: real copies of the weights at candidate turning points;
- ``plot``: the paper-style figure;  ``hf``: a transformers ``TrainerCallback`` for PEFT LoRA models
  (imported on demand: ``from lorakit.earlystop.hf import CSFluctuationCallback``).
"""

from __future__ import annotations

from lorakit.lazy import lazy_exports

# Names are imported on first use (PEP 562), not here: lorakit.config reads earlystop.rules, and `lorakit train
# --print-config` must not wait for torch and matplotlib, which cs, monitor and plot bring.
_EXPORTS: dict[str, str] = {
    "CSFluctuationMonitor": "lorakit.earlystop.monitor",
    "CSMeter": "lorakit.earlystop.cs",
    "CSReading": "lorakit.earlystop.cs",
    "CalmRule": "lorakit.earlystop.rules",
    "Candidate": "lorakit.earlystop.candidates",
    "CandidateStore": "lorakit.earlystop.candidates",
    "Decision": "lorakit.earlystop.monitor",
    "Detection": "lorakit.earlystop.rules",
    "GrowthStall": "lorakit.earlystop.rules",
    "History": "lorakit.earlystop.monitor",
    "SamplePlateau": "lorakit.earlystop.samples",
    "SecondValley": "lorakit.earlystop.rules",
    "SpectralBudget": "lorakit.earlystop.rules",
    "TurningPoint": "lorakit.earlystop.monitor",
    "UpdateBudget": "lorakit.earlystop.rules",
    "cs_fluctuation": "lorakit.earlystop.series",
    "cs_native": "lorakit.earlystop.cs",
    "cs_value": "lorakit.earlystop.cs",
    "csf_offset": "lorakit.earlystop.series",
    "find_turning_point": "lorakit.earlystop.monitor",
    "first_difference": "lorakit.earlystop.series",
    "layer_cosines": "lorakit.earlystop.cs",
    "moving_average": "lorakit.earlystop.series",
    "moving_variance": "lorakit.earlystop.series",
    "plot_cs_fluctuation": "lorakit.earlystop.plot",
    "plot_sample_scores": "lorakit.earlystop.plot",
    "register_sample_scorer": "lorakit.earlystop.samples",
    "rule_from_dict": "lorakit.earlystop.rules",
    "sign_change_valleys": "lorakit.earlystop.series",
    "smoothed_slope": "lorakit.earlystop.series",
    "turning_point_lag": "lorakit.earlystop.series",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
