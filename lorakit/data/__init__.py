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

from lorakit.data.buckets import BucketScheme, bucket_resolutions
from lorakit.data.cache import vae_fingerprint
from lorakit.data.captions import base_caption, count_tags, sample_caption
from lorakit.data.config import DataConfig, DatasetConfig, SubsetConfig, read_dataset_toml
from lorakit.data.dataset import Batch, BatchPlan, EpochBatches, TrainingData
from lorakit.data.discovery import ImageRecord, resolve_datasets
from lorakit.data.errors import DatasetError, DatasetWarning
from lorakit.data.images import IMAGE_EXTENSIONS, load_rgb, to_rgb

__all__ = [
    "IMAGE_EXTENSIONS", "Batch", "BatchPlan", "BucketScheme", "DataConfig", "DatasetConfig", "DatasetError",
    "DatasetWarning", "EpochBatches", "ImageRecord", "SubsetConfig", "TrainingData", "base_caption",
    "bucket_resolutions", "count_tags", "load_rgb", "read_dataset_toml", "resolve_datasets", "sample_caption",
    "to_rgb", "vae_fingerprint",
]
