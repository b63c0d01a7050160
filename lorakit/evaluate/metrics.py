"""Evaluation metrics (DESIGN.md section 6), each a plain function of embeddings (torch tensors or arrays).

Conventions follow the LyCORIS paper's evaluation code: features are L2-normalised before any cosine; the Vendi
score uses the cosine kernel.  Every function returns a Python float (or bool).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch
from PIL import Image

ArrayLike = torch.Tensor | np.ndarray


def image_similarity(a: ArrayLike, b: ArrayLike) -> float:
    """Fidelity: the mean of the full cosine matrix between rows of ``a`` (generated) and ``b`` (data)."""
    raise NotImplementedError


def centroid_distance(a: ArrayLike, b: ArrayLike) -> float:
    """Fidelity: ``‖mean(â) − mean(b̂)‖²`` on L2-normalised rows (lower is closer)."""
    raise NotImplementedError


def vendi_score(x: ArrayLike) -> float:
    """Diversity: ``exp(−Σ λ log λ)``, λ the eigenvalues of K/n, K = X̂ X̂ᵀ (0·log 0 = 0).  1 for identical rows,
    n for n orthogonal ones."""
    raise NotImplementedError


def mean_vendi_by_group(x: ArrayLike, groups: Sequence[Hashable]) -> float:
    """The Vendi score within each group (e.g. one prompt's images), averaged over groups of two or more rows,
    as the paper does for prompts beyond the data; nan when no group has two rows."""
    raise NotImplementedError


def clip_score(image_emb: ArrayLike, text_emb: ArrayLike) -> float:
    """Controllability: mean cosine similarity of each image with its own prompt (row i with row i)."""
    raise NotImplementedError


def prompt_classification_accuracy(image_emb: ArrayLike, text_emb: ArrayLike, true_index: Sequence[int]) -> float:
    """The logo study's CLIP check: the share of images whose own prompt (``text_emb[true_index[i]]``) is the
    best cosine match among all rows of ``text_emb`` (a tie counts as a miss)."""
    raise NotImplementedError


def gram_style_loss(grams_a: Sequence[ArrayLike], grams_b: Sequence[ArrayLike]) -> float:
    """Base-model preservation: mean over images of the sum over layers of the mean squared difference of
    paired Gram matrices (image i of ``a`` against image i of ``b``, same prompt and seed)."""
    raise NotImplementedError


def concept_leak(agnostic_emb: ArrayLike, data_emb: ArrayLike, reference_emb: ArrayLike) -> float:
    """Concept leak: the share of agnostic-prompt images whose mean cosine similarity to the concept's data is
    higher than to ``reference_emb`` (the base model's images for the same prompts and seeds)."""
    raise NotImplementedError


def ocr_contains(image: Image.Image, word: str) -> bool:
    """Whether OCR (rapidocr-onnxruntime, optional extra ``ocr``) reads ``word`` in the image: case-insensitive,
    0 and o taken as the same letter.  LorakitError when the extra is not installed."""
    raise NotImplementedError
