"""CS-Fluctuation series and turning-point rules on synthetic CS curves with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.earlystop import (
    CalmRule,
    SecondValley,
    cs_fluctuation,
    csf_offset,
    find_turning_point,
    moving_average,
    sign_change_valleys,
    smoothed_slope,
    turning_point_lag,
)
from lorakit.earlystop.series import pad_to_samples

# ---- an independent, literal reading of eq. 3-4 and Algorithm 1 (loops, trailing windows) ----------


def naive_csf(cs: list[float], m: int, lr: float) -> dict[int, float]:
    """CSF by sample index, written from the equations with plain loops."""
    ma = {n: sum(cs[n - m + 1:n + 1]) / m for n in range(m - 1, len(cs))}
    slope = {n: ma[n] - ma[n - 1] for n in ma if n - 1 in ma}
    x = {n: sum(slope[k] for k in range(n - m + 1, n + 1)) / m for n in slope if n - m + 1 in slope}
    out = {}
    for n in x:
        if n - m + 1 in x:
            window = [x[k] for k in range(n - m + 1, n + 1)]
            mean = sum(window) / m
            out[n] = sum((v - mean) ** 2 for v in window) / m / lr
    return out


def naive_valleys(csf: dict[int, float]) -> list[int]:
    """Algorithm 1 line 6: samples where ∇CSF goes from − to + (no flat bottoms in these tests)."""
    idx = sorted(csf)
    d = {idx[i]: csf[idx[i]] - csf[idx[i - 1]] for i in range(1, len(idx))}
    return [n for n in idx[1:-1] if d[n] < 0 and d[n + 1] > 0]


def training_like(n: int = 1200, sigma: float = 0.0, seed: int = 0, period: float = 90.0) -> np.ndarray:
    """CS that rises fast and settles, with a decaying wobble: the 'transverse waves' of the paper."""
    t = np.arange(n, dtype=np.float64)
    cs = 0.1 * (1 - np.exp(-t / 150)) + 0.02 * np.exp(-t / 250) * np.sin(2 * np.pi * t / period)
    return cs + sigma * np.random.default_rng(seed).normal(size=n)


def saturating(n: int = 1200, sigma: float = 0.0, seed: int = 3) -> np.ndarray:
    """A smooth rise that settles with no wave at all: its CSF only decays (no valley)."""
    t = np.arange(n, dtype=np.float64)
    return 0.1 * (1 - np.exp(-t / 150)) + sigma * np.random.default_rng(seed).normal(size=n)


# ---- the series ----------------------------------------------------------------------------------


def test_series_match_a_literal_reading_of_the_equations():
    cs = training_like(300, sigma=1e-4)
    m, lr = 7, 3e-4
    csf = cs_fluctuation(cs, m, lr)
    reference = naive_csf(list(cs), m, lr)
    offset = csf_offset(m)
    assert offset == 3 * m - 2 == min(reference)
    assert len(csf) == len(reference) == len(cs) - 3 * m + 2
    np.testing.assert_allclose(csf, [reference[n] for n in sorted(reference)], rtol=1e-9, atol=0)


def test_smoothed_slope_is_the_slope_of_the_moving_average_over_one_window():
    cs = training_like(200, sigma=1e-3)
    m = 9
    ma = moving_average(cs, m)  # ma[k] belongs to sample k + m - 1
    x = smoothed_slope(cs, m)  # x[k] belongs to sample k + 2m - 1
    np.testing.assert_allclose(x, (ma[m:] - ma[:-m]) / m, rtol=1e-9, atol=1e-15)


def test_a_linear_cs_has_zero_fluctuation():
    cs = 0.3 + 1e-3 * np.arange(100)
    np.testing.assert_allclose(cs_fluctuation(cs, 5), 0.0, atol=1e-25)


def test_series_shorter_than_the_windows_has_no_csf_and_no_decision():
    m = 10
    cs = training_like(3 * m - 2)  # one sample short
    assert len(cs_fluctuation(cs, m)) == 0
    assert len(cs_fluctuation(training_like(3 * m - 1), m)) == 1
    assert find_turning_point(cs, m) is None
    assert find_turning_point(cs[:3], m) is None


def test_constant_series_gives_exact_zeros_no_valley_no_nan():
    cs = np.full(500, 0.123456789)
    csf = cs_fluctuation(cs, 13, lr=1e-5)
    assert not np.isnan(csf).any()
    assert (csf == 0).all()  # each window is summed on its own: no rounding drift
    assert len(sign_change_valleys(csf)) == 0
    assert find_turning_point(cs, 13, lr=1e-5) is None
    assert find_turning_point(cs, 13, rule=SecondValley(prominence=0)) is None
    assert find_turning_point(cs, 13, rule=CalmRule()) is None


def test_window_must_be_at_least_two_and_lr_positive():
    with pytest.raises(ValueError, match="window"):
        cs_fluctuation(np.zeros(10), 1)
    with pytest.raises(ValueError, match="lr"):
        cs_fluctuation(np.zeros(10), 2, lr=0)


def test_pad_to_samples_places_values_under_their_samples():
    out = pad_to_samples(np.array([1.0, 2.0]), 3, 6)
    assert np.isnan(out[:3]).all() and list(out[3:5]) == [1.0, 2.0] and np.isnan(out[5])


# ---- valleys and the lag ---------------------------------------------------------------------------


def test_sign_change_valleys_count_a_flat_bottom_once():
    y = np.array([5, 4, 3, 3, 3, 4, 5, 4, 4, 5, 6, 6, 7, 6, 5.0])
    assert list(sign_change_valleys(y)) == [2, 7]


@pytest.mark.parametrize("seed", range(5))
def test_the_guardless_rule_is_exactly_the_papers_sign_change(seed):
    rng = np.random.default_rng(seed)
    y = np.round(rng.normal(size=300), 1)  # rounding makes flat stretches
    valleys = SecondValley(prominence=0).valleys(y, window=5)
    assert [v for v, _ in valleys] == list(sign_change_valleys(y))
    # a valley is known at the first sample that rises above it
    for v, known in valleys:
        assert y[known] > y[v] and (y[v:known] == y[v]).all()


@pytest.mark.parametrize("m", [4, 10, 20])
def test_slow_sinusoid_has_valleys_at_its_inflections_plus_the_centre_lag(m):
    """CS = sin(2πt/P) is antisymmetric about each inflection kP/2, so CSF is symmetric about kP/2 + (3M-2)/2:
    the valleys sit there exactly."""
    period = 80
    cs = np.sin(2 * np.pi * np.arange(400) / period)
    offset, lag = csf_offset(m), turning_point_lag(m)
    assert lag == (3 * m - 2) // 2
    valleys = sign_change_valleys(cs_fluctuation(cs, m)) + offset
    expected = [k * period // 2 + lag for k in range(1, 20) if offset < k * period // 2 + lag < 399]
    assert list(valleys) == expected


@pytest.mark.parametrize(("alignment", "shift"), [("centre", 0), ("start", -14), ("end", 14), (5, 9)])
def test_one_abrupt_change_then_calm_points_at_the_change(alignment, shift):
    """A single sigmoid step in CS (abrupt, then calm): one CSF valley, at its inflection + lag.  With the
    centre alignment the turning point is the inflection itself (M = 10: lag 14)."""
    t0, m = 150, 10
    cs = np.tanh((np.arange(400) - t0) / 8.0)
    rule = SecondValley(valley=1, prominence=0)
    tp = find_turning_point(cs, m, rule=rule, alignment=alignment)
    assert tp.valley_index == t0 + 14
    assert tp.index == tp.step == t0 + shift
    assert tp.found_at_index == tp.valley_index + 1  # no guard: known at the next sample
    assert find_turning_point(cs, m, rule=SecondValley(prominence=0)) is None  # there is no second valley


def test_two_bursts_give_valleys_at_each_inflection_and_between_them():
    m, lag = 10, 14
    t = np.arange(600.0)
    cs = np.tanh((t - 150) / 8) + np.tanh((t - 300) / 8)
    valleys = SecondValley().valleys(cs_fluctuation(cs, m), m, csf_offset(m))
    assert [v for v, _ in valleys] == [150 + lag, 225 + lag, 300 + lag]


def test_papers_worked_case_skips_the_under_fitted_first_valley():
    """CSF behaves like a decaying wave; the first valley is the under-fitted start, the second is returned."""
    m, lr = 20, 1e-4
    cs = training_like()
    expected = naive_valleys(naive_csf(list(cs), m, lr))
    assert len(expected) > 3
    for rule in (SecondValley(prominence=0), SecondValley()):
        tp = find_turning_point(cs, m, lr, rule=rule)
        assert tp.valley_index == expected[1] != expected[0]
        assert tp.index == expected[1] - turning_point_lag(m)
        assert tp.found_at_index > tp.valley_index
    # the guard confirms later than the bare sign change, never earlier
    bare = find_turning_point(cs, m, lr, rule=SecondValley(prominence=0))
    assert bare.found_at_index == expected[1] + 1
    assert find_turning_point(cs, m, lr).found_at_index >= bare.found_at_index
    # the third valley if asked for
    assert find_turning_point(cs, m, lr, rule=SecondValley(valley=3, prominence=0)).valley_index == expected[2]


@pytest.mark.parametrize("lr", [1.0, 1e-4, 3e-6, 0.37])
@pytest.mark.parametrize("rule", [SecondValley(), SecondValley(prominence=0), CalmRule()])
def test_lr_scales_the_curve_but_does_not_move_the_turning_point(lr, rule):
    cs = training_like(sigma=1e-4)
    np.testing.assert_allclose(cs_fluctuation(cs, 20, lr), cs_fluctuation(cs, 20) / lr, rtol=1e-12)
    reference = find_turning_point(cs, 20, 1.0, rule=rule)
    tp = find_turning_point(cs, 20, lr, rule=rule)
    assert (tp.index, tp.valley_index, tp.found_at_index) == (
        reference.index, reference.valley_index, reference.found_at_index)


# ---- the noise guard ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1e-6, 1e-5])
def test_noise_on_a_wave_free_curve_makes_a_spurious_stop_only_without_the_guard(sigma):
    m = 20
    clean, noisy = saturating(), saturating(sigma=sigma)
    offset = csf_offset(m)
    assert len(sign_change_valleys(cs_fluctuation(clean, m))) == 0
    assert len(sign_change_valleys(cs_fluctuation(noisy, m))) > 10  # the noise makes wiggles...
    assert find_turning_point(noisy, m, rule=SecondValley(prominence=0)) is not None  # ...and a false stop
    assert SecondValley().valleys(cs_fluctuation(noisy, m), m, offset) == []  # the guard sees none
    assert find_turning_point(noisy, m) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sigma", [1e-4, 3e-4])
def test_noise_on_a_wave_adds_valleys_only_without_the_guard(sigma, seed):
    m = 20
    offset = csf_offset(m)
    clean, noisy = cs_fluctuation(training_like(), m), cs_fluctuation(training_like(sigma=sigma, seed=seed), m)
    guarded_clean = SecondValley().valleys(clean, m, offset)
    guarded_noisy = SecondValley().valleys(noisy, m, offset)
    assert len(guarded_noisy) == len(guarded_clean) >= 6
    for (a, _), (b, _) in zip(guarded_clean, guarded_noisy, strict=True):
        assert abs(a - b) <= 2
    if sigma >= 3e-4:
        assert len(sign_change_valleys(noisy)) > len(sign_change_valleys(clean)) + 5
    noisy_tp = find_turning_point(training_like(sigma=sigma, seed=seed), m)
    assert abs(noisy_tp.index - find_turning_point(training_like(), m).index) <= 2


def test_prominence_is_measured_against_the_running_range():
    # dips of 3 after a range of 100 are wiggles at 5 %, valleys at 2 %
    y = np.array([100, 50, 0, 50, 100, 97, 100, 99, 100, 98, 100.0])
    assert [v for v, _ in SecondValley(prominence=0.05).valleys(y, 2)] == [2]
    assert [v for v, _ in SecondValley(prominence=0.02).valleys(y, 2)] == [2, 5]  # 98 is not > 2 below 100
    # and only once the rise has exceeded the margin is the valley known
    assert SecondValley(prominence=0.05).valleys(y, 2)[0] == (2, 3)
    assert SecondValley(prominence=0.6).valleys(y, 2) == [(2, 4)]


def test_a_fall_is_needed_before_a_valley():
    # rising with a small dip: no fall of more than the margin from the last peak, so no valley
    y = np.array([0, 10, 20, 30, 29.5, 40, 50, 60.0])
    assert SecondValley(prominence=0.05).valleys(y, 2) == []
    assert [v for v, _ in SecondValley(prominence=0).valleys(y, 2)] == [4]


def test_min_distance_ignores_a_valley_too_close_to_the_previous_one():
    y = np.array([9, 0, 9, 1, 9, 9, 9, 9, 9, 9, 9, 2, 9.0])
    assert [v for v, _ in SecondValley(prominence=0.05).valleys(y, 2)] == [1, 3, 11]
    # min_distance 2 windows of 2 samples: sample 3 is 2 samples after 1, ignored; 11 counts
    assert [v for v, _ in SecondValley(prominence=0.05, min_distance=2).valleys(y, 2)] == [1, 11]
    found = SecondValley(prominence=0.05, min_distance=2).find(y, 2)
    assert (found.csf_index, found.decided_index) == (11, 12)


def test_rule_parameters_are_checked():
    with pytest.raises(ValueError):
        SecondValley(valley=0)
    with pytest.raises(ValueError):
        SecondValley(prominence=1.5)
    with pytest.raises(ValueError):
        SecondValley(min_distance=-1)
    with pytest.raises(ValueError):
        CalmRule(threshold=0)
    with pytest.raises(ValueError):
        turning_point_lag(10, "middle")


# ---- the alternative rule ----------------------------------------------------------------------------


def test_calm_rule_finds_the_first_lasting_calm_stretch():
    y = np.array([0, 5, 10, 6, 0.5, 3, 0.9, 0.8, 0.7, 0.6, 0.5, 2.0])
    found = CalmRule(threshold=0.1, patience=2).find(y, window=2)  # 4 samples below 1.0 in a row
    assert (found.csf_index, found.decided_index) == (6, 9)
    assert CalmRule(threshold=0.1, patience=3).find(y, window=2) is None  # the stretch is broken at 11


def test_second_valley_tracks_the_wave_period_not_the_settling_time():
    """Why an alternative exists: on these curves the second valley stays about one wobble period in,
    however long the wobble takes to die out; the calm rule moves with the settling time."""
    t = np.arange(1500.0)

    def curve(settle: float) -> np.ndarray:
        return 0.1 * (1 - np.exp(-t / 150)) + 0.02 * np.exp(-t / settle) * np.sin(2 * np.pi * t / 90)

    second = [find_turning_point(curve(s), 20).index for s in (60, 250, 500)]
    calm = [find_turning_point(curve(s), 20, rule=CalmRule()).index for s in (60, 250, 500)]
    assert max(second) - min(second) < 10
    assert calm[0] < calm[1] < calm[2] and calm[2] - calm[0] > 200
