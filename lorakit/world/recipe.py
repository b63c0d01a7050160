"""The built-in job's recipe: how the "zkz" concept is trained on the built-in model, in one place.

``lorakit train`` with no data (``lorakit.commands.train``), the overfitting curves (``lorakit.world.experiment``)
and the end-to-end test all start from it.  Measured on the shapes world (docs/early_stopping.md): a LoCon,
since the star's outline needs the conv layers, at a learning rate that learns it within 20 epochs without
breaking the model (on the built-in model, 4e-3 broke it within 8-12 epochs and the calm rule then stopped
on a broken checkpoint).
"""

from __future__ import annotations

from typing import Any

from lorakit.config import TrainConfig
from lorakit.world.concept import SAMPLE_CFG, SAMPLE_STEPS

#: dotted config key -> value
RECIPE: dict[str, Any] = {
    "network.preset": "full",
    "network.rank": 8,
    "network.alpha": 8.0,
    "optimizer.learning_rate": 2e-3,
    "data.batch_size": 4,
    "training.max_epochs": 20,
    # sampling 9 prompts costs about as much as training an epoch on the CPU
    "sample.every_n_epochs": 2,
    # the world's sampler settings (its sample prompts carry them too): the sample stop
    # (early_stop.samples = "world") then draws the very images the overfitting onset is measured on
    "sample.steps": SAMPLE_STEPS,
    "sample.cfg_scale": SAMPLE_CFG,
    # textual inversion / pivotal tuning start the new token from the world's class word
    "method.ti_init_word": "shape",
}


def apply_recipe(cfg: TrainConfig, *, only_defaults: bool = False) -> TrainConfig:
    """Set the recipe's values on ``cfg`` (with ``only_defaults``: only where ``cfg`` still has the general
    default, so a user's own choice wins); returns ``cfg``."""
    defaults = TrainConfig()
    for dotted, value in RECIPE.items():
        section, name = dotted.split(".")
        if section == "network" and cfg.method.kind in ("ti", "native"):
            continue  # no adapter to shape (and adapter settings on those methods are refused)
        if not only_defaults or getattr(getattr(cfg, section), name) == getattr(getattr(defaults, section), name):
            setattr(getattr(cfg, section), name, value)
    return cfg


def recipe_config() -> TrainConfig:
    """A fresh config with the recipe applied."""
    return apply_recipe(TrainConfig())
