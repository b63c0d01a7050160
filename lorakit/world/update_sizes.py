"""The update's size ‖ΔW‖/‖W‖ (mean over layers) of every epoch checkpoint of a run, for replaying the ``budget``
rule on runs recorded before the trainer kept the size with every CS sample; and its spectral size
σ1(ΔW)/σ1(W) (``checkpoint_spectral_sizes``), which the trainer reads only when its rule is ``spectral-budget``.

A run trained since then has the size per step in ``cs_history.json`` and the rule replays exactly as it ran;
for an older run the size is read from its saved epoch checkpoints (the same ``CSMeter`` sums), so the rule is
replayed at epoch ends: it stops at the first epoch whose checkpoint reached the budget (online it decides at
the step inside that epoch where the size crossed it).  Cached in ``<run>/update_sizes.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorakit.atomic import atomic_write_json
from lorakit.checkpoints import RunFolder
from lorakit.config import load_config
from lorakit.earlystop.cs import CSMeter
from lorakit.earlystop.rules import Rule
from lorakit.formats import load_network
from lorakit.models import BaseModel, load_base_model
from lorakit.world.grid import SPECTRAL_CACHE

CACHE = "update_sizes.json"


_models: dict[str | None, BaseModel] = {}  # one load of a base model for every run of a report


def checkpoint_update_sizes(run_dir: Path, model: BaseModel | None = None) -> dict[int, float]:
    """Epoch -> mean ‖ΔW‖/‖W0‖ over the adapted U-Net layers of that epoch's checkpoint (as the trainer measures:
    the U-Net's adapters); ``model``: the run's base model (default: the one its config names)."""
    return _checkpoint_sizes(run_dir, CACHE, spectral=False, model=model)


def budget_epoch(sizes: dict[int, float], budget: float) -> int | None:
    """The first epoch whose checkpoint's size reached ``budget`` (None: never in the run)."""
    return next((epoch for epoch, size in sorted(sizes.items()) if size >= budget), None)


def size_rule_epoch(sizes: dict[int, float], rule: Rule) -> int | None:
    """The epoch a size rule (a budget, or the growth stall) picks on the checkpoints' sizes, one value per epoch
    (a window of one sample); None: never in the run.  Epochs are taken in order; a gap in them is the rule's
    window too (a growth stall then compares epochs further apart)."""
    epochs = sorted(sizes)
    found = rule.find(np.asarray([sizes[e] for e in epochs], dtype=np.float64), window=1)
    return None if found is None else epochs[found.csf_index]


def checkpoint_spectral_sizes(run_dir: Path, model: BaseModel | None = None) -> dict[int, float]:
    """Epoch -> the mean over the adapted U-Net layers of σ1(ΔW)/σ1(W0) for each epoch checkpoint.

    Why beside ‖ΔW‖/‖W‖: the Frobenius size of a high-rank update (LoHa's rank r², LoKr's Kronecker product) is
    spread over many directions, each moved a little, while a rank-8 LoRA puts all of it into eight; the largest
    singular value is how far the layer moves any one input, whatever the update's rank.  The trainer's own
    reading (``CSMeter.read(spectral=True)``: exact), cached in ``spectral_sizes.json``; a run whose checkpoints
    are gone (an archived record) is read from that file alone."""
    return _checkpoint_sizes(run_dir, SPECTRAL_CACHE, spectral=True, model=model)


def _checkpoint_sizes(run_dir: Path, cache_name: str, spectral: bool, model: BaseModel | None) -> dict[int, float]:
    """The trainer's reading of every epoch checkpoint not yet in ``<run>/<cache_name>``: the spectral size or
    ‖ΔW‖/‖W‖.  A spectral record stands alone (an archived run keeps it, not its checkpoints); the Frobenius one
    is only a cache of the checkpoints, which must be there."""
    cache = run_dir / cache_name
    sizes = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.exists() else {}
    standalone = spectral and not (run_dir / "checkpoints").is_dir()
    missing = [] if standalone else [c for c in RunFolder(run_dir, "resume").checkpoints() if c.epoch not in sizes]
    if missing:
        if model is None:
            base = load_config(run_dir / "config.toml").model.base
            model = _models[base] if base in _models else _models.setdefault(base, load_base_model(base))
        for checkpoint in missing:
            network, _ = load_network(checkpoint.tensors_path, model.unet, model.text_encoder)
            try:
                unet = network.names("unet")
                reading = CSMeter({n: network[n] for n in unet} if unet else network).read(spectral=spectral)
                sizes[checkpoint.epoch] = reading.spectral if spectral else reading.update  # what the trainer reads
            finally:
                network.remove()
        atomic_write_json(cache, {str(k): v for k, v in sorted(sizes.items())})
    return dict(sorted(sizes.items()))
