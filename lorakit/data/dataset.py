"""TrainingData: the images found, their buckets and repeats, and the batches of every epoch.

Determinism (what makes resuming exact): the batches of epoch ``e`` are a pure function of (seed, e), and
each sample's caption, flip and crop a pure function of (seed, e, sample id), where the sample id is the
sample's place in the fixed list of (image, repeat) pairs. Nothing depends on what was drawn before, so
a run resumed at global step ``s`` uses ``epoch_batches(s // steps_per_epoch, skip=s % steps_per_epoch)``
and trains on bit-identical batches.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorakit.data.buckets import BucketScheme, crop_offset, face_crop, make_scheme, size_condition
from lorakit.data.cache import EncodeJob, Latent, encode_all
from lorakit.data.captions import count_tags, sample_caption, shuffle
from lorakit.data.config import DataConfig, SubsetConfig
from lorakit.data.discovery import ImageRecord, resolve_datasets, scan_subset
from lorakit.data.errors import DatasetError, Problems
from lorakit.data.images import (
    COLOR_AUG_GAMMA,
    COLOR_AUG_HUE_STEPS,
    color_augment,
    fit,
    load_alpha,
    load_mask,
    load_rgb,
    mask_tensor,
    to_tensor,
)
from lorakit.metadata import ss_metadata

if TYPE_CHECKING:
    from PIL import Image


def seeded_rng(*parts: object) -> random.Random:
    """A generator seeded from a hash of ``parts``: independent streams per (purpose, seed, epoch, sample)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class BatchPlan:
    """Which samples make one batch (cheap; the images are read by ``TrainingData.load_batch``)."""

    epoch: int
    index: int  # place in the epoch: the step within the epoch
    dataset: int
    bucket: tuple[int, int]  # (width, height)
    sample_ids: tuple[int, ...]


