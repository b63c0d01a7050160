"""The online monitor: same answer as the offline functions, resumable, report-only, min_steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorakit.earlystop import (
    CalmRule,
    CSFluctuationMonitor,
    SecondValley,
    UpdateBudget,
    cs_fluctuation,
    csf_offset,
    find_turning_point,
)

M = 20


def training_like(n: int = 1200, sigma: float = 1e-4, seed: int = 0) -> np.ndarray:
    t = np.arange(n, dtype=np.float64)
    cs = 0.1 * (1 - np.exp(-t / 150)) + 0.02 * np.exp(-t / 250) * np.sin(2 * np.pi * t / 90)
    return cs + sigma * np.random.default_rng(seed).normal(size=n)


def run(monitor: CSFluctuationMonitor, cs: np.ndarray, steps: list[int], epochs: list[int] | None = None,
        start: int = 0):
    """Feed samples from ``start``; return (sample index of the first stop, its decision) or (None, last)."""
    decision = None
    for k in range(start, len(cs)):
        decision = monitor.update(steps[k], cs[k], None if epochs is None else epochs[k])
        if decision.stop:
            return k, decision
    return None, decision


@pytest.mark.parametrize("rule", [SecondValley(), SecondValley(prominence=0), CalmRule()],
                         ids=["guarded", "bare", "calm"])
def test_online_equals_offline_on_every_prefix(rule):
    cs = training_like()
    interval = 5
    steps = [interval * (k + 1) for k in range(len(cs))]  # a CS sample every 5 steps
    epochs = [s // 100 + 1 for s in steps]
    monitor = CSFluctuationMonitor(M, lr=2e-4, rule=rule)
    stop_at, decision = run(monitor, cs, steps, epochs)
    assert stop_at is not None

    # the CSF the monitor computed, sample by sample, is bit for bit the offline curve
    offline_csf = cs_fluctuation(cs[:stop_at + 1], M, 2e-4)
    online_csf = monitor.history.csf[csf_offset(M):]
    np.testing.assert_array_equal(online_csf, offline_csf)

    # offline on the prefix ending at the stop finds the same turning point, one sample earlier finds none
    offline = find_turning_point(cs[:stop_at + 1], M, 2e-4, rule=rule, steps=steps, epochs=epochs)
    assert find_turning_point(cs[:stop_at], M, 2e-4, rule=rule, steps=steps, epochs=epochs) is None
    assert decision.turning_point == offline == monitor.turning_point
    tp = decision.turning_point
    assert tp.found_at_index == stop_at and tp.found_at_step == steps[stop_at]
    assert tp.step == steps[tp.index] and tp.epoch == epochs[tp.index]
    assert tp.index == tp.valley_index - monitor.lag
    assert decision.action == "stop" and f"step {tp.step}" in decision.reason


def test_decisions_before_enough_samples_say_so():
    monitor = CSFluctuationMonitor(4)
    for k in range(3 * 4 - 2):  # the first CSF needs 3M - 1 samples
        decision = monitor.update(k, 0.1 * k)
        assert not decision.stop and decision.turning_point is None
        assert "collecting samples" in decision.reason
    assert "no turning point" in monitor.update(100, 1.0).reason


@pytest.mark.parametrize("cut", [5, 70, 119])
def test_state_dict_round_trip_continues_identically(cut):
    cs = training_like(250)  # the stop comes at sample 121
    whole = CSFluctuationMonitor(M, 1e-4)
    first = CSFluctuationMonitor(M, 1e-4)
    expected = [whole.update(k, cs[k]) for k in range(len(cs))]
    for k in range(cut):
        first.update(k, cs[k])
    state = json.loads(json.dumps(first.state_dict()))  # it must survive JSON (trainer_state.json)
    for resumed in (CSFluctuationMonitor.from_state_dict(state), CSFluctuationMonitor(M, 1e-4)):
        if not resumed.history.cs.size:
            resumed.load_state_dict(state)
        got = [resumed.update(k, cs[k]) for k in range(cut, len(cs))]
        assert got == expected[cut:]
        assert resumed.state_dict() == whole.state_dict()
    assert any(d.stop for d in expected[cut:])


def test_load_state_dict_refuses_a_different_curve():
    state = CSFluctuationMonitor(M, 1e-4).state_dict()
    with pytest.raises(ValueError, match="window"):
        CSFluctuationMonitor(M + 1, 1e-4).load_state_dict(state)
    with pytest.raises(ValueError, match="rule"):
        CSFluctuationMonitor(M, 1e-4, rule=CalmRule()).load_state_dict(state)
    # what only affects stopping may change
    CSFluctuationMonitor(M, 1e-4, report_only=True, min_steps=5).load_state_dict(state)


def test_report_only_decides_but_never_stops():
    cs = training_like(300)
    steps = list(range(len(cs)))
    normal = CSFluctuationMonitor(M, 1e-4)
    stop_at, decision = run(normal, cs, steps)
    quiet = CSFluctuationMonitor(M, 1e-4, report_only=True)
    decisions = [quiet.update(k, cs[k]) for k in range(len(cs))]
    assert not any(d.stop for d in decisions)
    assert decisions[stop_at - 1].turning_point is None
    assert all(d.turning_point == decision.turning_point for d in decisions[stop_at:])
    assert "report only" in decisions[stop_at].reason
    assert quiet.turning_point == decision.turning_point


def test_min_steps_delays_the_stop_not_the_turning_point():
    cs = training_like()
    steps = list(range(len(cs)))
    stop_at, decision = run(CSFluctuationMonitor(M, 1e-4), cs, steps)
    late = stop_at + 50
    monitor = CSFluctuationMonitor(M, 1e-4, min_steps=late)
    stop_late, decision_late = run(monitor, cs, steps)
    assert stop_late == late
    assert decision_late.turning_point == decision.turning_point


def test_stop_is_repeated_after_the_decision():
    cs = training_like()
    monitor = CSFluctuationMonitor(M, 1e-4)
    stop_at, decision = run(monitor, cs, list(range(len(cs))))
    again = monitor.update(stop_at + 1, cs[stop_at + 1])
    assert again.stop and again.turning_point == decision.turning_point


def test_bad_input_is_refused():
    monitor = CSFluctuationMonitor(3)
    monitor.update(10, 0.5)
    with pytest.raises(ValueError, match="steps must increase"):
        monitor.update(10, 0.5)
    with pytest.raises(ValueError, match="not finite"):
        monitor.update(11, float("nan"))
    with pytest.raises(ValueError):
        CSFluctuationMonitor(1)
    with pytest.raises(ValueError):
        CSFluctuationMonitor(3, lr=-1)


@pytest.mark.parametrize("rule", [SecondValley(), CalmRule()], ids=["valley", "calm"])
def test_earliest_candidate_never_passes_the_turning_point(rule):
    """Weights older than the earliest candidate may be dropped: it must never pass the eventual answer."""
    cs = training_like()
    monitor = CSFluctuationMonitor(M, 1e-4, rule=rule)
    seen = []
    for k in range(len(cs)):
        seen.append(monitor.earliest_candidate_step())
        if monitor.update(k, cs[k]).stop:
            break
    tp = monitor.turning_point
    assert max(seen) <= tp.step
    assert seen == sorted(seen)  # it only moves forward
    assert monitor.earliest_candidate_step() == tp.step


def test_history_holds_the_series_on_the_sample_axis():
    cs = training_like(200)
    monitor = CSFluctuationMonitor(10, 1e-4)
    for k in range(len(cs)):
        monitor.update(3 * k, cs[k], epoch=k // 50 + 1)
    h = monitor.history
    assert list(h.steps) == [3 * k for k in range(200)] and h.epochs[-1] == 4
    assert np.isnan(h.csf[:csf_offset(10)]).all()
    np.testing.assert_array_equal(h.csf[csf_offset(10):], cs_fluctuation(cs, 10, 1e-4))
    assert np.isnan(h.ma_cs()[:9]).all() and h.ma_cs()[9] == pytest.approx(cs[:10].mean())
    again = type(h).from_dict(json.loads(json.dumps(h.to_dict())))
    np.testing.assert_array_equal(again.csf, h.csf)
    assert again.turning_point == h.turning_point


def test_the_budget_rule_decides_where_the_update_reaches_it_with_no_lag():
    cs = training_like(300)
    size = np.linspace(0.0, 0.3, 300)  # the update grows through training
    steps = [2 * (k + 1) for k in range(300)]
    epochs = [s // 40 + 1 for s in steps]
    rule = UpdateBudget(budget=0.1)
    monitor = CSFluctuationMonitor(M, 1e-4, rule=rule)
    first = int(np.argmax(size >= 0.1))
    for k in range(300):
        decision = monitor.update(steps[k], cs[k], epochs[k], update=size[k])
        if decision.stop:
            break
    assert k == first and decision.turning_point.step == decision.turning_point.found_at_step == steps[first]
    assert decision.turning_point.epoch == epochs[first] and monitor.lag == 0
    assert "budget 0.1" in decision.reason
    # offline says the same; and the history keeps the sizes (a CSF rule's history too, for later replays)
    assert find_turning_point(cs, M, 1e-4, rule=rule, steps=steps, epochs=epochs, update=size) == \
        decision.turning_point
    np.testing.assert_array_equal(monitor.history.update, size[:first + 1])
    with pytest.raises(ValueError, match="update's size"):
        find_turning_point(cs, M, 1e-4, rule=rule)
    with pytest.raises(ValueError, match="needs the update's size"):
        CSFluctuationMonitor(M, 1e-4, rule=rule).update(1, 0.1)
    from lorakit.earlystop import rule_from_dict

    assert rule_from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="budget"):
        UpdateBudget(budget=-1.0)


def test_each_rule_says_why_it_did_not_decide_by_the_end():
    """At the end of a run without a turning point each rule explains itself in its own numbers: a budget how far
    the size got (and its largest), the growth stall how fast the size still grew (or that the run was too short
    to measure a growth), a rule on CS-Fluctuation that the curve held none."""
    from lorakit.earlystop import GrowthStall, SpectralBudget

    no_valley = SecondValley().undecided(None, M)
    assert no_valley == "the second-valley rule found no turning point in the CS-Fluctuation curve"
    spectral = np.array([np.nan, 0.05, np.nan, 0.12, np.nan, 0.08])
    assert SpectralBudget(0.25).undecided(spectral, 2).startswith(
        "the update's spectral size σ1(ΔW)/σ1(W) was 0.08 at the end, 32% of its budget 0.25 (largest 0.12)")
    assert UpdateBudget(0.1).undecided(np.array([np.nan]), M) == "the budget rule had no size reading to decide on"
    short = GrowthStall(span=2).undecided(np.array([0.01, 0.02, 0.03, 0.04]), 2)
    assert short == ("the growth-stall rule compares the update's size over 2 windows of 2 samples; "
                     "the run ended after 2")
    growing = GrowthStall(growth=0.07, span=2).undecided(np.array([0.0, 0.01, 0.0, 0.02, 0.0, 0.04]), 2)
    assert growing.startswith("the update's size ‖ΔW‖/‖W‖ was still growing by 100.0% per window at the end")
    assert growing.endswith("it reached 0.04)")


def test_each_rule_says_what_it_waits_for_before_it_decides():
    """The monitor's "not yet" reason comes from the rule: a size rule names its series and its last value; a
    rule on CS-Fluctuation leaves it to the monitor (how many samples CS-Fluctuation still needs)."""
    from lorakit.earlystop import CalmRule, GrowthStall, SpectralBudget

    def first_reason(rule, spectral=None):
        return CSFluctuationMonitor(M, 1e-4, rule=rule).update(1, 0.1, epoch=1, update=0.0123,
                                                                  spectral=spectral).reason

    assert first_reason(UpdateBudget(0.1)) == "the update's size 0.0123 is under the budget"
    assert first_reason(GrowthStall()) == "the update's size 0.0123 is still growing"
    assert first_reason(SpectralBudget(0.25)) == "the spectral size is read at epoch ends"
    assert first_reason(SpectralBudget(0.25), spectral=0.05) == "the spectral size 0.05 (last read) is under the budget"
    assert first_reason(CalmRule()).startswith("collecting samples: 1 of the")
    # the last size read counts, not a sample between epoch ends that carries none
    monitor = CSFluctuationMonitor(M, 1e-4, rule=SpectralBudget(0.25))
    monitor.update(1, 0.1, epoch=1, update=0.01, spectral=0.07)
    waiting = monitor.update(2, 0.1, epoch=1, update=0.02).reason
    assert waiting == "the spectral size 0.07 (last read) is under the budget"


def test_the_budget_rule_resumes_and_old_states_without_sizes_load():
    cs, size = training_like(200), np.linspace(0.0, 0.2, 200)
    whole, first = (CSFluctuationMonitor(M, 1e-4, rule=UpdateBudget(0.15)) for _ in range(2))
    expected = [whole.update(k, cs[k], update=size[k]) for k in range(200)]
    for k in range(60):
        first.update(k, cs[k], update=size[k])
    resumed = CSFluctuationMonitor.from_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.update(k, cs[k], update=size[k]) for k in range(60, 200)] == expected[60:]
    # a state saved before the size was recorded (a CSF rule) still loads, its sizes unknown
    old = CSFluctuationMonitor(M, 1e-4)
    for k in range(30):
        old.update(k, cs[k])
    state = old.state_dict()
    del state["update"]
    again = CSFluctuationMonitor.from_state_dict(state)
    assert again.history.update is None and len(again.history.cs) == 30


def test_the_spectral_budget_decides_only_where_the_spectral_size_was_read():
    """The trainer reads σ1(ΔW)/σ1(W) at epoch ends (every 10th sample here): the samples between carry none and
    never decide; the turning point is the epoch end that reached the budget; resumable, replayable."""
    from lorakit.earlystop import History, SpectralBudget, rule_from_dict
    from lorakit.earlystop.replay import replay

    cs, n = training_like(120), 120
    spectral = [0.03 * (k // 10 + 1) if k % 10 == 9 else None for k in range(n)]  # 0.03, 0.06, ... at epoch ends
    rule = SpectralBudget(budget=0.2)
    whole = CSFluctuationMonitor(M, 1e-4, rule=rule)
    decisions = [whole.update(k + 1, cs[k], epoch=k // 10 + 1, update=0.01 * k, spectral=spectral[k])
                 for k in range(n)]
    stop = next(k for k, d in enumerate(decisions) if d.stop)
    assert stop == 69 and spectral[69] == pytest.approx(0.21)  # the 7th epoch end: 0.21 ≥ 0.2 > 0.18
    tp = decisions[stop].turning_point
    assert tp.step == tp.found_at_step == 70 and tp.epoch == 7 and "σ1(ΔW)/σ1(W)" in tp.reason
    assert "under the budget" in decisions[stop - 1].reason
    # resumed mid-way: the same decisions; the history keeps the sizes where read, NaN between
    first = CSFluctuationMonitor(M, 1e-4, rule=rule)
    for k in range(35):
        first.update(k + 1, cs[k], epoch=k // 10 + 1, update=0.01 * k, spectral=spectral[k])
    resumed = CSFluctuationMonitor.from_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.update(k + 1, cs[k], epoch=k // 10 + 1, update=0.01 * k, spectral=spectral[k])
            for k in range(35, n)] == decisions[35:]
    history = History.from_dict(json.loads(json.dumps(whole.history.to_dict())))
    assert np.isnan(history.spectral[0]) and history.spectral[9] == pytest.approx(0.03)
    assert replay(history, rule) == tp
    assert replay(History.from_dict({**whole.history.to_dict(), "spectral": None}), rule) is None
    assert rule_from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="budget"):
        SpectralBudget(budget=0.0)


def _growing(ends: list[float], window: int) -> np.ndarray:
    """A size series whose value at the end of window w is ``ends[w]``, rising linearly inside each window (the
    samples between window ends must not decide)."""
    out, last = [], 0.0
    for end in ends:
        out += list(np.linspace(last, end, window + 1)[1:])
        last = end
    return np.asarray(out)


def test_the_growth_stall_stops_at_the_first_window_end_where_growth_slows():
    """Growth per window over the last two windows, read at window ends only: 30% per window, then 4%; the rule
    decides at the first window end where the two-window rate is below 7%, with no lag; resumable, replayable."""
    from lorakit.earlystop import GrowthStall, History, rule_from_dict
    from lorakit.earlystop.replay import replay

    ends = [0.02 * 1.3 ** w for w in range(6)] + [0.02 * 1.3 ** 5 * 1.04 ** w for w in range(1, 8)]
    window = 10
    size = _growing(ends, window)
    n = len(size)
    cs = training_like(n)
    rule = GrowthStall(growth=0.07, span=2, cap=1.0)
    rates = [(ends[w] / ends[w - 2]) ** 0.5 - 1 for w in range(2, len(ends))]
    stall = 2 + next(i for i, r in enumerate(rates) if r < 0.07)  # the window whose end decides
    assert stall == 7  # windows 5→7: 1.3 · 1.04 → sqrt = 16% at window 6; 1.04² at window 7
    monitor = CSFluctuationMonitor(window, 1e-4, rule=rule)
    decisions = [monitor.update(k + 1, cs[k], epoch=k // window + 1, update=size[k]) for k in range(n)]
    stop = next(k for k, d in enumerate(decisions) if d.stop)
    assert stop == (stall + 1) * window - 1 and monitor.lag == 0
    tp = decisions[stop].turning_point
    assert tp.step == tp.found_at_step == stop + 1 and tp.epoch == stall + 1
    assert "grew by 4.0% per window over the last 2" in tp.reason
    assert "still growing" in decisions[stop - 1].reason
    # compared sample by sample the rate would dip below 7% inside the window already: only window ends count
    early = [k for k in range(2 * window, n) if (size[k] / size[k - 2 * window]) ** 0.5 - 1 < 0.07]
    assert early[0] < stop and not decisions[early[0]].stop
    # resumed mid-way: the same decisions; the history replays to the same turning point
    first = CSFluctuationMonitor(window, 1e-4, rule=rule)
    for k in range(35):
        first.update(k + 1, cs[k], epoch=k // window + 1, update=size[k])
    resumed = CSFluctuationMonitor.from_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.update(k + 1, cs[k], epoch=k // window + 1, update=size[k]) for k in range(35, n)] == \
        decisions[35:]
    assert replay(History.from_dict(json.loads(json.dumps(monitor.history.to_dict()))), rule) == tp
    assert rule_from_dict(rule.to_dict()) == rule


def test_the_growth_stall_cap_stops_a_run_that_grows_fast():
    """A breakdown doubles its update every window: it never stalls, and the cap stops it at the first window
    end past it (here the second, before any growth rate exists)."""
    from lorakit.earlystop import GrowthStall

    size = _growing([0.1, 0.2, 0.4, 0.8, 1.6], 10)
    found = GrowthStall(cap=0.175).find(size, 10)
    assert found.csf_index == found.decided_index == 19 and "cap 0.175" in found.reason
    assert GrowthStall(cap=5.0).find(size, 10) is None  # growing 100% per window: never stalled
    # a size that never grows (nothing learned) stalls as soon as two windows can be compared
    assert GrowthStall(cap=5.0).find(np.full(50, 0.01), 10).csf_index == 29


@pytest.mark.parametrize("args, match", [({"growth": 0.0}, "growth"), ({"span": 0}, "span"),
                                         ({"span": 1.5}, "span"), ({"cap": -1.0}, "cap")])
def test_the_growth_stall_rejects_meaningless_options(args, match):
    from lorakit.earlystop import GrowthStall

    with pytest.raises(ValueError, match=match):
        GrowthStall(**args)
