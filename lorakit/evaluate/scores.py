"""Scores across the checkpoints compared: rank normalisation, the harmonic-mean best checkpoint, and an optional
SHAP analysis of which settings drive a metric (the LyCORIS paper's method; DESIGN.md section 6)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from lorakit.errors import LorakitError


class ScoresError(LorakitError, ValueError):
    """Scores that cannot be computed (mismatched tables, a missing optional extra)."""


def _is_nan(v: float | None) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def rank_normalise(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """``(rank − 1) / (n − 1)`` with the best value 1 and the worst 0; ties get their average rank; a single
    value gets 1.0; nan (or None) stays nan and is not ranked."""
    present = [(float(v), i) for i, v in enumerate(values) if not _is_nan(v)]
    out = [float("nan")] * len(values)
    n = len(present)
    if n == 1:
        out[present[0][1]] = 1.0
    if n < 2:
        return out
    # ascending in "goodness": rank 1 is the worst
    present.sort(key=lambda vi: vi[0] if higher_is_better else -vi[0])
    start = 0
    while start < n:
        end = start
        while end + 1 < n and present[end + 1][0] == present[start][0]:
            end += 1
        mean_rank = (start + end) / 2 + 1  # ranks start..end (1-based) share their mean
        for _, i in present[start:end + 1]:
            out[i] = (mean_rank - 1) / (n - 1)
        start = end + 1
    return out


def harmonic_mean(values: Sequence[float]) -> float:
    """``n / Σ 1/v``; 0 if any value is 0; nan values are skipped (nan if none is left)."""
    vs = [float(v) for v in values if not _is_nan(v)]
    if not vs:
        return float("nan")
    if any(v < 0 for v in vs):
        raise ScoresError(f"harmonic_mean: negative value in {vs}; rank-normalise first")
    if any(v == 0 for v in vs):
        return 0.0
    return len(vs) / sum(1.0 / v for v in vs)


def best_by_harmonic_mean(table: Mapping[Hashable, Mapping[str, float]],
                          directions: Mapping[str, bool]) -> tuple[Hashable, dict[Hashable, float]]:
    """Rank-normalise each metric of ``directions`` (True: higher is better) across the checkpoints of ``table``
    (checkpoint -> metric -> value), take each checkpoint's harmonic mean, and return the best checkpoint with
    every checkpoint's harmonic mean.  A metric a checkpoint lacks (or nan) is left out of its mean; among equal
    means the first checkpoint of ``table`` wins."""
    if not table:
        raise ScoresError("best_by_harmonic_mean: no checkpoints to compare")
    if not directions:
        raise ScoresError("best_by_harmonic_mean: no metrics to compare on")
    names = list(table)
    present = {m for row in table.values() for m in row}
    missing = [m for m in directions if m not in present]
    if missing:
        raise ScoresError(f"best_by_harmonic_mean: no checkpoint has the metrics {missing}")
    normalised = {m: rank_normalise([table[c].get(m, float("nan")) for c in names], higher)
                  for m, higher in directions.items()}
    means = {c: harmonic_mean([normalised[m][i] for m in directions]) for i, c in enumerate(names)}
    ranked = [c for c in names if not _is_nan(means[c])]
    if not ranked:
        raise ScoresError("best_by_harmonic_mean: every value is nan")
    best = max(ranked, key=lambda c: means[c])  # max keeps the first of equal values
    return best, means


def shap_importance(rows: Sequence[Mapping[str, Any]], features: Sequence[str], target: str,
                    seed: int = 0) -> dict[str, float]:
    """Mean |SHAP value| per feature of a CatBoost regressor (300 iterations, lr 0.1, as in the paper; string
    features categorical) fitted to predict ``target`` from ``features``.  Needs the optional extra ``shap``
    (catboost + shap).  A constant target has nothing to explain: every importance is 0."""
    try:
        import shap
        from catboost import CatBoostRegressor, Pool
    except ImportError:
        raise ScoresError("the SHAP analysis needs the optional extra 'shap' (catboost and shap): "
                          "pip install 'lorakit[shap]'") from None
    if len(rows) < 2:
        raise ScoresError(f"shap_importance: {len(rows)} rows; need at least two to fit anything")
    for i, row in enumerate(rows):
        lacking = [k for k in (*features, target) if k not in row]
        if lacking:
            raise ScoresError(f"shap_importance: row {i} lacks {lacking}")
    y = np.array([float(r[target]) for r in rows])
    if np.ptp(y) == 0:
        return {f: 0.0 for f in features}
    categorical = [j for j, f in enumerate(features) if any(isinstance(r[f], str) for r in rows)]
    x = [[str(r[f]) if j in categorical else float(r[f]) for j, f in enumerate(features)] for r in rows]
    pool = Pool(x, y, cat_features=categorical, feature_names=list(features))
    model = CatBoostRegressor(iterations=300, learning_rate=0.1, random_seed=seed, verbose=False,
                              allow_writing_files=False, thread_count=1)
    model.fit(pool)
    values = np.asarray(shap.TreeExplainer(model).shap_values(pool))
    return {f: float(np.mean(np.abs(values[:, j]))) for j, f in enumerate(features)}
