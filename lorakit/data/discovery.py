"""Finding the images: the three input forms, caption files, and the checks that run before training.

Input forms (``DataConfig.train_data``):

1. kohya layout: a parent folder of ``<repeats>_<trigger> <class>/`` folders (``10_zkz shape/``) holding
   images and same-stem caption files; an image without a caption file is captioned with the folder's
   ``<trigger> <class>``. Regularization images (``reg_data``) use the same layout (``1_shape/``).
2. a ``.toml`` file in kohya's ``--dataset_config`` format (see ``config.read_dataset_toml``).
3. a plain folder of images (and optional captions) plus ``trigger`` (and ``class_word``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.buckets import face_from_name
from lorakit.data.captions import CAPTION_TEMPLATES, base_caption, read_caption_file, template_caption
from lorakit.data.config import DataConfig, DatasetConfig, SubsetConfig, build_dataset, defaults_from, read_dataset_toml
from lorakit.data.errors import DatasetError, Problems
from lorakit.data.images import (
    IMAGE_EXTENSIONS,
    RESIZE_INTERPOLATIONS,
    is_image,
    is_transparent,
    probe,
    unreadable_image,
)
from lorakit.textfile import first_wrong_byte

KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
#: more repeats than this is a folder name that starts with a number by chance (a date: 20230101_photos)
MAX_REPEATS = 10_000
#: a year, then a month (and day): 2024_05_17, 2024_05 trip; read as kohya's name, 2024 repeats of "05_17"
_DATE_NAME = re.compile(r"^(19|20)\d\d_\d{1,2}(?:[_\-.]\d{1,2})?(?:\D|$)")
_EXPECTED_LAYOUT = (
    f"expected either images ({', '.join(IMAGE_EXTENSIONS)}) directly in the folder, with a trigger word, "
    "or kohya layout: subfolders named '<repeats>_<trigger> <class>' (such as '10_zkz shape/') holding the images"
)
_CAPTION_LIKE = (".txt", ".caption")
# pictures kohya does not train either (GIF, TIFF, phone and web formats): said, so that none is left out unawares
_UNTRAINED_PICTURES = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jfif", ".jp2", ".psd", ".svg")


@dataclass
class ImageRecord:
    """One image file as found on disk, with its prepared caption."""

    path: Path
    size: tuple[int, int]  # (width, height), upright
    caption: str  # after prefix/suffix, dropped tags and trigger injection; before per-step randomness
    has_caption_file: bool
    dataset: int
    subset: int  # index into the dataset's subsets
    is_reg: bool
    folder: str  # the image folder's name: the key of kohya's tag frequency
    mtime_ns: int
    file_size: int
    mask: Path | None = None  # its mask image in the folder's conditioning_data_dir (masked loss)
    face: tuple[int, int, int, int] | None = None  # face_crop_aug_range: (cx, cy, w, h) from its file name


def _subdirs(folder: Path) -> list[Path]:
    return [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def folder_phrase(folder: Path) -> str:
    """The ``<trigger> <class>`` words a ``<repeats>_<trigger> <class>`` folder names; "" for any other folder
    (hidden, no name after the number, or a number too large to be repeats: a date)."""
    match = KOHYA_FOLDER.match(folder.name)
    if folder.name.startswith(".") or not match or not_repeats(folder.name):
        return ""
    return match.group(2).strip()


def not_repeats(name: str) -> str | None:
    """Why the number a ``<number>_<rest>`` folder name starts with is no repeat count (a date), said for an error;
    None when it reads as one."""
    repeats = int(KOHYA_FOLDER.match(name).group(1))
    if repeats > MAX_REPEATS:
        return (f"the folder name asks for {repeats} repeats (the number before '_'), more than {MAX_REPEATS} (a "
                "date, or a number that is part of the name)")
    if _DATE_NAME.match(name):
        return (f"the folder name looks like a date, not '<repeats>_<name>' (read as kohya reads it: {repeats} "
                f"repeats of '{name.split('_', 1)[1]}'; on purpose? a dataset .toml with num_repeats says so)")
    return None


def kohya_names(parent: Path, part: str = "trigger") -> dict[str, list[str]]:
    """What the ``<repeats>_<trigger> <class>`` subfolders of a kohya-layout folder name: their triggers (the first
    word) or, with ``part="class"``, their class words (the rest), each with the subfolders that name it; {} for a
    folder that is not in kohya layout."""
    found: dict[str, list[str]] = {}
    if parent.is_dir():
        for folder in _subdirs(parent):
            words = folder_phrase(folder).split()
            name = (words[0] if part == "trigger" else " ".join(words[1:])) if words else ""
            if name:
                found.setdefault(name, []).append(folder.name)
    return found


def kohya_phrase(parent: str | Path) -> str | None:
    """The ``<trigger> <class>`` the first ``<repeats>_<trigger> <class>`` subfolder of ``parent`` names
    (``10_zkz shape`` -> ``zkz shape``): the words a kohya-layout image without a caption file is trained on, and
    what evaluation prompts say by default; ``None`` for a folder that is not in kohya layout."""
    parent = Path(parent)
    names = [folder_phrase(folder) for folder in _subdirs(parent)] if parent.is_dir() else []
    return next((name for name in names if name), None)


def kohya_subsets(parent: Path, is_reg: bool, defaults: dict, trigger: str | None, problems: Problems,
                  skip: Path | None = None) -> list[dict]:
    """Subset values for each ``N_name`` folder of ``parent``; badly named folders are reported."""
    subsets = []
    for folder in _subdirs(parent):
        if skip is not None and folder.resolve() == skip:
            continue
        match = KOHYA_FOLDER.match(folder.name)
        if not match or not match.group(2).strip():
            problems.error(f"{folder}: folder name does not match '<repeats>_<name>' (e.g. '10_zkz shape' for "
                           f"training or '1_shape' for regularization images); rename it or move it out of {parent}")
            continue
        repeats = int(match.group(1))
        if reason := not_repeats(folder.name):
            problems.error(f"{folder}: {reason}; rename it '<repeats>_<trigger> <class>' (e.g. '10_sks dog'), or "
                           f"train on it alone: --data {folder} --trigger WORD")
            continue
        if re.fullmatch(r"[\d_\-. ]+", match.group(2)):  # 05_17_2024: 5 repeats of "17_2024", a trigger of digits
            problems.warn(f"{folder}: read as {repeats} repeats of '{match.group(2).strip()}' ('<repeats>_<name>'), "
                          "a name of digits only: if the folder name is a date, rename it '<repeats>_<trigger> "
                          "<class>' (e.g. '10_sks dog')")
        subsets.append({**defaults, "image_dir": str(folder), "num_repeats": repeats,
                        "class_tokens": match.group(2).strip(), "is_reg": is_reg,
                        "trigger": None if is_reg else trigger})
    return subsets


def resolve_datasets(config: DataConfig, default_resolution: int | tuple[int, int] | None = None,
                     problems: Problems | None = None) -> list[DatasetConfig]:
    """The datasets and subsets described by ``config``, whatever its input form (nothing is read yet)."""
    problems = problems if problems is not None else Problems()
    if not config.train_data:
        raise DatasetError("no training data given: set train_data to a folder of images, a kohya-layout folder "
                           "or a dataset .toml file")
    defaults = defaults_from(config, default_resolution)
    source = Path(config.train_data).expanduser()
    if source.suffix.lower() == ".toml":
        if config.reg_data:
            raise DatasetError(f"{source}: reg_data ({config.reg_data}) is not used with a dataset config file; "
                               "add a [[datasets.subsets]] with is_reg = true instead")
        if config.validation_data:
            raise DatasetError(f"{source}: validation_data ({config.validation_data}) is not used with a dataset "
                               "config file; add a [[datasets.subsets]] with is_validation = true instead")
        if config.metadata_file:
            raise DatasetError(f"{source}: metadata_file ({config.metadata_file}) is not used with a dataset config "
                               "file; set metadata_file on its [[datasets.subsets]] instead")
        return read_dataset_toml(source, defaults)
    if not source.is_dir():
        raise DatasetError(f"{source}: no such folder" if not source.exists() else
                           f"{source}: expected a folder of images or a .toml dataset config, not a file")
    _refuse_run_folder(source)
    skip = Path(config.cache_dir).resolve() if config.cache_dir else None
    images = [p for p in sorted(source.iterdir()) if is_image(p)]
    kohya = [d for d in _subdirs(source) if KOHYA_FOLDER.match(d.name)]
    if kohya and images:
        raise DatasetError(f"{source}: holds both images ({images[0].name}, ...) and kohya folders "
                           f"({kohya[0].name}/, ...); in kohya layout every image must be inside a "
                           "'<repeats>_<trigger> <class>' folder, so move the loose images into one")
    if kohya and config.metadata_file:
        raise DatasetError(f"{source}: metadata_file ({config.metadata_file}) goes with a plain folder of images (as "
                           "kohya's --in_json); for kohya-layout folders set it on a subset of a dataset .toml")
    if kohya:
        subsets = kohya_subsets(source, False, defaults, config.trigger, problems, skip)
    elif images:
        tokens = " ".join(w for w in (config.trigger, config.class_word) if w) or None
        subsets = [{**defaults, "image_dir": str(source), "class_tokens": tokens, "trigger": config.trigger,
                    "metadata_file": config.metadata_file}]
    else:
        holding = [(d, sum(is_image(p) for p in d.iterdir())) for d in _subdirs(source)]
        holding = [(d, n) for d, n in holding if n]
        if holding:  # e.g. a folder named like a date: images, but not in a '<repeats>_<name>' folder
            d, n = holding[0]
            raise DatasetError(f"{source}: no images of its own and no '<repeats>_<trigger> <class>' folders, but "
                               f"{d.name}/ holds {n} image(s){' (and more subfolders)' if len(holding) > 1 else ''}: "
                               "rename it in kohya layout ('<repeats>_<trigger> <class>', e.g. '10_sks dog'), or "
                               f"train on it alone: --data {d} --trigger WORD")
        looked = ", ".join(f"{d.name}/" for d in _subdirs(source)) or "no subfolders"
        raise DatasetError(f"no images found in {source} (looked at the folder itself and its subfolders: "
                           f"{looked}); {_EXPECTED_LAYOUT}")
    if config.reg_data:
        reg = Path(config.reg_data).expanduser()
        if not reg.is_dir():
            raise DatasetError(f"{reg}: regularization folder not found")
        reg_subsets = kohya_subsets(reg, True, defaults, None, problems)
        if not reg_subsets and not problems.errors:
            raise DatasetError(f"{reg}: no '<repeats>_<class>' folders (such as '1_shape/') found; regularization "
                               "images use kohya layout")
        subsets += reg_subsets
    if config.validation_data:
        subsets += validation_subsets(Path(config.validation_data).expanduser(), source, defaults, config, problems)
    problems.raise_if_any(str(source))
    return [build_dataset(defaults, subsets, str(source))]


def _refuse_run_folder(source: Path) -> None:
    """A lorakit run's folder (or one inside it, such as its samples) given as training data: its pictures are
    sample grids, and its text files are no captions."""
    from lorakit.run_manifest import enclosing_run, is_lorakit_run

    run = source if is_lorakit_run(source) else enclosing_run(source)
    if run is not None:
        where = "a lorakit run's folder" if run == source else f"inside the lorakit run {run}"
        raise DatasetError(f"{source}: {where} (what a run wrote: its results, samples and settings), not images to "
                           "train on; give the folder of your images (kohya layout, or a plain folder with --trigger)")


def validation_subsets(folder: Path, source: Path, defaults: dict, config: DataConfig,
                       problems: Problems) -> list[dict]:
    """The subsets of ``validation_data``: a kohya-layout folder (its folders' repeats are not used) or a plain
    folder of images, in the training data's caption rules; every image held out."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: validation folder not found" if not folder.exists() else
                           f"{folder}: validation_data must be a folder of images, not a file")
    if folder.resolve() == source.resolve() or source.resolve() in folder.resolve().parents:
        raise DatasetError(f"{folder}: validation_data is (inside) the training folder {source}: its images "
                           "would be trained on; keep held-out images in a folder of their own")
    if any(is_image(p) for p in folder.iterdir()):
        tokens = " ".join(w for w in (config.trigger, config.class_word) if w) or None
        subsets = [{**defaults, "image_dir": str(folder), "class_tokens": tokens, "trigger": config.trigger}]
    else:
        subsets = kohya_subsets(folder, False, defaults, config.trigger, problems)
        if not subsets and not problems.errors:
            raise DatasetError(f"{folder}: validation_data holds no images and no '<repeats>_<trigger> <class>' "
                               "folders")
    return [{**s, "is_validation": True} for s in subsets]


