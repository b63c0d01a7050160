"""From generated images to numbers: metrics per checkpoint and prompt type, rank-normalised scores, the
harmonic-mean best checkpoint, written as ``metrics.json`` and ``metrics.csv``.

Metrics per image extractor E (names carry the extractor: ``fidelity[dinov2]``):
- ``fidelity[E]`` mean cosine to the concept's data, ``centroid_dist[E]`` squared centroid distance (lower is
  better), on train/trigger/alter/style prompts;
- ``diversity[E]`` Vendi score: per prompt and averaged when there are several seeds, else over the type's images;
- ``leak[E]`` on agnostic prompts: the share of images nearer the concept's data than the base model's image
  for the same prompt and seed (lower is better);
- with a text tower: ``clip_score[E]`` (image-prompt cosine) and ``prompt_acc[E]`` (is an image's own prompt the
  best match among its type's prompts);
- with Gram matrices (VGG): ``style_loss[E]`` against the base model's image of the same prompt and seed, on
  style and agnostic prompts (lower is better: the base model's abilities kept).
Metric providers (``register_metric_provider``) add exact metrics, e.g. the shapes world's reader-based ones.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from lorakit.atomic import atomic_write_json, atomic_write_text
from lorakit.errors import LorakitError
from lorakit.evaluate import metrics as M
from lorakit.evaluate.checkpoints import EvalCheckpoint, RunInfo
from lorakit.evaluate.extractors import FeatureExtractor
from lorakit.evaluate.generate import ImageJob
from lorakit.evaluate.prompts import PROMPT_TYPES
from lorakit.evaluate.scores import best_by_harmonic_mean, rank_normalise, shap_importance
from lorakit.prompt_weights import plain_text

FIDELITY_TYPES = ("train", "trigger", "alter", "style")
STYLE_LOSS_TYPES = ("style", "agnostic")
ALL = "all"  # the group of metrics not tied to one prompt type


class EvaluationError(LorakitError, ValueError):
    """The evaluation cannot be computed as asked (no images, an unknown provider, ...)."""


class MetricProvider(Protocol):
    """Exact metrics from images and the prompt of each: group (prompt type or "all") -> metric -> value."""

    name: str
    directions: Mapping[str, bool]  # metric -> higher is better

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[Any]) -> dict[str, dict[str, float]]: ...


METRIC_PROVIDERS: dict[str, Callable[[], MetricProvider]] = {}


def register_metric_provider(name: str, factory: Callable[[], MetricProvider]) -> None:
    METRIC_PROVIDERS[name] = factory


def load_metric_provider(name: str) -> MetricProvider:
    if name not in METRIC_PROVIDERS:
        raise EvaluationError(f"unknown metric provider {name!r} (known: {', '.join(METRIC_PROVIDERS) or 'none'})")
    return METRIC_PROVIDERS[name]()


class OCRProvider:
    """The logo study's text check: on prompts whose ``expected`` has a ``text`` (the word the image must show),
    the share of images in which OCR reads it (``ocr_text``).  Needs the optional extra ``ocr``."""

    name = "ocr"
    directions = {"ocr_text": True}

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[Any]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for t in PROMPT_TYPES:
            idx = [i for i, p in enumerate(prompts) if p.type == t and p.expected.get("text")]
            if idx:
                found = [M.ocr_contains(images[i], prompts[i].expected["text"]) for i in idx]
                out[t] = {"ocr_text": float(np.mean(found))}
        return out


register_metric_provider("ocr", OCRProvider)


@dataclass
class EvalResult:
    checkpoints: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    groups: list[str]
    directions: dict[str, bool]
    metrics: dict[str, dict[str, dict[str, float | None]]]  # group -> checkpoint -> metric -> value
    scores: dict[str, dict[str, dict[str, float | None]]]  # the same, rank-normalised across checkpoints
    harmonic_mean: dict[str, float | None]
    best: str | None
    mean_score: dict[str, float | None] = field(default_factory=dict)  # arithmetic mean of the scores: tie-break
    #: "group/metric" -> setting -> mean |SHAP value| (what drives the metric across the runs' checkpoints)
    importance: dict[str, dict[str, float]] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def value(self, group: str, checkpoint: str, metric: str) -> float | None:
        return self.metrics.get(group, {}).get(checkpoint, {}).get(metric)

    def metric_names(self, group: str) -> list[str]:
        names: list[str] = []
        for row in self.metrics.get(group, {}).values():
            names.extend(m for m in row if m not in names)
        return names

    def ranking(self) -> list[str]:
        """Checkpoint labels best first (``best`` is the first when two or more were compared)."""
        return best_first([c["label"] for c in self.checkpoints], self.harmonic_mean, self.mean_score)

    def tied_with_best(self) -> int:
        """How many checkpoints share the best one's harmonic mean (itself included; the arithmetic mean chose
        among them)."""
        if self.best is None:
            return 0
        hm = self.harmonic_mean.get(self.best)
        return sum(1 for v in self.harmonic_mean.values() if v == hm)


def best_first(labels: Sequence[str], harmonic: Mapping[str, float | None],
               means: Mapping[str, float | None]) -> list[str]:
    """``labels`` best first: by the harmonic mean of the rank-normalised scores, and among equal harmonic means
    (with many metrics most checkpoints are worst at one of them: 0) by the arithmetic mean of the same scores;
    equal keys keep the input order (the first checkpoint wins, as in ``best_by_harmonic_mean``)."""
    def key(label: str) -> tuple[float, float]:
        hm, mean = harmonic.get(label), means.get(label)
        return (hm if _finite(hm) else -1.0, mean if _finite(mean) else -1.0)

    return sorted(labels, key=key, reverse=True)  # sorted is stable, reversed too


def _clean(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN; browsers refuse it), numpy scalars -> Python, paths -> str."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, float | int) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------- metrics
def _embed(extractor: FeatureExtractor, images: Sequence[Image.Image]) -> torch.Tensor:
    return extractor.embed_images(list(images)).float()


def _metric_name(metric: str, extractor: str) -> str:
    return f"{metric}[{extractor}]"


def compute_metrics(checkpoints: Sequence[EvalCheckpoint], jobs: Sequence[ImageJob],
                    images: Mapping[str, Sequence[Image.Image]], extractors: Mapping[str, FeatureExtractor],
                    data_images: Sequence[Image.Image] = (), providers: Sequence[MetricProvider] = (),
                    seeds: int = 1, held_out_images: Sequence[Image.Image] = ()
                    ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, bool]]:
    """group -> checkpoint label -> metric -> value, and metric -> higher-is-better.

    ``held_out_images``: images of the concept never trained on (the run's validation folder): fidelity to them
    (``heldout_fidelity``), and how much nearer the samples are to the training images than to these
    (``memorisation``, fidelity − held-out fidelity): a checkpoint that copies its training images rather than
    learning the concept draws away from the held-out ones."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    directions: dict[str, bool] = {}

    def put(group: str, label: str, metric: str, value: float, higher: bool) -> None:
        table.setdefault(group, {}).setdefault(label, {})[metric] = float(value)
        directions[metric] = higher

    by_type: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_type.setdefault(job.prompt.type, []).append(i)
    types = [t for t in PROMPT_TYPES if t in by_type]
    base = next((c.label for c in checkpoints if c.kind == "base"), None)

    for name, extractor in extractors.items():
        data = _embed(extractor, data_images) if data_images else None
        held = _embed(extractor, held_out_images) if held_out_images else None
        emb = {c.label: _embed(extractor, images[c.label]) for c in checkpoints}
        texts = None
        if extractor.supports_text:
            prompt_texts = sorted({j.prompt.text for j in jobs})
            # a weighted prompt's words, as the generator read them ("(red:1.3)" is not text to embed)
            text_emb = extractor.embed_texts([plain_text(t) for t in prompt_texts]).float()
            texts = {t: text_emb[k] for k, t in enumerate(prompt_texts)}
        grams = None
        gram_fn = getattr(extractor, "gram_matrices", None)
        if gram_fn is not None and base is not None:
            grams = {c.label: gram_fn(list(images[c.label])) for c in checkpoints}
        for c in checkpoints:
            for t in types:
                idx = by_type[t]
                e = emb[c.label][idx]
                if data is not None and t in FIDELITY_TYPES:
                    put(t, c.label, _metric_name("fidelity", name), M.image_similarity(e, data), True)
                    put(t, c.label, _metric_name("centroid_dist", name), M.centroid_distance(e, data), False)
                if held is not None and t in FIDELITY_TYPES:
                    near_held = M.image_similarity(e, held)
                    put(t, c.label, _metric_name("heldout_fidelity", name), near_held, True)
                    if data is not None:
                        put(t, c.label, _metric_name("memorisation", name), M.image_similarity(e, data) - near_held,
                            False)
                if seeds >= 2:
                    div = M.mean_vendi_by_group(e, [jobs[i].prompt_index for i in idx])
                else:
                    div = M.vendi_score(e)
                put(t, c.label, _metric_name("diversity", name), div, True)
                if t == "agnostic" and data is not None and base is not None:
                    put(t, c.label, _metric_name("leak", name), M.concept_leak(e, data, emb[base][idx]), False)
                if texts is not None:
                    own = torch.stack([texts[jobs[i].prompt.text] for i in idx])
                    put(t, c.label, _metric_name("clip_score", name), M.clip_score(e, own), True)
                    candidates = sorted({jobs[i].prompt.text for i in idx})
                    if len(candidates) >= 2:
                        cand = torch.stack([texts[p] for p in candidates])
                        truth = [candidates.index(jobs[i].prompt.text) for i in idx]
                        put(t, c.label, _metric_name("prompt_acc", name),
                            M.prompt_classification_accuracy(e, cand, truth), True)
                if grams is not None and t in STYLE_LOSS_TYPES:
                    mine = [g[idx] for g in grams[c.label]]
                    ref = [g[idx] for g in grams[base]]
                    put(t, c.label, _metric_name("style_loss", name), M.gram_style_loss(mine, ref), False)

    prompts = [j.prompt for j in jobs]
    for provider in providers:
        for c in checkpoints:
            for group, values in provider(list(images[c.label]), prompts).items():
                for metric, value in values.items():
                    put(group, c.label, metric, value, provider.directions.get(metric, True))
    # a metric undefined for every checkpoint of a group (Vendi per prompt with one seed) says nothing: dropped
    for rows in table.values():
        names = {m for row in rows.values() for m in row}
        for metric in names:
            if not any(_finite(row.get(metric)) for row in rows.values()):
                for row in rows.values():
                    row.pop(metric, None)
    return table, directions


def rank_scores(table: Mapping[str, Mapping[str, Mapping[str, float]]], directions: Mapping[str, bool],
                labels: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Each (group, metric) rank-normalised across the checkpoints (best 1, worst 0)."""
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for group, rows in table.items():
        metrics = sorted({m for row in rows.values() for m in row})
        for metric in metrics:
            have = [lb for lb in labels if lb in rows and metric in rows[lb]]
            values = [rows[lb][metric] for lb in have]
            for lb, s in zip(have, rank_normalise(values, directions[metric]), strict=True):
                scores.setdefault(group, {}).setdefault(lb, {})[metric] = s
    return scores


def evaluate(checkpoints: Sequence[EvalCheckpoint], runs: Sequence[RunInfo], jobs: Sequence[ImageJob],
             images: Mapping[str, Sequence[Image.Image]], extractors: Mapping[str, FeatureExtractor],
             data_images: Sequence[Image.Image] = (), providers: Sequence[MetricProvider] = (), seeds: int = 1,
             setup: Mapping[str, Any] | None = None, held_out_images: Sequence[Image.Image] = ()) -> EvalResult:
    """Metrics, scores and the harmonic-mean best checkpoint of everything compared."""
    if not jobs:
        raise EvaluationError("no prompts to evaluate")
    if not extractors and not providers:
        raise EvaluationError("no extractor and no metric provider chosen: nothing would be measured")
    table, directions = compute_metrics(checkpoints, jobs, images, extractors, data_images, providers, seeds,
                                        held_out_images)
    labels = [c.label for c in checkpoints]
    scores = rank_scores(table, directions, labels)
    harmonic: dict[str, float | None] = {}
    means: dict[str, float] = {}
    best = None
    if len(labels) >= 2:
        flat = {lb: {f"{g}/{m}": v for g, rows in table.items() for m, v in rows.get(lb, {}).items() if _finite(v)}
                for lb in labels}
        present = {k for row in flat.values() for k in row}  # a metric nan everywhere ranks nothing
        flat_dirs = {f"{g}/{m}": directions[m] for g, rows in table.items() for row in rows.values() for m in row
                     if f"{g}/{m}" in present}
        if flat_dirs:
            _, harmonic = best_by_harmonic_mean(flat, flat_dirs)
            means = {lb: float(np.mean([s for g in scores.values() for s in g.get(lb, {}).values() if _finite(s)]
                                       or [float("nan")])) for lb in labels}
            best = best_first(labels, harmonic, means)[0]
    groups = [g for g in (*PROMPT_TYPES, ALL) if g in table]
    return EvalResult(
        checkpoints=[{"label": c.label, "kind": c.kind, "run": c.run, "epoch": c.epoch, "step": c.step,
                      "path": str(c.path) if c.path else None, "hash": c.hash, "token": c.token,
                      **({"embedding": str(c.embedding)} if c.embedding else {})} for c in checkpoints],
        runs=[{"name": r.name, "path": str(r.path), "settings": r.settings, "turning_epoch": r.turning_epoch,
               "turning_step": r.turning_step} for r in runs],
        groups=groups, directions=directions, metrics=table, scores=scores,
        harmonic_mean={str(k): v for k, v in harmonic.items()}, best=None if best is None else str(best),
        mean_score=means, setup=dict(setup or {}))


# ---------------------------------------------------------------------------------------------- writing
CSV_COLUMNS = ("checkpoint", "run", "epoch", "group", "metric", "value", "score", "higher_is_better")


def metrics_csv(result: EvalResult) -> str:
    info = {c["label"]: c for c in result.checkpoints}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for group in result.groups:
        for label, row in result.metrics[group].items():
            for metric, value in row.items():
                score = result.scores.get(group, {}).get(label, {}).get(metric)
                writer.writerow([label, info[label]["run"] or "", "" if info[label]["epoch"] is None
                                 else info[label]["epoch"], group, metric, _fmt_csv(value), _fmt_csv(score),
                                 int(result.directions[metric])])
    return out.getvalue()


def _fmt_csv(v: float | None) -> str:
    return "" if not _finite(v) else repr(float(v))


def write_results(result: EvalResult, out: str | Path) -> list[Path]:
    """``metrics.json`` and ``metrics.csv`` in ``out``, each written atomically."""
    out = Path(out)
    return [atomic_write_json(out / "metrics.json", result.to_dict()),
            atomic_write_text(out / "metrics.csv", metrics_csv(result))]


def result_from_dict(data: Mapping[str, Any]) -> EvalResult:
    return EvalResult(**{k: data[k] for k in ("checkpoints", "runs", "groups", "directions", "metrics", "scores",
                                              "harmonic_mean", "best")}, mean_score=data.get("mean_score", {}),
                      importance=data.get("importance", {}), setup=dict(data.get("setup", {})))


def summary_lines(result: EvalResult, headline: Sequence[tuple[str, str]] = ()) -> list[str]:
    """A short plain-text summary: the best checkpoint and a few headline metrics per checkpoint."""
    lines = []
    if result.best is not None:
        hm = result.harmonic_mean.get(result.best)
        mean = result.mean_score.get(result.best)
        tied = result.tied_with_best()
        if tied > 1 and _finite(hm) and _finite(mean):  # say which mean chose, or "best ... (0.000)" reads as a failure
            lines.append(f"best checkpoint: {result.best} (arithmetic mean of rank-normalised metrics {mean:.3f}; "
                         f"{tied} checkpoints tie on the harmonic mean at {hm:.3f}"
                         + (", each worst at one metric or more)" if hm == 0 else ")"))
        else:
            lines.append(f"best checkpoint (harmonic mean of rank-normalised metrics): {result.best}"
                         + (f" ({hm:.3f}" if _finite(hm) else " (")
                         + (f"; arithmetic mean {mean:.3f})" if _finite(mean) else ")"))
    for group, metric in headline:
        values = [(c["label"], result.value(group, c["label"], metric)) for c in result.checkpoints]
        shown = ", ".join(f"{lb} {v:.3f}" for lb, v in values if _finite(v))
        if shown:
            lines.append(f"{metric} on {group}: {shown}")
    return lines


def headline_metrics(result: EvalResult) -> list[tuple[str, str]]:
    """(group, metric) pairs a person looks at first: fidelity on train prompts (and the memorisation gap, with
    held-out images), control on alter prompts."""
    wanted = []
    for group, prefixes in (("train", ("world.fidelity", "fidelity[")), ("train", ("memorisation[",)),
                            ("alter", ("world.controllability", "clip_score[")), ("alter", ("world.success",)),
                            ("style", ("world.success", "style_loss[")), ("agnostic", ("world.leak", "leak["))):
        names = result.metric_names(group)
        for prefix in prefixes:
            match = next((m for m in names if m.startswith(prefix)), None)
            if match:
                wanted.append((group, match))
                break
    return wanted


#: run settings (and the epoch) the SHAP analysis explains a metric by, as the paper does
SHAP_FEATURES = ("algorithm", "preset", "rank", "alpha", "lr", "epoch")


def add_importance(result: EvalResult, pairs: Sequence[tuple[str, str]] | None = None) -> EvalResult:
    """The paper's SHAP analysis: for each (group, metric), a CatBoost regressor predicts the metric from the
    settings of the run a checkpoint came from and its epoch; the mean |SHAP value| per setting is how much it
    drives the metric.  Settings that never vary are left out.  Needs the optional extra ``shap``."""
    settings = {r["name"]: r["settings"] for r in result.runs}
    rows = []
    for c in result.checkpoints:
        if c["run"] is None or c["epoch"] is None:
            continue
        rows.append({"label": c["label"], "epoch": c["epoch"],
                     **{f: settings[c["run"]].get(f) for f in SHAP_FEATURES if f != "epoch"}})
    features = [f for f in SHAP_FEATURES
                if all(r.get(f) is not None for r in rows) and len({str(r[f]) for r in rows}) > 1]
    if len(rows) < 3 or not features:
        raise EvaluationError("the SHAP analysis needs at least 3 checkpoints of runs whose settings or epochs "
                              f"differ ({len(rows)} checkpoints, varying settings: {features or 'none'})")
    for group, metric in pairs or headline_metrics(result):
        data = [{**r, "target": result.value(group, r["label"], metric)} for r in rows]
        data = [r for r in data if _finite(r["target"])]
        if len(data) >= 3:
            result.importance[f"{group}/{metric}"] = shap_importance(data, features, "target")
    return result
