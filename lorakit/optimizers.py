"""The optimizers a run can use, by the name ``optimizer.optimizer`` gives (one table: the config checks names
against it, the trainer builds from it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _adamw(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=opt.learning_rate, betas=tuple(opt.betas), weight_decay=opt.weight_decay)


def _adamw8bit(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("needs bitsandbytes (pip install bitsandbytes)") from None
    return bnb.optim.AdamW8bit(groups, lr=opt.learning_rate, betas=tuple(opt.betas), weight_decay=opt.weight_decay)


def _sgd(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=opt.learning_rate, weight_decay=opt.weight_decay)


#: name -> builder(param_groups, OptimizerConfig)
OPTIMIZERS: dict[str, Callable[[list[dict], Any], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "sgd": _sgd,
}
