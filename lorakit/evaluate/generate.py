"""Images for evaluation: N seeds per prompt for every checkpoint compared, cached on disk.

Each image is stored under a key of everything that decides it: the base model's hash, the checkpoint's hash,
prompt, negative prompt, seed and sampler settings.  A second call (or one after an interruption) finds every
image already made and generates none of them again; images are written one by one, atomically, as soon as
their batch is done.  Generation goes through ``lorakit.sample.generate`` (deterministic per seed, whatever the
batch), with the checkpoint applied by lorakit's own network loading and removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from lorakit.atomic import atomic_write
from lorakit.checkpoint_names import PIVOTAL_EMBEDDING_PREFIX, split_pivotal
from lorakit.embeddings import ENCODER_KEYS, EmbeddingError, embedding_added, read_embedding
from lorakit.errors import InvalidValueError, LorakitError
from lorakit.evaluate.checkpoints import CheckpointError, EvalCheckpoint
from lorakit.evaluate.prompts import EvalPrompt
from lorakit.formats import AdapterFile
from lorakit.metadata import TEXT_SETTINGS
from lorakit.model_blend import load_like, move_towards, put_back, weights_copy
from lorakit.models import BaseModel
from lorakit.native_checkpoints import NativeCheckpointError, apply_native_checkpoint, restore
from lorakit.sample import SamplePrompt, generate, sampler_name

#: the k-th seed of a prompt is its own seed + SEED_STRIDE * k (the world experiment's convention)
SEED_STRIDE = 10_000


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "ddim"
    width: int | None = None  # None: the model's native size
    height: int | None = None
    clip_skip: int = 1  # as kohya and A1111 count it (lorakit.models.encode_prompt_ids)
    max_token_length: int = 75  # kohya's: prompts read in chunks of 75 tokens up to this

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", sampler_name(self.sampler))
        if self.steps < 1:
            raise InvalidValueError(f"sampler steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class ImageJob:
    """One image to make per checkpoint: prompt ``prompt_index`` of the set with its ``repeat``-th seed."""

    prompt_index: int
    prompt: EvalPrompt
    repeat: int
    seed: int


def make_jobs(prompts: Sequence[EvalPrompt], seeds: int, base_seed: int = 0) -> list[ImageJob]:
    """``seeds`` images per prompt: a prompt without its own seed gets ``base_seed + index``."""
    if seeds < 1:
        raise InvalidValueError(f"--seeds must be >= 1, got {seeds}")
    jobs = []
    for i, p in enumerate(prompts):
        first = p.seed if p.seed is not None else base_seed + i
        jobs.extend(ImageJob(i, p, k, first + SEED_STRIDE * k) for k in range(seeds))
    return jobs


class ImageCache:
    """PNG files under ``folder/<2 hex>/<key>.png``, written atomically."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(base_hash: str, checkpoint_hash: str, job: ImageJob, settings: SamplerSettings) -> str:
        sampler = asdict(settings)
        for name, (_, default) in TEXT_SETTINGS.items():
            if sampler[name] == default:  # absent from the keys of images made before the option existed
                del sampler[name]
        fields = {"base": base_hash, "checkpoint": checkpoint_hash, "prompt": job.prompt.text,
                  "negative": job.prompt.negative, "seed": job.seed, **sampler}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.png"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> Image.Image:
        with Image.open(self.path(key)) as im:
            return im.convert("RGB")

    def store(self, key: str, image: Image.Image) -> Path:
        return atomic_write(self.path(key), lambda tmp: image.save(tmp, format="PNG"), suffix=".png")


# ----------------------------------------------------------------------------------------------- applying
def _unchanged(prompt: str) -> str:
    return prompt


