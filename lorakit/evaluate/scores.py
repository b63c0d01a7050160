"""Scores across the checkpoints compared: rank normalisation, the harmonic-mean best checkpoint, and an optional
SHAP analysis of which settings drive a metric (the LyCORIS paper's method; DESIGN.md section 6)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from lorakit.errors import LorakitError


class ScoresError(LorakitError, ValueError):
    """Scores that cannot be computed (mismatched tables, a missing optional extra)."""


def rank_normalise(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """``(rank − 1) / (n − 1)`` with the best value 1 and the worst 0; ties get their average rank; a single
    value gets 1.0; nan stays nan and is not ranked."""
    raise NotImplementedError


def harmonic_mean(values: Sequence[float]) -> float:
    """``n / Σ 1/v``; 0 if any value is 0; nan values are skipped (nan if none is left)."""
    raise NotImplementedError


def best_by_harmonic_mean(table: Mapping[Hashable, Mapping[str, float]],
                          directions: Mapping[str, bool]) -> tuple[Hashable, dict[Hashable, float]]:
    """Rank-normalise each metric of ``directions`` (True: higher is better) across the checkpoints of ``table``
    (checkpoint -> metric -> value), take each checkpoint's harmonic mean, and return the best checkpoint with
    every checkpoint's harmonic mean."""
    raise NotImplementedError


def shap_importance(rows: Sequence[Mapping[str, Any]], features: Sequence[str], target: str,
                    seed: int = 0) -> dict[str, float]:
    """Mean |SHAP value| per feature of a CatBoost regressor (300 iterations, lr 0.1, string features
    categorical) fitted to predict ``target`` from ``features``.  Needs the optional extra ``shap``."""
    raise NotImplementedError
