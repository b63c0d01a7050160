"""lorakit.data batches: bucket resolutions and assignment, crops, flips, reg balance, determinism for resume."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import data, make_folder, make_image
from PIL import Image

from lorakit.data import BucketScheme, DataConfig, DatasetError, DatasetWarning, TrainingData, bucket_resolutions
from lorakit.data.buckets import make_scheme
from lorakit.data.config import DatasetConfig


# --------------------------------------------------------------------------------------------- buckets
def test_sd15_bucket_list_matches_kohya():
    # for each width the tallest height within 512² (rounded down to 64), both orientations, sorted
    assert bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]


def test_small_buckets_with_steps_of_8():
    resos = bucket_resolutions((64, 64), 32, 128, 8)
    assert (64, 64) in resos and (32, 128) in resos and (128, 32) in resos and (72, 56) in resos
    assert all(w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 and 32 <= min(w, h) for w, h in resos)
    assert resos == sorted(resos) and all((h, w) in resos for w, h in resos)


def test_default_bucket_range_is_half_to_twice_the_resolution():
    scheme, errors, _ = make_scheme(DatasetConfig([], (64, 64), enable_bucket=True, bucket_reso_steps=8))
    assert not errors and (scheme.min_reso, scheme.max_reso) == (32, 128)
    scheme, errors, _ = make_scheme(DatasetConfig([], (64, 64), enable_bucket=True))  # steps 64: one bucket
    assert not errors and scheme.resos == ((64, 64),)
    _, _, warned = make_scheme(DatasetConfig([], (512, 512), enable_bucket=True, min_bucket_reso=250))
    assert "using 192" in warned[0]  # kohya rounds down to the step, with a warning


@pytest.mark.parametrize("size, bucket, resized", [
    ((1000, 500), (704, 320), (704, 352)),   # 2.0: nearest is 704×320 (2.2); narrower than it: widths match
    ((500, 1000), (320, 704), (352, 704)),
    ((1200, 500), (768, 320), (768, 320)),   # 2.4: exactly 768×320's ratio
    ((300, 200), (640, 384), (640, 427)),    # 1.5: 640×384 beats 576×448; narrower: widths match
    ((512, 512), (512, 512), (512, 512)),
    ((576, 448), (576, 448), (576, 448)),    # exactly a bucket: kept
    ((2000, 2000), (512, 512), (512, 512)),
    ((100, 900), (256, 1024), (256, 2304)),  # beyond the last bucket: cover it
])
def test_bucket_assignment_is_exact(size, bucket, resized):
    scheme = BucketScheme((512, 512), tuple(bucket_resolutions((512, 512), 256, 1024, 64)), True, 64, 256, 1024)
    assert scheme.select(size) == (bucket, resized)


@pytest.mark.parametrize("size, bucket, resized", [
    ((300, 200), (256, 192), (300, 200)),    # smaller than 512²: its own size, cut to steps of 64, never enlarged
    ((512, 512), (512, 512), (512, 512)),
    ((1000, 500), (640, 320), (640, 320)),   # larger: shrunk to 512²'s area; the height's rounding keeps 2:1
    ((2000, 2000), (512, 512), (512, 512)),
    ((700, 300), (640, 256), (700, 300)),    # 210 000 pixels fit in 512²: kept, cropped to 640×256
])
def test_bucket_no_upscale_gives_each_image_a_bucket_of_its_own_size(size, bucket, resized):
    scheme, errors, _ = make_scheme(DatasetConfig([], (512, 512), enable_bucket=True, bucket_no_upscale=True))
    assert not errors and scheme.no_upscale and scheme.select(size) == (bucket, resized)


def test_bucket_no_upscale_trains_small_images_at_their_size_and_refuses_those_below_a_step(tmp_path):
    folder = tmp_path / "1_zkz"
    make_image(folder / "small.png", (40, 24))
    make_image(folder / "square.png", (64, 64))
    make_image(folder / "wide.png", (128, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # nothing is enlarged, so nothing to warn about
        d = data(tmp_path, enable_bucket=True, bucket_reso_steps=8, bucket_no_upscale=True)
    assignment = {r.path.name: d.buckets[i] for i, r in enumerate(d.records)}
    assert assignment == {"small.png": ((40, 24), (40, 24)), "square.png": ((64, 64), (64, 64)),
                          "wide.png": ((80, 40), (80, 40))}
    shapes = {tuple(b.pixel_values.shape[2:]) for b in d.epoch_batches(0)}
    assert shapes == {(24, 40), (64, 64), (40, 80)}
    assert d.kohya_metadata()["ss_bucket_no_upscale"] == "True"
    make_image(folder / "tiny.png", (4, 30))
    with pytest.raises(DatasetError, match=r"bucket_reso_steps \(8 pixels\).*tiny\.png \(4×30\)"):
        data(tmp_path, enable_bucket=True, bucket_reso_steps=8, bucket_no_upscale=True)
    _, _, said = make_scheme(DatasetConfig([], (64, 64), bucket_no_upscale=True))
    assert "does nothing without enable_bucket" in said[0]
    _, _, said = make_scheme(DatasetConfig([], (64, 64), enable_bucket=True, bucket_no_upscale=True,
                                           min_bucket_reso=32))
    assert "not used with bucket_no_upscale" in said[0]


def test_an_image_smaller_than_the_training_size_is_named_with_its_enlargement(tmp_path):
    folder = tmp_path / "1_zkz"
    make_image(folder / "square.png", (64, 64))
    make_image(folder / "tiny.png", (8, 8))
    with pytest.warns(DatasetWarning, match=r"1 image is smaller than the training size and upscaled \(blurry\): "
                                            r".*tiny\.png \(8×8, enlarged 8\.00× to fill 64×64\)"):
        TrainingData(DataConfig(train_data=str(tmp_path), resolution=64), seed=0)


def test_batches_stay_within_one_bucket_and_have_the_bucket_size(tmp_path):
    folder = tmp_path / "3_zkz"
    for i in range(5):
        make_image(folder / f"sq{i}.png", (64, 64))
    for i in range(3):
        make_image(folder / f"wide{i}.png", (128, 64))
    make_image(folder / "tall.png", (48, 96))
    d = data(tmp_path, enable_bucket=True, bucket_reso_steps=8, batch_size=4)
    assignment = {r.path.name: d.buckets[i][0] for i, r in enumerate(d.records)}
    assert assignment["sq0.png"] == (64, 64) and assignment["wide0.png"] == (88, 40)
    assert assignment["tall.png"] == (40, 88)
    assert d.bucket_counts() == {(0, (40, 88)): 3, (0, (64, 64)): 15, (0, (88, 40)): 9}
    assert d.steps_per_epoch == 1 + 4 + 3 == len(d.epoch_plan(0))
    for batch in d.epoch_batches(0):
        names = {p.name.rstrip("0123456789.png") for p in batch.image_paths}
        assert len(names) == 1  # one kind of image per batch
        w, h = assignment[batch.image_paths[0].name]
        assert batch.pixel_values.shape == (len(batch), 3, h, w)
        assert batch.pixel_values.min() >= -1 and batch.pixel_values.max() <= 1
    assert "3 buckets (images): 64×64 (5), 88×40 (3), 40×88 (1)" in d.summary()


def _stripes(path, size=(96, 32)):
    """Left third red, middle green, right third blue."""
    img = Image.new("RGB", size, (0, 255, 0))
    third = size[0] // 3
    img.paste((255, 0, 0), (0, 0, third, size[1]))
    img.paste((0, 0, 255), (2 * third, 0, size[0], size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_without_buckets_images_are_center_cropped_to_the_resolution(tmp_path):
    _stripes(tmp_path / "1_zkz" / "a.png")
    batch = next(iter(data(tmp_path, resolution=32).epoch_batches(0)))
    px = batch.pixel_values[0]
    assert px.shape == (3, 32, 32)
    assert torch.allclose(px[:, :, 4:28], torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 32, 24))


def test_random_crop_moves_and_flip_mirrors(tmp_path):
    _stripes(tmp_path / "20_zkz" / "a.png")
    d = data(tmp_path, resolution=32, random_crop=True, flip_aug=True)
    left_colors, flips = set(), []
    for batch in d.epoch_batches(0):
        px = batch.pixel_values[0]
        left, right = px[:, 16, 0], px[:, 16, -1]
        left_colors.add(tuple(left.round().tolist()))
        flips.append(batch.flipped[0])
        if tuple(left.round().tolist()) == (1.0, -1.0, -1.0):  # red at the left edge: not mirrored
            assert not batch.flipped[0]
        if tuple(right.round().tolist()) == (1.0, -1.0, -1.0):  # red at the right: mirrored
            assert batch.flipped[0]
    assert len(left_colors) > 1 and 3 <= sum(flips) <= 17


# ----------------------------------------------------------------------------------- reg images, repeats
def test_reg_images_balanced_to_training_samples(tmp_path):
    make_folder(tmp_path / "train" / "10_zkz shape", 3)
    make_folder(tmp_path / "reg" / "1_shape", 4)
    d = data(tmp_path / "train", reg_data=str(tmp_path / "reg"), batch_size=3)
    assert d.num_train_images == 30 and d.num_reg_images == 4
    assert [n for n, r in zip(d.repeats, d.records, strict=True) if r.is_reg] == [8, 8, 7, 7]  # kohya's cycling
    flags = torch.cat([b.is_reg for b in d.epoch_batches(0)])
    assert flags.sum() == 30 and (~flags).sum() == 30
    assert "4 reg images, 30 reg samples/epoch" in d.summary()


def test_reg_images_beyond_the_training_count_are_not_used(tmp_path):
    make_folder(tmp_path / "train" / "10_zkz", 1)
    make_folder(tmp_path / "reg" / "1_shape", 25)
    with pytest.warns(DatasetWarning, match="only the first ones"):
        d = TrainingData(DataConfig(train_data=str(tmp_path / "train"), reg_data=str(tmp_path / "reg"),
                                    resolution=64))
    assert [n for n, r in zip(d.repeats, d.records, strict=True) if r.is_reg] == [1] * 10 + [0] * 15


def test_reg_repeats_overshoot_like_kohya(tmp_path):
    make_folder(tmp_path / "train" / "10_zkz", 1)
    make_folder(tmp_path / "reg" / "4_shape", 3)
    d = data(tmp_path / "train", reg_data=str(tmp_path / "reg"))
    assert [n for n, r in zip(d.repeats, d.records, strict=True) if r.is_reg] == [4, 4, 4]  # 12 ≥ 10, as kohya
    assert d.num_reg_images == 12


# --------------------------------------------------------------------------------------------- determinism
def _dataset(tmp_path):
    make_folder(tmp_path / "train" / "2_zkz shape", 4, captions={i: f"zkz shape, tag{i}, red, round, small"
                                                                 for i in range(4)})
    make_folder(tmp_path / "train" / "2_qqw", 3, size=(64, 48))
    make_folder(tmp_path / "reg" / "1_shape", 2)
    return dict(reg_data=str(tmp_path / "reg"), shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.2,
                caption_tag_dropout_rate=0.2, flip_aug=True, batch_size=2, enable_bucket=True, bucket_reso_steps=8)


def _snapshot(batches):
    return [(b.captions, [p.name for p in b.image_paths], b.is_reg.tolist(), b.flipped, b.pixel_values.sum().item())
            for b in batches]


def test_same_seed_and_epoch_give_identical_batches(tmp_path):
    options = _dataset(tmp_path)
    a, b = data(tmp_path / "train", seed=7, **options), data(tmp_path / "train", seed=7, **options)
    assert _snapshot(a.epoch_batches(3)) == _snapshot(b.epoch_batches(3))
    assert [p.sample_ids for p in a.epoch_plan(1)] != [p.sample_ids for p in a.epoch_plan(2)]  # another order
    assert [p.sample_ids for p in a.epoch_plan(1)] != [p.sample_ids for p in data(tmp_path / "train", seed=8,
                                                                                    **options).epoch_plan(1)]


def test_resume_mid_epoch_by_skipping_batches(tmp_path):
    d = data(tmp_path / "train", seed=1, **_dataset(tmp_path))
    full = _snapshot(d.epoch_batches(2))
    assert _snapshot(d.epoch_batches(2, skip=5)) == full[5:]
    assert _snapshot(d.epoch_batches(2)[5:]) == full[5:]
    assert _snapshot([d.epoch_batches(2)[5]]) == [full[5]]
    # reading other epochs in between (as an interrupted run did) changes nothing
    list(d.epoch_batches(0))
    assert _snapshot(d.epoch_batches(2, skip=5)) == full[5:]


def test_every_sample_appears_once_per_epoch(tmp_path):
    d = data(tmp_path / "train", seed=3, **_dataset(tmp_path))
    for epoch in range(3):
        seen = Counter(d.samples[sid] for plan in d.epoch_plan(epoch) for sid in plan.sample_ids)
        assert seen == Counter({i: n for i, n in enumerate(d.repeats) if n})
        assert len(d.epoch_plan(epoch)) == d.steps_per_epoch


def test_caption_randomness_varies_with_epoch_not_with_order(tmp_path):
    d = data(tmp_path / "train", seed=3, **_dataset(tmp_path))
    captions = {e: {sid: d._draw(e, sid).caption for sid in range(len(d.samples))} for e in range(2)}
    assert captions[0] != captions[1]
    assert captions[0] == {sid: d._draw(0, sid).caption for sid in reversed(range(len(d.samples)))}
    assert 0 < sum(c == "" for c in captions[0].values()) < len(d.samples)  # dropout 0.2 happened


def test_works_as_a_torch_dataset(tmp_path):
    d = data(tmp_path / "train", seed=3, **_dataset(tmp_path))
    loader = torch.utils.data.DataLoader(d.epoch_batches(0), batch_size=None, num_workers=0)
    assert _snapshot(loader) == _snapshot(d.epoch_batches(0))


def test_resize_interpolation_resizes_as_kohya_names_it(tmp_path):
    from lorakit.data.images import RESIZE_INTERPOLATIONS, load_rgb

    make_image(tmp_path / "1_zkz" / "a.png", (96, 96), (0, 0, 0))
    noisy = Image.effect_noise((96, 96), 80).convert("RGB")
    noisy.save(tmp_path / "1_zkz" / "a.png")
    pixels = {name: data(tmp_path, resolution=40, resize_interpolation=name).pixels(0)
              for name in (None, "nearest", "area", "bicubic")}
    assert len({tuple(p.flatten()[:200].tolist()) for p in pixels.values()}) == 4  # each resizes differently
    for name in ("nearest", "area"):  # Pillow's filter of that name, and nothing else
        expected = load_rgb(tmp_path / "1_zkz" / "a.png").resize((40, 40), RESIZE_INTERPOLATIONS[name])
        assert torch.equal(pixels[name], torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 127.5 - 1)
    toml = tmp_path / "d.toml"
    toml.write_text(f"[[datasets]]\nresolution = 40\n[[datasets.subsets]]\nimage_dir = '{tmp_path / '1_zkz'}'\n"
                    "class_tokens = 'zkz'\nresize_interpolation = 'cubic'\n")
    assert torch.equal(data(toml).pixels(0), pixels["bicubic"])  # kohya's alias
    assert data(toml).kohya_metadata()["ss_resize_interpolation"] == "cubic"
    with pytest.raises(DatasetError, match=r"1_zkz: resize_interpolation 'sinc' is not one of lanczos, "):
        data(tmp_path, resolution=40, resize_interpolation="sinc")


def test_color_aug_shifts_hue_or_gamma_of_a_third_of_the_samples_and_changes_no_other_draw(tmp_path):
    from lorakit.data.images import color_augment

    red = Image.new("RGB", (8, 8), (200, 40, 40))
    assert np.abs(np.asarray(color_augment(red, "hue", 0.0), dtype=int) - np.asarray(red, dtype=int)).max() <= 2
    turned = np.asarray(color_augment(red, "hue", 8.0), dtype=int)[0, 0]
    assert turned[0] >= 190 and turned[1] > 60 and abs(turned[2] - 40) <= 3  # red towards orange, 16° round
    darker = np.asarray(color_augment(red, "gamma", 1.05), dtype=int)[0, 0]
    assert tuple(darker) == tuple(round(255 * (v / 255) ** 1.05) for v in (200, 40, 40))  # on the 0..1 scale

    noisy = Image.fromarray(np.random.default_rng(0).integers(30, 220, (32, 32, 3), dtype=np.uint8))  # colorful
    for i in range(6):
        (tmp_path / "50_zkz").mkdir(exist_ok=True)
        noisy.rotate(90 * i).save(tmp_path / "50_zkz" / f"{i}.png")
    plain = data(tmp_path, resolution=32, flip_aug=True, shuffle_caption=True, batch_size=10)
    colored = data(tmp_path, resolution=32, flip_aug=True, shuffle_caption=True, batch_size=10, color_aug=True)
    changed = total = 0
    for epoch in range(2):
        for a, b in zip(plain.epoch_batches(epoch), colored.epoch_batches(epoch), strict=True):
            assert a.captions == b.captions and a.flipped == b.flipped and a.image_paths == b.image_paths
            differs = (a.pixel_values - b.pixel_values).abs().flatten(1).amax(1) > 1.5 / 127.5
            changed += int(differs.sum())
            total += len(a)
    assert 0.25 < changed / total < 0.4  # kohya's third of the samples (600 of them)
    again = data(tmp_path, resolution=32, flip_aug=True, shuffle_caption=True, batch_size=10, color_aug=True)
    assert torch.equal(next(iter(again.epoch_batches(0))).pixel_values,
                       next(iter(colored.epoch_batches(0))).pixel_values)  # the same draws: resume is exact
    assert colored.kohya_metadata()["ss_color_aug"] == "True"
    with pytest.raises(DatasetError, match=r"color_aug cannot be used with cached latents .*cache_latents = false"):
        colored.cache_latents(None)


def test_face_crop_puts_the_face_in_the_middle_at_a_scale_within_the_range(tmp_path):
    import random

    from lorakit.data.buckets import face_crop, face_from_name

    assert face_from_name(Path("me_300_200_80_100.png")) == (300, 200, 80, 100)
    assert face_from_name(Path("photo_2024.png")) is None and face_from_name(Path("a_b_1_2_3.png")) is None
    # a 1000×800 image, face 100 px at (300, 200), 64×64 crops: the face fills 1/4..1/2 of the side
    for seed in range(20):
        resized, (left, top) = face_crop((1000, 800), (64, 64), (300, 200, 100, 100), (2.0, 4.0),
                                         random.Random(seed))
        scale = resized[0] / 1000
        assert 64 / (100 * 4.0) - 0.01 <= scale <= 64 / (100 * 2.0) + 0.01
        # centred on the face, give or take kohya's jitter of face_size // 20 (in the original's pixels)
        assert abs(left + 32 - 300 * scale) <= 6 and abs(top + 32 - 200 * scale) <= 6
    # one value: one scale, no draws at all (a latent can be cached)
    assert face_crop((1000, 800), (64, 64), (300, 200, 100, 100), (3.0, 3.0), None)[0] == (213, 171)
    # a face at the edge: the crop stays inside the image
    resized, (left, top) = face_crop((1000, 800), (64, 64), (5, 5, 100, 100), (2.0, 2.0), None)
    assert (left, top) == (0, 0)


def test_face_crop_in_batches_is_drawn_per_step_and_refused_with_cached_latents(tmp_path):
    from data_helpers import tiny_vae

    folder = tmp_path / "1_zkz"
    folder.mkdir()
    img = Image.new("RGB", (256, 256), (0, 0, 255))
    img.paste((255, 0, 0), (96, 96, 160, 160))  # a red "face" of 64 px in the middle
    img.save(folder / "me_128_128_64_64.png")
    img.save(folder / "plain.png")  # no face in its name: the usual center crop
    d = data(tmp_path, resolution=32, face_crop_aug_range=(1.0, 2.0), batch_size=2)
    sizes = set()
    for epoch in range(6):
        (batch,) = d.epoch_batches(epoch)
        for path, px in zip(batch.image_paths, batch.pixel_values, strict=True):
            red = float((px[0] > 0.5).float().mean())
            if path.name == "plain.png":
                assert 0.05 < red < 0.07  # 64² of 256², shrunk whole into 32×32: 1/16 of the crop
            else:
                assert red > 0.24  # the face fills half or all of the side: at least a quarter of the crop
                sizes.add(round(red, 2))
    assert len(sizes) > 1  # another scale in other epochs
    with pytest.raises(DatasetError, match="face_crop_aug_range cannot be used with cached latents"):
        d.cache_latents(tiny_vae())
    fixed = data(tmp_path, resolution=32, face_crop_aug_range=(2.0, 2.0), batch_size=2)
    fixed.cache_latents(tiny_vae())  # one scale: cached once, at the face
    with pytest.raises(DatasetError, match=r"face_crop_aug_range must be \[min, max\]"):
        data(tmp_path, resolution=32, face_crop_aug_range=(3.0, 2.0))
