"""The shapes world's exact evaluation metrics: what DESIGN.md section 6 measures with DINO/CLIP features,
measured here by reading the generated images' attributes back (``lorakit.world.reader``).

Given generated images and the prompts they came from (each with the attributes it asks for):

- fidelity: the fraction of images of ``train``, ``trigger``, ``alter`` and ``style`` prompts in which the
  reader sees the concept's shape (also per prompt type);
- controllability: for ``alter`` and ``style`` prompts, the fraction of images obeying each requested
  attribute other than the shape (color, position, size, background), per attribute and pooled over all
  checks; the same on ``agnostic`` prompts says how well the base model's own abilities are kept;
- diversity: the Vendi score (``exp(−Σ λ log λ)``, λ the eigenvalues of K/n, K the cosine kernel) of the
  reader's one-hot attribute vectors, per prompt and averaged (prompts with at least two images), as
  LyCORIS-evaluation does for prompts beyond the data; also of simple pixel features when images are given;
- leak: the fraction of ``agnostic``-prompt images (no trigger) in which the concept's shape appears;
- success by change: for each attribute a prompt asks to change from the training set (``EvalPrompt.changes``:
  a new color or position on ``alter`` prompts, a new background on ``style`` prompts), the fraction of those
  prompts' images showing the concept *and* the new value: the measure of an overfitting onset.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from lorakit.world.concept import CONCEPT_SHAPE, EvalPrompt
from lorakit.world.reader import SHAPE_CLASSES, UNKNOWN, Reader, Reading, ReadObject, default_reader, to_array
from lorakit.world.render import BACKGROUNDS, COLORS, CONCEPT_SHAPES, POSITIONS, SIZES, STYLE_BACKGROUNDS

FIDELITY_TYPES = ("train", "trigger", "alter", "style")
CONTROL_TYPES = ("alter", "style")
OBJECT_ATTRIBUTES = ("color", "position", "size")


# ------------------------------------------------------------------------------------------------ Vendi
def vendi_score_kernel(k: np.ndarray) -> float:
    """``exp(−Σ λ log λ)`` over the eigenvalues λ of K/n (0·log 0 = 0); K a similarity matrix with unit
    diagonal.  1 for n identical items, n for n mutually orthogonal ones."""
    n = k.shape[0]
    if n == 0:
        return 0.0
    w = np.linalg.eigvalsh(k / n)
    w = w[w > 1e-12]  # round-off makes zero eigenvalues slightly negative; 0·log 0 = 0
    return float(np.exp(-np.sum(w * np.log(w))))


def vendi_score(features: np.ndarray) -> float:
    """Vendi score of feature rows under the cosine kernel (rows L2-normalised, K = X Xᵀ)."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    return vendi_score_kernel(x @ x.T)


def attribute_vector(reading: Reading) -> np.ndarray:
    """One-hot background plus one-hot shape/color/position/size of the main object (all zero if none)."""
    parts = [np.array([reading.background == b for b in BACKGROUNDS + STYLE_BACKGROUNDS], dtype=np.float64)]
    obj = reading.main
    for values, attr in ((SHAPE_CLASSES[:-1] + (UNKNOWN,), "shape"), (tuple(COLORS) + (UNKNOWN,), "color"),
                         (tuple(POSITIONS), "position"), (tuple(SIZES), "size")):
        got = getattr(obj, attr) if obj is not None else None
        parts.append(np.array([got == v for v in values], dtype=np.float64))
    return np.concatenate(parts)


def pixel_vector(image: Image.Image | np.ndarray, size: int = 16) -> np.ndarray:
    """A 16×16 RGB thumbnail, centred on its own mean: cosine similarity then compares the layout and
    colors rather than the overall brightness."""
    img = Image.fromarray(to_array(image)).resize((size, size), Image.Resampling.BOX)
    x = np.asarray(img, dtype=np.float64).ravel()
    return x - x.mean()


