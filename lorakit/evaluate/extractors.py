"""Feature extractors behind one small interface: image (and, where it applies, text) embeddings.

CLIP and DINOv2 load through transformers from a local folder only (``local_files_only``: nothing is downloaded;
a user passes the folder a model was saved to).  The VGG19 conv stack of the Gram style loss is written here in
torch, with torchvision's layer indices, so a ``features.N.weight`` safetensors file of torchvision's vgg19 loads
without torchvision.  Other kinds (the shapes world's exact reader) join with ``register_extractor``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from lorakit.errors import LorakitError

#: torchvision's vgg19 ``features`` indices whose outputs give the Gram matrices of the style loss
GRAM_LAYERS = (0, 5, 10, 19, 28)
#: torchvision's vgg19 (configuration "E"): conv widths, "M" a 2×2 max-pool; each conv is followed by a ReLU
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im.convert("RGB") for im in images]


# ------------------------------------------------------------------------------------ transformers models
def model_folder(path: str | Path, model_type: str, label: str) -> Path:
    """The folder, checked to hold a transformers model of ``model_type``: a clear error naming the folder, and
    never a hub lookup (a path that is not a folder would otherwise be taken for a repository id)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ExtractorError(f"{folder}: no such folder; pass the local folder of a {label} model "
                             "(saved with save_pretrained; nothing is downloaded)")
    config = folder / "config.json"
    if not config.is_file():
        raise ExtractorError(f"{folder}: not a {label} model folder (no config.json)")
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ExtractorError(f"{config}: unreadable model config ({e})") from None
    if found != model_type:
        raise ExtractorError(f"{folder}: not a {label} model folder (its config.json says model_type "
                             f"{found!r}, expected {model_type!r})")
    return folder


def _load(loader: Callable, folder: Path, what: str):
    try:
        return loader(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExtractorError(f"{folder}: cannot load the {what} ({type(e).__name__}: {e})") from None


class CLIPExtractor:
    """A CLIP model (image and text towers) from a local transformers folder: the projected embeddings CLIP
    compares, the image processor and tokenizer saved beside the model."""

    supports_text = True

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.folder = model_folder(path, "clip", "CLIP")
        self.name = f"clip:{self.folder.name}"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = _load(CLIPModel.from_pretrained, self.folder, "CLIP model").eval().to(self.device)
        self.processor = _load(CLIPImageProcessor.from_pretrained, self.folder, "CLIP image processor "
                               "(preprocessor_config.json)")
        self.tokenizer = _load(AutoTokenizer.from_pretrained, self.folder, "CLIP tokenizer")

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected image embeddings (n, projection_dim)."""
        out = []
        for batch in _batches(_rgb(images), self.batch_size):
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            # the towers directly, not get_image_features: its return type changed across transformers versions
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (n, projection_dim); texts longer than the model's context are cut."""
        out = []
        max_len = self.model.config.text_config.max_position_embeddings
        for batch in _batches(list(texts), self.batch_size):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, max_length=max_len,
                                    return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens.get("attention_mask")).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)


class DINOv2Extractor:
    """A DINOv2 model from a local transformers folder; the embedding is the final layer-normed CLS token (what
    the paper's torch-hub DINOv2 returns)."""

    supports_text = False

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoImageProcessor, Dinov2Model

        self.folder = model_folder(path, "dinov2", "DINOv2")
        self.name = f"dinov2:{self.folder.name}"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = _load(Dinov2Model.from_pretrained, self.folder, "DINOv2 model").eval().to(self.device)
        self.processor = _load(AutoImageProcessor.from_pretrained, self.folder, "DINOv2 image processor "
                               "(preprocessor_config.json)")

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for batch in _batches(_rgb(images), self.batch_size):
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self.model(pixel_values=pixels).pooler_output.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise ExtractorError(f"{self.name}: DINOv2 embeds images only; use a CLIP extractor for prompts")


# --------------------------------------------------------------------------------------------------- VGG19
def _vgg_layout(depth: int) -> list[tuple[int, str]]:
    """(torchvision index, "conv" | "relu" | "pool") of vgg19's ``features`` up to index ``depth``."""
    layout, i = [], 0
    for item in VGG19_CFG:
        if item == "M":
            layout.append((i, "pool"))
            i += 1
        else:
            layout += [(i, "conv"), (i + 1, "relu")]
            i += 2
    return [(j, kind) for j, kind in layout if j <= depth]


