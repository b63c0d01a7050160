"""The measured overfitting onset of a shapes-world run, and how sure it is.

Per scored epoch, the generalisation score

    g(e) = success on prompts that change something the training set never shows × kept

where success is the share of those prompts' images showing the concept *and* the new color, row or
background (pooled over the ``changes`` asked for), and kept is the share of ``agnostic``-prompt images (no
trigger: "a red circle at the top right") that are still the picture asked for: not the concept (a leak), and
the asked shape, color, row and background (a model that breaks loses them).  g falls when a run overfits: the
concept is drawn in its training colors and rows whatever the prompt says, drawn where it was not asked for,
or the adapter breaks what the base model could draw.  A product, not a difference: a checkpoint is worth
nothing if it never draws the concept in a new setting, or if it no longer draws what the base model drew;
success − (1 − kept) was measured first and peaks at epoch 1 in most runs (every epoch costs more kept than it
adds success in this world), which rewards stopping before anything is learned.  Rows scored before outcomes
carried ``kept`` use success − leak (leak alone misses a breakdown: a broken model that draws no star does not
leak).

The onset is the first epoch (≥ 1) where the centred 3-epoch moving average of g reaches ``REACH`` (80%) of its
peak: the earliest checkpoint nearly as good as the best one.  The peak itself (``reach = 1``, the onset of the
first grids, still reported) sits on a plateau in a run that learns slowly, and the bootstrap moves it by ten
epochs and more ([6–17], [8–20] on the star's LoCon and LoRA at 2e-3) where the plateau's start moves by five
or six ([6–11], [7–13]); by construction, stopping there gives up at most a fifth of the best smoothed g.

How sure: every epoch is scored on the same prompts and seeds, so a paired bootstrap draws prompts with
replacement (change prompts and agnostic prompts separately, each prompt with all its images), uses the draw
for every epoch, and takes the onset of each draw; the interval is the central 90% of those onsets.  The share
of draws whose onset is within ±1 epoch of the measured one (``Onset.reproduced``) is how often a rule that
stopped at the run's true onset would be counted within ±1 of the measured onset: summed over runs, the most
"N/M runs within ±1 epoch" any rule can expect, the measurement's ceiling.  Drawing ``images`` times as many
prompts per draw estimates that ceiling if every epoch were scored on that many times more images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorakit.earlystop.samples import smoothed

#: bootstrap draws: the interval's ends move by less than an epoch between seeds at this count (tests)
RESAMPLES = 1000
#: the onset is the first epoch whose smoothed g reaches this share of its peak (1.0: the peak itself)
REACH = 0.8
#: the attributes whose change g counts: all three, since the built-in model places objects where the prompt
#: says (README)
CHANGES = ("color", "position", "background")


@dataclass(frozen=True)
class Onset:
    epoch: int
    low: int | None  # the interval's ends; None when the rows carry no per-image outcomes (older runs)
    high: int | None
    scores: tuple[float, ...]  # g per scored epoch, unsmoothed
    #: where smoothed g peaks, with its own interval (the onset itself when it is measured with ``reach = 1``)
    peak: int | None = None
    peak_low: int | None = None
    peak_high: int | None = None
    #: share of bootstrap draws whose onset is within ±1 epoch of ``epoch`` (None without per-image outcomes)
    reproduced: float | None = None

    def __str__(self) -> str:
        return f"{self.epoch}" if self.low is None else f"{self.epoch} [{self.low}–{self.high}]"

    @property
    def peak_text(self) -> str:
        return "" if self.peak is None else f"{self.peak}" if self.peak_low is None else \
            f"{self.peak} [{self.peak_low}–{self.peak_high}]"

    def contains(self, epoch: int, slack: int = 0) -> bool:
        low, high = (self.epoch, self.epoch) if self.low is None else (self.low, self.high)
        return low - slack <= epoch <= high + slack


@dataclass(frozen=True)
class PromptCounts:
    """Per scored epoch and prompt: images counted for success (``n``) and the successes among them (``s``),
    agnostic images (``a``) and those failed (``l``: not the picture asked for when ``kept``, else showing the
    concept).  Arrays of shape (epochs, prompts)."""
    epochs: tuple[int, ...]
    change_prompts: np.ndarray  # bool (prompts,): the prompt changes one of the attributes asked for
    agnostic_prompts: np.ndarray  # bool (prompts,)
    s: np.ndarray
    n: np.ndarray
    l: np.ndarray  # noqa: E741  (the paper-style letter for leak)
    a: np.ndarray
    kept: bool = False  # ``l`` counts pictures not kept (outcomes with ``kept``), not leaks alone


def prompt_counts(rows: Sequence[dict], changes: Sequence[str]) -> PromptCounts | None:
    """Counts from the ``outcomes`` each scored row carries (``lorakit.world.experiment.score``); ``None`` when a
    row has none.  Every row must hold the same prompts (they are paired across epochs)."""
    if not rows or any("outcomes" not in r for r in rows):
        return None
    keys = sorted({(o["type"], o["prompt"]) for o in rows[0]["outcomes"]})
    index = {k: i for i, k in enumerate(keys)}
    shape = (len(rows), len(keys))
    s, n, a, leaked, lost = (np.zeros(shape) for _ in range(5))
    for e, row in enumerate(rows):
        if {(o["type"], o["prompt"]) for o in row["outcomes"]} != set(keys):
            raise ValueError(f"epoch {row['epoch']} was scored on other prompts than epoch {rows[0]['epoch']}")
        for o in row["outcomes"]:
            k = index[(o["type"], o["prompt"])]
            asked = [o["changed"][c] for c in changes if c in o["changed"]]
            if asked:  # a prompt changing two asked attributes counts once per attribute, as change_success
                n[e, k] += len(asked)
                s[e, k] += sum(asked)
            if o["type"] == "agnostic":
                a[e, k] += 1
                leaked[e, k] += o["seen"]
                lost[e, k] += not o.get("kept", True)
    # every epoch alike: a run scored partly before ``kept`` existed counts leaks alone
    kept = all("kept" in o for r in rows for o in r["outcomes"] if o["type"] == "agnostic")
    return PromptCounts(tuple(r["epoch"] for r in rows), n.sum(0) > 0, a.sum(0) > 0, s, n,
                        lost if kept else leaked, a, kept)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def generalisation(counts: PromptCounts, weights: np.ndarray | None = None, count_leak: bool = True) -> np.ndarray:
    """g per epoch; with ``weights`` (draws × prompts: how often each prompt was drawn) one row per draw."""
    w = np.ones((1, counts.s.shape[1])) if weights is None else np.atleast_2d(weights)
    success = _ratio(w @ counts.s.T, w @ counts.n.T)  # (draws, epochs)
    if not count_leak:
        return success if weights is not None else success[0]
    failed = _ratio(w @ counts.l.T, w @ counts.a.T)
    g = success * (1 - failed) if counts.kept else success - failed
    return g if weights is not None else g[0]


def smooth_rows(values: np.ndarray, width: int = 3) -> np.ndarray:
    """Centred moving average along the last axis, shorter at the ends, one row per draw: each row's scores of
    neighbouring epochs are noisy.  The sample stop's own smoothing (``lorakit.earlystop.samples.smoothed``)."""
    return smoothed(np.atleast_2d(values), width)