def _check_subset(subset: SubsetConfig, where: Path, problems: Problems) -> None:
    if subset.num_repeats > MAX_REPEATS:
        problems.error(f"{where}: {subset.num_repeats} repeats is more than {MAX_REPEATS}; use fewer")
    if subset.num_repeats < 1:
        problems.error(f"{where}: {subset.num_repeats} repeats: its images would never be trained; use at least 1 "
                       "(or move the folder out)")
    if subset.caption_templates is not None and subset.caption_templates not in CAPTION_TEMPLATES:
        problems.error(f"{where}: caption_templates {subset.caption_templates!r} is not one of "
                       f"{', '.join(CAPTION_TEMPLATES)}")
    if subset.resize_interpolation is not None and subset.resize_interpolation not in RESIZE_INTERPOLATIONS:
        problems.error(f"{where}: resize_interpolation {subset.resize_interpolation!r} is not one of "
                       f"{', '.join(RESIZE_INTERPOLATIONS)}")
    if subset.is_reg and subset.is_validation:
        problems.error(f"{where}: is_reg and is_validation: a folder is either regularization images or held-out "
                       "images of the concept; choose one")
    if subset.alpha_mask and subset.conditioning_data_dir:
        problems.error(f"{where}: alpha_mask and conditioning_data_dir both give the loss mask; choose one")
    face_range = subset.face_crop_aug_range
    if face_range is not None and not (len(face_range) == 2 and 0 < face_range[0] <= face_range[1]):
        problems.error(f"{where}: face_crop_aug_range must be [min, max] with 0 < min <= max, not {list(face_range)}")
    if subset.token_warmup_min < 0 or subset.token_warmup_step < 0:
        problems.error(f"{where}: token_warmup_min and token_warmup_step must be 0 or more")
    if subset.keep_tokens < 0:
        problems.error(f"{where}: keep_tokens must be 0 or more, not {subset.keep_tokens}")
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(subset, name) <= 1.0:
            problems.error(f"{where}: {name} must be between 0 and 1, not {getattr(subset, name)}")
    for name in ("keep_tokens_separator", "secondary_separator"):
        value = getattr(subset, name)
        if value and value.strip() in ("", subset.caption_separator.strip()):
            problems.error(f"{where}: {name} = {value!r} would split every caption at its tags or spaces; use "
                           f"a mark that never appears in a caption (kohya's guides: "
                           f"{'|||' if name == 'keep_tokens_separator' else ';;;'})")
    if subset.keep_tokens_separator and subset.keep_tokens_separator == subset.secondary_separator:
        problems.error(f"{where}: keep_tokens_separator and secondary_separator are both "
                       f"{subset.keep_tokens_separator!r}; they mean different things")
    if (subset.shuffle_caption and subset.keep_tokens == 0 and not subset.keep_tokens_separator
            and subset.effective_trigger and subset.inject_trigger):
        problems.warn(f"{where}: shuffle_caption with keep_tokens = 0 moves the trigger "
                      f"{subset.effective_trigger!r} around the caption; set keep_tokens = 1 to keep it first")


