"""lorakit.evaluate.scores: rank normalisation, harmonic means and the best checkpoint worked out by hand;
the SHAP analysis when its optional extra is installed."""

import math
import random
import sys

import pytest

from lorakit.errors import LorakitError
from lorakit.evaluate.scores import (
    ScoresError,
    best_by_harmonic_mean,
    harmonic_mean,
    rank_normalise,
    shap_importance,
)

NAN = float("nan")


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w), (got, want)


def test_rank_normalise_best_is_one_worst_is_zero():
    _same(rank_normalise([3, 1, 2], higher_is_better=True), [1.0, 0.0, 0.5])
    _same(rank_normalise([3, 1, 2], higher_is_better=False), [0.0, 1.0, 0.5])  # a distance: lower is better


def test_rank_normalise_ties_share_their_mean_rank():
    # ranks 1, 2.5, 2.5, 4 of 4 -> (r - 1) / 3
    _same(rank_normalise([1, 2, 2, 3], True), [0.0, 0.5, 0.5, 1.0])
    _same(rank_normalise([5, 5, 5], True), [0.5, 0.5, 0.5])


def test_rank_normalise_single_values_and_nan():
    _same(rank_normalise([0.3], True), [1.0])
    _same(rank_normalise([NAN, 1, 2], True), [NAN, 0.0, 1.0])  # nan is not ranked
    _same(rank_normalise([None, 4.0], False), [NAN, 1.0])
    _same(rank_normalise([], True), [])


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / (1 + 2))
    assert harmonic_mean([0.25, 0.5, 1.0]) == pytest.approx(3 / (4 + 2 + 1))
    assert harmonic_mean([0.5, 0.0]) == 0.0
    assert harmonic_mean([NAN, 0.5]) == pytest.approx(0.5)
    assert math.isnan(harmonic_mean([NAN]))
    with pytest.raises(ScoresError, match="negative"):
        harmonic_mean([-1.0, 1.0])


def test_best_by_harmonic_mean_worked_example():
    table = {"epoch 1": {"fidelity": 0.5, "distance": 0.3},
             "epoch 2": {"fidelity": 0.7, "distance": 0.2},
             "epoch 3": {"fidelity": 0.9, "distance": 0.4}}
    # fidelity ranks 0, .5, 1; distance (lower better) .5, 1, 0 -> harmonic means 0, 2/3, 0
    best, means = best_by_harmonic_mean(table, {"fidelity": True, "distance": False})
    assert best == "epoch 2"
    assert means == pytest.approx({"epoch 1": 0.0, "epoch 2": 2 / 3, "epoch 3": 0.0})
    # only fidelity: the highest wins
    assert best_by_harmonic_mean(table, {"fidelity": True})[0] == "epoch 3"


def test_best_by_harmonic_mean_missing_values_and_errors():
    table = {"a": {"x": 1.0, "y": 2.0}, "b": {"x": 2.0}, "c": {"x": 3.0, "y": 1.0}}
    # x ranks 0, .5, 1; y (higher better) ranks a 1, c 0, b has none -> a: hm(0, 1) = 0, b: .5, c: 0
    best, means = best_by_harmonic_mean(table, {"x": True, "y": True})
    assert best == "b" and means["b"] == pytest.approx(0.5)
    with pytest.raises(ScoresError, match=r"no checkpoint has the metrics \['z'\]"):
        best_by_harmonic_mean(table, {"z": True})
    with pytest.raises(ScoresError, match="no checkpoints"):
        best_by_harmonic_mean({}, {"x": True})
    assert issubclass(ScoresError, LorakitError)


def _rows():
    rng = random.Random(0)
    rows = []
    for algo in ("lora", "loha", "lokr"):
        for rank in (4, 8, 16):
            for lr in (1e-4, 3e-4, 1e-3):
                # the target depends strongly on the algorithm, a little on the rank, not on lr
                target = {"lora": 0.2, "loha": 0.5, "lokr": 0.9}[algo] + 0.002 * rank + rng.uniform(0, 0.005)
                rows.append({"algorithm": algo, "rank": rank, "lr": lr, "fidelity": target})
    return rows


def test_shap_importance_finds_the_setting_that_drives_a_metric():
    pytest.importorskip("catboost", reason="optional extra 'shap' (catboost) not installed")
    pytest.importorskip("shap", reason="optional extra 'shap' (shap) not installed")
    imp = shap_importance(_rows(), ["algorithm", "rank", "lr"], "fidelity")
    assert set(imp) == {"algorithm", "rank", "lr"}
    assert imp["algorithm"] > 5 * imp["rank"] > 0
    assert imp["algorithm"] > 5 * imp["lr"]
    # a constant target: nothing to explain
    flat = [dict(r, fidelity=1.0) for r in _rows()]
    assert shap_importance(flat, ["algorithm", "rank"], "fidelity") == {"algorithm": 0.0, "rank": 0.0}
    with pytest.raises(ScoresError, match="row 0 lacks"):
        shap_importance([{"rank": 1}, {"rank": 2, "fidelity": 1.0}], ["rank"], "fidelity")


def test_shap_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "catboost", None)
    with pytest.raises(ScoresError, match=r"lorakit\[shap\]"):
        shap_importance(_rows(), ["rank"], "fidelity")
