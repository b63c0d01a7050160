"""lorakit.data discovery: kohya layout, dataset TOML inheritance, plain folder + trigger, and bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from data_helpers import data, make_folder, make_image

from lorakit.data import DataConfig, DatasetError, DatasetWarning, TrainingData, resolve_datasets
from lorakit.data.dataset import cut_share


def warned(path, **options) -> str:
    """All DatasetWarnings raised while reading, as one string."""
    options.setdefault("resolution", 64)
    with pytest.warns(DatasetWarning) as record:
        TrainingData(DataConfig(train_data=str(path), **options), seed=0)
    return "\n".join(str(w.message) for w in record)


def error(path, **options) -> str:
    options.setdefault("resolution", 64)
    with pytest.raises(DatasetError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        TrainingData(DataConfig(train_data=str(path), **options), seed=0)
    return str(info.value)


# --------------------------------------------------------------------------------------------- kohya layout
def test_kohya_layout_repeats_triggers_and_folder_captions(tmp_path):
    make_folder(tmp_path / "10_zkz shape", 3, captions={0: "a red circle, on white", 1: "zkz shape, blue"})
    make_folder(tmp_path / "5_qqw thing", 2)
    d = data(tmp_path)
    assert d.num_train_images == 3 * 10 + 2 * 5 == d.samples_per_epoch
    assert d.num_reg_images == 0
    by_name = {(r.folder, r.path.name): r.caption for r in d.records}
    assert by_name[("10_zkz shape", "000.png")] == "zkz shape, a red circle, on white"  # trigger injected
    assert by_name[("10_zkz shape", "001.png")] == "zkz shape, blue"  # already there: unchanged
    assert by_name[("10_zkz shape", "002.png")] == "zkz shape"  # no caption file: the folder's name
    assert by_name[("5_qqw thing", "000.png")] == "qqw thing"
    assert [d.subset_of(r).effective_trigger for r in d.records] == ["zkz"] * 3 + ["qqw"] * 2
    assert d.tag_frequency == {"10_zkz shape": {"zkz shape": 3, "a red circle": 1, "on white": 1, "blue": 1},
                               "5_qqw thing": {"qqw thing": 2}}
    summary = d.summary()
    assert "2 folders, 5 images" in summary and "= 40 samples/epoch" in summary and "0 reg images" in summary
    assert "64×64 (5)" in summary


def test_kohya_phrase_is_what_the_first_training_folder_names(tmp_path):
    from lorakit.data.discovery import kohya_names, kohya_phrase

    assert kohya_phrase(tmp_path) is None  # no subfolders
    (tmp_path / ".0_hidden thing").mkdir()  # hidden, as the trainer skips it
    (tmp_path / "20230101_photos").mkdir()  # a date, not repeats: the trainer refuses it
    (tmp_path / "2024_05_17").mkdir()  # so is this one (not 2024 repeats of "05_17")
    (tmp_path / "3_").mkdir()  # no name
    (tmp_path / "notes").mkdir()
    assert kohya_phrase(tmp_path) is None
    (tmp_path / "5_ohwx dog").mkdir()
    (tmp_path / "7_zkz shape").mkdir()
    assert kohya_phrase(tmp_path) == "ohwx dog"  # the first in sorted order, trigger and class
    assert kohya_names(tmp_path) == {"ohwx": ["5_ohwx dog"], "zkz": ["7_zkz shape"]}
    assert kohya_phrase(tmp_path / "5_ohwx dog") is None  # an image folder itself
    assert kohya_phrase(tmp_path / "missing") is None


def test_caption_extension_is_configurable(tmp_path):
    folder = make_folder(tmp_path / "2_zkz", 2, captions={0: "zkz, star", 1: "zkz, cross"}, ext=".caption")
    (folder / "000.txt").write_text("not the caption")
    d = data(tmp_path, caption_extension=".caption")
    assert [r.caption for r in d.records] == ["zkz, star", "zkz, cross"]
    d = data(tmp_path, caption_extension="caption")  # without the dot
    assert [r.caption for r in d.records] == ["zkz, star", "zkz, cross"]


def test_caption_files_with_another_extension_are_pointed_out(tmp_path):
    make_folder(tmp_path / "2_zkz", 2, captions={0: "zkz, star", 1: "zkz, cross"}, ext=".caption")
    message = warned(tmp_path)
    assert "caption_extension = '.caption'" in message and "2_zkz" in message


def test_trigger_option_overrides_folder_and_injection_can_be_off(tmp_path):
    make_folder(tmp_path / "1_zkz shape", 1, captions={0: "a star"})
    assert data(tmp_path, trigger="qqw").records[0].caption == "qqw, a star"
    assert data(tmp_path, inject_trigger=False).records[0].caption == "a star"


def test_reg_data_dir_in_kohya_layout(tmp_path):
    make_folder(tmp_path / "train" / "10_zkz shape", 2)
    make_folder(tmp_path / "reg" / "1_shape", 4, captions={0: "a shape, blue"})
    d = data(tmp_path / "train", reg_data=str(tmp_path / "reg"))
    reg = [r for r in d.records if r.is_reg]
    assert len(reg) == 4 and d.num_reg_images == 4
    assert [r.caption for r in reg] == ["a shape, blue", "shape", "shape", "shape"]  # never a trigger
    assert d.reg_samples_per_epoch == d.num_train_images == 20


def test_plain_folder_with_trigger(tmp_path):
    make_folder(tmp_path / "photos", 3, captions={0: "a star on grass", 2: "zkz star, at night"})
    d = data(tmp_path / "photos", trigger="zkz", class_word="star", repeats=4)
    assert [r.caption for r in d.records] == ["zkz star, a star on grass", "zkz star", "zkz star, at night"]
    assert d.num_train_images == 12
    assert d.tag_frequency == {"photos": {"zkz star": 3, "a star on grass": 1, "at night": 1}}


def test_a_captioned_folder_missing_some_caption_files_is_named(tmp_path):
    """Most images captioned, one .txt missing: said with the caption the image gets instead; a folder with no
    caption files at all (the folder's caption on purpose, as in kohya) is not warned about."""
    make_folder(tmp_path / "a" / "5_ohwx dog", 3, captions={0: "ohwx dog, red ball", 2: "ohwx dog, grass"})
    message = warned(tmp_path / "a")
    assert "1 of 3 images has no caption file (<image name>.txt)" in message
    assert "the caption 'ohwx dog'" in message and "001.png" in message
    make_folder(tmp_path / "b" / "5_ohwx dog", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        TrainingData(DataConfig(train_data=str(tmp_path / "b"), resolution=64), seed=0)


def test_plain_folder_without_trigger_or_captions_warns_about_empty_captions(tmp_path):
    make_folder(tmp_path / "photos", 2)
    assert "empty caption" in warned(tmp_path / "photos")


def test_images_left_without_caption_text_are_said_once_with_why(tmp_path):
    """A TOML subset without class_tokens, one caption file empty and one missing: it said "the folder's caption
    None is used", then named the same images twice more (one of them "with no caption file" while it had one)."""
    make_folder(tmp_path / "imgs", 3, captions={0: "ohwx dog, red ball", 1: ""})
    config = tmp_path / "ds.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "imgs"}"\n')
    said = [line for line in warned(config).splitlines() if "caption" in line]
    assert said == [f"{tmp_path / 'imgs'}: 2 of 3 images have no caption text (no <image name>.txt caption file, or an "
                    "empty one) and the folder names no trigger or class: trained with an empty caption: 001.png, "
                    "002.png"]
    make_folder(tmp_path / "a" / "5_ohwx dog", 3, captions={0: "ohwx dog, red ball", 1: ""})  # words to fall back on
    message = warned(tmp_path / "a")
    assert "empty caption files, trained with the caption 'ohwx dog' instead: 001.txt" in message
    assert "1 of 3 images has no caption file (<image name>.txt) and is trained with the caption 'ohwx dog'" in message
    assert "no caption text" not in message


def test_hidden_files_and_folders_are_skipped(tmp_path):
    make_folder(tmp_path / "1_zkz", 1)
    (tmp_path / "1_zkz" / "._000.png").write_bytes(b"mac resource fork")
    (tmp_path / ".cache").mkdir()
    assert len(data(tmp_path).records) == 1


def test_pictures_in_formats_not_trained_are_named_not_silently_left_out(tmp_path):
    """A GIF or a phone's HEIC among the PNGs is not trained (nor by kohya); the user is told which."""
    folder = make_folder(tmp_path / "3_zkz", 2)
    make_image(folder / "clip.gif")
    (folder / "IMG_0001.HEIC").write_bytes(b"not decoded")
    message = warned(tmp_path)
    assert "2 pictures in a format not trained" in message
    assert "IMG_0001.HEIC, clip.gif" in message and "save them as PNG" in message
    assert len(data(tmp_path).records) == 2
    (folder / "IMG_0001.HEIC").unlink()
    assert "1 picture in a format not trained (only .png" in warned(tmp_path)
    # its caption is not "without an image": the picture is there, in a format not trained
    (folder / "clip.txt").write_text("zkz, a clip")
    message = error(tmp_path)
    assert "clip.txt: caption file of clip.gif, a picture in a format not trained" in message
    assert "save it as clip.png" in message and "without an image" not in message


# ----------------------------------------------------------------------------------------------- TOML
TOML = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1
resolution = 64
enable_bucket = true
bucket_reso_steps = 8

[[datasets]]
batch_size = 2
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'hoge'
  class_tokens = 'zkz shape'
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = 'fuga'
  class_tokens = 'qqw thing'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg'
  class_tokens = 'shape'
  keep_tokens = 1

[[datasets]]
resolution = [64, 48]
enable_bucket = false
cache_info = true

  [[datasets.subsets]]
  image_dir = 'hoge'
  caption_dropout_rate = 0.25
  custom_attributes = { diff_output_preservation = true }  # kohya's FLUX scripts read it, its SD scripts do not
"""


def test_toml_inheritance_general_dataset_subset(tmp_path):
    for name in ("hoge", "fuga", "reg"):
        make_folder(tmp_path / name, 2)
    path = tmp_path / "dataset.toml"
    path.write_text(TOML)
    config = DataConfig(train_data=str(path), caption_tag_dropout_rate=0.1, flip_aug=True)
    first, second = resolve_datasets(config)
    assert (first.resolution, first.batch_size, first.enable_bucket, first.bucket_reso_steps) == ((64, 64), 2, True, 8)
    hoge, fuga, reg = first.subsets
    assert hoge.keep_tokens == 2 and fuga.keep_tokens == 3 and reg.keep_tokens == 1  # dataset, subset, subset
    assert hoge.shuffle_caption and reg.shuffle_caption  # from [general]
    assert hoge.caption_tag_dropout_rate == 0.1 and hoge.flip_aug  # from DataConfig (kohya's command line)
    assert (hoge.num_repeats, fuga.num_repeats) == (3, 1)
    assert Path(hoge.image_dir) == tmp_path / "hoge"  # relative to the TOML's folder
    assert reg.is_reg and not hoge.is_reg and reg.effective_trigger is None
    assert (second.resolution, second.batch_size, second.enable_bucket) == ((64, 48), 1, False)
    assert second.subsets[0].keep_tokens == 1 and second.subsets[0].caption_dropout_rate == 0.25
    assert second.subsets[0].class_tokens is None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        d = TrainingData(config, seed=0)
    assert d.num_train_images == 2 * 3 + 2 + 2  # two datasets; reg images balanced inside the first
    assert d.reg_samples_per_epoch == 8
    assert {plan.bucket for plan in d.epoch_plan(0) if plan.dataset == 1} == {(64, 48)}


def _toml_error(tmp_path, text: str) -> str:
    make_folder(tmp_path / "hoge", 1)
    path = tmp_path / "my_dataset.toml"
    path.write_text(text)
    with pytest.raises(DatasetError) as info:
        resolve_datasets(DataConfig(train_data=str(path)))
    return str(info.value)


def test_toml_unknown_key_names_key_file_and_suggestion(tmp_path):
    message = _toml_error(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'hoge'\nnum_repeat = 3\n")
    assert "my_dataset.toml" in message and "'num_repeat'" in message and "did you mean 'num_repeats'" in message
    message = _toml_error(tmp_path, "[general]\nshufle_caption = true\n[[datasets]]\n[[datasets.subsets]]\n"
                                    "image_dir = 'hoge'\n")
    assert "[general]" in message and "did you mean 'shuffle_caption'" in message


@pytest.mark.parametrize("text, expected", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'hoge'\nresolution = 512\n", "belongs in [general] or"),
    ("[general]\nimage_dir = 'hoge'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'hoge'\n",
     "belongs in [[datasets.subsets]]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'hoge'\ncustom_attributes = 3\n",
     "custom_attributes: expected a table"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'hoge'\nnum_repeats = 'ten'\n", "expected int"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'hoge'\nshuffle_caption = 1\n", "expected bool"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "image_dir is required"),
    ("[[datasets]]\nbatch_size = 2\n", "no [[datasets.subsets]]"),
    ("[dataset]\n", "did you mean 'datasets'"),
    ("[[datasets]\n", "not valid TOML"),
])
def test_toml_errors(tmp_path, text, expected):
    message = _toml_error(tmp_path, text)
    assert expected in message and "my_dataset.toml" in message


def test_toml_zero_repeats_and_missing_folder(tmp_path):
    make_folder(tmp_path / "hoge", 1)
    path = tmp_path / "d.toml"
    path.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'hoge'\nnum_repeats = 0\n"
                    "[[datasets.subsets]]\nimage_dir = 'nothere'\n")
    message = error(path)
    assert "hoge: 0 repeats" in message and "nothere: image folder not found" in message


# -------------------------------------------------------------------------------------------- bad input
def test_empty_parent_folder_says_where_it_looked_and_what_it_expected(tmp_path):
    (tmp_path / "zkz").mkdir()
    message = error(tmp_path)
    assert str(tmp_path) in message and "zkz/" in message and "'<repeats>_<trigger> <class>'" in message


def test_images_in_a_folder_named_like_a_date_are_pointed_at(tmp_path):
    """`--data photos` where the images sit in photos/2024-01-01/: not kohya layout, and not "no images"."""
    make_folder(tmp_path / "2024-01-01", 3)
    message = error(tmp_path)
    assert "2024-01-01/ holds 3 image(s)" in message and "'<repeats>_<trigger> <class>'" in message
    assert f"--data {tmp_path / '2024-01-01'} --trigger WORD" in message


@pytest.mark.parametrize("name", ["2024_05_17", "2024_05", "1999_12_31 party", "2023_1-2"])
def test_a_folder_named_like_a_date_with_underscores_is_not_read_as_2024_repeats(tmp_path, name):
    """`photos/2024_05_17/` (a camera's export) matched '<repeats>_<name>': 2024 repeats of '05_17', 4048 steps an
    epoch for two images, said nowhere but in the step count."""
    make_folder(tmp_path / name, 2)
    message = error(tmp_path)
    assert f"{tmp_path / name}: the folder name looks like a date, not '<repeats>_<name>'" in message
    assert f"--data {tmp_path / name} --trigger WORD" in message


@pytest.mark.parametrize("name", ["2000_zkz shape", "20_05 dog", "1_2024_05_17"])
def test_repeats_that_only_look_a_little_like_a_date_are_repeats(tmp_path, name):
    make_folder(tmp_path / name, 1)
    assert len(data(tmp_path).records) == 1


def test_a_name_of_digits_only_is_trained_but_said(tmp_path):
    """05_17_2024 (a US date) reads as 5 repeats of '17_2024': kohya's reading, kept, with a word."""
    make_folder(tmp_path / "05_17_2024", 1)
    assert "05_17_2024: read as 5 repeats of '17_2024' ('<repeats>_<name>'), a name of digits only" in warned(
        tmp_path)
    assert len(data(tmp_path).records) == 1


def test_kohya_folder_without_images(tmp_path):
    make_folder(tmp_path / "10_zkz shape", 2)
    (tmp_path / "3_empty one").mkdir()
    (tmp_path / "3_empty one" / "notes.md").write_text("x")
    message = error(tmp_path)
    assert "3_empty one" in message and "no images" in message and "notes.md" in message


def test_corrupt_and_truncated_images_are_all_named(tmp_path):
    folder = make_folder(tmp_path / "10_zkz", 2)
    (folder / "garbage.png").write_bytes(b"this is not a png")
    good = (folder / "000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    message = error(tmp_path)
    assert "garbage.png" in message and "truncated.png" in message and "2 problems" in message


def test_truncated_jpeg_is_caught_at_discovery(tmp_path):
    from data_helpers import make_noise_image

    folder = tmp_path / "1_zkz"
    jpg = make_noise_image(folder / "photo.jpg")
    blob = jpg.read_bytes()
    jpg.write_bytes(blob[: len(blob) // 2])
    assert "photo.jpg" in error(tmp_path)


def test_caption_without_image_is_an_error_or_a_warning(tmp_path):
    folder = make_folder(tmp_path / "10_zkz", 1)
    (folder / "lost.txt").write_text("zkz, caption of a deleted image")
    message = error(tmp_path)
    assert "lost.txt" in message and "without an image" in message
    assert "lost.txt" in warned(tmp_path, orphan_captions="warn")


def test_folder_name_not_matching_kohya_pattern(tmp_path):
    make_folder(tmp_path / "10_zkz shape", 1)
    make_folder(tmp_path / "zkz extra", 1)
    make_folder(tmp_path / "5_", 1)
    message = error(tmp_path)
    assert "zkz extra" in message and "'<repeats>_<name>'" in message and "5_" in message


def test_zero_repeats_folder(tmp_path):
    make_folder(tmp_path / "0_zkz shape", 1)
    message = error(tmp_path)
    assert "0_zkz shape" in message and "0 repeats" in message


def test_loose_images_next_to_kohya_folders(tmp_path):
    make_folder(tmp_path / "10_zkz shape", 1)
    make_image(tmp_path / "stray.png")
    message = error(tmp_path)
    assert "stray.png" in message and "10_zkz shape" in message


def test_caption_not_utf8(tmp_path):
    folder = make_folder(tmp_path / "1_zkz", 1)
    (folder / "000.txt").write_bytes("zkz, caf\xe9".encode("latin-1"))
    assert "000.txt" in error(tmp_path)


def test_missing_source_and_reg_folder(tmp_path):
    assert "nowhere" in error(tmp_path / "nowhere")
    make_folder(tmp_path / "t" / "1_zkz", 1)
    assert "noreg" in error(tmp_path / "t", reg_data=str(tmp_path / "noreg"))
    with pytest.raises(DatasetError, match="no training data"):
        TrainingData(DataConfig(resolution=64))


def test_small_image_upscale_warning_names_file_and_factor(tmp_path):
    folder = make_folder(tmp_path / "1_zkz", 1)
    make_image(folder / "tiny.png", (16, 16))
    message = warned(tmp_path, enable_bucket=True, bucket_reso_steps=8)
    assert "tiny.png" in message and "4.00×" in message and "000.png" not in message


def test_buckets_off_warns_about_upscaling_and_cropping(tmp_path):
    folder = tmp_path / "1_zkz"
    make_image(folder / "small.png", (48, 48))
    make_image(folder / "wide.png", (128, 64))
    message = warned(tmp_path)
    assert "small.png" in message and "1.33×" in message
    assert "wide.png" in message and "50% cut away" in message and "enable_bucket" in message
    make_image(folder / "strip.png", (2000, 8))  # keeps 0.4% of itself: not "100% cut away"
    assert "strip.png (2000×8, enlarged 8.00× to fill 64×64" in warned(tmp_path)
    assert "strip.png (2000×8, 99.6% cut away to fill 64×64)" in warned(tmp_path)


def test_cut_share_says_100_only_when_nothing_is_kept():
    assert [cut_share(k) for k in (0.5, 0.004, 0.0004, 0.0)] == ["50%", "99.6%", "99.9%", "100%"]


def test_multiline_and_empty_caption_files_warn(tmp_path):
    make_folder(tmp_path / "1_zkz", 2, captions={0: "zkz, first\nsecond line\n", 1: "  \n"})
    message = warned(tmp_path)
    assert "000.txt" in message and "first line" in message and "001.txt" in message


def test_bad_bucket_settings(tmp_path):
    make_folder(tmp_path / "1_zkz", 1)
    assert "bucket_reso_steps" in error(tmp_path, enable_bucket=True, bucket_reso_steps=12)
    assert "min_bucket_reso" in error(tmp_path, enable_bucket=True, bucket_reso_steps=8, min_bucket_reso=128)
    assert "resolution" in error(tmp_path, resolution=60)


# ------------------------------------------------------------------------------------------ the example
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "zkz"


@pytest.mark.skipif(not EXAMPLE.is_dir(), reason="examples/zkz not present")
def test_the_zkz_example_folder_reads_cleanly():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # the shipped example must not warn
        d = TrainingData(DataConfig(train_data=str(EXAMPLE), resolution=64), seed=0)
    train = [r for r in d.records if not r.is_reg]
    assert train and all(r.size == (64, 64) and r.has_caption_file for r in train)
    assert all("zkz" in r.caption for r in train)
    assert d.num_train_images == 10 * len(train) and d.steps_per_epoch == d.num_train_images
    batch = d.epoch_batches(0)[0]
    assert batch.pixel_values.shape == (1, 3, 64, 64)


def test_wildcard_captions_keep_every_line_and_draw_one_per_step(tmp_path):
    make_folder(tmp_path / "1_zkz shape", 1, captions={0: "zkz, {red|blue} circle\n\nzkz, a star\n"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # no "only the first line" warning: every line is used
        d = data(tmp_path, enable_wildcard=True)
    assert d.records[0].caption == "zkz, {red|blue} circle\nzkz, a star"
    drawn = {caption for epoch in range(40) for batch in d.epoch_batches(epoch) for caption in batch.captions}
    assert drawn == {"zkz, red circle", "zkz, blue circle", "zkz, a star"}
    # without it only the first line is read, as kohya does
    assert data(tmp_path).records[0].caption == "zkz, {red|blue} circle"


def test_caption_templates_replace_the_captions_with_a_template_drawn_per_step(tmp_path):
    """data.caption_templates (kohya's use_object_template / use_style_template): every image of a training folder
    is trained with one of the templates filled with the folder's trigger, its caption file unread; regularization
    folders keep their captions; a folder with no trigger, or an unknown set, is an error naming it."""
    from lorakit.data.captions import CAPTION_TEMPLATES

    make_folder(tmp_path / "data" / "1_zkz shape", 2, captions={0: "a caption that is not read"})
    make_folder(tmp_path / "reg" / "1_shape", 1, captions={0: "a red shape"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # no "1 of 2 images has no caption file" warning
        d = TrainingData(DataConfig(train_data=str(tmp_path / "data"), resolution=64, caption_templates="style",
                                    reg_data=str(tmp_path / "reg")), seed=0)
    train = [r for r in d.records if not r.is_reg]
    assert all(r.caption.split("\n") == [t.format("zkz") for t in CAPTION_TEMPLATES["style"]] for r in train)
    assert [r.caption for r in d.records if r.is_reg] == ["a red shape"]
    drawn = {c for epoch in range(30) for batch in d.epoch_batches(epoch) for c in batch.captions}
    assert len(drawn - {"a red shape"}) > 8 and all("in the style of zkz" in c for c in drawn - {"a red shape"})
    make_folder(tmp_path / "plain", 1)
    assert "caption_templates = 'object' fills its templates with the folder's trigger" in error(
        tmp_path / "plain", caption_templates="object")
    assert data(tmp_path / "plain", caption_templates="object", trigger="qwx").records[0].caption.startswith(
        "a photo of a qwx")
    assert "caption_templates 'objects' is not one of object, style" in error(tmp_path / "data",
                                                                             caption_templates="objects")


def test_kohya_caption_separators_are_read_from_a_dataset_toml_and_checked(tmp_path):
    make_folder(tmp_path / "hoge", 1, captions={0: "zkz, red ||| circle;;;small, plain"})
    toml = tmp_path / "dataset.toml"
    toml.write_text("[general]\nkeep_tokens_separator = '|||'\nsecondary_separator = ';;;'\n"
                    "enable_wildcard = true\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                    "image_dir = 'hoge'\nclass_tokens = 'zkz shape'\n")
    d = data(toml)
    (batch,) = d.epoch_batches(0)
    assert batch.captions == ["zkz, red, circle,small, plain"]
    for bad in (",", " "):
        toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'hoge'\n"
                        f"keep_tokens_separator = '{bad}'\n")
        assert "keep_tokens_separator" in error(toml) and "|||" in error(toml)
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'hoge'\n"
                    "keep_tokens_separator = '|'\nsecondary_separator = '|'\n")
    assert "both '|'" in error(toml)


def test_captions_without_the_keep_tokens_separator_are_named_when_shuffling_would_move_their_trigger(tmp_path):
    make_folder(tmp_path / "1_zkz shape", 3, captions={0: "zkz ||| red, circle", 1: "zkz, blue, star",
                                                       2: "zkz, green, square"})
    said = warned(tmp_path, keep_tokens_separator="|||", shuffle_caption=True)
    assert "2 of 3 captions have no '|||', so shuffle_caption moves their trigger 'zkz'" in said
    assert "001.png" in said and "000.png" not in said.split("have no")[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # keep_tokens = 1 keeps it in front: nothing to say
        TrainingData(DataConfig(train_data=str(tmp_path), resolution=64, keep_tokens_separator="|||",
                                shuffle_caption=True, keep_tokens=1), seed=0)


# ---- kohya's fine-tuning metadata (metadata_file, kohya's --in_json) --------------------------------------------

def test_a_plain_folder_takes_a_metadata_file_as_kohya_s_in_json(tmp_path):
    """data.metadata_file (kohya's --in_json beside train_data_dir): a plain folder's captions from the JSON, no
    trigger needed; with kohya-layout folders or a dataset TOML it belongs on a subset, and says so."""
    make_folder(tmp_path / "images", 2)
    (tmp_path / "meta.json").write_text(json.dumps({"000": {"caption": "a red circle"}, "001": {"tags": "star"}}))
    d = data(tmp_path / "images", metadata_file=str(tmp_path / "meta.json"))
    assert {r.path.name: r.caption for r in d.records} == {"000.png": "a red circle", "001.png": "star"}
    make_folder(tmp_path / "kohya" / "1_zkz shape", 1)
    assert "goes with a plain folder of images" in error(tmp_path / "kohya", metadata_file="meta.json")
    toml = tmp_path / "d.toml"
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'images'\n")
    assert "set metadata_file on its [[datasets.subsets]]" in error(toml, metadata_file="meta.json")


def test_a_metadata_file_lists_the_images_and_gives_their_captions_as_kohya_joins_them(tmp_path):
    make_folder(tmp_path / "images", 4, captions={0: "a caption file, never read"})
    (tmp_path / "meta.json").write_text(json.dumps({
        "000": {"caption": "zkz shape, a red circle", "tags": "red, circle"},  # kohya's keys: names without extension
        "001.png": {"tags": "blue, star"},  # tags alone are the caption
        str(tmp_path / "images" / "002.png"): {"caption": "two lines\nof caption", "tags": "green"},
    }))
    toml = tmp_path / "d.toml"
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'images'\n"
                    "metadata_file = 'meta.json'\n")
    said = warned(toml)
    assert "1 image is not in its metadata_file meta.json and not trained: 003.png" in said
    d = data(toml)
    captions = {r.path.name: r.caption for r in d.records}
    assert captions == {"000.png": "zkz shape, a red circle,red, circle", "001.png": "blue, star",
                        "002.png": "two lines\nof caption,green"}
    d = data(toml, enable_wildcard=True)  # kohya: the tags follow each line
    assert {r.path.name: r.caption for r in d.records}["002.png"] == "two lines,green\nof caption,green"
    (tmp_path / "meta.json").write_text(json.dumps({"000": {"caption": "x"}, "nope": {"caption": "y"}}))
    assert "meta.json: 1 entry names no image in" in error(toml) and "nope" in error(toml)
    (tmp_path / "meta.json").write_text(json.dumps({"000": {"caption": ["a", "list"]}}))
    assert "'000': \"caption\" and \"tags\" must be text" in error(toml)
    (tmp_path / "meta.json").write_text("[1, 2]")
    assert "expected a JSON object" in error(toml)


@pytest.mark.parametrize(("images", "processes", "expected"), [(5, 1, 5), (5, 2, 6), (5, 4, 8), (1, 3, 3), (6, 2, 6)])
def test_an_epoch_dealt_to_processes_gives_each_as_many_batches(tmp_path, images, processes, expected):
    """As accelerate's even_batches: the epoch's own first batches again until it divides among the processes (a
    process with a batch fewer left the others waiting for its gradients); a resume skips within the evened plan."""
    d = data(make_folder(tmp_path / "1_zkz", images))
    plan = d.epoch_batches(0, processes=processes).plans
    assert len(plan) == expected and plan[:images] == d.epoch_plan(0)
    assert plan[images:] == [d.epoch_plan(0)[i % images] for i in range(expected - images)]
    assert {len(plan[rank::processes]) for rank in range(processes)} == {expected // processes}
    assert d.epoch_batches(0, skip=2, processes=processes).plans == plan[2:]


def test_caption_differing_from_its_image_in_letter_case_says_so(tmp_path):
    # a folder made on a case-blind disk: IMG1.PNG captioned by img1.txt trains on Windows, not here
    folder = make_folder(tmp_path / "10_zkz", 1)
    make_image(folder / "IMG1.PNG")
    (folder / "img1.txt").write_text("zkz, red")
    message = error(tmp_path)
    assert "img1.txt" in message and "IMG1.PNG differs from it only in letter case" in message
    assert "rename the caption IMG1.txt" in message


def test_images_in_a_folder_inside_an_image_folder_are_named_as_not_trained(tmp_path):
    folder = make_folder(tmp_path / "10_zkz", 2)
    make_image(folder / "more" / "a.png")
    make_image(folder / "more" / "b.png")
    (folder / "notes").mkdir()  # no images: nothing to say
    (folder / "back").symlink_to(tmp_path)  # a link to a folder is not followed (this one loops)
    message = warned(tmp_path)
    assert "2 images in folders inside it not trained (more/ holds 2)" in message
    assert "notes" not in message and "back" not in message
    assert data(tmp_path).num_train_images == 20  # the two in the folder itself, ten times


def test_a_lorakit_run_folder_or_a_folder_inside_one_is_refused_as_training_data(tmp_path):
    from lorakit.run_manifest import RunManifest

    run = tmp_path / "run"
    make_folder(run / "samples", 2)  # its sample grids are pictures, its summary.txt no caption
    (run / "config.toml").write_text("")
    (run / "summary.txt").write_text("adapter: 10 steps")
    RunManifest(run).add_files([run / "config.toml", run / "summary.txt"])
    assert "a lorakit run's folder" in error(run) and "not images to train on" in error(run)
    assert f"inside the lorakit run {run}" in error(run / "samples")
    # a project folder with a config.toml of its own beside the data is no run (no manifest): trained
    project = tmp_path / "project"
    make_folder(project / "data" / "5_zkz star", 2)
    (project / "config.toml").write_text("[data]\ntrain_data = 'data'\n")
    assert data(project / "data").num_train_images == 10
