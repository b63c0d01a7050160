"""Everything between "a folder of images" and batches for the training loop.

Typical use by the trainer::

    data = TrainingData(config.data, seed=config.training.seed, default_resolution=512)
    print(data.summary())                      # DatasetError was raised already if anything is wrong
    data.cache_latents(vae, directory=...)     # optional; batches then carry latents instead of pixels
    for epoch in range(first_epoch, epochs):
        for batch in data.epoch_batches(epoch, skip=steps_done_in_epoch):
            ...

Modules: ``config`` (DataConfig, kohya TOML), ``discovery`` (folders, caption files, checks), ``captions``,
``buckets``, ``images``, ``cache`` (latents), ``dataset`` (TrainingData, batches).
"""

from __future__ import annotations

from lorakit.lazy import lazy_exports

# Names are imported on first use (PEP 562), not here: lorakit.config reads data.config, and `lorakit train
# --print-config` must not wait for torch, which cache and dataset bring.
_EXPORTS: dict[str, str] = {
    "IMAGE_EXTENSIONS": "lorakit.data.images",
    "Batch": "lorakit.data.dataset",
    "BatchPlan": "lorakit.data.dataset",
    "BucketScheme": "lorakit.data.buckets",
    "DataConfig": "lorakit.data.config",
    "DatasetConfig": "lorakit.data.config",
    "DatasetError": "lorakit.data.errors",
    "DatasetWarning": "lorakit.data.errors",
    "EpochBatches": "lorakit.data.dataset",
    "ImageRecord": "lorakit.data.discovery",
    "SubsetConfig": "lorakit.data.config",
    "TrainingData": "lorakit.data.dataset",
    "base_caption": "lorakit.data.captions",
    "bucket_resolutions": "lorakit.data.buckets",
    "count_tags": "lorakit.data.captions",
    "load_rgb": "lorakit.data.images",
    "read_dataset_toml": "lorakit.data.config",
    "resolve_datasets": "lorakit.data.discovery",
    "sample_caption": "lorakit.data.captions",
    "to_rgb": "lorakit.data.images",
    "vae_fingerprint": "lorakit.data.cache",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
