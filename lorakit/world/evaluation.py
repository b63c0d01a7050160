"""The shapes world as a user of ``lorakit.evaluate`` and of the sample stop: its exact attribute reader as a
feature extractor, its exact metrics (``lorakit.world.metrics``) as a metric provider, and the onset's score as a
sample scorer.

Importing this module registers all three: ``load_extractor("world-reader", None)`` (or a path to other reader
weights), ``load_metric_provider("world")`` and ``load_sample_scorer("world")`` (``early_stop.samples``).  The
reader's embedding of an image is the one-hot vector of what it reads (background, the main object's shape,
color, position, size), so the generic metrics (fidelity, Vendi, leak) computed on it say the same things in the
same units as the world's exact metrics, on any image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lorakit.earlystop.samples import register_sample_scorer
from lorakit.evaluate.extractors import ExtractorError, register_extractor
from lorakit.evaluate.pipeline import ALL, register_metric_provider
from lorakit.world import concept
from lorakit.world.metrics import (
    attribute_vector,
    concept_shape_of,
    image_outcomes,
    metrics_from_readings,
    pixel_vector,
)
from lorakit.world.onset import CHANGES, generalisation, prompt_counts
from lorakit.world.reader import Reader, default_reader

EXTRACTOR_KIND = "world-reader"
PROVIDER = "world"


class WorldReaderExtractor:
    """The world's reader as a FeatureExtractor (image embeddings only)."""

    name = EXTRACTOR_KIND
    supports_text = False

    def __init__(self, weights: str | Path | None = None) -> None:
        if weights is None:
            self.reader = default_reader()
        else:
            path = Path(weights)
            if not path.is_file() or path.suffix != ".safetensors":
                raise ExtractorError(f"{path}: not a reader weights file (.safetensors from `lorakit world "
                                     "train-reader`)")
            try:
                self.reader = Reader(path)
            except Exception as err:  # a state dict for another network
                raise ExtractorError(f"{path}: not the world reader's weights: {err}") from None

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        readings = self.reader.read_many(list(images))
        if not readings:
            return torch.zeros(0, len(attribute_vector(self.reader.read(Image.new("RGB", (64, 64))))))
        return torch.from_numpy(np.stack([attribute_vector(r) for r in readings])).float()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise ExtractorError("the world reader reads images only; choose a CLIP extractor for text metrics")


def _world_prompt(p: Any) -> concept.EvalPrompt:
    """lorakit.evaluate's prompt -> the world's (the attributes it asks for decide what is checked)."""
    return concept.EvalPrompt(type=p.type, prompt=p.text, expected=dict(p.expected), seed=p.seed or 0,
                              negative=p.negative, changes=tuple(p.changes))


class WorldMetricProvider:
    """The world's exact metrics per prompt type (and pooled, as group "all"), prefixed ``world.``."""

    name = PROVIDER
    directions = {"world.fidelity": True, "world.success": True, "world.controllability": True,
                  "world.diversity": True, "world.leak": False, "world.preservation": True,
                  "world.pixel_diversity": True, "world.success_color": True, "world.success_position": True,
                  "world.success_background": True}

    def __init__(self, reader: Reader | None = None) -> None:
        self.reader = reader or default_reader()

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[Any]) -> dict[str, dict[str, float]]:
        world_prompts = [_world_prompt(p) for p in prompts]
        # from every prompt at once: the agnostic prompts alone do not say which shape the concept is
        shape = concept_shape_of(world_prompts)
        readings = self.reader.read_many(list(images))
        pixels = np.stack([pixel_vector(im) for im in images]) if len(images) else None
        out: dict[str, dict[str, float]] = {}
        for t in concept.PROMPT_TYPES:
            idx = [i for i, p in enumerate(world_prompts) if p.type == t]
            if not idx:
                continue
            m = metrics_from_readings([readings[i] for i in idx], [world_prompts[i] for i in idx], concept_shape=shape)
            row = {"world.diversity": m.diversity}
            if t == "agnostic":
                row.update({"world.leak": m.leak, "world.preservation": m.preservation})
            else:
                row.update({"world.fidelity": m.fidelity, "world.success": m.success_by_type.get(t, float("nan"))})
                if t in ("alter", "style"):
                    row["world.controllability"] = m.controllability
            out[t] = {k: v for k, v in row.items() if v is not None}
        m = metrics_from_readings(readings, world_prompts, pixel_features=pixels, concept_shape=shape)
        pooled = {"world.fidelity": m.fidelity, "world.controllability": m.controllability,
                  "world.preservation": m.preservation, "world.leak": m.leak, "world.diversity": m.diversity}
        if m.pixel_diversity is not None:
            pooled["world.pixel_diversity"] = m.pixel_diversity
        for attr, value in m.success_by_change.items():  # the overfitting onset's measure
            pooled[f"world.success_{attr}"] = value
        out[ALL] = pooled
        return out


class WorldSampleScorer:
    """The onset's score g of a set of images (``lorakit.world.onset``): success on prompts that change a color,
    row or background the training set never shows × the share of agnostic pictures kept."""

    name = PROVIDER
    types = ("alter", "style", "agnostic")

    def __init__(self, weights: str | Path | None = None) -> None:
        self.reader = WorldReaderExtractor(weights).reader

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[Any]) -> float:
        world_prompts = [_world_prompt(p) for p in prompts]
        outcomes = image_outcomes(self.reader.read_many(list(images)), world_prompts)
        counts = prompt_counts([{"epoch": 0, "outcomes": outcomes}], CHANGES)
        return float(generalisation(counts)[0])


register_extractor(EXTRACTOR_KIND, lambda path: WorldReaderExtractor(path))
register_sample_scorer(PROVIDER, WorldSampleScorer)  # the class: its types are known without loading it
register_metric_provider(PROVIDER, WorldMetricProvider)