class _VGGFeatures(nn.Module):
    """vgg19's ``features`` with torchvision's indices (so ``features.N.weight`` names match), conv widths taken
    from the weights file; returns the activations the style loss uses."""

    def __init__(self, shapes: dict[int, torch.Size], depth: int) -> None:
        super().__init__()
        self.layout = _vgg_layout(depth)
        self.features = nn.ModuleDict()
        for j, kind in self.layout:
            if kind == "conv":
                out_c, in_c, kh, kw = shapes[j]
                self.features[str(j)] = nn.Conv2d(in_c, out_c, (kh, kw), padding=(kh // 2, kw // 2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taken = []
        last = self.layout[-1][0]
        for j, kind in self.layout:
            if kind == "conv":
                x = self.features[str(j)](x)
            elif kind == "relu":
                x = F.relu(x)
            else:
                x = F.max_pool2d(x, 2, 2)
            # The paper takes layers 0, 5, 10, 19, 28 of torchvision's features[:29]; torchvision's ReLUs work
            # in place, so the kept tensors of 0, 5, 10, 19 are the ReLU outputs (index + 1) while 28, the last
            # layer, has no ReLU after it.  Taking the same tensors keeps our numbers the paper's.
            if (j - 1 in GRAM_LAYERS and kind == "relu") or (j == last == GRAM_LAYERS[-1]):
                taken.append(x)
        return taken


class VGGStyleExtractor:
    """torchvision's VGG19 ``features`` stack, written here (no torchvision), loaded from a safetensors file
    holding ``features.N.weight`` / ``features.N.bias`` (a whole vgg19 state dict works; other keys are
    ignored).  Images are resized (shorter side ``size``, bicubic) and normalised with ImageNet's statistics as
    in the paper.  ``gram_matrices`` gives the style loss's inputs; ``embed_images`` the flattened, concatenated
    Gram matrices (the paper's style features)."""

    supports_text = False

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu", size: int | None = 224,
                 batch_size: int = 8) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self.path = Path(weights_path)
        self.name = f"vgg19:{self.path.name}"
        if not self.path.is_file():
            raise ExtractorError(f"{self.path}: no such VGG19 weights file (a .safetensors of torchvision's vgg19 "
                                 "with features.N.weight names)")
        try:
            state = load_file(str(self.path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ExtractorError(f"{self.path}: not a readable safetensors file ({e})") from None
        state = {k.removeprefix("features."): v for k, v in state.items()
                 if k.startswith("features.") or k.split(".")[0].isdigit()}
        depth = GRAM_LAYERS[-1]
        convs = [j for j, kind in _vgg_layout(depth) if kind == "conv"]
        missing = [f"features.{j}.{p}" for j in convs for p in ("weight", "bias") if f"{j}.{p}" not in state]
        if missing:
            raise ExtractorError(f"{self.path}: not torchvision's vgg19 features: missing {', '.join(missing[:4])}"
                                 f"{' …' if len(missing) > 4 else ''}")
        prev = 3
        for j in convs:
            w, b = state[f"{j}.weight"], state[f"{j}.bias"]
            if w.ndim != 4 or w.shape[1] != prev or b.shape != (w.shape[0],):
                raise ExtractorError(f"{self.path}: features.{j}.weight has shape {tuple(w.shape)} (bias "
                                     f"{tuple(b.shape)}), which does not follow a layer of {prev} channels")
            prev = w.shape[0]
        self.net = _VGGFeatures({j: state[f"{j}.weight"].shape for j in convs}, depth)
        self.net.features.load_state_dict({k: v.float() for k, v in state.items()
                                           if int(k.split(".")[0]) <= depth}, strict=True)
        self.device = torch.device(device)
        self.net.eval().to(self.device)
        self.size = size
        self.batch_size = batch_size

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.size:
            w, h = image.size
            scale = self.size / min(w, h)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def gram_matrices(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One tensor per layer of GRAM_LAYERS, shape (n, C, C): G = F Fᵀ / (C·H·W) for the (C, H·W) activations
        F, i.e. F scaled by 1/√(C·H·W) before the product, as in the paper."""
        tensors = [self._tensor(im) for im in images]
        per_image: list[list[torch.Tensor]] = [[] for _ in tensors]
        # images of one size share a batch (they may differ in size: the resize keeps the aspect ratio)
        by_shape: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        for idx in by_shape.values():
            for chunk in _batches(idx, self.batch_size):
                feats = self.net(torch.stack([tensors[i] for i in chunk]).to(self.device))
                for f in feats:
                    n, c, h, w = f.shape
                    flat = f.reshape(n, c, h * w) / (c * h * w) ** 0.5
                    gram = (flat @ flat.transpose(1, 2)).float().cpu()
                    for k, i in enumerate(chunk):
                        per_image[i].append(gram[k])
        if not tensors:
            return []
        return [torch.stack([grams[layer] for grams in per_image]) for layer in range(len(GRAM_LAYERS))]

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The Gram matrices flattened and concatenated: (n, Σ C²)."""
        grams = self.gram_matrices(images)
        if not grams:
            return torch.zeros(0, 0)
        return torch.cat([g.reshape(g.shape[0], -1) for g in grams], dim=1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise ExtractorError(f"{self.name}: VGG19 embeds images only")


# ------------------------------------------------------------------------------------------------ registry
ExtractorFactory = Callable[[str | None], FeatureExtractor]


def _needs_path(kind: str, build: Callable[[str], FeatureExtractor]) -> ExtractorFactory:
    def factory(path: str | None) -> FeatureExtractor:
        if not path:
            raise ExtractorError(f"the {kind} extractor needs a local path (nothing is downloaded)")
        return build(path)
    return factory


#: kind -> factory(path); "clip", "dinov2" and "vgg19" are built in
EXTRACTORS: dict[str, ExtractorFactory] = {
    "clip": _needs_path("clip", CLIPExtractor),
    "dinov2": _needs_path("dinov2", DINOv2Extractor),
    "vgg19": _needs_path("vgg19", VGGStyleExtractor),
}


def register_extractor(kind: str, factory: ExtractorFactory) -> None:
    """Make ``load_extractor(kind, path)`` call ``factory(path)`` (a later registration replaces an earlier)."""
    if not kind or not isinstance(kind, str):
        raise ExtractorError(f"an extractor kind must be a non-empty name, got {kind!r}")
    EXTRACTORS[kind] = factory


def load_extractor(kind: str, path: str | None) -> FeatureExtractor:
    """Build the extractor of ``kind`` from ``path``; ExtractorError for an unknown kind or a bad path."""
    if kind not in EXTRACTORS:
        raise ExtractorError(f"unknown extractor kind {kind!r}; known: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[kind](path)
