"""lorakit.data images and latent cache: RGB conversion, EXIF, and encode-once latents in memory and on disk."""

from __future__ import annotations

import functools
import json
import os

import data_helpers
import numpy as np
import pytest
import torch
from data_helpers import make_folder, make_image, make_noise_image, tiny_vae
from PIL import Image

from lorakit.data import DatasetError, load_rgb, vae_fingerprint
from lorakit.data.images import probe, to_tensor

data = functools.partial(data_helpers.data, resolution=32)  # the tiny VAE works at 32 pixels


def count_encodes(vae) -> list[int]:
    """Record the batch size of every vae.encode call."""
    calls: list[int] = []
    original = vae.encode

    def encode(x, *args, **kwargs):
        calls.append(len(x))
        return original(x, *args, **kwargs)

    vae.encode = encode
    return calls


# ------------------------------------------------------------------------------------------------ images
def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)
    px = np.asarray(load_rgb(tmp_path / "rgba.png"))
    assert px[0, 0].tolist() == [255, 0, 0] and px[2, 2].tolist() == [255, 255, 255]
    assert np.asarray(load_rgb(tmp_path / "la.png"))[0, 0].tolist() == [255, 255, 255]
    p_px = np.asarray(load_rgb(tmp_path / "p.png"))
    assert p_px[1, 1].tolist() == [0, 255, 0] and p_px[0, 0].tolist() == [255, 255, 255]


def test_grayscale_and_16_bit_images_become_rgb(tmp_path):
    Image.new("L", (4, 4), 128).save(tmp_path / "l.png")
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert np.asarray(load_rgb(tmp_path / "l.png"))[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(load_rgb(tmp_path / "i16.png"))[0, 0].tolist() == [128, 128, 128]  # scaled, not clipped


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored landscape, shown portrait
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert probe(tmp_path / "phone.jpg") == (20, 40)
    assert load_rgb(tmp_path / "phone.jpg").size == (20, 40)


def test_to_tensor_range_and_layout():
    t = to_tensor(Image.new("RGB", (3, 2), (0, 255, 51)))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, -0.6])


# -------------------------------------------------------------------------------------------- latents
def _folder(tmp_path, n=3):
    folder = tmp_path / "data" / "2_zkz"
    for i in range(n):
        make_noise_image(folder / f"{i}.png", (32, 32), seed=i)
    return tmp_path / "data"


def test_memory_cache_holds_the_vae_mean_and_std(tmp_path):
    d = data(_folder(tmp_path), batch_size=2)
    vae = tiny_vae()
    calls = count_encodes(vae)
    d.cache_latents(vae)
    assert sum(calls) == 3  # each image once, whatever its repeats
    batch = next(iter(d.epoch_batches(0)))
    assert batch.pixel_values is None and batch.latents.shape == (2, 4, 16, 16)
    record = d.records.index(next(r for r in d.records if r.path == batch.image_paths[0]))
    with torch.no_grad():
        dist = vae.encode(d.pixels(record)[None]).latent_dist
    assert torch.allclose(batch.latents[0], dist.mean[0], atol=1e-5)
    assert torch.allclose(batch.latents_std[0], dist.std[0], atol=1e-5)
    g = torch.Generator().manual_seed(0)
    drawn = batch.sample_latents(g)
    expected = batch.latents + batch.latents_std * torch.randn(batch.latents.shape, generator=g.manual_seed(0))
    assert torch.equal(drawn, expected)


def test_flipped_latents_are_cached_too(tmp_path):
    d = data(_folder(tmp_path, n=1), flip_aug=True)
    vae = tiny_vae()
    calls = count_encodes(vae)
    d.cache_latents(vae)
    assert sum(calls) == 2
    flipped = torch.flip(d.pixels(0), dims=[2])
    with torch.no_grad():
        mean = vae.encode(flipped[None]).latent_dist.mean[0]
    assert torch.allclose(d._latents[(0, True)][0], mean, atol=1e-5)
    assert not torch.allclose(d._latents[(0, False)][0], mean, atol=1e-3)


def test_disk_cache_round_trip_and_reuse(tmp_path):
    source, cache = _folder(tmp_path), tmp_path / "cache"
    vae = tiny_vae()
    first = data(source)
    first.cache_latents(vae, directory=cache)
    index = json.loads((cache / "index.json").read_text())
    assert len(index["entries"]) == 3 and len(list(cache.glob("*.safetensors"))) == 3
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing behind

    again = data(source)
    calls = count_encodes(vae)
    again.cache_latents(vae, directory=cache)
    assert calls == []  # everything read back
    for key, (mean, std) in first._latents.items():
        assert torch.equal(again._latents[key][0], mean) and torch.equal(again._latents[key][1], std)


