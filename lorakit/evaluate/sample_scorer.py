"""The ``clip`` sample scorer (``early_stop.samples = "clip=PATH"``): early stopping on the samples of any
concept, read with a local CLIP model, with the evaluation's own metrics.

At every epoch end the trainer draws the evaluation prompts (fixed seeds) and this scorer turns the images into
one number, higher is better:

    score = fidelity × prompt-following

- **fidelity**: the mean CLIP image cosine between the images of the concept's prompts (``train``, ``trigger``,
  ``alter``, ``style``) and the training images (``lorakit eval``'s ``fidelity[clip]``); it rises while the
  adapter learns the concept and keeps rising as it copies its data;
- **prompt-following**: the mean CLIP cosine between each ``alter``/``style`` image and its own prompt
  (``clip_score[clip]``); it falls when the concept takes over what the prompt asks for, the overfitting the
  LyCORIS paper measures as lost controllability.

Their product peaks where the concept is learned and the prompts still steer it, and ``SamplePlateau`` hands back
the first epoch near that peak.  Unlike the shapes world's exact reader (``world``), what this score says about
a run's onset is not measured here: the machines that build lorakit have no pretrained CLIP (nothing is
downloaded), so the rule and its formula are tested on what they compute, not on how well they stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lorakit.data.images import load_rgb
from lorakit.earlystop.samples import register_sample_scorer
from lorakit.errors import InvalidValueError
from lorakit.evaluate import metrics as M
from lorakit.evaluate.extractors import load_extractor, model_folder
from lorakit.prompt_weights import plain_text

#: the prompt types fidelity is measured on, and those prompt-following is measured on (a subset)
FIDELITY_TYPES = ("train", "trigger", "alter", "style")
FOLLOWING_TYPES = ("alter", "style")
#: training images read and embedded at a time
REFERENCE_BATCH = 64


class ClipSampleScorer:
    """fidelity × prompt-following of a set of images (see the module's docstring).  ``set_reference`` must be
    given the training images before the first call."""

    name = "clip"
    types = FIDELITY_TYPES

    def __init__(self, path: str | Path | None) -> None:
        self.check_spec(path)
        self.extractor = load_extractor("clip", str(path))
        self.reference: np.ndarray | None = None

    @staticmethod
    def check_spec(path: str | Path | None) -> None:
        """The folder checked to hold a CLIP model (its config only: ``--dry-run`` loads nothing)."""
        if not path:
            raise InvalidValueError('early_stop.samples = "clip" needs the local folder of a CLIP model: '
                                    '"clip=/path/to/clip" (saved with save_pretrained; nothing is downloaded)')
        model_folder(path, "clip", "CLIP")

    def set_reference(self, images: Sequence[Image.Image | Path]) -> None:
        """The training images the generated ones are compared with (embedded once; files are read a batch at a
        time, upright and RGB, so a large dataset is never held in memory)."""
        if not images:
            raise InvalidValueError("the clip sample scorer needs the training images to compare with; none given")
        parts = []
        for start in range(0, len(images), REFERENCE_BATCH):
            batch = [load_rgb(Path(im)) if isinstance(im, str | Path) else im
                     for im in images[start:start + REFERENCE_BATCH]]
            parts.append(self.extractor.embed_images(batch).numpy())
        self.reference = np.concatenate(parts)

    def components(self, images: Sequence[Image.Image], prompts: Sequence[Any]) -> dict[str, float]:
        """The two factors (``fidelity``, ``following``); NaN for a factor none of the prompts measures."""
        if self.reference is None:
            raise InvalidValueError("the clip sample scorer has no training images to compare with (set_reference)")
        embedded = self.extractor.embed_images(list(images)).numpy()
        concept = [i for i, p in enumerate(prompts) if p.type in FIDELITY_TYPES]
        steered = [i for i, p in enumerate(prompts) if p.type in FOLLOWING_TYPES]
        fidelity = M.image_similarity(embedded[concept], self.reference) if concept else float("nan")
        following = float("nan")
        if steered:
            texts = self.extractor.embed_texts([plain_text(prompts[i].text) for i in steered]).numpy()
            following = M.clip_score(embedded[steered], texts)
        return {"fidelity": fidelity, "following": following}

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[Any]) -> float:
        parts = self.components(images, prompts)
        # cosines of unrelated CLIP embeddings sit near 0 and may dip below: clamped, so that a product of two
        # negatives never reads as a good score
        return max(parts["fidelity"], 0.0) * max(parts["following"], 0.0)

    @staticmethod
    def check_prompts(prompts: Sequence[Any], source: str) -> None:
        """Both factors need prompts: refused before training when one has none."""
        if not any(p.type in FOLLOWING_TYPES for p in prompts):
            raise InvalidValueError(f"{source}: the clip sample scorer needs alter or style prompts (the concept "
                                    "asked into something new) to measure how the prompts still steer it")


register_sample_scorer(ClipSampleScorer.name, ClipSampleScorer)