# ---------------------------------------------------------------------------------------------- metrics
@dataclass
class WorldMetrics:
    fidelity: float
    fidelity_by_type: dict[str, float]
    controllability: float
    controllability_by_attribute: dict[str, float]
    preservation: float  # controllability on agnostic prompts: the base model's own skills kept
    diversity: float
    diversity_by_type: dict[str, float]
    pixel_diversity: float | None
    leak: float
    #: per prompt type: the concept drawn AND every requested color/position/background obeyed
    success_by_type: dict[str, float] = field(default_factory=dict)
    #: per attribute a prompt changes (one the training set never shows: a new color, position, background):
    #: over the prompts that change it, the concept drawn AND that attribute obeyed
    success_by_change: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    counts_by_change: dict[str, int] = field(default_factory=dict)
    concept_shape: str = CONCEPT_SHAPE

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One paragraph a person reads."""
        def pct(v: float) -> str:
            return "n/a" if np.isnan(v) else f"{100 * v:.0f}%"

        fid = ", ".join(f"{k} {pct(v)}" for k, v in self.fidelity_by_type.items())
        ctl = ", ".join(f"{k} {pct(v)}" for k, v in self.controllability_by_attribute.items())
        n_fid = sum(self.counts.get(t, 0) for t in FIDELITY_TYPES)
        text = (f"The concept's {self.concept_shape} was drawn in {pct(self.fidelity)} of the {n_fid} images "
                f"prompted for it (fidelity; by prompt type: {fid or 'none'}). ")
        text += (f"Where a prompt asked for a new color, place, size or background, {pct(self.controllability)} "
                 f"of the requests were obeyed (controllability; {ctl or 'no requests'}). ")
        text += (f"Without the trigger the base model still obeyed {pct(self.preservation)} of its prompts' "
                 f"requests, and the {self.concept_shape} leaked into {pct(self.leak)} of its "
                 f"{self.counts.get('agnostic', 0)} images (concept leak). ")
        text += f"Diversity (Vendi score of the read attributes, per prompt) is {self.diversity:.2f}"
        if self.pixel_diversity is not None:
            text += f", {self.pixel_diversity:.2f} on pixel thumbnails"
        return text + " (1 means every image of a prompt is the same)."


def _as_prompt(p: EvalPrompt | dict) -> EvalPrompt:
    return p if isinstance(p, EvalPrompt) else EvalPrompt(**p)


def concept_shape_of(prompts: Sequence[EvalPrompt]) -> str:
    """The concept's shape as the prompts ask for it: the concept shape most trigger, train, alter and style
    prompts expect (a prompt file for the heart scores hearts); the star when none says."""
    asked = Counter(p.expected.get("shape") for p in prompts if p.type != "agnostic")
    named = [(n, shape) for shape, n in asked.items() if shape in CONCEPT_SHAPES]
    return max(named)[1] if named else CONCEPT_SHAPE


def _target(reading: Reading, expected: dict[str, str]) -> ReadObject | None:
    """The object a prompt's requests are checked on: the largest one of the requested shape, else the
    largest one."""
    wanted = expected.get("shape")
    for obj in reading.objects:
        if obj.shape == wanted:
            return obj
    return reading.main


def obeyed(reading: Reading, expected: dict[str, str]) -> dict[str, bool]:
    """For each attribute ``expected`` asks for, whether the reading shows it (object attributes on the object
    the prompt is about)."""
    obj = _target(reading, expected)
    out = {}
    for attr, value in expected.items():
        if attr == "background":
            out[attr] = reading.background == value
        elif attr in OBJECT_ATTRIBUTES:
            out[attr] = obj is not None and getattr(obj, attr) == value
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def metrics_from_readings(readings: Sequence[Reading], prompts: Sequence[EvalPrompt | dict],
                          pixel_features: np.ndarray | None = None,
                          concept_shape: str | None = None) -> WorldMetrics:
    """The world's metrics from readings (one per image) and the prompt each image came from; the concept's shape
    is what the prompts ask for unless given."""
    prompts = [_as_prompt(p) for p in prompts]
    if len(readings) != len(prompts):
        raise ValueError(f"{len(readings)} readings for {len(prompts)} prompts")
    concept_shape = concept_shape or concept_shape_of(prompts)
    seen = [r.has_shape(concept_shape) for r in readings]
    by_type: dict[str, list[int]] = defaultdict(list)
    by_prompt: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_type[p.type].append(i)
        by_prompt[(p.type, p.prompt)].append(i)

    fidelity_by_type = {t: _mean([seen[i] for i in by_type[t]]) for t in FIDELITY_TYPES if t in by_type}
    fidelity = _mean([seen[i] for t in FIDELITY_TYPES for i in by_type.get(t, [])])

    obeys = [obeyed(r, p.expected) for r, p in zip(readings, prompts, strict=True)]
    checks: dict[str, list[bool]] = defaultdict(list)
    kept: list[bool] = []
    for i, p in enumerate(prompts):
        if p.type in CONTROL_TYPES:
            for attr, ok in obeys[i].items():
                checks[attr].append(ok)
        elif p.type == "agnostic":
            kept.extend(obeys[i].values())
    order = ("color", "position", "size", "background")
    success_by_type = {}
    for t in FIDELITY_TYPES:
        if t in by_type:
            # size is left out: an alter/style prompt changes color, place or background, and "small"/"large"
            # is the least reliable reading of a generated shape
            success_by_type[t] = _mean([seen[i] and all(ok for a, ok in obeys[i].items() if a != "size")
                                        for i in by_type[t]])
    changed: dict[str, list[bool]] = defaultdict(list)
    for i, p in enumerate(prompts):
        for attr in p.changes:
            changed[attr].append(seen[i] and obeys[i][attr])
    controllability_by_attribute = {a: _mean(checks[a]) for a in order if checks[a]}
    controllability = _mean([ok for a in order for ok in checks[a]])

    vectors = np.stack([attribute_vector(r) for r in readings]) if readings else np.zeros((0, 1))
    per_prompt: dict[str, list[float]] = defaultdict(list)
    pixel_scores = []
    for (kind, _), idx in by_prompt.items():
        if len(idx) >= 2:
            per_prompt[kind].append(vendi_score(vectors[idx]))
            if pixel_features is not None:
                pixel_scores.append(vendi_score(pixel_features[idx]))
    diversity_by_type = {t: _mean(v) for t, v in per_prompt.items()}
    diversity = _mean([s for v in per_prompt.values() for s in v])

    return WorldMetrics(
        fidelity=fidelity, fidelity_by_type=fidelity_by_type,
        controllability=controllability, controllability_by_attribute=controllability_by_attribute,
        preservation=_mean(kept), diversity=diversity, diversity_by_type=diversity_by_type,
        pixel_diversity=_mean(pixel_scores) if pixel_features is not None else None,
        leak=_mean([seen[i] for i in by_type.get("agnostic", [])]), success_by_type=success_by_type,
        success_by_change={a: _mean(v) for a, v in changed.items()},
        counts={t: len(v) for t, v in by_type.items()},
        counts_by_change={a: len(v) for a, v in changed.items()}, concept_shape=concept_shape)


def image_outcomes(readings: Sequence[Reading], prompts: Sequence[EvalPrompt | dict],
                   concept_shape: str | None = None) -> list[dict]:
    """Per image, what the onset needs and a bootstrap can resample: the prompt it came from, its type, whether
    the concept was drawn, for each attribute the prompt changes whether the image shows the concept *and* the
    new value, and for an agnostic prompt whether the picture is still the one asked for (``kept``)."""
    prompts = [_as_prompt(p) for p in prompts]
    concept_shape = concept_shape or concept_shape_of(prompts)
    out = []
    for reading, p in zip(readings, prompts, strict=True):
        seen = reading.has_shape(concept_shape)
        got = obeyed(reading, p.expected)
        outcome = {"prompt": p.prompt, "type": p.type, "seen": bool(seen),
                   "changed": {a: bool(seen and got[a]) for a in p.changes}}
        if p.type == "agnostic":
            # the prompt's own picture, as the base model drew it: no concept, and what it asks for (size left
            # out, as in success); a leak fails it, and so does a broken picture
            outcome["kept"] = bool(not seen and all(ok for a, ok in got.items() if a != "size"))
        out.append(outcome)
    return out


def read_images(images: Sequence[Image.Image | np.ndarray],
                reader: Reader | None = None) -> tuple[list[Reading], np.ndarray | None]:
    """The reader's readings of ``images`` and their pixel vectors (the diversity features)."""
    readings = (reader or default_reader()).read_many(list(images))
    pixels = np.stack([pixel_vector(im) for im in images]) if len(images) else None
    return readings, pixels


def world_metrics(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[EvalPrompt | dict],
                  reader: Reader | None = None, concept_shape: str | None = None) -> WorldMetrics:
    """Read ``images`` (one per entry of ``prompts``, several images per prompt allowed) and score them."""
    readings, pixels = read_images(images, reader)
    return metrics_from_readings(readings, prompts, pixel_features=pixels, concept_shape=concept_shape)
