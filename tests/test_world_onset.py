"""The measured onset with its bootstrap interval (lorakit.world.onset): hand-made per-image outcomes with a
known peak, leak on agnostic prompts moving it, an interval that narrows with more prompts, and the per-image
outcomes read from readings."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.world.concept import EvalPrompt
from lorakit.world.metrics import image_outcomes
from lorakit.world.onset import generalisation, measure_onset, peak_epoch, prompt_counts
from lorakit.world.reader import Reading, ReadObject


def outcomes(success: list[float], leak: float, prompts: int = 4, images: int = 10) -> list[dict]:
    """``prompts`` color-change prompts, prompt k with round(success[k] * images) successes, and one agnostic
    prompt with round(leak * images) images showing the concept."""
    out = []
    for k in range(prompts):
        hits = round(success[k] * images)
        out += [{"prompt": f"zkz in blue {k}", "type": "alter", "seen": True, "changed": {"color": i < hits}}
                for i in range(images)]
    hits = round(leak * images)
    out += [{"prompt": "a red circle", "type": "agnostic", "seen": i < hits, "changed": {}} for i in range(images)]
    return out


def rows_from(curves: list[list[float]], leaks: list[float], **kw) -> list[dict]:
    """One row per epoch; ``curves[e]`` is the success of each prompt at epoch e."""
    return [{"epoch": e, "outcomes": outcomes(s, leak, prompts=len(s), **kw)}
            for e, (s, leak) in enumerate(zip(curves, leaks, strict=True))]


def test_generalisation_is_success_minus_leak_counted_by_hand():
    rows = rows_from([[0.0, 0.0], [0.5, 0.3], [0.8, 0.6]], [0.0, 0.1, 0.4])
    counts = prompt_counts(rows, ("color",))
    assert counts.epochs == (0, 1, 2)
    np.testing.assert_allclose(generalisation(counts, count_leak=False), [0.0, 0.4, 0.7])
    np.testing.assert_allclose(generalisation(counts), [0.0, 0.3, 0.3])
    # a draw that takes the agnostic prompt once, prompt 0 twice and prompt 1 never (prompts in (type, text) order)
    np.testing.assert_allclose(generalisation(counts, np.array([[1.0, 2.0, 0.0]])), [[0.0, 0.4, 0.4]])


def test_onset_is_the_smoothed_peak_and_leak_moves_it_earlier():
    success = [0.0, 0.2, 0.4, 0.6, 0.7, 0.75, 0.8, 0.8]  # still rising: without leak the peak is late
    leak = [0.0, 0.0, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9]  # the star drawn where a circle was asked for
    rows = rows_from([[s] * 4 for s in success], leak)
    assert measure_onset(rows, ("color",), count_leak=False).peak == 6
    assert measure_onset(rows, ("color",), count_leak=False).epoch == 4  # smoothed .57, .70: 80% of .80 at 4
    onset = measure_onset(rows, ("color",))
    assert onset.peak == 3  # smoothed g: .2, .37, .43, .38 ... peaks at epoch 3
    assert onset.epoch == 2  # and reaches 80% of the peak (.35) at epoch 2
    assert onset.low <= 2 <= onset.high and onset.peak_low <= 3 <= onset.peak_high
    assert measure_onset(rows, ("color",), reach=1.0).epoch == 3


def test_the_start_of_a_plateau_is_measured_tighter_than_its_peak():
    """g climbs for three epochs and then stays flat for twelve: where the flat part peaks is chance, where it
    starts is not.  The bootstrap says so: the peak's interval spans the plateau, the onset's does not."""
    rng = np.random.default_rng(1)
    truth = [0.0, 0.15, 0.3, 0.45] + [0.5] * 12
    curves = [list(np.clip(t + rng.normal(0, 0.2, 12), 0, 1)) for t in truth]
    onset = measure_onset(rows_from(curves, [0.0] * len(truth), images=5), ("color",))
    assert 2 <= onset.epoch <= 4 and onset.high < onset.peak_high  # measured: 4 [3–8], peak 8 [5–15]
    assert onset.peak_high - onset.peak_low >= 2 * (onset.high - onset.low)
    assert onset.peak_text == f"{onset.peak} [{onset.peak_low}–{onset.peak_high}]"


def test_interval_narrows_with_more_prompts_and_is_reproducible():
    rng = np.random.default_rng(0)
    truth = np.array([0.0, 0.2, 0.4, 0.55, 0.5, 0.35, 0.2, 0.1, 0.05])  # onset at epoch 3 (smoothed peak)

    def noisy(prompts: int) -> list[dict]:
        curves = [list(np.clip(t + rng.normal(0, 0.25, prompts), 0, 1)) for t in truth]
        return rows_from(curves, [0.0] * len(truth), images=4)

    few, many = noisy(3), noisy(60)
    wide, narrow = measure_onset(few, ("color",)), measure_onset(many, ("color",))
    assert narrow.high - narrow.low <= 1 and narrow.contains(3)
    assert wide.high - wide.low >= narrow.high - narrow.low
    assert measure_onset(few, ("color",)) == wide  # same seed, same interval
    assert str(narrow) == f"{narrow.epoch} [{narrow.low}–{narrow.high}]"


def test_ties_go_to_the_earlier_epoch_and_epoch_zero_is_never_the_onset():
    assert list(peak_epoch([0, 1, 2, 3], np.array([[0.9, 0.4, 0.4, 0.4]]))) == [1]
    with pytest.raises(ValueError, match="at least one scored epoch"):
        measure_onset([{"epoch": 0, "outcomes": []}], ("color",))


def test_rows_without_outcomes_fall_back_to_the_aggregates():
    rows = [{"epoch": e, "success_by_change": {"color": s}, "counts_by_change": {"color": 6}, "leak": leak}
            for e, (s, leak) in enumerate([(0, 0), (0.3, 0), (0.6, 0.5), (0.6, 0.6), (0.6, 0.7)])]
    onset = measure_onset(rows, ("color",))
    assert (onset.epoch, onset.low, onset.high, onset.peak) == (1, None, None, 1)  # g: 0, .3, .1, 0, -.1
    assert str(onset) == "1"
    no_leak = measure_onset(rows, ("color",), count_leak=False)  # g: 0, .3, .6, .6, .6 (smoothed .3, .5, .6)
    assert (no_leak.epoch, no_leak.peak) == (2, 3)


def test_epochs_scored_on_other_prompts_are_refused():
    rows = rows_from([[0.0, 0.1], [0.2, 0.3]], [0, 0])
    rows[1]["outcomes"][0]["prompt"] = "something else"
    with pytest.raises(ValueError, match="other prompts"):
        prompt_counts(rows, ("color",))


def test_image_outcomes_from_readings():
    def star(color: str, position: str = "center") -> Reading:
        return Reading("white", 1.0, (ReadObject("star", color, position, "large", confidence={}, area=0.05,
                                                  centroid=(0.5, 0.5)),))

    blue = EvalPrompt("alter", "zkz in blue", expected={"shape": "star", "color": "blue", "position": "top"},
                      changes=("color", "position"))
    agnostic = EvalPrompt("agnostic", "a red circle", expected={"shape": "circle", "color": "red"})
    got = image_outcomes([star("blue"), star("red"), star("red")], [blue, blue, agnostic])
    assert got[0] == {"prompt": "zkz in blue", "type": "alter", "seen": True,
                      "changed": {"color": True, "position": False}}
    assert got[1]["changed"] == {"color": False, "position": False}
    assert got[2] == {"prompt": "a red circle", "type": "agnostic", "seen": True, "changed": {}, "kept": False}
    circle = Reading("white", 1.0, (ReadObject("circle", "red", "center", "small", confidence={}, area=0.03,
                                               centroid=(0.5, 0.5)),))
    blank = Reading("white", 1.0, ())
    # the asked picture (size is not judged) is kept; a broken one without the concept is not
    assert [o["kept"] for o in image_outcomes([circle, blank], [agnostic, agnostic])] == [True, False]


def test_a_breakdown_counts_as_overfitting_where_leak_alone_misses_it():
    """The adapter breaks the model at epoch 3 (the agnostic prompts stop being drawn, with no concept leaked)
    while success on new colors creeps up.  Leak alone puts the onset at the end of the run; kept puts it
    before the breakdown."""
    def row(epoch: int, broken: bool) -> dict:
        alter = [{"prompt": f"zkz in blue {k}", "type": "alter", "seen": True, "changed": {"color": k < epoch // 2}}
                 for k in range(6)]
        agnostic = [{"prompt": f"a red circle {k}", "type": "agnostic", "seen": False, "changed": {},
                     "kept": not broken} for k in range(6)]
        return {"epoch": epoch, "outcomes": alter + agnostic}

    rows = [row(e, broken=e >= 3) for e in range(8)]
    onset = measure_onset(rows, ("color",))
    assert onset.epoch <= 2 and onset.high <= 2
    leak_only = [{**r, "outcomes": [{k: v for k, v in o.items() if k != "kept"} for o in r["outcomes"]]}
                 for r in rows]
    assert measure_onset(leak_only, ("color",)).epoch >= 6  # the leak sees nothing happen


def test_reproduced_says_how_often_a_resampled_onset_lands_within_one_epoch():
    """A sharp rise measured on many prompts is reproduced by nearly every resample; a flat, noisy run is not,
    and scoring it on four times as many images (``images=4``) reproduces it more often."""
    rng = np.random.default_rng(2)
    sharp = [0.0, 0.0, 0.0, 0.8, 0.8, 0.8, 0.8, 0.8]
    flat = [0.0] + [0.3] * 11

    def noisy(truth: list[float], prompts: int) -> list[dict]:
        curves = [list(np.clip(t + rng.normal(0, 0.2, prompts), 0, 1)) for t in truth]
        return rows_from(curves, [0.0] * len(truth), images=4)

    clear, unclear = measure_onset(noisy(sharp, 30), ("color",)), measure_onset(noisy(flat, 6), ("color",))
    assert clear.reproduced >= 0.95 and clear.epoch == 4  # smoothed g: .27, .53, .8 at epochs 2-4
    assert unclear.reproduced < 0.9
    flat_rows = noisy(flat, 6)
    assert measure_onset(flat_rows, ("color",), images=4).reproduced > measure_onset(flat_rows, ("color",)).reproduced