@contextmanager
def applied(model: BaseModel, checkpoint: EvalCheckpoint) -> Iterator[Callable[[str], str]]:
    """The model with ``checkpoint`` applied in place; exactly the base model again afterwards.  Yields how a
    prompt is written for it: an embedding's token expanded to all its vectors (``zkz`` → ``zkz zkz_1``), as
    training and sampling read it; other prompts unchanged."""
    if checkpoint.kind == "base" or checkpoint.path is None:
        yield _unchanged
        return
    if checkpoint.kind == "adapter":
        with _adapter(model, checkpoint.path):
            yield _unchanged
        return
    if checkpoint.kind == "native":
        with _native_weights(model, checkpoint.path):
            yield _unchanged
        return
    if checkpoint.kind == "model":
        with _whole_model(model, checkpoint.path):
            yield _unchanged
        return
    if checkpoint.kind == "embedding":
        vectors, _ = _read_embedding(checkpoint.path)
        with _embedding(model, vectors, checkpoint) as expand:
            yield expand
        return
    if checkpoint.kind == "pivotal":
        if checkpoint.embedding is not None:  # a result's two files
            adapter, (vectors, _) = checkpoint.path, _read_embedding(checkpoint.embedding)
        else:  # a run's checkpoint: both in one file
            adapter, vectors = _pivotal_parts(checkpoint.path)
        with _adapter(model, adapter), _embedding(model, vectors, checkpoint) as expand:
            yield expand
        return
    raise CheckpointError(f"{checkpoint.path}: cannot apply a checkpoint of kind {checkpoint.kind!r}")


@contextmanager
def _adapter(model: BaseModel, source: Path | AdapterFile) -> Iterator[None]:
    """An adapter file (or its tensors) loaded unmerged; removed after."""
    from lorakit.formats import load_network

    where = str(source.path if isinstance(source, AdapterFile) else source)
    try:
        network, _ = load_network(source, model.unet, model.text_encoders)
    except (ValueError, OSError) as err:  # AdapterFileError names the file and the key that does not fit
        raise CheckpointError(str(err) if where in str(err) else f"{where}: {err}") from None
    try:
        yield
    finally:
        network.remove()


def _read_embedding(path: Path) -> tuple[tuple[torch.Tensor, ...], str | None]:
    try:
        return read_embedding(path)
    except EmbeddingError as err:
        raise CheckpointError(str(err)) from None


@contextmanager
def _embedding(model: BaseModel, vectors: tuple[torch.Tensor, ...], checkpoint: EvalCheckpoint
               ) -> Iterator[Callable[[str], str]]:
    """A checkpoint's embedding added under its token for the duration; yields the prompt expansion."""
    if not checkpoint.token:
        raise CheckpointError(f"{checkpoint.path}: an embedding checkpoint without a token")
    try:
        with embedding_added(model, vectors, checkpoint.token, str(checkpoint.path)) as loaded:
            yield loaded.expand_prompt
    except EmbeddingError as err:  # names the file: a token already in the vocabulary, vectors of another size
        raise CheckpointError(str(err)) from None