def _extension(ext: str) -> str:
    ext = ext.strip()
    return ext if ext.startswith(".") else f".{ext}"


def _warn_nested_images(folder: Path, listing: Sequence[Path], problems: Problems) -> None:
    """Images one folder down are not trained (kohya reads an image folder's own files only): say so, rather than
    train on fewer images than the user put there.  Links to folders are not followed (one may loop)."""
    nested = {}
    for sub in listing:
        if sub.is_dir() and not sub.is_symlink():
            count = sum(1 for p in sub.iterdir() if is_image(p))  # is_image: files only
            if count:
                nested[sub.name] = count
    if nested:
        total = sum(nested.values())
        where = ", ".join(f"{name}/ holds {n}" for name, n in list(nested.items())[:5])
        problems.warn(f"{folder}: {total} {'image' if total == 1 else 'images'} in folders inside it not trained "
                      f"({where}{', ...' if len(nested) > 5 else ''}): only "
                      "an image folder's own files are read; move them up, or give them a folder of their own "
                      "beside it")


def scan_subset(subset: SubsetConfig, dataset: int, index: int, config: DataConfig,
                problems: Problems) -> list[ImageRecord]:
    """Read one image folder: every image checked, every caption read; problems collected, not raised."""
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        problems.error(f"{folder}: image folder not found")
        return []
    _check_subset(subset, folder, problems)
    entries, images = _folder_images(folder, problems)
    if not images:
        return []
    ext = _extension(subset.caption_extension)
    if subset.metadata_file:  # kohya's fine-tuning layout: the JSON lists the images and holds the captions
        images, from_json = _metadata_captions(Path(subset.metadata_file), folder, images, subset, problems)
        if not images:
            return []
        captions: dict[str, Path] = {}
    else:
        from_json = None
        captions = _caption_files(folder, entries, images, ext, config, problems)
    templates = template_caption(subset)
    if subset.caption_templates in CAPTION_TEMPLATES and subset.templated and templates is None:
        problems.error(f"{folder}: caption_templates = {subset.caption_templates!r} fills its templates with the "
                       "folder's trigger, and this folder names none: name it '<repeats>_<trigger> <class>', or give "
                       "a trigger (--trigger)")
    records, multiline, empty, no_file = [], [], [], []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        probed = list(pool.map(lambda p: _try_probe(p, config.verify_images), images))
    for image, size in zip(images, probed, strict=True):
        if isinstance(size, Exception):  # Pillow raises many types (OSError, SyntaxError, DecompressionBomb...)
            problems.error(unreadable_image(image, size))
            continue
        raw = None
        caption_path = captions.get(image.stem)
        if templates is not None:  # kohya's use_object/style_template: the captions are not read
            stat = image.stat()
            records.append(ImageRecord(image, size, templates, False, dataset, index, subset.is_reg, folder.name,
                                       stat.st_mtime_ns, stat.st_size))
            continue
        if from_json is not None:
            raw = from_json[image] or None
        elif caption_path is None:
            no_file.append(image.name)
        else:
            try:
                lines = read_caption_file(caption_path)
            except UnicodeDecodeError as e:
                problems.error(f"{caption_path}: caption file is not UTF-8 text ({first_wrong_byte(e)}); save it as "
                               "UTF-8")
                continue
            if len(lines) > 1 and not subset.enable_wildcard:
                multiline.append(caption_path.name)
            text = "\n".join(lines) if subset.enable_wildcard else "".join(lines[:1])
            if text:
                raw = text
            else:
                empty.append(caption_path.name)
        stat = image.stat()
        records.append(ImageRecord(image, size, base_caption(raw, subset), raw is not None, dataset, index,
                                   subset.is_reg, folder.name, stat.st_mtime_ns, stat.st_size))
    if subset.conditioning_data_dir:
        _find_masks(records, Path(subset.conditioning_data_dir), folder, config.verify_images, problems)
    if subset.face_crop_aug_range is not None:
        records[:] = [dataclasses.replace(r, face=face_from_name(r.path)) for r in records]
        if records and not any(r.face for r in records):
            problems.warn(f"{folder}: face_crop_aug_range is set, but no image name ends in a face position "
                          "(<name>_<cx>_<cy>_<w>_<h>, as kohya's detect_face_rotate writes them): nothing is cropped "
                          "around a face")
    if multiline:
        problems.warn(f"{folder}: only the first line of multi-line caption files is used (enable_wildcard = true "
                      f"draws one line per step): {_some(multiline)}")
    _warn_about_captions(subset, folder, records, empty, no_file, ext, problems)
    if subset.alpha_mask and records and not any(is_transparent(r.path) for r in records):
        problems.warn(f"{folder}: alpha_mask is on, but none of its images has transparency (an alpha channel): "
                      "their loss is not masked")
    return records


