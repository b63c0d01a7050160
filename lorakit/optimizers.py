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


def _dadaptation(name: str) -> Callable[[list[dict], Any], torch.optim.Optimizer]:
    """D-Adaptation (Defazio & Mishchenko 2023; Prodigy's predecessor, kohya's DAdaptAdam, DAdaptLion...):
    estimates the step size; the learning rate is a multiplier, 1.0 as kohya's guides set it."""
    def build(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
        dadaptation = _import("dadaptation", "dadaptation")
        return getattr(dadaptation, name)(groups, **{"lr": opt.learning_rate, "weight_decay": opt.weight_decay,
                                                     **opt.args})
    return build


def _adafactor(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
    """transformers' Adafactor at the configured learning rate (no relative step, as kohya runs it with an lr)."""
    from transformers.optimization import Adafactor

    return Adafactor(groups, **{"lr": opt.learning_rate, "weight_decay": opt.weight_decay, "relative_step": False,
                                "scale_parameter": False, "warmup_init": False, **opt.args})


#: the dadaptation package's optimizers, by their class names (kohya's optimizer_type names)
_DADAPTATION = ("DAdaptAdam", "DAdaptLion", "DAdaptSGD", "DAdaptAdaGrad", "DAdaptAdan")

#: name -> builder(param_groups, OptimizerConfig)
OPTIMIZERS: dict[str, Callable[[list[dict], Any], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "sgd": _sgd,
    "prodigy": _prodigy,
    "lion": _lion,
    "adafactor": _adafactor,
    **{name.lower(): _dadaptation(name) for name in _DADAPTATION},
}
#: the optimizers that find their own step size: the learning rate multiplies it, and belongs near 1
ADAPTIVE = ("prodigy", *(name.lower() for name in _DADAPTATION))


def adaptive_lr_note(optimizer: str, learning_rates: list[float]) -> str | None:
    """A warning when an optimizer that estimates its own step size gets a learning rate far below 1 (the usual
    slip: AdamW's 1e-4 kept, so the estimated step is scaled 10 000 times down and nothing is learned)."""
    # the largest: block-wise learning-rate weights scale some groups down on purpose
    top = max(learning_rates, default=1.0)
    if optimizer not in ADAPTIVE or top >= 0.1:
        return None
    return (f"note: {optimizer} estimates its own step size and the learning rate multiplies it; {top:g} makes it "
            "learn almost nothing. Use --lr 1 (as kohya's guides do), or 0.5 for a gentler run")
