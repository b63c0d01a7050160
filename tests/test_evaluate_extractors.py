"""lorakit.evaluate.extractors: tiny random CLIP and DINOv2 models saved with save_pretrained and loaded back the
way a user's folder is; VGG19 Gram matrices from a torchvision-layout weights file against a reference written
here with plain conv/relu/pool calls; the registry and its errors."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.nn import functional as F

from lorakit.errors import LorakitError
from lorakit.evaluate import metrics as M
from lorakit.evaluate.extractors import (
    EXTRACTORS,
    GRAM_LAYERS,
    CLIPExtractor,
    DINOv2Extractor,
    ExtractorError,
    FeatureExtractor,
    VGGStyleExtractor,
    load_extractor,
    register_extractor,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "lorakit/world/base_model/tokenizer"  # a real CLIP tokenizer, small enough to ship


def _images(n: int, size: tuple[int, int] = (40, 40), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def make_tiny_clip(folder: Path) -> Path:
    """A random CLIP model (image and text towers, the shipped tokenizer) saved as a user's CLIP folder is."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=847, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=845, eos_token_id=846,
                         pad_token_id=846),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dino") / "tiny-dinov2"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             mlp_ratio=2)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


# -------------------------------------------------------------------------------------------------- CLIP
def test_clip_from_a_saved_folder_matches_the_models_own_embeddings(clip_folder):
    from transformers import CLIPModel, CLIPProcessor

    ext = load_extractor("clip", str(clip_folder))
    assert isinstance(ext, CLIPExtractor) and isinstance(ext, FeatureExtractor) and ext.supports_text
    images, texts = _images(3), ["a red zkz shape", "a blue circle on the left", "zkz shape"]
    img, txt = ext.embed_images(images), ext.embed_texts(texts)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    assert img.dtype == txt.dtype == torch.float32
    # the model's own forward pass (another code path) gives the same directions
    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(clip_folder, local_files_only=True)
    with torch.no_grad():
        out = model(**proc(text=texts, images=images, return_tensors="pt", padding=True))
    assert torch.allclose(F.normalize(img, dim=-1), out.image_embeds, atol=1e-5)
    assert torch.allclose(F.normalize(txt, dim=-1), out.text_embeds, atol=1e-5)
    # not normalised, deterministic, and different images differ
    assert not torch.allclose(img.norm(dim=-1), torch.ones(3))
    assert torch.equal(ext.embed_images(images), img)
    assert not torch.allclose(img[0], img[1])
    assert M.clip_score(img, txt) == pytest.approx(float((out.image_embeds * out.text_embeds).sum(-1).mean()),
                                                   abs=1e-5)
    # batches give the same as one pass
    ext.batch_size = 2
    assert torch.allclose(ext.embed_images(images), img, atol=1e-6)


# ------------------------------------------------------------------------------------------------ DINOv2
def test_dinov2_from_a_saved_folder_gives_the_cls_token(dino_folder):
    from transformers import AutoImageProcessor, Dinov2Model

    ext = load_extractor("dinov2", str(dino_folder))
    assert isinstance(ext, DINOv2Extractor) and not ext.supports_text
    images = _images(4, size=(48, 36), seed=1)
    emb = ext.embed_images(images)
    assert emb.shape == (4, 32) and emb.dtype == torch.float32
    model = Dinov2Model.from_pretrained(dino_folder, local_files_only=True).eval()
    pixels = AutoImageProcessor.from_pretrained(dino_folder, local_files_only=True)(images, return_tensors="pt")
    with torch.no_grad():
        cls = model(**pixels).last_hidden_state[:, 0]
    assert torch.allclose(emb, cls, atol=1e-5)
    assert 1.0 < M.vendi_score(emb) <= 4.0
    with pytest.raises(ExtractorError, match="images only"):
        ext.embed_texts(["a dog"])


# -------------------------------------------------------------------------------------- not such a model
def test_a_folder_that_is_not_the_model_is_named(tmp_path, dino_folder, clip_folder):
    empty = tmp_path / "my-model"
    empty.mkdir()
    for kind in ("clip", "dinov2"):
        with pytest.raises(ExtractorError, match=rf"{empty}: not a .* model folder \(no config.json\)"):
            load_extractor(kind, str(empty))
    with pytest.raises(ExtractorError, match=rf"{dino_folder}: not a CLIP model folder .*'dinov2'"):
        load_extractor("clip", str(dino_folder))
    with pytest.raises(ExtractorError, match=rf"{clip_folder}: not a DINOv2 model folder .*'clip'"):
        load_extractor("dinov2", str(clip_folder))
    with pytest.raises(ExtractorError, match=r"openai/clip-vit-base-patch32: no such folder.*nothing is downloaded"):
        load_extractor("clip", "openai/clip-vit-base-patch32")  # a hub id is never looked up
    broken = tmp_path / "broken"
    shutil.copytree(clip_folder, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ExtractorError, match=rf"{broken}: cannot load the CLIP model"):
        load_extractor("clip", str(broken))
    assert issubclass(ExtractorError, LorakitError)


# ------------------------------------------------------------------------------------------------- VGG19
CONV = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)  # torchvision's vgg19 conv indices
POOL = (4, 9, 18, 27, 36)
WIDTH = {0: 64, 5: 128, 10: 256, 19: 512, 28: 512}  # each block's width, from its first conv


