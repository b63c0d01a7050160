"""Latent cache: each (image, crop, flip) encoded by the VAE once, kept in memory or on disk.

What is stored is the VAE's ``latent_dist`` mean and standard deviation (float32, before
``scaling_factor``), not one sample: the trainer draws ``mean + std * noise`` at every step, as it would
without a cache. On disk, one ``.safetensors`` file per entry sits next to ``index.json``. An entry's key
hashes the image's absolute path, mtime, byte size, the resize/crop/flip applied, and the VAE's identity
(a hash of its config, dtype and weights), so an edited image or another VAE can never be served a stale
latent: it gets a new key and is encoded again. Entries whose image changed are deleted. All writes go to
a temporary file first and are moved into place with ``os.replace`` (a crash leaves no half file).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.atomic import atomic_write, atomic_write_text
from lorakit.data.errors import DatasetError, Problems

CACHE_VERSION = 1
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class EncodeJob:
    """One latent to have: which file, how it is cut, and the file's state when the dataset was read."""

    path: Path
    mtime_ns: int
    file_size: int
    resized: tuple[int, int]
    bucket: tuple[int, int]
    offset: tuple[int, int]
    flip: bool
    interpolation: str | None = None  # resize_interpolation (None: Lanczos)

    def key(self, vae_id: str) -> str:
        fields = {"v": CACHE_VERSION, "path": str(self.path.resolve()), "mtime_ns": self.mtime_ns,
                  "size": self.file_size, "resized": list(self.resized), "bucket": list(self.bucket),
                  "offset": list(self.offset), "flip": self.flip, "vae": vae_id}
        if self.interpolation is not None:  # absent: the key of a latent cached before the option
            fields["interpolation"] = self.interpolation
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


Latent = tuple[torch.Tensor, torch.Tensor]  # (mean, std), each (C, h, w) float32 on the CPU


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A hash of the VAE's class, config, dtype and every weight: two VAEs share latents only if equal."""
    h = hashlib.sha256(type(vae).__name__.encode())
    config = getattr(vae, "config", {})
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]



class DiskIndex:
    """``index.json``: key → what the entry was made from (for pruning and for people reading the folder)."""

    def __init__(self, directory: Path, problems: Problems) -> None:
        self.directory = directory
        self.path = directory / INDEX_NAME
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                if loaded.get("version") == CACHE_VERSION:
                    self.entries = dict(loaded.get("entries", {}))
            except (json.JSONDecodeError, OSError, AttributeError) as e:
                problems.warn(f"{self.path}: unreadable latent cache index ({e}); rebuilding it")

    def load(self, key: str) -> Latent | None:
        """The entry's tensors, if its file exists and says it holds exactly this key."""
        if key not in self.entries:
            return None
        file = self.directory / self.entries[key]["file"]
        try:
            with safe_open(str(file), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                return f.get_tensor("mean"), f.get_tensor("std")
        except Exception:  # missing or damaged file: encode again
            return None

    def store(self, key: str, job: EncodeJob, latent: Latent) -> None:
        file = f"{key[:40]}.safetensors"
        atomic_write(self.directory / file, lambda tmp: save_file(
            {"mean": latent[0].contiguous(), "std": latent[1].contiguous()}, str(tmp), metadata={"key": key}))
        self.entries[key] = {"file": file, "path": str(job.path.resolve()), "mtime_ns": job.mtime_ns,
                             "size": job.file_size, "bucket": list(job.bucket), "flip": job.flip}

    def prune(self) -> None:
        """Delete entries whose image is gone or changed: they can never be used again."""
        for key, entry in list(self.entries.items()):
            try:
                stat = os.stat(entry["path"])
                stale = stat.st_mtime_ns != entry["mtime_ns"] or stat.st_size != entry["size"]
            except (OSError, KeyError):
                stale = True
            if not stale:
                continue
            name = str(entry.get("file", ""))
            if name == Path(name).name and name.endswith(".safetensors"):  # an entry's own file, nothing else
                (self.directory / name).unlink(missing_ok=True)
            del self.entries[key]

    def save(self) -> None:
        text = json.dumps({"version": CACHE_VERSION, "entries": self.entries}, indent=1, sort_keys=True)
        atomic_write_text(self.path, text)


def encode_all(jobs: Sequence[EncodeJob], vae: torch.nn.Module, load_pixels: Callable[[EncodeJob], torch.Tensor],
               directory: Path | None = None, vae_id: str | None = None, batch_size: int = 8,
               problems: Problems | None = None) -> dict[EncodeJob, Latent]:
    """Latents for every job: read from ``directory`` when present and valid, else encoded (and written)."""
    problems = problems if problems is not None else Problems()
    vae_id = vae_id or vae_fingerprint(vae)
    index = None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        index = DiskIndex(directory, problems)
    for job in jobs:  # an image edited since the dataset was read would be encoded with the wrong bucket
        stat = job.path.stat()
        if (stat.st_mtime_ns, stat.st_size) != (job.mtime_ns, job.file_size):
            raise DatasetError(f"{job.path}: changed since the dataset was read; start again to re-read it")
    result: dict[EncodeJob, Latent] = {}
    todo = []
    for job in jobs:
        found = index.load(job.key(vae_id)) if index is not None else None
        if found is not None:
            result[job] = found
        else:
            todo.append(job)
    by_bucket: dict[tuple[int, int], list[EncodeJob]] = {}
    for job in todo:  # same-size images batch together
        by_bucket.setdefault(job.bucket, []).append(job)
    param = next(iter(vae.parameters()))
    for group in by_bucket.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            pixels = torch.stack([load_pixels(job) for job in chunk]).to(param.device, param.dtype)
            with torch.no_grad():
                dist = vae.encode(pixels).latent_dist
            for job, mean, std in zip(chunk, dist.mean.float().cpu(), dist.std.float().cpu(), strict=True):
                result[job] = (mean.clone(), std.clone())
                if index is not None:
                    index.store(job.key(vae_id), job, result[job])
    if index is not None:
        index.prune()
        index.save()
    return result