def peak_epoch(epochs: Sequence[int], scores: np.ndarray) -> np.ndarray:
    """Per row of ``scores``: the epoch ≥ 1 of the smoothed maximum (the earliest on ties)."""
    return first_reaching(epochs, scores, 1.0)


def first_reaching(epochs: Sequence[int], scores: np.ndarray, reach: float) -> np.ndarray:
    """Per row of ``scores``: the first epoch ≥ 1 whose smoothed score reaches ``reach`` × the smoothed maximum
    (over epochs ≥ 1); a maximum ≤ 0 (nothing learned, or leak above success) must be reached itself."""
    smoothed = smooth_rows(scores)
    usable = np.array([e >= 1 for e in epochs])
    smoothed[:, ~usable] = -np.inf
    best = smoothed.max(axis=1, keepdims=True)
    target = np.where(best > 0, reach * best, best)
    # a hair of slack: the moving averages of equal scores can differ in the last bit
    return np.asarray(epochs)[np.argmax(smoothed >= target - 1e-12, axis=1)]


def _draws(mask: np.ndarray, resamples: int, rng: np.random.Generator, multiple: int = 1) -> np.ndarray:
    """How often each prompt of ``mask`` is drawn in each of ``resamples`` draws of ``multiple × mask.sum()``
    prompts (``multiple`` > 1: as if every prompt had been scored on that many times more images)."""
    chosen = np.flatnonzero(mask)
    out = np.zeros((resamples, mask.size))
    if chosen.size:
        picks = rng.integers(0, chosen.size, size=(resamples, chosen.size * multiple))
        np.add.at(out, (np.arange(resamples)[:, None], chosen[picks]), 1)
    return out


def measure_onset(rows: Sequence[dict], changes: Sequence[str], *, count_leak: bool = True,
                  resamples: int = RESAMPLES, level: float = 0.9, seed: int = 0, reach: float = REACH,
                  images: int = 1) -> Onset:
    """The onset of a scored run (rows of ``curve.json``, epoch 0 first) with its bootstrap interval, and the
    peak of g with its own (the same draws); ``images`` > 1 draws that many times more prompts per resample (the
    interval and ``reproduced`` as if every epoch had been scored on ``images`` × as many images)."""
    from lorakit.world.experiment import change_success  # the aggregate fallback for rows without outcomes

    rows = sorted(rows, key=lambda r: r["epoch"])
    epochs = [r["epoch"] for r in rows]
    if not any(e >= 1 for e in epochs):
        raise ValueError("the onset needs at least one scored epoch after epoch 0")
    counts = prompt_counts(rows, changes)
    if counts is None:
        g = np.array([change_success(r, tuple(changes)) - (r.get("leak", 0.0) if count_leak else 0.0)  # leak alone
                      for r in rows])
        g = np.nan_to_num(g)
        return Onset(int(first_reaching(epochs, g[None], reach)[0]), None, None, tuple(float(x) for x in g),
                     peak=int(peak_epoch(epochs, g[None])[0]))
    g = generalisation(counts, count_leak=count_leak)
    rng = np.random.default_rng(seed)
    weights = _draws(counts.change_prompts, resamples, rng, images)
    if count_leak:
        weights += _draws(counts.agnostic_prompts & ~counts.change_prompts, resamples, rng, images)
    drawn = generalisation(counts, weights, count_leak)
    tail = (1 - level) / 2

    def interval(per_draw: np.ndarray) -> tuple[int, int]:
        low, high = np.quantile(per_draw, [tail, 1 - tail], method="inverted_cdf")
        return int(low), int(high)

    onset = int(first_reaching(epochs, g[None], reach)[0])
    onsets = first_reaching(epochs, drawn, reach)
    low, high = interval(onsets)
    peak_low, peak_high = interval(peak_epoch(epochs, drawn))
    return Onset(onset, low, high, tuple(float(x) for x in g), peak=int(peak_epoch(epochs, g[None])[0]),
                 peak_low=peak_low, peak_high=peak_high, reproduced=float(np.mean(np.abs(onsets - onset) <= 1)))
