"""kohya's alpha_mask: a transparent image's alpha channel masks the loss (its background is not learned); the
mask follows the image's crop and flip, cached latents or not, and an all-transparent dataset teaches nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import data, make_image, tiny_vae
from PIL import Image

from lorakit.loss import per_sample_loss


def half_transparent(path, size=(64, 32)):
    """Red, its left half fully transparent."""
    rgba = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, size[0] // 2:, 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_the_mask_weighs_each_element_and_is_averaged_down_to_the_prediction():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=gen)
    prediction = target.clone()
    prediction[..., :4] += 1.0  # wrong on the left half only
    unmasked = per_sample_loss(prediction, target)
    torch.testing.assert_close(per_sample_loss(prediction, target, mask=torch.ones(2, 1, 64, 64)), unmasked)
    left_hidden = torch.ones(2, 1, 64, 64)
    left_hidden[..., :32] = 0  # at the image's size, 8 times the latents'
    assert torch.equal(per_sample_loss(prediction, target, mask=left_hidden), torch.zeros(2))
    right_hidden = 1 - left_hidden
    torch.testing.assert_close(per_sample_loss(prediction, target, mask=right_hidden), unmasked)
    c = torch.full((2,), 0.1)
    assert torch.equal(per_sample_loss(prediction, target, "huber", c, left_hidden), torch.zeros(2))


@pytest.mark.parametrize("cached", [False, True])
def test_batches_carry_the_alpha_of_their_crop_and_flip(tmp_path, cached):
    folder = tmp_path / "1_zkz"
    half_transparent(folder / "a.png")
    make_image(folder / "b.png", (64, 32))  # opaque: counts everywhere
    d = data(tmp_path, resolution=32, alpha_mask=True, flip_aug=True, batch_size=2)  # center crop 32×32
    if cached:
        d.cache_latents(tiny_vae())
    seen = set()
    for epoch in range(8):
        (batch,) = d.epoch_batches(epoch)
        assert batch.loss_masks.shape == (2, 1, 32, 32)
        for path, flipped, mask in zip(batch.image_paths, batch.flipped, batch.loss_masks, strict=True):
            if path.name == "b.png":
                assert bool((mask == 1).all())
                continue
            # the center crop of a 64-wide image whose left 32 columns are clear: columns 16-31 of the crop
            # are opaque, mirrored when flipped
            opaque = mask[0, 0] > 0.5
            expected = torch.arange(32) >= 16
            assert torch.equal(opaque, expected.flip(0) if flipped else expected)
            seen.add(flipped)
    assert seen == {False, True}
    plain = data(tmp_path, resolution=32, batch_size=2)
    assert next(iter(plain.epoch_batches(0))).loss_masks is None  # off: nothing is read or masked


def test_alpha_mask_on_a_folder_without_transparency_is_pointed_out(tmp_path):
    from lorakit.data import DataConfig, DatasetWarning, TrainingData

    make_image(tmp_path / "1_zkz" / "a.png", (32, 32))
    with pytest.warns(DatasetWarning, match=r"1_zkz: alpha_mask is on, but none of its images has transparency"):
        TrainingData(DataConfig(train_data=str(tmp_path), resolution=32, alpha_mask=True))


def test_an_all_transparent_dataset_teaches_nothing_and_the_file_says_the_loss_was_masked(tiny_model_dir,
                                                                                          tmp_path):
    from test_train import make_config, run_train

    from lorakit.formats import read_adapter

    folder = tmp_path / "data" / "1_zkz shape"
    for i in range(2):
        rgba = np.zeros((64, 64, 4), dtype=np.uint8)
        rgba[..., i] = 255  # colored, but fully transparent
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
    cfg = make_config(tiny_model_dir, tmp_path / "data", tmp_path / "run", training={"max_epochs": 1},
                      optimizer={"weight_decay": 0.0})
    cfg.data.alpha_mask = True
    run_train(cfg)
    adapter = read_adapter(tmp_path / "run" / "lorakit.safetensors")
    assert adapter.metadata["ss_masked_loss"] == "True"
    ups = [t for k, t in adapter.tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(bool((t == 0).all()) for t in ups)  # zero loss everywhere: the update never moved
    cfg.data.alpha_mask = False
    cfg.output.dir = str(tmp_path / "unmasked")
    run_train(cfg)
    ups = [t for k, t in read_adapter(tmp_path / "unmasked" / "lorakit.safetensors").tensors.items()
           if k.endswith("lora_up.weight")]
    assert any(bool((t != 0).any()) for t in ups)  # the same images unmasked do teach


# ---- kohya's conditioning_data_dir: mask images beside the data ------------------------------------------------


def _mask_toml(tmp_path, masks: str = "masks", **extra):
    lines = "".join(f"{k} = {v!r}\n" for k, v in extra.items()).replace("True", "true")
    toml = tmp_path / "data.toml"
    toml.write_text(f"[[datasets]]\nresolution = 32\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = 'images'\n"
                    f"class_tokens = 'zkz shape'\nconditioning_data_dir = '{masks}'\n{lines}")
    return toml


@pytest.mark.parametrize("cached", [False, True])
def test_mask_images_weigh_the_loss_through_crop_and_flip(tmp_path, cached):
    make_image(tmp_path / "images" / "a.png", (64, 32))
    make_image(tmp_path / "images" / "b.jpg", (64, 32), (0, 90, 0))
    (tmp_path / "masks").mkdir()
    left_black = np.zeros((32, 64, 3), dtype=np.uint8)
    left_black[:, 32:] = (255, 0, 0)  # the red channel is the mask, as kohya reads it
    Image.fromarray(left_black).save(tmp_path / "masks" / "a.png")
    Image.new("L", (64, 32), 255).save(tmp_path / "masks" / "b.webp")  # any extension, grayscale too
    d = data(_mask_toml(tmp_path, flip_aug=True))  # relative folders: from the TOML's folder
    if cached:
        d.cache_latents(tiny_vae())
    seen = set()
    for epoch in range(8):
        (batch,) = d.epoch_batches(epoch)
        for path, flipped, mask in zip(batch.image_paths, batch.flipped, batch.loss_masks, strict=True):
            if path.name == "b.jpg":
                assert bool((mask == 1).all())
                continue
            expected = torch.arange(32) >= 16  # the center crop: its right half is white
            assert torch.equal(mask[0, 0] > 0.5, expected.flip(0) if flipped else expected)
            seen.add(flipped)
    assert seen == {False, True}
    assert d.kohya_metadata()["ss_masked_loss"] == "True"


def test_a_missing_or_mis_sized_mask_is_an_error_naming_the_files(tmp_path):
    from lorakit.data import DatasetError

    for name in ("a", "b", "c"):
        make_image(tmp_path / "images" / f"{name}.png", (64, 32))
    (tmp_path / "masks").mkdir()
    Image.new("L", (64, 32), 255).save(tmp_path / "masks" / "a.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "masks" / "b.png")
    with pytest.raises(DatasetError) as info:
        data(_mask_toml(tmp_path))
    text = str(info.value)
    assert "1 image has no mask image of the same name" in text and "c.png" in text
    assert "masks/b.png: the mask is 32×32, its image" in text and "is 64×32" in text
    with pytest.raises(DatasetError, match="conditioning_data_dir .*nowhere is not a folder"):
        data(_mask_toml(tmp_path, masks="nowhere"))
    with pytest.raises(DatasetError, match="alpha_mask and conditioning_data_dir both give the loss mask"):
        data(_mask_toml(tmp_path, alpha_mask=True))
