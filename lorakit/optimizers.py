"""The optimizers a run can use, by the name ``optimizer.optimizer`` gives (one table: the config checks names
against it, the trainer builds from it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def can_fuse(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: floating point, all on one CPU or CUDA device.
    On the CPU the default for-loop AdamW spends ~45 ms per step on a LoCon's 556 tensors, the fused one ~10 ms
    (docs/performance.md); the update is the same AdamW (results agree to float rounding, not bit for bit)."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


def _adamw(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=opt.learning_rate, betas=tuple(opt.betas), weight_decay=opt.weight_decay,
                             fused=can_fuse(groups) or None)


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