def test_changed_image_is_reencoded_and_its_stale_entry_removed(tmp_path):
    source, cache = _folder(tmp_path), tmp_path / "cache"
    vae = tiny_vae()
    data(source).cache_latents(vae, directory=cache)
    old_files = set(cache.glob("*.safetensors"))
    changed = source / "2_zkz" / "1.png"
    make_noise_image(changed, (32, 32), seed=99)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    d = data(source)
    calls = count_encodes(vae)
    d.cache_latents(vae, directory=cache)
    assert sum(calls) == 1  # only the changed image
    index = json.loads((cache / "index.json").read_text())
    assert len(index["entries"]) == 3 and len(old_files - set(cache.glob("*.safetensors"))) == 1
    record = next(i for i, r in enumerate(d.records) if r.path.name == "1.png")
    with torch.no_grad():
        mean = vae.encode(d.pixels(record)[None]).latent_dist.mean[0]
    assert torch.allclose(d._latents[(record, False)][0], mean, atol=1e-5)


def test_another_vae_or_resolution_never_gets_stale_latents(tmp_path):
    source, cache = _folder(tmp_path), tmp_path / "cache"
    data(source).cache_latents(tiny_vae(0), directory=cache)
    other = tiny_vae(1)
    assert vae_fingerprint(other) != vae_fingerprint(tiny_vae(0)) == vae_fingerprint(tiny_vae(0))
    calls = count_encodes(other)
    data(source).cache_latents(other, directory=cache)
    assert sum(calls) == 3
    vae = tiny_vae(0)
    calls = count_encodes(vae)
    data(source, resolution=16).cache_latents(vae, directory=cache)
    assert sum(calls) == 3


def test_damaged_cache_file_is_reencoded(tmp_path):
    source, cache = _folder(tmp_path, n=1), tmp_path / "cache"
    vae = tiny_vae()
    data(source).cache_latents(vae, directory=cache)
    next(cache.glob("*.safetensors")).write_bytes(b"broken")
    calls = count_encodes(vae)
    data(source).cache_latents(vae, directory=cache)
    assert sum(calls) == 1


def test_image_changed_after_discovery_is_refused(tmp_path):
    source = _folder(tmp_path, n=1)
    d = data(source)
    image = source / "2_zkz" / "0.png"
    make_image(image, (32, 32), (1, 2, 3))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    with pytest.raises(DatasetError, match="0.png"):
        d.cache_latents(tiny_vae())


def test_random_crop_cannot_be_cached(tmp_path):
    d = data(_folder(tmp_path, n=1), random_crop=True)
    with pytest.raises(DatasetError, match="random_crop"):
        d.cache_latents(tiny_vae())


def test_unused_reg_images_are_not_encoded(tmp_path):
    make_folder(tmp_path / "t" / "1_zkz", 1, size=(32, 32))
    make_folder(tmp_path / "r" / "1_shape", 4, size=(32, 32))
    d = data(tmp_path / "t", reg_data=str(tmp_path / "r"))
    vae = tiny_vae()
    calls = count_encodes(vae)
    d.cache_latents(vae)
    assert sum(calls) == 2
    assert all(b.latents is not None for b in d.epoch_batches(0))


def test_another_resize_interpolation_gets_latents_of_its_own(tmp_path):
    """kohya's resize_interpolation changes the pixels the VAE sees; Lanczos (absent) keeps the keys it had."""
    source, cache = _folder(tmp_path), tmp_path / "cache"
    vae = tiny_vae(0)
    data(source, resolution=16).cache_latents(vae, directory=cache)
    calls = count_encodes(vae)
    data(source, resolution=16, resize_interpolation="nearest").cache_latents(vae, directory=cache)
    assert sum(calls) == 3
    calls = count_encodes(vae)
    data(source, resolution=16).cache_latents(vae, directory=cache)
    assert calls == []  # the Lanczos latents are still there, under their old keys


def test_pruning_deletes_only_an_entrys_own_file(tmp_path):
    """A stale entry's latent file is deleted; an index naming anything else (a path outside the cache, a hand-
    edited entry) loses the entry, never the file."""
    from lorakit.data.cache import INDEX_NAME, DiskIndex
    from lorakit.data.errors import Problems

    cache = tmp_path / "cache"
    cache.mkdir()
    precious = tmp_path / "photo.png"
    precious.write_bytes(b"irreplaceable")
    (cache / "k1.safetensors").write_bytes(b"latent")
    gone = str(tmp_path / "no-such-image.png")
    entries = {"k1": {"file": "k1.safetensors", "path": gone, "mtime_ns": 0, "size": 0},
               "k2": {"file": "../photo.png", "path": gone, "mtime_ns": 0, "size": 0},
               "k3": {"path": gone}}
    (cache / INDEX_NAME).write_text(json.dumps({"version": 1, "entries": entries}))
    index = DiskIndex(cache, Problems())
    index.prune()
    assert index.entries == {} and not (cache / "k1.safetensors").exists()
    assert precious.read_bytes() == b"irreplaceable" and cache.is_dir()
