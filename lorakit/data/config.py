"""Data configuration: the user's options, and kohya's ``--dataset_config`` TOML with its inheritance.

Three levels, as in kohya sd-scripts: ``DataConfig`` (the trainer's ``[data]`` section, kohya's command-line
flags) gives defaults; a dataset TOML's ``[general]`` overrides them, ``[[datasets]]`` overrides
``[general]``, and ``[[datasets.subsets]]`` overrides ``[[datasets]]``. Resolved, every image folder becomes
one ``SubsetConfig`` inside one ``DatasetConfig`` (a resolution, a batch size, a bucket scheme).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.errors import DatasetError
from lorakit.tomlcheck import check_value, suggestion

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    """Everything between a folder of images and training batches (the trainer embeds this as ``[data]``)."""

    #: a kohya-layout parent folder (``10_zkz shape/``), a plain image folder (give ``trigger``), or a TOML file
    #: in kohya's ``--dataset_config`` format
    train_data: str | None = None
    #: regularization (class) images in kohya layout (``1_shape/``); not used with a TOML file (use ``is_reg``)
    reg_data: str | None = None
    #: kohya's fine-tuning metadata (``--in_json``) for a plain ``train_data`` folder: a JSON file {image:
    #: {"caption": ..., "tags": ...}}; the folder's images it lists are trained, with its captions (a TOML dataset
    #: config sets it per subset)
    metadata_file: str | None = None
    #: held-out images of the concept, never trained on (as OneTrainer's validation concepts): a kohya-layout or
    #: plain folder like ``train_data``; their loss is the run's validation loss, beside or instead of
    #: ``validation_split``.  Not used with a TOML file (use a subset with ``is_validation = true``)
    validation_data: str | None = None
    #: the word the adapter learns. Kohya layout: default the first word of each folder's name (``zkz`` in
    #: ``10_zkz shape``); plain folder: needed unless every image has a caption
    trigger: str | None = None
    #: plain folder: the class after the trigger in default captions ("zkz shape")
    class_word: str | None = None
    #: plain folder (and default for TOML subsets, kohya's ``--dataset_repeats``): times each image is seen per epoch
    repeats: int = 1
    #: square side, or (width, height); None: the trainer passes the model's native resolution
    resolution: int | tuple[int, int] | None = None
    #: images per batch (kohya's train_batch_size); with gradient accumulation, per micro-batch
    batch_size: int = 1
    #: aspect-ratio buckets; off (kohya's default): every image is resized and center-cropped to `resolution`
    enable_bucket: bool = False
    #: bucket sides are multiples of this (multiples of 8, the VAE's factor; use 8 or 16 for 64-pixel models)
    bucket_reso_steps: int = 64
    #: smallest/largest bucket side; None: half / twice the resolution (kohya's 256/1024 at 512)
    min_bucket_reso: int | None = None
    #: the largest bucket side (see min_bucket_reso)
    max_bucket_reso: int | None = None
    #: kohya's bucket_no_upscale (with enable_bucket): each image trains at its own size, shrunk only when larger
    #: than the resolution's area and cut to multiples of bucket_reso_steps, never enlarged (small images stay
    #: sharp; many sizes make smaller batches)
    bucket_no_upscale: bool = False
    #: the caption file beside each image: its name with this extension (kohya's caption_extension)
    caption_extension: str = ".txt"
    #: what separates the tags of a caption, for shuffling, keep_tokens and tag dropout
    caption_separator: str = ","
    #: kohya's caption_prefix: text put before every caption, with a space (part of the caption: keep_tokens
    #: counts its tags)
    caption_prefix: str | None = None
    #: kohya's caption_suffix: text put after every caption, with a space (part of the caption)
    caption_suffix: str | None = None
    #: put the trigger in front of captions that lack it (never for regularization images)
    inject_trigger: bool = True
    #: the first N tags stay in place when captions are shuffled (1 keeps a leading trigger first)
    keep_tokens: int = 0
    #: kohya's keep_tokens_separator (e.g. "|||"): in a caption "zkz, red ||| tags ||| end", what stands before it
    #: is never shuffled or dropped, nor what follows a second one (kept at the end); the separator itself is
    #: removed.  Captions without it fall back to keep_tokens
    keep_tokens_separator: str = ""
    #: kohya's secondary_separator (e.g. ";;;"): tags joined by it move and drop as one, then it becomes the
    #: caption separator ("red;;;circle" -> "red,circle")
    secondary_separator: str = ""
    #: kohya's enable_wildcard: each step draws one line of a multi-line caption file and one option of each
    #: "{a|b|c}" in it ("{{" / "}}": literal braces); off, only a caption file's first line is read
    enable_wildcard: bool = False
    #: kohya's use_object_template / use_style_template: "object" or "style" trains every image of a training
    #: folder with one of lorakit's caption templates ("a photo of a zkz", "a painting in the style of zkz"),
    #: filled with the folder's trigger and drawn anew each step, instead of its caption (textual inversion
    #: without captions); None: the captions
    caption_templates: str | None = None
    #: kohya's weighted_captions: ``(word:1.2)``, ``(word)``, ``[word]`` in captions weigh words as in sample prompts
    #: (``\\(`` a literal bracket), and shuffling and tag dropout keep a bracket's tags together; off, brackets are
    #: plain text
    weighted_captions: bool = False
    #: kohya's shuffle_caption: the tags of each caption in a new order every step (the first keep_tokens stay)
    shuffle_caption: bool = False
    #: probability that a whole caption becomes "" (unconditional training)
    caption_dropout_rate: float = 0.0
    #: kohya: drop the caption in every n-th epoch (epochs counted from 1); 0 = never
    caption_dropout_every_n_epochs: int = 0
    #: probability that each tag (except the kept ones) is dropped
    caption_tag_dropout_rate: float = 0.0
    #: kohya's token warm-up: for the first ``token_warmup_step`` steps (below 1: that share of the run's steps)
    #: captions keep only their first tags after the kept ones, ``token_warmup_min`` at the start and
    #: growing linearly to all of them (0: off)
    token_warmup_min: int = 1
    #: the steps of the token warm-up (see token_warmup_min; below 1: that share of the run's steps; 0: off)
    token_warmup_step: float = 0.0
    #: tags removed from every caption: words that describe the concept itself, which the trigger should absorb
    drop_tags: list[str] = field(default_factory=list)
    #: random horizontal flip. Off by default: it breaks captions that say "left"/"right" and asymmetric concepts
    #: (text, logos, a side parting)
    flip_aug: bool = False
    #: random instead of center crop (cannot be combined with cached latents)
    random_crop: bool = False
    #: kohya's alpha_mask: a transparent image's alpha channel masks the loss, so its transparent background is not
    #: learned (the image itself is shown to the VAE on white); opaque images count everywhere
    alpha_mask: bool = False
    #: kohya's resize_interpolation: how images are resized to their bucket (lanczos, nearest, bilinear, bicubic,
    #: area, box; kohya's aliases linear, cubic, lanczos4); absent: Lanczos
    resize_interpolation: str | None = None
    #: kohya's validation_split: this share of each training folder's images (drawn with ``validation_seed``,
    #: default the training seed) is held out and not trained on; their loss at fixed timesteps and noise is the
    #: run's validation loss (``training.validate_every_n_epochs``/``_steps``)
    validation_split: float = 0.0
    #: kohya's validation_seed: the seed that draws the validation_split images (absent: training.seed)
    validation_seed: int | None = None
    #: kohya's per-dataset network_multiplier: the adapter's strength while training on this data (a dataset
    #: at -1 teaches the adapter the opposite, as in kohya's "difference" training); 1: as usual
    network_multiplier: float = 1.0
    #: kohya's face_crop_aug_range (without buckets): images named ``<name>_<cx>_<cy>_<w>_<h>`` (kohya's
    #: detect_face_rotate script) are cropped around that face, scaled so that it fills between 1/max and 1/min of
    #: the shorter side, e.g. [2.0, 4.0] (needs cache_latents = false when the range is not one value)
    face_crop_aug_range: tuple[float, float] | None = None
    #: kohya's color_aug: a third of the samples get a small random hue shift or gamma (needs cache_latents =
    #: false: the pixels change every step)
    color_aug: bool = False
    #: a caption file whose image is missing: "error" (default) or "warn" (kohya ignores it silently)
    orphan_captions: str = "error"
    #: open every image fully before training (catches truncated/corrupt files up front)
    verify_images: bool = True
    #: warn when an image must be enlarged by more than this factor to fill its bucket
    upscale_warning_factor: float = 2.0
    #: encode images with the VAE once (see TrainingData.cache_latents); in memory, or on disk in `cache_dir`
    cache_latents: bool = True
    #: kohya's cache_latents_to_disk: keep the cached latents in files (cache_dir, else latent_cache/ in the run
    #: folder), checked against the images and read again when they still match
    cache_latents_to_disk: bool = False
    #: where cache_latents_to_disk writes (absent: latent_cache/ in the run folder); shared by runs on the same images
    cache_dir: str | None = None
    #: kohya's cache_text_encoder_outputs: encode each caption once and reuse it (the text encoders must not train,
    #: and tags must be neither shuffled nor dropped; whole-caption dropout, wildcards and the warm-up are kept)
    cache_text_encoder_outputs: bool = False
    #: kohya's vae_batch_size: images encoded together when the latents are cached (fewer: less GPU memory)
    vae_batch_size: int = 8
    #: DreamBooth prior preservation, read by the trainer: this many class images, generated from
    #: `class_prompt` by the base model when `reg_data` holds fewer (lorakit.data only reads images)
    num_class_images: int = 0
    #: the prompt the class images are generated from (kohya's class prompt, e.g. "a dog")
    class_prompt: str | None = None


@dataclass
class SubsetConfig:
    """One image folder and how its images and captions are used (kohya's ``[[datasets.subsets]]``)."""

    image_dir: str
    is_reg: bool = False
    #: every image of this folder is held out for the validation loss and never trained on
    is_validation: bool = False
    num_repeats: int = 1
    #: caption of images without a caption file ("zkz shape")
    class_tokens: str | None = None
    #: None: the first word of class_tokens (training folders only); "": no trigger
    trigger: str | None = None
    inject_trigger: bool = True
    caption_extension: str = ".txt"
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    enable_wildcard: bool = False
    caption_templates: str | None = None
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    drop_tags: list[str] = field(default_factory=list)
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    #: kohya's conditioning_data_dir for the masked loss: a folder with a mask image per image (the same name,
    #: any image extension, the same size); its red channel weighs the loss (white: learned, black: ignored)
    conditioning_data_dir: str | None = None
    #: kohya's fine-tuning metadata (``--in_json``): a JSON file {image: {"caption": ..., "tags": ...}}; the
    #: folder's images it lists are trained, with its captions (caption files are not read)
    metadata_file: str | None = None

    @property
    def templated(self) -> bool:
        """Whether this folder's images train on caption templates (``caption_templates``), not their captions."""
        return bool(self.caption_templates) and not self.is_reg

    @property
    def effective_trigger(self) -> str | None:
        """The word every caption of this folder must contain (None: no check, e.g. regularization images)."""
        if self.is_reg:
            return None
        if self.trigger is not None:
            return self.trigger.strip() or None
        words = (self.class_tokens or "").split()
        return words[0] if words else None


@dataclass
class DatasetConfig:
    """Folders trained at one resolution and batch size (kohya's ``[[datasets]]``)."""

    subsets: list[SubsetConfig]
    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    network_multiplier: float = 1.0


# ------------------------------------------------------------------------------------------- key tables
_SUBSET_ONLY = ("image_dir", "is_reg", "is_validation", "conditioning_data_dir", "metadata_file")
SUBSET_KEYS = tuple(f.name for f in dataclasses.fields(SubsetConfig))
DATASET_KEYS = tuple(f.name for f in dataclasses.fields(DatasetConfig) if f.name != "subsets")
_INHERITED_SUBSET_KEYS = tuple(k for k in SUBSET_KEYS if k not in _SUBSET_ONLY)

# kohya options that only change speed: accepted and ignored
KOHYA_IGNORED = ("cache_info",)
# kohya tables its SD scripts never read (custom_attributes: only its FLUX and Lumina scripts do, for
# diff_output_preservation): accepted when they are tables and, as there, change nothing
KOHYA_INERT_TABLES = ("custom_attributes",)


_SUBSET_HINTS = typing.get_type_hints(SubsetConfig)
_DATASET_HINTS = {**typing.get_type_hints(DatasetConfig), "resolution": int | tuple[int, int]}


def _check_table(table: Any, allowed: tuple[str, ...], level: str, where: str) -> dict[str, Any]:
    """Refuse unknown keys (naming the key, the file, and the closest valid key) and check value types."""
    if not isinstance(table, dict):
        raise DatasetError(f"{where}: expected a table, got {table!r}")
    out = {}
    for key, value in table.items():
        if key in KOHYA_IGNORED:
            continue
        if key in KOHYA_INERT_TABLES:
            if not isinstance(value, dict):
                raise DatasetError(f"{where}: {key}: expected a table (e.g. {key} = {{ name = 1 }}), got {value!r}")
            continue
        if key not in allowed:
            if key in SUBSET_KEYS or key in DATASET_KEYS:
                home = "[[datasets.subsets]]" if key in _SUBSET_ONLY else "[general] or [[datasets]]"
                raise DatasetError(f"{where}: {key!r} cannot be set in {level}; it belongs in {home}")
            raise DatasetError(f"{where}: unknown key {key!r}{suggestion(key, allowed)}")
        hint = _SUBSET_HINTS.get(key) or _DATASET_HINTS[key]
        out[key] = check_value(value, hint, f"{where}: {key}", DatasetError)
    return out


def defaults_from(config: DataConfig, default_resolution: int | tuple[int, int] | None) -> dict[str, Any]:
    """The lowest layer of the inheritance chain: DataConfig's values under their kohya names."""
    values = {k: getattr(config, k) for k in _INHERITED_SUBSET_KEYS + DATASET_KEYS if hasattr(config, k)}
    values["num_repeats"] = config.repeats
    values["drop_tags"] = list(config.drop_tags)
    values["resolution"] = config.resolution if config.resolution is not None else default_resolution
    return values


def normalize_resolution(value: Any, where: str) -> tuple[int, int]:
    if value is None:
        raise DatasetError(f"{where}: no resolution given (set resolution = 512, or [width, height])")
    width, height = (value, value) if isinstance(value, int) else tuple(value)
    return int(width), int(height)


def build_dataset(values: dict[str, Any], subsets: list[dict[str, Any]], where: str) -> DatasetConfig:
    """Make a DatasetConfig from merged values (already checked) and the merged values of each subset."""
    ds_values = {k: values[k] for k in DATASET_KEYS if k in values}
    ds_values["resolution"] = normalize_resolution(ds_values.get("resolution"), where)
    subset_objs = [SubsetConfig(**{k: v for k, v in s.items() if k in SUBSET_KEYS}) for s in subsets]
    return DatasetConfig(subsets=subset_objs, **ds_values)


def read_dataset_toml(path: str | Path, defaults: dict[str, Any]) -> list[DatasetConfig]:
    """Read kohya's ``--dataset_config`` TOML; relative ``image_dir`` are taken from the TOML's folder first.

    Errors name the file, the table (``[[datasets]] #1 [[datasets.subsets]] #2``) and the key.
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such dataset config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid TOML: {e}") from None
    for key in doc:
        if key not in ("general", "datasets"):
            raise DatasetError(f"{path}: unknown table {key!r}{suggestion(key, ['general', 'datasets'])}; "
                               "a dataset config has [general] and [[datasets]] with [[datasets.subsets]]")
    general = _check_table(doc.get("general", {}), _INHERITED_SUBSET_KEYS + DATASET_KEYS, "[general]",
                           f"{path} [general]")
    datasets_raw = doc.get("datasets")
    if not isinstance(datasets_raw, list) or not datasets_raw:
        raise DatasetError(f"{path}: no [[datasets]] table (each needs at least one [[datasets.subsets]] "
                           "with image_dir)")
    datasets = []
    for d, ds_raw in enumerate(datasets_raw, 1):
        where = f"{path} [[datasets]] #{d}"
        if not isinstance(ds_raw, dict):
            raise DatasetError(f"{where}: expected a table")
        ds_raw = dict(ds_raw)
        subsets_raw = ds_raw.pop("subsets", None)
        ds_values = _check_table(ds_raw, _INHERITED_SUBSET_KEYS + DATASET_KEYS, "[[datasets]]", where)
        if not isinstance(subsets_raw, list) or not subsets_raw:
            raise DatasetError(f"{where}: no [[datasets.subsets]] (each names an image_dir)")
        merged_ds = {**defaults, **general, **ds_values}
        subsets = []
        for s, sub_raw in enumerate(subsets_raw, 1):
            sub_where = f"{where} [[datasets.subsets]] #{s}"
            sub_values = _check_table(sub_raw, SUBSET_KEYS, "[[datasets.subsets]]", sub_where)
            if "image_dir" not in sub_values:
                raise DatasetError(f"{sub_where}: image_dir is required")
            merged = {**merged_ds, **sub_values}
            merged["image_dir"] = str(_resolve_dir(sub_values["image_dir"], path.parent))
            for key in ("conditioning_data_dir", "metadata_file"):  # relative: from the TOML's folder first
                if sub_values.get(key):
                    merged[key] = str(_resolve_dir(sub_values[key], path.parent))
            subsets.append(merged)
        datasets.append(build_dataset(merged_ds, subsets, where))
    return datasets


def _resolve_dir(image_dir: str, base: Path) -> Path:
    p = Path(image_dir).expanduser()
    if p.is_absolute():
        return p
    beside_toml = base / p
    # kohya takes relative paths from the working directory; lorakit prefers the TOML's folder (the config
    # then works from anywhere) and falls back to the working directory
    return beside_toml if beside_toml.exists() or not p.exists() else p.resolve()