def _vgg_state(widths: dict[int, int], seed: int = 0, upto: int = 36) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state, prev, width = {}, 3, None
    for j in CONV:
        if j > upto:
            break
        width = widths.get(j, width)
        state[f"features.{j}.weight"] = torch.randn(width, prev, 3, 3, generator=g) * (2 / (9 * prev)) ** 0.5
        state[f"features.{j}.bias"] = torch.randn(width, generator=g) * 0.1
        prev = width
    return state


def _reference_grams(state: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Walk torchvision's features[:29] index by index, keeping what the paper's code keeps: the ReLU'd output
    of convs 0, 5, 10, 19 (torchvision's in-place ReLU) and the raw output of conv 28 (the last layer)."""
    kept = []
    for j in range(29):
        if j in CONV:
            x = F.conv2d(x, state[f"features.{j}.weight"], state[f"features.{j}.bias"], padding=1)
            if j == 28:
                kept.append(x)
        elif j in POOL:
            x = F.max_pool2d(x, 2)
        else:
            x = F.relu(x)
            if j - 1 in GRAM_LAYERS:
                kept.append(x)
    grams = []
    for f in kept:
        n, c, h, w = f.shape
        flat = f.reshape(n, c, h * w)
        grams.append(flat @ flat.transpose(1, 2) / (c * h * w))
    return grams


def _pixels(images, size):
    out = []
    for im in images:
        im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
        out.append((x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225])
                   .view(3, 1, 1))
    return torch.stack(out)


def test_vgg_grams_match_a_plain_reference(tmp_path):
    narrow = {0: 4, 5: 6, 10: 8, 19: 8, 28: 10}  # torchvision's layout and names, narrow layers: fast
    state = _vgg_state(narrow)
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a whole vgg19 state dict: other keys are ignored
    path = tmp_path / "vgg19.safetensors"
    save_file(state, str(path))
    ext = load_extractor("vgg19", str(path))
    ext.size = 32
    images = _images(3, size=(50, 50), seed=2)
    grams = ext.gram_matrices(images)
    want = _reference_grams(state, _pixels(images, 32))
    assert [tuple(g.shape) for g in grams] == [(3, c, c) for c in narrow.values()]
    for got, ref in zip(grams, want, strict=True):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    # the embedding is the flattened Grams; the style loss of an image with itself is 0, with another > 0
    emb = ext.embed_images(images)
    assert emb.shape == (3, sum(c * c for c in narrow.values()))
    assert M.gram_style_loss(grams, grams) == 0.0
    other = ext.gram_matrices(_images(3, size=(50, 50), seed=3))
    assert M.gram_style_loss(grams, other) == pytest.approx(M.gram_style_loss(emb, ext.embed_images(
        _images(3, size=(50, 50), seed=3))), rel=1e-5)
    assert M.gram_style_loss(grams, other) > 0


def test_vgg_loads_torchvision_shaped_weights_and_mixed_sizes(tmp_path):
    path = tmp_path / "vgg19.safetensors"
    save_file(_vgg_state(WIDTH, upto=28), str(path))  # the real layer shapes, features up to 28
    ext = VGGStyleExtractor(path, size=32)
    images = _images(2, size=(40, 40)) + _images(1, size=(64, 32))  # a wide image: resized to 64 × 32
    grams = ext.gram_matrices(images)
    assert [tuple(g.shape) for g in grams] == [(3, c, c) for c in WIDTH.values()]
    # batched by size, but each image's Grams are its own
    alone = ext.gram_matrices(images[2:])
    assert all(torch.allclose(g[2], a[0], rtol=1e-4, atol=1e-7) for g, a in zip(grams, alone, strict=True))


def test_vgg_bad_weights_are_named(tmp_path):
    missing = _vgg_state({0: 4, 5: 4, 10: 4, 19: 4, 28: 4}, upto=25)
    path = tmp_path / "short.safetensors"
    save_file(missing, str(path))
    with pytest.raises(ExtractorError, match=rf"{path}: not torchvision's vgg19 features: missing features.28.weight"):
        VGGStyleExtractor(path)
    bad = _vgg_state({0: 4, 5: 4, 10: 4, 19: 4, 28: 4})
    bad["features.5.weight"] = torch.zeros(4, 7, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(ExtractorError, match=rf"{path}: features.5.weight has shape \(4, 7, 3, 3\)"):
        VGGStyleExtractor(path)
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not weights")
    with pytest.raises(ExtractorError, match=rf"{notes}: not a readable safetensors file"):
        VGGStyleExtractor(notes)
    with pytest.raises(ExtractorError, match="no such VGG19 weights file"):
        VGGStyleExtractor(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------- registry
class _Constant:
    name = "constant"
    supports_text = False

    def __init__(self, path):
        self.path = path

    def embed_images(self, images):
        return torch.ones(len(images), 2)

    def embed_texts(self, texts):
        raise ExtractorError("no texts")


def test_registry(monkeypatch):
    monkeypatch.setattr("lorakit.evaluate.extractors.EXTRACTORS", dict(EXTRACTORS))
    register_extractor("constant", _Constant)
    ext = load_extractor("constant", "somewhere")
    assert isinstance(ext, FeatureExtractor) and ext.path == "somewhere"
    with pytest.raises(ExtractorError, match="unknown extractor kind 'cilp'; known: clip, constant, dinov2, vgg19"):
        load_extractor("cilp", "x")
    with pytest.raises(ExtractorError, match="the clip extractor needs a local path"):
        load_extractor("clip", None)
