"""Early stopping on the samples (beyond the paper): score the images the trainer makes at each epoch end and
stop when the score has stopped rising.

CS-Fluctuation and the size budgets read the adapter's weights only.  This mode reads what the adapter draws:
at every epoch end the trainer draws a fixed set of evaluation prompts (fixed seeds, so epochs differ only by
the adapter) and a *sample scorer* turns the images into one number, higher is better.  ``SamplePlateau``
then applies the same definition the shapes world measures its overfitting onset with
(``lorakit.world.onset``): the turning point is the first epoch whose centred 3-epoch mean reaches ``reach``
(80%) of the best such mean so far, decided once ``patience`` epochs have passed without a new best.  A
checkpoint nearly as good as the best one, as early as it can be known.

Scorers are registered by name (``register_sample_scorer``): what "good" means depends on what can read the
images.  The shapes world registers ``world`` (its exact reader: success on new colors, rows and backgrounds ×
agnostic pictures kept, the onset's own score) when ``lorakit.world.evaluation`` is imported; the core never
imports the world.  lorakit ships ``clip`` (``lorakit.evaluate.sample_scorer``: fidelity to the training images ×
prompt-following, read with a local CLIP model), imported when first named.  A scorer with a ``set_reference``
method is given the training images before training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lorakit.errors import InvalidValueError

#: epochs without a new best before the rule decides: 4 on the star's runs (3 stopped its slow learners on a bump
#: of noise before they learned; docs/early_stopping.md)
PATIENCE = 4
#: the smoothing of the per-epoch scores: a centred moving average this wide (a score's epoch is trusted once
#: the epoch after it is scored)
WIDTH = 3


class SampleScorer(Protocol):
    """Images drawn for evaluation prompts -> one score, higher is better."""

    name: str
    #: the prompt types it reads (``lorakit.evaluate.prompts.PROMPT_TYPES``); the trainer draws only these
    types: tuple[str, ...]

    def __call__(self, images: Sequence[Any], prompts: Sequence[Any]) -> float: ...


SAMPLE_SCORERS: dict[str, Callable[[str | None], SampleScorer]] = {}


def register_sample_scorer(name: str, factory: Callable[[str | None], SampleScorer]) -> None:
    """``factory(path)``: the scorer, ``path`` being what follows ``=`` in ``early_stop.samples`` (or None).  A
    scorer class as the factory lets ``--dry-run`` read its ``types`` (and ``check_spec``) without loading it."""
    SAMPLE_SCORERS[name] = factory


#: the scorers lorakit ships, imported when first named (the module registers its scorer)
BUILT_IN_SCORERS = {"clip": "lorakit.evaluate.sample_scorer"}


def _scorer_factory(name: str) -> Callable[[str | None], SampleScorer]:
    """The registered factory of ``name`` (a built-in scorer's module imported on first use)."""
    if name not in SAMPLE_SCORERS and name in BUILT_IN_SCORERS:
        import importlib

        importlib.import_module(BUILT_IN_SCORERS[name])
    if name not in SAMPLE_SCORERS:
        known = ", ".join(SAMPLE_SCORERS) or "none registered"
        raise InvalidValueError(f"early_stop.samples: unknown sample scorer {name!r} (known: {known})")
    return SAMPLE_SCORERS[name]


def load_sample_scorer(spec: str) -> SampleScorer:
    """``"name"`` or ``"name=PATH"`` -> the registered scorer."""
    name, _, path = spec.partition("=")
    return _scorer_factory(name)(path or None)


def smoothed(values: Sequence[float] | np.ndarray, width: int = WIDTH) -> np.ndarray:
    """The centred ``width``-epoch mean along the last axis (shorter at the ends); the shapes world's onset
    smooths its scores with the same function, so the rule and the onset it is judged against agree."""
    v = np.asarray(values, dtype=float)
    half = width // 2
    cols = [v[..., max(0, i - half):i + half + 1].mean(axis=-1) for i in range(v.shape[-1])]
    return np.stack(cols, axis=-1) if cols else v.copy()


@dataclass(frozen=True)
class SampleTurningPoint:
    epoch: int  # the checkpoint to hand back
    decided_at: int  # the epoch whose score decided it
    best_epoch: int  # where the smoothed score peaked (so far)
    score: float  # the smoothed score at ``epoch``
    best: float  # the smoothed score at ``best_epoch``
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "found_at_epoch": self.decided_at, "best_epoch": self.best_epoch,
                "score": self.score, "best": self.best, "reason": self.reason}


