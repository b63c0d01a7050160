"""Feature extractors behind one small interface: image (and, where it applies, text) embeddings.

CLIP and DINOv2 load through transformers from a local folder only (nothing is downloaded); the VGG19 conv stack
for the Gram style loss loads from a local safetensors file with torchvision's parameter names.  Other kinds (the
shapes world's reader) are added with ``register_extractor``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from lorakit.errors import LorakitError

#: torchvision's vgg19 ``features`` indices whose outputs give the Gram matrices of the style loss
GRAM_LAYERS = (0, 5, 10, 19, 28)


class ExtractorError(LorakitError, ValueError):
    """An extractor that cannot be built: names the folder or file and what is wrong."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """What a metric needs from a model: ``embed_images`` -> (n, d) float32 on the CPU, not normalised;
    ``embed_texts`` the same for texts, only when ``supports_text`` (else it raises ExtractorError)."""

    name: str
    supports_text: bool

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


class CLIPExtractor:
    """A CLIP model (image and text towers) from a local transformers folder."""

    supports_text = True

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        raise NotImplementedError

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected image embeddings (n, projection_dim)."""
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (n, projection_dim); texts longer than the model's context are cut."""
        raise NotImplementedError


class DINOv2Extractor:
    """A DINOv2 model from a local transformers folder; the embedding is the CLS token of the last layer."""

    supports_text = False

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        raise NotImplementedError

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class VGGStyleExtractor:
    """torchvision's VGG19 ``features`` stack, written here (no torchvision), loaded from a safetensors file
    holding ``features.N.weight`` / ``features.N.bias``.  ``gram_matrices`` gives the style loss's inputs;
    ``embed_images`` the flattened, concatenated Gram matrices (a style embedding)."""

    supports_text = False

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu", size: int | None = None,
                 batch_size: int = 8) -> None:
        raise NotImplementedError

    def gram_matrices(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One tensor per layer of GRAM_LAYERS, shape (n, C, C), each Gram matrix divided by sqrt(C*H*W)."""
        raise NotImplementedError

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


ExtractorFactory = Callable[[str | None], FeatureExtractor]
#: kind -> factory(path); "clip", "dinov2" and "vgg19" are built in
EXTRACTORS: dict[str, ExtractorFactory] = {}


def register_extractor(kind: str, factory: ExtractorFactory) -> None:
    """Make ``load_extractor(kind, path)`` call ``factory(path)`` (a later registration replaces an earlier)."""
    raise NotImplementedError


def load_extractor(kind: str, path: str | None) -> FeatureExtractor:
    """Build the extractor of ``kind`` from ``path``; ExtractorError for an unknown kind or a bad path."""
    raise NotImplementedError