def _folder_images(folder: Path, problems: Problems) -> tuple[list[Path], list[Path]]:
    """The folder's files and, among them, the images it trains (none: an error); what it holds that is not
    trained (broken links, other picture formats, images in folders inside it) is said."""
    listing = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    entries = [p for p in listing if p.is_file()]
    # a link to nowhere (or a link loop) is not a file: say so rather than train on fewer images unawares
    dead = [p.name for p in listing if p.is_symlink() and not p.exists()]
    if dead:
        problems.warn(f"{folder}: skipped symbolic links that lead to no file (broken or looping): {_some(dead)}")
    images = [p for p in entries if is_image(p)]
    _warn_nested_images(folder, listing, problems)
    untrained = [p.name for p in entries if p.suffix.lower() in _UNTRAINED_PICTURES]
    if images and untrained:
        one = len(untrained) == 1
        problems.warn(f"{folder}: {len(untrained)} {'picture' if one else 'pictures'} in a format not trained (only "
                      f"{', '.join(IMAGE_EXTENSIONS)} are) left out: {_some(untrained)}; save "
                      f"{'it' if one else 'them'} as PNG to train {'it' if one else 'them'}")
    if not images:
        others = ", ".join(p.name for p in entries[:5]) or "the folder is empty"
        problems.error(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder (found: {others})")
    return entries, images


def _caption_files(folder: Path, entries: list[Path], images: list[Path], ext: str, config: DataConfig,
                   problems: Problems) -> dict[str, Path]:
    """The caption files beside the images, by image stem; one without its image is an error (or a warning, with
    orphan_captions = 'warn'), and captions of another extension next to the images are pointed out."""
    captions = {p.stem: p for p in entries if p.suffix.lower() == ext.lower()}
    stems = {p.stem for p in images}
    by_lower = {image.stem.lower(): image for image in images}
    for stem, path in captions.items():
        if stem in stems:
            continue
        alike = by_lower.get(stem.lower())
        if alike is not None:  # made on a case-blind disk (Windows, macOS): names here are matched by case
            message = (f"{path}: caption file without an image: the image {alike.name} differs from it only in "
                       f"letter case, and names are matched with their case; rename the caption "
                       f"{alike.stem}{path.suffix}")
        elif untrained := [p.name for p in entries if p.stem == stem and p.suffix.lower() in _UNTRAINED_PICTURES]:
            message = (f"{path}: caption file of {untrained[0]}, a picture in a format not trained (only "
                       f"{', '.join(IMAGE_EXTENSIONS)} are); save it as {stem}.png to train it, or remove the caption")
        else:
            message = (f"{path}: caption file without an image (no {stem}{{{','.join(IMAGE_EXTENSIONS)}}} in "
                       f"{folder}); remove or rename it")
        if config.orphan_captions == "warn":
            problems.warn(message)
        else:
            problems.error(message + " (or set orphan_captions = 'warn')")
    if not captions:
        other = [p for p in entries if p.suffix.lower() in _CAPTION_LIKE and p.stem in stems]
        if other:
            problems.warn(f"{folder}: no '{ext}' caption files, but {len(other)} '{other[0].suffix}' files next to "
                          f"the images (e.g. {other[0].name}) are ignored; set caption_extension = "
                          f"'{other[0].suffix}' if they are the captions")
    return captions


def _warn_about_captions(subset: SubsetConfig, folder: Path, records: list[ImageRecord], empty: list[str],
                         no_file: list[str], ext: str, problems: Problems) -> None:
    """What the images were captioned with, where it is likely not what the user meant: an empty caption file, a
    caption file missing among captioned images, a trigger shuffle_caption moves, no caption text at all."""
    # what an image without a caption of its own is trained with; when that is nothing, the last warning says it
    fallback = base_caption(None, subset)
    if empty and fallback:
        problems.warn(f"{folder}: empty caption files, trained with the caption {fallback!r} instead: {_some(empty)}")
    if no_file and len(no_file) < len(records) and not subset.is_reg and fallback:
        # a folder that is captioned file by file and misses some: more often a lost or misnamed .txt than a
        # choice (a folder with no caption files at all uses the folder's caption on purpose, as in kohya)
        has, are = ("has", "is") if len(no_file) == 1 else ("have", "are")
        problems.warn(f"{folder}: {len(no_file)} of {len(records)} images {has} no caption file (<image name>{ext}) "
                      f"and {are} trained with the caption {fallback!r}: {_some(no_file)}")
    sep = subset.keep_tokens_separator
    if (sep and subset.shuffle_caption and subset.keep_tokens == 0 and subset.effective_trigger
            and subset.inject_trigger and not subset.is_reg):
        # such a caption falls back to keep_tokens (kohya's rule), and nothing keeps its trigger in front
        loose = [r.path.name for r in records if r.caption and sep not in r.caption]
        if loose:
            problems.warn(f"{folder}: {len(loose)} of {len(records)} captions have no {sep!r}, so shuffle_caption "
                          f"moves their trigger {subset.effective_trigger!r} around (keep_tokens = 0); put {sep!r} "
                          f"after the trigger or set keep_tokens = 1: {_some(loose)}")
    uncaptioned = [r.path.name for r in records if not r.caption]
    if uncaptioned and not subset.is_reg:
        where = (f"none in {subset.metadata_file}" if subset.metadata_file else
                 f"no <image name>{ext} caption file, or an empty one")
        problems.warn(f"{folder}: {len(uncaptioned)} of {len(records)} images have no caption text ({where}) and the "
                      f"folder names no trigger or class: trained with an empty caption: {_some(uncaptioned)}")


def _metadata_captions(path: Path, folder: Path, images: list[Path], subset: SubsetConfig,
                       problems: Problems) -> tuple[list[Path], dict[Path, str]]:
    """The images kohya's metadata JSON lists (a key is an image path, or its name in ``folder`` with or
    without extension) and each one's caption as kohya makes it: "caption", then the "tags" after the caption
    separator (with enable_wildcard: after each line of the caption).  Errors name the file and the keys."""
    try:
        metadata = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        problems.error(f"{path}: metadata_file not found")
        return [], {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.error(f"{path}: cannot read this metadata file ({err})")
        return [], {}
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in metadata.values()):
        problems.error(f"{path}: expected a JSON object {{image: {{\"caption\": ..., \"tags\": ...}}}}")
        return [], {}
    by_name = {p.name: p for p in images} | {p.stem: p for p in images}
    listed, captions, missing = [], {}, []
    for key, entry in metadata.items():
        image = Path(key) if Path(key).is_file() and is_image(Path(key)) else by_name.get(Path(key).name)
        if image is None:
            missing.append(key)
            continue
        caption, tags = entry.get("caption"), entry.get("tags")
        if not all(v is None or isinstance(v, str) for v in (caption, tags)):
            problems.error(f"{path}: {key!r}: \"caption\" and \"tags\" must be text")
            continue
        if caption is None:
            caption, tags = tags, None
        sep = subset.caption_separator
        if tags:
            tags = tags.replace("\n", sep) if subset.enable_wildcard else tags
            caption = "\n".join(f"{line}{sep}{tags}" for line in caption.split("\n") if line.strip()) \
                if subset.enable_wildcard else f"{caption}{sep}{tags}"
        if image not in captions:
            listed.append(image)
        captions[image] = str(caption or "").strip()
    if missing:
        name = "1 entry names" if len(missing) == 1 else f"{len(missing)} entries name"
        problems.error(f"{path}: {name} no image in {folder}: {_some(missing)}")
    unlisted = [p.name for p in images if p not in captions]
    if unlisted and not missing:
        are = "1 image is" if len(unlisted) == 1 else f"{len(unlisted)} images are"
        problems.warn(f"{folder}: {are} not in its metadata_file {path.name} and not trained: {_some(unlisted)}")
    return listed, captions


def _find_masks(records: list[ImageRecord], mask_dir: Path, folder: Path, verify: bool, problems: Problems) -> None:
    """Give each record its mask image (the same stem in ``mask_dir``, as kohya pairs conditioning images); a
    missing, unreadable or differently sized mask is an error naming the files."""
    if not mask_dir.is_dir():
        problems.error(f"{folder}: conditioning_data_dir {mask_dir} is not a folder")
        return
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if is_image(p)}
    missing = []
    for i, rec in enumerate(records):
        mask = masks.get(rec.path.stem)
        if mask is None:
            missing.append(rec.path.name)
            continue
        size = _try_probe(mask, verify)
        if isinstance(size, Exception):
            problems.error(f"{mask}: cannot read this mask image ({type(size).__name__}: {size})")
        elif size != rec.size:
            problems.error(f"{mask}: the mask is {size[0]}×{size[1]}, its image {rec.path} is {rec.size[0]}×"
                           f"{rec.size[1]}; a mask must have its image's size")
        else:
            records[i] = dataclasses.replace(rec, mask=mask)
    if missing:
        have = "1 image has" if len(missing) == 1 else f"{len(missing)} images have"
        problems.error(f"{folder}: {have} no mask image of the same name in {mask_dir} (conditioning_data_dir): "
                       f"{_some(missing)}")


def _try_probe(path: Path, verify: bool) -> tuple[int, int] | Exception:
    try:
        return probe(path, verify=verify)
    except Exception as e:
        return e


def _some(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
