"""The optimizers a run can use, by the name ``optimizer.optimizer`` gives (one table: the config checks names
against it, the trainer builds from it)."""

from __future__ import annotations

import importlib
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
    return torch.optim.AdamW(groups, **{"lr": opt.learning_rate, "betas": tuple(opt.betas),
                                        "weight_decay": opt.weight_decay, "fused": can_fuse(groups) or None,
                                        **opt.args})


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"needs {package} (pip install {package}, or lorakit[optimizers])") from None


def _adamw8bit(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    bnb = _import("bitsandbytes", "bitsandbytes")
    return bnb.optim.AdamW8bit(groups, **{"lr": opt.learning_rate, "betas": tuple(opt.betas),
                                          "weight_decay": opt.weight_decay, **opt.args})


def _sgd(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, **{"lr": opt.learning_rate, "weight_decay": opt.weight_decay, **opt.args})


# The adaptive and sign-based optimizers kohya users pick: their own default betas (Lion's are (0.9, 0.99), not
# AdamW's), so optimizer.betas is not passed; optimizer.args (kohya's --optimizer_args) is.
def _prodigy(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023) estimates the step size itself: the learning rate is a multiplier, 1.0
    as its authors and kohya's guides set it."""
    prodigy = _import("prodigyopt", "prodigyopt")
    return prodigy.Prodigy(groups, **{"lr": opt.learning_rate, "weight_decay": opt.weight_decay, **opt.args})


def _lion(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    """Lion (Chen et al. 2023): sign updates; its learning rate is 3-10 times smaller than AdamW's."""
    lion = _import("lion_pytorch", "lion-pytorch")
    return lion.Lion(groups, **{"lr": opt.learning_rate, "weight_decay": opt.weight_decay, **opt.args})


def _adafactor(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    """transformers' Adafactor at the configured learning rate (no relative step, as kohya runs it with an lr)."""
    from transformers.optimization import Adafactor

    return Adafactor(groups, **{"lr": opt.learning_rate, "weight_decay": opt.weight_decay, "relative_step": False,
                                "scale_parameter": False, "warmup_init": False, **opt.args})


#: name -> builder(param_groups, OptimizerConfig)
OPTIMIZERS: dict[str, Callable[[list[dict], Any], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "sgd": _sgd,
    "prodigy": _prodigy,
    "lion": _lion,
    "adafactor": _adafactor,
}
