"""Evaluation metrics (DESIGN.md section 6), each a plain function of embeddings (torch tensors or arrays).

Conventions follow the LyCORIS paper's evaluation code: rows are L2-normalised before any cosine, the Vendi
score uses the cosine kernel, the style loss sums squared differences of Gram matrices.  Every function takes
embeddings as rows (n, d), computes in float64 and returns a Python float (or bool).
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from lorakit.errors import LorakitError

ArrayLike = torch.Tensor | np.ndarray


class MetricError(LorakitError, ValueError):
    """Inputs a metric cannot use: empty, wrongly shaped or of mismatched lengths."""


def _matrix(x: ArrayLike | Sequence, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:  # one embedding
        m = m[None, :]
    if m.ndim != 2:
        raise MetricError(f"{name}: expected rows of embeddings (n, d), got shape {m.shape}")
    if m.shape[0] == 0:
        raise MetricError(f"{name}: no embeddings")
    if not np.all(np.isfinite(m)):
        raise MetricError(f"{name}: embeddings hold nan or inf")
    return m


def _unit_rows(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms > 0, norms, 1.0)  # an all-zero row stays zero (cosine 0 with everything)


def _same_width(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"{names}: embedding widths differ ({a.shape[1]} vs {b.shape[1]}); use one extractor")


def _cosine(a: ArrayLike, b: ArrayLike, names: str) -> np.ndarray:
    """The full cosine matrix of the rows of a against the rows of b."""
    x, y = _matrix(a, names.split(",")[0]), _matrix(b, names.split(",")[-1].strip())
    _same_width(x, y, names)
    return _unit_rows(x) @ _unit_rows(y).T


# ---------------------------------------------------------------------------------------------- fidelity
def image_similarity(a: ArrayLike, b: ArrayLike) -> float:
    """Fidelity: the mean of the full cosine matrix between rows of ``a`` (generated) and ``b`` (data)."""
    return float(_cosine(a, b, "image_similarity a, b").mean())


def centroid_distance(a: ArrayLike, b: ArrayLike) -> float:
    """Fidelity: ``‖mean(â) − mean(b̂)‖²`` on L2-normalised rows (lower is closer; at most 4)."""
    x, y = _matrix(a, "centroid_distance a"), _matrix(b, "centroid_distance b")
    _same_width(x, y, "centroid_distance")
    d = _unit_rows(x).mean(axis=0) - _unit_rows(y).mean(axis=0)
    return float(d @ d)


# --------------------------------------------------------------------------------------------- diversity
def vendi_score(x: ArrayLike) -> float:
    """Diversity: ``exp(−Σ λ log λ)``, λ the eigenvalues of K/n, K = X̂ X̂ᵀ (0·log 0 = 0).  1 for identical rows,
    n for n orthogonal ones."""
    u = _unit_rows(_matrix(x, "vendi_score"))
    n, d = u.shape
    # X̂ᵀX̂/n (d × d) has the same non-zero eigenvalues as X̂X̂ᵀ/n: use whichever is smaller
    s = (u.T @ u if d < n else u @ u.T) / n
    w = np.linalg.eigvalsh(s)
    w = w[w > 0]  # round-off makes zero eigenvalues slightly negative; 0·log 0 = 0
    return float(np.exp(-np.sum(w * np.log(w))))


def mean_vendi_by_group(x: ArrayLike, groups: Sequence[Hashable]) -> float:
    """The Vendi score within each group (e.g. one prompt's images), averaged over groups of two or more rows,
    as the paper does for prompts beyond the data; nan when no group has two rows."""
    m = _matrix(x, "mean_vendi_by_group")
    if len(groups) != m.shape[0]:
        raise MetricError(f"mean_vendi_by_group: {m.shape[0]} embeddings but {len(groups)} group labels")
    rows: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        rows[g].append(i)
    scores = [vendi_score(m[idx]) for idx in rows.values() if len(idx) >= 2]
    return float(np.mean(scores)) if scores else float("nan")


# -------------------------------------------------------------------------------------- controllability
def clip_score(image_emb: ArrayLike, text_emb: ArrayLike) -> float:
    """Controllability: mean cosine similarity of each image with its own prompt (row i with row i)."""
    x, t = _matrix(image_emb, "clip_score images"), _matrix(text_emb, "clip_score texts")
    if x.shape[0] != t.shape[0]:
        raise MetricError(f"clip_score: {x.shape[0]} images but {t.shape[0]} texts; pass one text per image")
    _same_width(x, t, "clip_score")
    return float(np.mean(np.sum(_unit_rows(x) * _unit_rows(t), axis=1)))


def prompt_classification_accuracy(image_emb: ArrayLike, text_emb: ArrayLike, true_index: Sequence[int]) -> float:
    """The logo study's CLIP check: the share of images whose own prompt (``text_emb[true_index[i]]``) is the
    best cosine match among all rows of ``text_emb`` (a tie counts as a miss)."""
    sims = _cosine(image_emb, text_emb, "prompt_classification_accuracy images, texts")
    truth = np.asarray(true_index, dtype=np.int64).reshape(-1)
    if truth.shape[0] != sims.shape[0]:
        raise MetricError(f"prompt_classification_accuracy: {sims.shape[0]} images but {truth.shape[0]} indices")
    if np.any(truth < 0) or np.any(truth >= sims.shape[1]):
        raise MetricError(f"prompt_classification_accuracy: indices must lie in [0, {sims.shape[1]})")
    rows = np.arange(sims.shape[0])
    own = sims[rows, truth]
    others = sims.copy()
    others[rows, truth] = -np.inf
    best_other = others.max(axis=1) if sims.shape[1] > 1 else np.full(sims.shape[0], -np.inf)
    return float(np.mean(own > best_other))


# ---------------------------------------------------------------------------------------- preservation
def gram_style_loss(grams_a: Sequence[ArrayLike] | ArrayLike, grams_b: Sequence[ArrayLike] | ArrayLike) -> float:
    """Base-model preservation: image i of ``a`` against image i of ``b`` (same prompt and seed), the sum over
    layers of the summed squared differences of their Gram matrices, averaged over images (the paper's
    ``mean(sum((ref − eval)²))`` on the concatenated Gram features).  Each argument is a list with one (n, …)
    array per layer (``VGGStyleExtractor.gram_matrices``) or one (n, d) array of flattened Grams."""
    la = [grams_a] if isinstance(grams_a, torch.Tensor | np.ndarray) else list(grams_a)
    lb = [grams_b] if isinstance(grams_b, torch.Tensor | np.ndarray) else list(grams_b)
    if not la or len(la) != len(lb):
        raise MetricError(f"gram_style_loss: {len(la)} layers against {len(lb)}")
    total = None
    for i, (ga, gb) in enumerate(zip(la, lb, strict=True)):
        a = _matrix(np.asarray(_numpy(ga)).reshape(len(ga), -1), f"gram_style_loss a layer {i}")
        b = _matrix(np.asarray(_numpy(gb)).reshape(len(gb), -1), f"gram_style_loss b layer {i}")
        if a.shape != b.shape:
            raise MetricError(f"gram_style_loss: layer {i} shapes differ ({a.shape} vs {b.shape}); "
                              "pair each tuned image with the base image of the same prompt and seed")
        per_image = np.sum((a - b) ** 2, axis=1)
        total = per_image if total is None else total + per_image
    return float(np.mean(total))


def _numpy(x: Any) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# -------------------------------------------------------------------------------------------------- leak
def concept_leak(agnostic_emb: ArrayLike, data_emb: ArrayLike, reference_emb: ArrayLike) -> float:
    """Concept leak: the share of agnostic-prompt images (prompts without the trigger) that are more like the
    concept's data than like a reference set, by mean cosine similarity: image x leaks when
    ``mean_j cos(x, data_j) > mean_k cos(x, reference_k)``.  The reference is what agnostic images should look
    like: the base model's images of the same prompts.  0 when nothing leaks, 1 when every image does."""
    to_data = _cosine(agnostic_emb, data_emb, "concept_leak agnostic, data").mean(axis=1)
    to_ref = _cosine(agnostic_emb, reference_emb, "concept_leak agnostic, reference").mean(axis=1)
    return float(np.mean(to_data > to_ref))


# --------------------------------------------------------------------------------------------------- OCR
def _ocr_normalise(text: str) -> str:
    # case-insensitive, 0 read as o (logos mix them up), spaces and punctuation ignored
    return re.sub(r"[^0-9a-z]", "", text.casefold().replace("0", "o"))


@functools.cache
def _ocr_engine() -> Any:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        raise LorakitError("the OCR check needs the optional extra 'ocr' (rapidocr-onnxruntime 1.x, whose models "
                           "ship inside its wheel): pip install 'lorakit[ocr]'") from None
    return RapidOCR()


def ocr_texts(image: Image.Image) -> list[str]:
    """The text pieces OCR reads in the image (rapidocr-onnxruntime, optional extra ``ocr``)."""
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # rapidocr expects OpenCV's BGR
    result, _ = _ocr_engine()(bgr)
    return [piece[1] for piece in result or ()]


def ocr_contains(image: Image.Image, word: str) -> bool:
    """Whether OCR (rapidocr-onnxruntime, optional extra ``ocr``) reads ``word`` in the image: case-insensitive,
    0 and o taken as the same letter, spaces and punctuation ignored.  LorakitError when the extra is missing."""
    if not _ocr_normalise(word):
        raise MetricError(f"ocr_contains: {word!r} has no letters or digits to look for")
    return text_contains(ocr_texts(image), word)


def text_contains(pieces: Sequence[str], word: str) -> bool:
    """The OCR check's matching rule on text already read: ``word`` appears in the pieces joined, ignoring case,
    spaces and punctuation, with 0 and o the same letter (a word OCR splits into two boxes still counts)."""
    target = _ocr_normalise(word)
    return bool(target) and target in _ocr_normalise("".join(pieces))