@dataclass
class SamplePlateau:
    """The online rule over per-epoch sample scores.  Epoch 0 (the base model) is smoothed with the others but is
    never the turning point."""

    reach: float = 0.8
    patience: int = PATIENCE
    scores: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # named as the config spells them: config validation builds the rule to check them
        if isinstance(self.reach, bool) or not isinstance(self.reach, int | float) or not 0 < self.reach <= 1:
            raise InvalidValueError(f"early_stop.sample_reach must be in (0, 1], got {self.reach!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise InvalidValueError(f"early_stop.sample_patience must be a positive integer (epochs), "
                                    f"got {self.patience!r}")

    def update(self, epoch: int, score: float) -> SampleTurningPoint | None:
        """Record ``epoch``'s score; the turning point once it is decided (None before)."""
        self.scores[epoch] = float(score)
        return self._decide(final=False)

    def final(self) -> SampleTurningPoint | None:
        """At the end of training: the turning point on every score recorded, decided or not (report mode)."""
        return self._decide(final=True)

    def earliest_candidate(self) -> int | None:
        """No later decision can hand back an epoch before this one (None: nothing trusted yet): on the epochs
        whose smoothing window is complete the best only rises, so the first epoch reaching ``reach`` of it only
        moves later.  What the trainer may prune checkpoints up to."""
        found = self._decide(final=False, wait=False)
        return None if found is None else found.epoch

    def _decide(self, final: bool, wait: bool = True) -> SampleTurningPoint | None:
        # epoch 0 (the base model, scored before the first step) takes part in the smoothing, as in the onset
        epochs = sorted(self.scores)
        values = smoothed([self.scores[e] for e in epochs])
        trusted = len(epochs) if final else len(epochs) - WIDTH // 2  # the last one's window is not complete
        candidates = [i for i in range(trusted) if epochs[i] >= 1]
        if not candidates:
            return None
        best_i = max(candidates, key=lambda i: (values[i], -i))
        waited = candidates[-1] - best_i
        if wait and not final and waited < self.patience:
            return None
        best = values[best_i]
        target = self.reach * best if best > 0 else best
        i = next(k for k in candidates if values[k] >= target - 1e-12)
        reason = (f"the smoothed sample score peaked at {best:.3f} (epoch {epochs[best_i]}) and did not rise for "
                  f"{waited} epochs; epoch {epochs[i]} is the first at {self.reach:.0%} of it ({values[i]:.3f})")
        return SampleTurningPoint(epoch=epochs[i], decided_at=epochs[-1], best_epoch=epochs[best_i],
                                  score=values[i], best=best, reason=reason)

    def state_dict(self) -> dict[str, Any]:
        return {"reach": self.reach, "patience": self.patience, "scores": {str(k): v for k, v in self.scores.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scores = {int(k): float(v) for k, v in state["scores"].items()}


def replay(scores: Mapping[int, float], reach: float = 0.8, patience: int = PATIENCE) -> SampleTurningPoint | None:
    """The turning point ``SamplePlateau`` finds online on a run's recorded per-epoch scores (None: not decided
    before the scores end)."""
    rule = SamplePlateau(reach, patience)
    for epoch in sorted(scores):
        found = rule.update(epoch, scores[epoch])
        if found is not None:
            return found
    return None


@dataclass
class SampleStop:
    """What the trainer runs at epoch ends: draw the prompts, score the images, ask the rule.

    ``draw(jobs)`` makes one image per (evaluation prompt, seed) with the adapter as it is now; the trainer
    supplies it (sampling settings, trigger expansion, device).  ``prompts``: the evaluation prompts the scorer
    reads (``lorakit.evaluate.prompts.EvalPrompt``), each drawn with ``seeds`` seeds."""

    scorer: SampleScorer
    prompts: Sequence[Any]
    seeds: int
    rule: SamplePlateau
    decided: SampleTurningPoint | None = None  # the first turning point the rule decided on

    @property
    def images_per_epoch(self) -> int:
        return len(self.prompts) * self.seeds

    def jobs(self) -> list[tuple[Any, int]]:
        """(prompt, seed) per image: the prompt's own seed (else its index), then the evaluation's seed stride."""
        from lorakit.evaluate.generate import make_jobs

        return [(job.prompt, job.seed) for job in make_jobs(list(self.prompts), self.seeds)]

    def score_images(self, draw: Callable[[list[tuple[Any, int]]], list[Any]]) -> float:
        """Draw this epoch's images and score them (in one process; every process then ``record_score``s it)."""
        jobs = self.jobs()
        return float(self.scorer(draw(jobs), [p for p, _ in jobs]))

    def record_score(self, epoch: int, score: float) -> SampleTurningPoint | None:
        """Record ``epoch``'s score; the turning point once decided.  Every process of a multi-process run
        records the same scores, so every one decides the same stop."""
        if score != score:  # NaN: a scorer that found nothing to score
            raise InvalidValueError(f"the sample scorer {self.scorer.name!r} returned NaN at epoch {epoch}: the "
                                    f"prompts hold none of the types it reads ({', '.join(self.scorer.types)})")
        found = self.rule.update(epoch, score)
        if found is not None and self.decided is None:
            self.decided = found
        return found

    def record(self) -> dict[str, Any]:
        """What ``sample_scores.json`` keeps: the scorer, the images per epoch, every score, the turning point on
        them (as decided, or for a run that never decided, on all of them)."""
        found = self.decided or self.rule.final()
        return {"scorer": self.scorer.name, "images_per_epoch": self.images_per_epoch, "reach": self.rule.reach,
                "patience": self.rule.patience, "scores": {str(k): v for k, v in sorted(self.rule.scores.items())},
                "turning_point": found.to_dict() if found is not None else None}


def _read_prompts(prompt_file: str | None, trigger: str | None) -> list[Any]:
    from lorakit.evaluate.prompts import PromptSetError, load_prompt_set

    if not prompt_file:
        raise InvalidValueError("early_stop.samples needs early_stop.sample_prompts: an evaluation prompt file "
                                "(the `lorakit eval --prompts` format) for the scorer to read")
    try:  # the file's own trigger first; the training data's only when the file has none
        prompt_set = load_prompt_set(prompt_file)
    except PromptSetError:
        if not trigger:
            raise
        prompt_set = load_prompt_set(prompt_file, trigger=trigger)
    return list(prompt_set.prompts)


def _prompts_it_reads(scorer: Any, prompts: list[Any], prompt_file: str) -> list[Any]:
    """The prompts of the types ``scorer`` (a scorer, or a scorer class) reads; refused when none, or when its
    ``check_prompts`` finds them short of what it needs."""
    read = [p for p in prompts if p.type in scorer.types]
    if not read:
        raise InvalidValueError(f"early_stop.sample_prompts: {prompt_file} has no prompt of the types the "
                                f"{scorer.name!r} scorer reads ({', '.join(scorer.types)})")
    if (check := getattr(scorer, "check_prompts", None)) is not None:  # what else a scorer needs of them
        check(read, f"early_stop.sample_prompts: {prompt_file}")
    return read


def make_sample_stop(spec: str, prompt_file: str | None, seeds: int, reach: float, patience: int,
                     trigger: str | None = None) -> SampleStop:
    """The configured sample stop (``early_stop.samples`` and its options): the scorer, the prompts of the types
    it reads from ``prompt_file`` (``trigger``: the training data's, for a file that names none), the rule."""
    scorer = load_sample_scorer(spec)
    prompts = _prompts_it_reads(scorer, _read_prompts(prompt_file, trigger), str(prompt_file))
    return SampleStop(scorer, prompts, seeds, SamplePlateau(reach, patience))


def check_sample_stop(spec: str, prompt_file: str | None, seeds: int, trigger: str | None = None) -> str:
    """What ``make_sample_stop`` checks, without loading the scorer's model (``lorakit train --dry-run``): the
    scorer's name, its own check of its path (``check_spec``, where the factory has one), the prompt file, and the
    prompts it reads (where the factory says which types); a line saying what each epoch would score."""
    name, _, path = spec.partition("=")
    factory = _scorer_factory(name)
    if (check := getattr(factory, "check_spec", None)) is not None:
        check(path or None)
    prompts = _read_prompts(prompt_file, trigger)
    if getattr(factory, "types", None) is not None:
        prompts = _prompts_it_reads(factory, prompts, str(prompt_file))
    return (f"early stop on the samples: the {name!r} scorer, {len(prompts)} prompts × {seeds} "
            f"seed{'' if seeds == 1 else 's'} drawn and scored at every epoch end")