@dataclass
class Batch:
    """One training batch. Either ``pixel_values`` or (with a latent cache) ``latents`` is set."""

    captions: list[str]
    is_reg: torch.Tensor  # (B,) bool: regularization (prior-preservation) samples
    image_paths: list[Path]
    pixel_values: torch.Tensor | None = None  # (B, 3, H, W) float32 in [-1, 1]
    latents: torch.Tensor | None = None  # (B, C, h, w) VAE latent_dist mean, NOT multiplied by scaling_factor
    latents_std: torch.Tensor | None = None  # (B, C, h, w) latent_dist std
    flipped: list[bool] | None = None
    #: (B, 1, H, W) in [0, 1] at the image size: the loss weight of each pixel (kohya's alpha_mask), or None
    loss_masks: torch.Tensor | None = None
    epoch: int = 0
    index: int = 0
    #: the adapter's strength for this batch (its dataset's network_multiplier; a batch is one dataset's)
    network_multiplier: float = 1.0
    #: SDXL's size conditioning per image (``buckets.size_condition``): original size, crop, bucket size
    size_conditions: list[tuple[int, int, int, int, int, int]] | None = None

    def sample_latents(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * noise``: a fresh draw from the cached latent distributions (still unscaled)."""
        if self.latents is None or self.latents_std is None:
            raise ValueError("this batch has no cached latents (encode pixel_values with the VAE instead)")
        noise = torch.randn(self.latents.shape, generator=generator, dtype=self.latents.dtype,
                            device=self.latents.device)
        return self.latents + self.latents_std * noise

    def __len__(self) -> int:
        return len(self.captions)


class EpochBatches(Sequence):
    """The batches of one epoch, loaded when indexed (so it also works as a map-style torch Dataset with
    ``DataLoader(batches, batch_size=None, num_workers=n)``)."""

    def __init__(self, data: TrainingData, plans: Sequence[BatchPlan]) -> None:
        self.data = data
        self.plans = list(plans)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int | slice) -> Batch | EpochBatches:
        if isinstance(i, slice):
            return EpochBatches(self.data, self.plans[i])
        return self.data.load_batch(self.plans[i])

    def __iter__(self) -> Iterator[Batch]:
        for plan in self.plans:
            yield self.data.load_batch(plan)


class RepeatedIndex(Sequence):
    """Sample id -> record index, where record ``i`` is repeated ``repeats[i]`` times, without building the list
    (a folder's repeat count comes from its name; memory must not grow with it)."""

    def __init__(self, repeats: Sequence[int]) -> None:
        self._ends = list(itertools.accumulate(repeats))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, sample_id: int) -> int:  # type: ignore[override]
        if not 0 <= sample_id < len(self):
            raise IndexError(sample_id)
        return bisect.bisect_right(self._ends, sample_id)

    def __iter__(self) -> Iterator[int]:
        start = 0
        for record, end in enumerate(self._ends):
            yield from itertools.repeat(record, end - start)
            start = end


@dataclass(frozen=True)
class _Draw:
    caption: str
    flip: bool
    offset: tuple[int, int]
    color: tuple[str, float] | None = None  # color_aug: ("hue", steps) or ("gamma", exponent)
    resized: tuple[int, int] | None = None  # face_crop_aug_range: this step's size (None: the record's own)


class TrainingData:
    """Reads and checks the whole dataset on construction; raises DatasetError listing every problem.

    ``seed`` fixes sample order and caption randomness; ``default_resolution`` is used when
    ``config.resolution`` is None (the model's native size).
    """

    def __init__(self, config: DataConfig, seed: int = 0,
                 default_resolution: int | tuple[int, int] | None = None) -> None:
        self.config = config
        self.seed = seed
        problems = Problems()
        if config.orphan_captions not in ("error", "warn"):
            raise DatasetError(f"orphan_captions must be 'error' or 'warn', not {config.orphan_captions!r}")
        self.datasets = resolve_datasets(config, default_resolution, problems)
        self.schemes: list[BucketScheme] = []
        self.records: list[ImageRecord] = []
        for d, dataset in enumerate(self.datasets):
            scheme, errors, warnings = make_scheme(dataset)
            for e in errors:
                problems.error(f"{config.train_data} dataset #{d + 1}: {e}")
            for w in warnings:
                problems.warn(f"{config.train_data} dataset #{d + 1}: {w}")
            if dataset.batch_size < 1:
                problems.error(f"{config.train_data} dataset #{d + 1}: batch_size must be at least 1")
            self.schemes.append(scheme)
            seen: set[Path] = set()
            for s, subset in enumerate(dataset.subsets):
                folder = Path(subset.image_dir).resolve()
                if folder in seen:
                    problems.error(f"{subset.image_dir}: listed twice in dataset #{d + 1}")
                    continue
                seen.add(folder)
                self.records += scan_subset(subset, d, s, config, problems)
                if subset.face_crop_aug_range is not None and dataset.enable_bucket:
                    problems.warn(f"{subset.image_dir}: face_crop_aug_range crops around faces only without "
                                  "buckets (as kohya's does); with enable_bucket it is not used")
        problems.raise_if_any(str(config.train_data))
        if not any(not r.is_reg and not self.subset_of(r).is_validation for r in self.records):
            raise DatasetError(f"{config.train_data}: only regularization or validation images were found; nothing "
                               "to train on")
        self.held_out = self._hold_out(problems)
        problems.raise_if_any(str(config.train_data))
        self.repeats = self._balance_repeats(problems)
        self.buckets: list[tuple[tuple[int, int], tuple[int, int]]] = []  # per record: (bucket, resized)
        self._assign_buckets(problems)
        problems.raise_if_any(str(config.train_data))
        self.samples = RepeatedIndex(self.repeats)
        for d, dataset in enumerate(self.datasets):
            n = sum(r for r, rec in zip(self.repeats, self.records, strict=True) if rec.dataset == d)
            if dataset.batch_size > n:
                problems.warn(f"{config.train_data} dataset #{d + 1}: batch_size {dataset.batch_size} is larger than "
                              f"the {n} samples of an epoch: every step trains on at most {n} (a smaller batch "
                              "size, or more repeats, gives more steps)")
        groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for sample_id, rec in enumerate(self.samples):
            groups.setdefault((self.records[rec].dataset, self.buckets[rec][0]), []).append(sample_id)
        self._groups = dict(sorted(groups.items()))
        self.warnings = problems.warnings
        self._latents: dict[tuple[int, bool], Latent] | None = None
        # how batches count as training steps (kohya's token warm-up counts steps); the trainer sets them
        self.total_steps: int | None = None
        self.batches_per_step = 1
        self._masks: dict[tuple[int, tuple[int, int], bool], Image.Image] = {}

    # ------------------------------------------------------------------------------------------ building
    def subset_of(self, record: ImageRecord) -> SubsetConfig:
        return self.datasets[record.dataset].subsets[record.subset]

    def _hold_out(self, problems: Problems) -> set[int]:
        """The records kept for validation (kohya's validation_split): per training folder, the images are
        shuffled with the validation seed and the last ``len - ceil(len × (1 - split))`` held out, as kohya
        splits them; never a regularization image.  Every image of a validation folder (``validation_data``,
        ``is_validation``) is held out too."""
        held = {i for i, r in enumerate(self.records) if self.subset_of(r).is_validation}
        for d, dataset in enumerate(self.datasets):
            split = dataset.validation_split
            if not 0 <= split < 1:
                problems.error(f"{self.config.train_data} dataset #{d + 1}: validation_split must be at least 0 and "
                               f"below 1, not {split}")
                continue
            if split == 0:
                continue
            seed = self.seed if dataset.validation_seed is None else dataset.validation_seed
            for s, subset in enumerate(dataset.subsets):
                if subset.is_reg or subset.is_validation:
                    continue
                ids = [i for i, r in enumerate(self.records) if r.dataset == d and r.subset == s]
                shuffle(ids, seeded_rng("validation", seed, d, s))
                kept = math.ceil(len(ids) * (1 - split))
                if ids and kept == len(ids):
                    problems.error(f"{subset.image_dir}: validation_split {split} of its {len(ids)} images holds "
                                   f"none out (kohya rounds the training share up); use at least "
                                   f"{math.ceil(100 / len(ids)) / 100:g}, or more images")
                held.update(ids[kept:])
        return held

    def _balance_repeats(self, problems: Problems) -> list[int]:
        """Repeats per record; regularization repeats follow kohya: per dataset, reg images are taken in
        order with their own repeats until they match the training samples, then cycled one more repeat each
        until they do (the last image taken may overshoot; reg images beyond that point are not used)."""
        repeats = [0 if r.is_reg or i in self.held_out else self.subset_of(r).num_repeats
                   for i, r in enumerate(self.records)]
        for d in range(len(self.datasets)):
            target = sum(n for n, r in zip(repeats, self.records, strict=True) if r.dataset == d)
            reg = [i for i, r in enumerate(self.records) if r.dataset == d and r.is_reg]
            if not reg:
                continue
            available = sum(self.subset_of(self.records[i]).num_repeats for i in reg)
            if available > target:
                problems.warn(f"dataset #{d + 1}: {available} regularization samples for {target} training samples "
                              "per epoch: only the first ones (in folder and file-name order) are used")
            n, first = 0, True
            while n < target:
                for i in reg:
                    step = self.subset_of(self.records[i]).num_repeats if first else 1
                    repeats[i] += step
                    n += step
                    if n >= target:
                        break
                first = False
        return repeats

    def _assign_buckets(self, problems: Problems) -> None:
        upscaled, cropped, too_small = [], [], []
        for rec in self.records:
            scheme = self.schemes[rec.dataset]
            bucket, resized = scheme.select(rec.size)
            self.buckets.append((bucket, resized))
            if min(bucket) == 0:  # bucket_no_upscale: a side shorter than one bucket step
                too_small.append(f"{rec.path} ({rec.size[0]}×{rec.size[1]})")
                continue
            factor = max(bucket[0] / rec.size[0], bucket[1] / rec.size[1])
            if factor > self.config.upscale_warning_factor or (not scheme.enabled and factor > 1.0):
                upscaled.append(f"{rec.path} ({rec.size[0]}×{rec.size[1]}, enlarged {factor:.2f}× to fill "
                                f"{bucket[0]}×{bucket[1]})")
            kept = (bucket[0] * bucket[1]) / (resized[0] * resized[1])
            if not scheme.enabled and kept < 0.8:
                cropped.append(f"{rec.path} ({rec.size[0]}×{rec.size[1]}, {cut_share(kept)} cut away to fill "
                               f"{bucket[0]}×{bucket[1]})")
        if too_small:
            steps = self.schemes[0].steps
            problems.error(f"{_images_are(len(too_small))} narrower or lower than bucket_reso_steps ({steps} "
                           "pixels), so bucket_no_upscale leaves no bucket of their size; remove them or lower "
                           "bucket_reso_steps: "
                           f"{'; '.join(too_small[:10])}" + (" ..." if len(too_small) > 10 else ""))
        if upscaled:
            problems.warn(f"{_images_are(len(upscaled))} smaller than the training size and upscaled "
                          f"(blurry): {'; '.join(upscaled[:10])}" + (" ..." if len(upscaled) > 10 else ""))
        if cropped:
            problems.warn(f"{_images_are(len(cropped))} cropped to the training resolution; set enable_bucket = true "
                          f"to keep them whole: {'; '.join(cropped[:10])}" + (" ..." if len(cropped) > 10 else ""))

    # ------------------------------------------------------------------------------------------- counting
    @property
    def samples_per_epoch(self) -> int:
        return len(self.samples)

    @property
    def num_train_images(self) -> int:
        """Training samples per epoch, repeats included (kohya's ``ss_num_train_images``)."""
        return sum(n for n, r in zip(self.repeats, self.records, strict=True) if not r.is_reg)

    def trained_image_paths(self) -> list[Path]:
        """The images trained on (no regularization or held-out image), each once."""
        return [r.path for n, r in zip(self.repeats, self.records, strict=True) if n and not r.is_reg]

    @property
    def num_reg_images(self) -> int:
        """Regularization images × their folder's repeats, before balancing (kohya's ``ss_num_reg_images``)."""
        return sum(self.subset_of(r).num_repeats for r in self.records if r.is_reg)

    @property
    def reg_samples_per_epoch(self) -> int:
        return sum(n for n, r in zip(self.repeats, self.records, strict=True) if r.is_reg)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the same every epoch)."""
        return sum(-(-len(ids) // self.datasets[d].batch_size) for (d, _), ids in self._groups.items())

    @property
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: {folder name: {tag: images with it}} over the prepared captions."""
        out: dict[str, dict[str, int]] = {}
        for i, rec in enumerate(self.records):
            if i in self.held_out:  # not trained on
                continue
            if self.subset_of(rec).templated:  # caption templates, the same for every image: no tags of its own
                continue
            counts = out.setdefault(rec.folder, {})
            for tag, n in count_tags([rec.caption], self.subset_of(rec).caption_separator).items():
                counts[tag] = counts.get(tag, 0) + n
        return out

    def fingerprint(self) -> str:
        """A hash of what an epoch is made of (images, sizes, captions, repeats, buckets, batch sizes): a run
        resumed on data with another fingerprint would not continue the same run."""
        # a validation folder's images are not trained on: it may be added or changed when a run is resumed
        parts = [(r.folder, r.path.name, r.file_size, r.caption, r.is_reg, n, self.buckets[i][0])
                 for i, (r, n) in enumerate(zip(self.records, self.repeats, strict=True))
                 if not self.subset_of(r).is_validation]
        parts.append([d.batch_size for d in self.datasets])
        resampled = [s.resize_interpolation for d in self.datasets for s in d.subsets if not s.is_validation]
        if any(resampled):  # other pixels; absent, the fingerprint of a run from before the option
            parts.append(resampled)
        if any(r.mask for r in self.records):  # the same for mask images
            parts.append([r.mask.name if r.mask else None for r in self.records
                          if not self.subset_of(r).is_validation])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def bucket_counts(self) -> dict[tuple[int, tuple[int, int]], int]:
        """{(dataset, (width, height)): samples per epoch}."""
        return {key: len(ids) for key, ids in self._groups.items()}

    # -------------------------------------------------------------------------------------------- epochs
    def epoch_plan(self, epoch: int) -> list[BatchPlan]:
        """The batches of ``epoch``: samples shuffled within each bucket, cut into batches, batches shuffled."""
        rng = seeded_rng("order", self.seed, epoch)
        batches: list[tuple[int, tuple[int, int], tuple[int, ...]]] = []
        for (d, bucket), ids in self._groups.items():
            ids = list(ids)
            shuffle(ids, rng)
            size = self.datasets[d].batch_size
            batches += [(d, bucket, tuple(ids[i:i + size])) for i in range(0, len(ids), size)]
        shuffle(batches, rng)
        return [BatchPlan(epoch, k, d, bucket, ids) for k, (d, bucket, ids) in enumerate(batches)]

    def epoch_batches(self, epoch: int, skip: int = 0, processes: int = 1) -> EpochBatches:
        """The batches of ``epoch`` from the ``skip``-th on, loaded lazily.  Dealt out to ``processes`` processes
        (``[rank::processes]``), the epoch is first made a multiple of them with its own first batches again, as
        accelerate's even_batches does: a process with a batch fewer would go on to the epoch's end while the
        others wait for its gradients (two processes on 5 batches crashed or hung)."""
        plan = self.epoch_plan(epoch)
        plan += list(itertools.islice(itertools.cycle(plan), -len(plan) % processes))
        return EpochBatches(self, plan[skip:])

    def count_steps(self, total_steps: int, batches_per_step: int = 1) -> None:
        """How the trainer counts steps: ``total_steps`` in the run, each ``batches_per_step`` batches (gradient
        accumulation × processes).  kohya's token warm-up is given in steps, or as a share of the run's."""
        self.total_steps, self.batches_per_step = total_steps, batches_per_step

    def _warmup_steps(self, subset: SubsetConfig) -> int:
        if subset.token_warmup_step >= 1:
            return int(subset.token_warmup_step)
        if subset.token_warmup_step <= 0 or self.total_steps is None:  # a share of an unknown run: off
            return 0
        return math.floor(subset.token_warmup_step * self.total_steps)

    def _draw(self, epoch: int, sample_id: int, step: int = 0) -> _Draw:
        rec_index = self.samples[sample_id]
        rec = self.records[rec_index]
        subset = self.subset_of(rec)
        caption = sample_caption(rec.caption, subset, seeded_rng("caption", self.seed, epoch, sample_id), epoch,
                                 step, self._warmup_steps(subset), weighted=self.config.weighted_captions)
        aug = seeded_rng("augment", self.seed, epoch, sample_id)
        flip = subset.flip_aug and aug.random() < 0.5
        bucket, resized = self.buckets[rec_index]
        face_resized = None
        if self._face_cropped(rec_index):  # a stream of its own, as color_aug's
            face_resized, offset = face_crop(rec.size, bucket, rec.face, subset.face_crop_aug_range,
                                             seeded_rng("face", self.seed, epoch, sample_id), subset.random_crop)
        elif subset.random_crop:
            offset = crop_offset(resized, bucket, aug.random(), aug.random())
        else:
            offset = crop_offset(resized, bucket)
        color = None
        if subset.color_aug:  # a stream of its own: the other draws stay what they are without it
            rng = seeded_rng("color", self.seed, epoch, sample_id)
            if rng.random() <= 0.33:  # kohya's odds: a third of the samples, half hue and half gamma
                color = ("hue", rng.uniform(-COLOR_AUG_HUE_STEPS, COLOR_AUG_HUE_STEPS)) if rng.random() > 0.5 \
                    else ("gamma", rng.uniform(*COLOR_AUG_GAMMA))
        return _Draw(caption, flip, offset, color, face_resized)

    def _face_cropped(self, record_index: int) -> bool:
        """Whether kohya's face_crop_aug_range crops this image: its name gives a face, and its dataset has no
        buckets (kohya crops faces only then)."""
        rec = self.records[record_index]
        return rec.face is not None and self.subset_of(rec).face_crop_aug_range is not None \
            and not self.datasets[rec.dataset].enable_bucket

    def load_batch(self, plan: BatchPlan) -> Batch:
        step = (plan.epoch * self.steps_per_epoch + plan.index) // self.batches_per_step  # the step it trains in
        draws = [self._draw(plan.epoch, sid, step) for sid in plan.sample_ids]
        recs = [self.samples[sid] for sid in plan.sample_ids]
        batch = Batch(captions=[d.caption for d in draws],
                      is_reg=torch.tensor([self.records[r].is_reg for r in recs], dtype=torch.bool),
                      image_paths=[self.records[r].path for r in recs], flipped=[d.flip for d in draws],
                      epoch=plan.epoch, index=plan.index,
                      network_multiplier=self.datasets[plan.dataset].network_multiplier,
                      size_conditions=[size_condition(self.records[r].size, self.buckets[r][0], d.flip)
                                       for r, d in zip(recs, draws, strict=True)])
        if any(self._masked(r) for r in recs):
            batch.loss_masks = torch.stack([self.alpha(r, d.offset, d.flip, d.resized)
                                            for r, d in zip(recs, draws, strict=True)])
        if self._latents is not None:
            pairs = [self._latents[(r, d.flip)] for r, d in zip(recs, draws, strict=True)]
            batch.latents = torch.stack([m for m, _ in pairs])
            batch.latents_std = torch.stack([s for _, s in pairs])
        else:
            batch.pixel_values = torch.stack([self.pixels(r, d.offset, d.flip, d.color, d.resized)
                                              for r, d in zip(recs, draws, strict=True)])
        return batch

    def validation_batches(self) -> Iterator[Batch]:
        """The held-out images (``validation_split``) in batches of their dataset's size and bucket, each as it
        is: its caption without shuffling, dropout or flip, center-cropped; the same batches every call, read as
        they are iterated."""
        groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for i in sorted(self.held_out):
            groups.setdefault((self.records[i].dataset, self.buckets[i][0]), []).append(i)
        index = 0
        for (d, _), ids in sorted(groups.items()):
            size = self.datasets[d].batch_size
            for k in range(0, len(ids), size):
                yield self._held_out_batch(ids[k:k + size], index)
                index += 1

    def _held_out_batch(self, ids: list[int], index: int) -> Batch:
        captions = []
        for i in ids:
            subset = dataclasses.replace(self.subset_of(self.records[i]), shuffle_caption=False,
                                         caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                                         caption_tag_dropout_rate=0.0)
            captions.append(sample_caption(self.records[i].caption, subset, seeded_rng("validation caption", i), 0,
                                           weighted=self.config.weighted_captions))
        batch = Batch(captions=captions, is_reg=torch.zeros(len(ids), dtype=torch.bool),
                      image_paths=[self.records[i].path for i in ids], flipped=[False] * len(ids), index=index,
                      network_multiplier=self.datasets[self.records[ids[0]].dataset].network_multiplier,
                      size_conditions=[size_condition(self.records[i].size, self.buckets[i][0]) for i in ids])
        if any(self._masked(i) for i in ids):
            batch.loss_masks = torch.stack([self.alpha(i) for i in ids])
        if self._latents is not None:
            batch.latents = torch.stack([self._latents[(i, False)][0] for i in ids])
            batch.latents_std = torch.stack([self._latents[(i, False)][1] for i in ids])
        else:
            batch.pixel_values = torch.stack([self.pixels(i) for i in ids])
        return batch

    def pixels(self, record_index: int, offset: tuple[int, int] | None = None, flip: bool = False,
               color: tuple[str, float] | None = None, resized: tuple[int, int] | None = None) -> torch.Tensor:
        """(3, H, W) in [-1, 1] for one image at its bucket size (center crop unless ``offset`` is given), with
        kohya's ``color`` augmentation when given; ``resized``: another size to crop from (a face crop)."""
        bucket, own = self.buckets[record_index]
        resized = own if resized is None else resized
        offset = crop_offset(resized, bucket) if offset is None else offset
        rec = self.records[record_index]
        im = fit(load_rgb(rec.path), resized, bucket, offset, flip, self.subset_of(rec).resize_interpolation)
        return to_tensor(color_augment(im, *color) if color is not None else im)

    def _masked(self, record_index: int) -> bool:
        """Whether the image's loss is masked: by its alpha channel, or by its mask image."""
        rec = self.records[record_index]
        return rec.mask is not None or self.subset_of(rec).alpha_mask

    def alpha(self, record_index: int, offset: tuple[int, int] | None = None, flip: bool = False,
              resized: tuple[int, int] | None = None) -> torch.Tensor:
        """(1, H, W) in [0, 1]: the loss mask of one image at its bucket size, cropped and flipped as its pixels:
        its mask image (conditioning_data_dir), else its alpha channel (alpha_mask), else ones (also for an image
        without transparency).  Kept in memory (as bytes) for the center crop, which every step of a cached run
        uses."""
        rec = self.records[record_index]
        bucket, own = self.buckets[record_index]
        if not self._masked(record_index):
            return torch.ones(1, bucket[1], bucket[0])
        resized = own if resized is None else resized
        offset = crop_offset(resized, bucket) if offset is None else offset
        key = (record_index, resized, offset, flip)
        mask = self._masks.get(key)
        if mask is None:
            source = load_mask(rec.mask) if rec.mask is not None else load_alpha(rec.path)
            mask = fit(source, resized, bucket, offset, flip, self.subset_of(rec).resize_interpolation)
            if (resized, offset) == (own, crop_offset(own, bucket)):
                self._masks[key] = mask
        return mask_tensor(mask)

    # ------------------------------------------------------------------------------------------- latents
    def _folders_where(self, holds: Callable[[int], bool]) -> list[str]:
        """The folders (sorted) of the records whose index ``holds``: where an option a cache cannot take is set."""
        return sorted({r.folder for i, r in enumerate(self.records) if holds(i)})

    def check_captions_cacheable(self) -> None:
        """Refuse ``cache_text_encoder_outputs`` where a folder draws a new caption nearly every step: shuffled
        tags (n! orders) and tag dropout (2^n subsets) would fill the cache and never hit it.  Whole-caption
        dropout, wildcards, templates and the token warm-up draw from a few captions each, which it keys by text."""
        for option, why in (("shuffle_caption", "a new order of tags every step"),
                            ("caption_tag_dropout_rate", "a new subset of tags every step")):
            folders = self._folders_where(lambda i, opt=option: bool(self.repeats[i])
                                          and bool(getattr(self.subset_of(self.records[i]), opt)))
            if folders:
                raise DatasetError(f"{option} cannot be used with cached text-encoder outputs ({why}), set in: "
                                   f"{', '.join(folders)}; turn one of them off "
                                   "(data.cache_text_encoder_outputs = false)")

    def cache_latents(self, vae: torch.nn.Module, directory: str | Path | None = None, vae_id: str | None = None,
                      batch_size: int = 8) -> None:
        """Encode every used (image, flip) once with ``vae`` (a diffusers AutoencoderKL); from now on batches
        carry ``latents``/``latents_std`` instead of pixels. With ``directory``, latents are kept on disk and
        reused by later runs while the image, the crop and the VAE are unchanged. ``vae_id`` overrides the VAE
        fingerprint (a hash of its weights) used in cache keys."""
        def varies(option: str, i: int) -> bool:
            subset = self.subset_of(self.records[i])
            if option == "face_crop_aug_range":  # one scale, no jitter: the same crop every step, cacheable
                return self._face_cropped(i) and (
                    subset.random_crop or subset.face_crop_aug_range[0] != subset.face_crop_aug_range[1])
            return bool(getattr(subset, option))

        for option, why in (("random_crop", "a new crop every step"), ("color_aug", "new colors every step"),
                            ("face_crop_aug_range", "a new scale every step")):
            folders = self._folders_where(lambda i, opt=option: varies(opt, i))
            if folders:
                raise DatasetError(f"{option} cannot be used with cached latents ({why}), set in: "
                                   f"{', '.join(folders)}; turn one of them off (cache_latents = false)")
        jobs: dict[tuple[int, bool], EncodeJob] = {}
        for i, rec in enumerate(self.records):
            if self.repeats[i] == 0 and i not in self.held_out:
                continue
            bucket, resized = self.buckets[i]
            offset = crop_offset(resized, bucket)
            if self._face_cropped(i) and i not in self.held_out:  # one scale (checked above): no draws
                resized, offset = face_crop(rec.size, bucket, rec.face, self.subset_of(rec).face_crop_aug_range,
                                            None)
            # a held-out image is only ever seen as it is (validation_batches)
            flips = (False, True) if self.subset_of(rec).flip_aug and i not in self.held_out else (False,)
            for flip in flips:
                jobs[(i, flip)] = EncodeJob(rec.path, rec.mtime_ns, rec.file_size, resized, bucket, offset, flip,
                                            self.subset_of(rec).resize_interpolation)
        by_job = {job: key for key, job in jobs.items()}
        problems = Problems()
        latents = encode_all(list(jobs.values()), vae,
                             lambda job: self.pixels(by_job[job][0], job.offset, job.flip, resized=job.resized),
                             Path(directory) if directory is not None else None, vae_id, batch_size, problems)
        self.warnings += problems.warnings
        self._latents = {key: latents[job] for key, job in jobs.items()}

    # ------------------------------------------------------------------------------------------- reports
    def summary(self) -> str:
        """Plain text: folders, images × repeats, buckets, regularization images, steps per epoch."""
        train = [r for i, r in enumerate(self.records) if not r.is_reg and i not in self.held_out]
        folders: dict[str, list[int]] = {}
        for i, rec in enumerate(self.records):
            if not rec.is_reg and i not in self.held_out:
                folders.setdefault(rec.folder, []).append(self.repeats[i])
        parts = [f"{name}: {len(reps)} × {reps[0]}" for name, reps in folders.items()]
        lines = [f"{len(folders)} folder{'s' if len(folders) != 1 else ''}, {len(train)} images "
                 f"({'; '.join(parts)}) = {self.num_train_images} samples/epoch"]
        reg = [r for r in self.records if r.is_reg]
        if reg:
            lines.append(f"{len(reg)} reg images, {self.reg_samples_per_epoch} reg samples/epoch "
                         f"(balanced to the training samples)")
        else:
            lines.append("0 reg images")
        if self.held_out:
            split = sorted({f"{d.validation_split:g}" for d in self.datasets if d.validation_split})
            folders = sum(1 for i in self.held_out if self.subset_of(self.records[i]).is_validation)
            how = ([f"validation_split {', '.join(split)}"] if split else []) + \
                ([f"{folders} in validation folders"] if folders else [])
            lines.append(f"{len(self.held_out)} images held out for validation ({'; '.join(how)})")
        for d in range(len(self.schemes)):
            images: dict[tuple[int, int], int] = {}
            for i, rec in enumerate(self.records):
                if rec.dataset == d and i not in self.held_out:
                    images[self.buckets[i][0]] = images.get(self.buckets[i][0], 0) + 1
            listing = ", ".join(f"{w}×{h} ({n})" for (w, h), n in sorted(images.items(), key=lambda kv: -kv[1]))
            prefix = f"dataset #{d + 1}: " if len(self.schemes) > 1 else ""
            multiplier = self.datasets[d].network_multiplier
            lines.append(f"{prefix}{len(images)} bucket{'s' if len(images) != 1 else ''} (images): {listing}; "
                         f"batch size {self.datasets[d].batch_size}"
                         + (f"; network multiplier {multiplier:g}" if multiplier != 1 else ""))
        lines.append(f"{self.steps_per_epoch} steps/epoch")
        return "\n".join(lines)

    def kohya_metadata(self) -> dict[str, str]:
        """The dataset's ``ss_*`` keys as kohya writes them into adapter files (JSON-encoded strings)."""
        dirs: dict[str, dict] = {}
        reg_dirs: dict[str, dict] = {}
        for d, dataset in enumerate(self.datasets):
            for s, subset in enumerate(dataset.subsets):
                if subset.is_validation:  # not trained on: A1111 and kohya count these folders' images as trained
                    continue
                count = sum(1 for i, r in enumerate(self.records)
                            if r.dataset == d and r.subset == s and i not in self.held_out)
                target = reg_dirs if subset.is_reg else dirs
                target[Path(subset.image_dir).name] = {"n_repeats": subset.num_repeats, "img_count": count}
        first = self.datasets[0]
        bucket_info = {"buckets": {i: {"resolution": list(b), "count": n}
                                   for i, ((_, b), n) in enumerate(self.bucket_counts().items())}}
        return ss_metadata(
            num_train_images=self.num_train_images, num_reg_images=self.num_reg_images,
            num_batches_per_epoch=self.steps_per_epoch, tag_frequency=self.tag_frequency, dataset_dirs=dirs,
            reg_dataset_dirs=reg_dirs, bucket_info=bucket_info,
            resolution=str(first.resolution),  # kohya writes the tuple as Python prints it: "(512, 512)"
            enable_bucket=first.enable_bucket, bucket_no_upscale=first.bucket_no_upscale,
            masked_loss=any(s.alpha_mask or s.conditioning_data_dir for d in self.datasets for s in d.subsets),
            flip_aug=any(s.flip_aug for d in self.datasets for s in d.subsets),
            color_aug=any(s.color_aug for d in self.datasets for s in d.subsets),
            min_bucket_reso=self.schemes[0].min_reso,
            max_bucket_reso=self.schemes[0].max_reso, batch_size_per_device=first.batch_size,
            **({"validation_split": first.validation_split, "validation_seed": str(first.validation_seed)}
               if self.held_out else {}),
            **({"resize_interpolation": first.subsets[0].resize_interpolation}
               if first.subsets[0].resize_interpolation else {}),
        )


def _images_are(n: int) -> str:
    """'1 image is', '3 images are': the subject of a warning about some of the images."""
    return "1 image is" if n == 1 else f"{n} images are"


def cut_share(kept: float) -> str:
    """The share of an image a square crop cuts away, as a percentage that says "100%" only when nothing is left
    (a 2000×8 strip keeps 0.4%: "99.6%", where rounding said "100%")."""
    cut = 100 * (1 - kept)
    text = f"{cut:.0f}%"
    return text if text != "100%" or cut >= 100 else f"{min(cut, 99.9):.1f}%"