def _pivotal_parts(path: Path) -> tuple[AdapterFile, tuple[torch.Tensor, ...]]:
    """A pivotal-tuning checkpoint's adapter (its own keys, with the file's metadata) and embedding vectors (the
    trainer keeps both in one file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as err:  # safetensors' own error types for a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    adapter, embedding = split_pivotal(tensors)
    if "clip_l" not in embedding:
        raise CheckpointError(f"{path}: a pivotal-tuning checkpoint without its embedding "
                              f"({PIVOTAL_EMBEDDING_PREFIX}clip_l)")
    vectors = tuple(embedding[key] for key in ENCODER_KEYS if key in embedding)  # SDXL's: clip_l and clip_g
    return AdapterFile(adapter, metadata, path), vectors


@contextmanager
def _native_weights(model: BaseModel, path: Path) -> Iterator[None]:
    """A native fine-tuning checkpoint (``lorakit.native_checkpoints``) copied in; the base weights put back after."""
    try:
        saved = apply_native_checkpoint(path, model.unet, model.text_encoders)
    except NativeCheckpointError as err:
        raise CheckpointError(str(err)) from None
    try:
        yield
    finally:
        restore(saved, model.unet, model.text_encoders)


@contextmanager
def _whole_model(model: BaseModel, path: Path) -> Iterator[None]:
    """A whole model's weights copied in (the same architecture and prediction type); the base's put back after."""
    try:
        other = load_like(path, model)
    except (LorakitError, OSError, ValueError) as err:  # not the same kind of model, or not a model that loads
        said = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise CheckpointError(f"{said} (judged as a fine-tuned model of the base; to judge adapters on it, give it "
                              "as --model)") from None
    saved = weights_copy(model)
    try:
        move_towards(model, other, saved)
        del other
        yield
    finally:
        put_back(model, saved)


def check_checkpoints(model: BaseModel, checkpoints: Sequence[EvalCheckpoint]) -> None:
    """Apply and remove each checkpoint once: a file that does not fit fails here, before any image is made."""
    for c in checkpoints:
        with applied(model, c):
            pass


# --------------------------------------------------------------------------------------------- generating
@dataclass
class GenerationStats:
    made: int = 0
    cached: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_image(self) -> float | None:
        return self.seconds / self.made if self.made else None


def image_keys(base_hash: str, checkpoints: Sequence[EvalCheckpoint], jobs: Sequence[ImageJob],
               settings: SamplerSettings) -> dict[str, list[str]]:
    """Checkpoint label -> the cache key of each job's image: everything that decides the image."""
    return {c.label: [ImageCache.key(base_hash, c.hash, j, settings) for j in jobs] for c in checkpoints}


def generate_all(model: BaseModel, base_hash: str, checkpoints: Sequence[EvalCheckpoint], jobs: Sequence[ImageJob],
                 settings: SamplerSettings, cache: ImageCache, *, batch_size: int = 16, progress: bool = True,
                 device: str | torch.device | None = None,
                 words: Callable[[str], str] = _unchanged) -> tuple[dict[str, list[Path]], GenerationStats]:
    """Make (or find) every job's image for every checkpoint; returns checkpoint label -> image paths in job
    order, and how many were made and how long that took.  One progress bar over the images still to make.
    ``words``: how every checkpoint's prompts are written besides its own token (the embeddings the model holds
    for the whole call, ``lorakit eval --embedding``; ``base_hash`` must name them)."""
    keys = image_keys(base_hash, checkpoints, jobs, settings)
    todo = {c.label: [i for i, k in enumerate(keys[c.label]) if not cache.has(k)] for c in checkpoints}
    stats = GenerationStats(cached=sum(len(jobs) - len(t) for t in todo.values()))
    bar = tqdm(total=sum(len(t) for t in todo.values()), desc="generating", unit="img", disable=not progress)
    try:
        for c in checkpoints:
            if not todo[c.label]:
                continue
            with applied(model, c) as own:
                def written(text: str, own=own) -> str:
                    return words(own(text))

                for start in range(0, len(todo[c.label]), max(1, batch_size)):
                    chunk = todo[c.label][start:start + batch_size]
                    samples = [SamplePrompt(written(jobs[i].prompt.text), written(jobs[i].prompt.negative),
                                            width=settings.width,
                                            height=settings.height, seed=jobs[i].seed, cfg_scale=settings.cfg_scale,
                                            steps=settings.steps, sampler=settings.sampler) for i in chunk]
                    started = time.perf_counter()
                    images = generate(model, samples, batch_size=batch_size, progress=False, device=device,
                                      clip_skip=settings.clip_skip, max_token_length=settings.max_token_length)
                    stats.seconds += time.perf_counter() - started
                    for i, image in zip(chunk, images, strict=True):
                        cache.store(keys[c.label][i], image)  # at once: an interrupted call keeps what it made
                    stats.made += len(chunk)
                    bar.update(len(chunk))
    finally:
        bar.close()
    return {label: [cache.path(k) for k in ks] for label, ks in keys.items()}, stats


def load_images(paths: Mapping[str, Sequence[Path]]) -> dict[str, list[Image.Image]]:
    out = {}
    for label, ps in paths.items():
        out[label] = []
        for p in ps:
            with Image.open(p) as im:
                out[label].append(im.convert("RGB"))
    return out
