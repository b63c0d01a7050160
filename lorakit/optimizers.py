"""The optimizers a run can use, by the name ``optimizer.optimizer`` gives (one table: the config checks names
against it, the trainer builds from it), kohya's ``optimizer_type`` names lowercased; or, as in kohya, any
optimizer class by its full name (``torch.optim.RAdam``, ``came_pytorch.CAME``: ``optimizer_builder``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from lorakit.schedule_free import SCHEDULE_FREE, is_schedule_free


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


def _from_module(module: str, name: str, package: str | None = None, *, betas: bool = False,
                 defaults: dict[str, Any] | None = None) -> Callable[[list[dict], Any], torch.optim.Optimizer]:
    """The optimizer class ``module.name`` (``package`` installs it): the learning rate and weight decay, and
    optimizer.betas where it takes them (``betas``), then ``defaults``, then optimizer.args.  A schedule-free one
    (``lorakit.schedule_free``) is handed over in training mode, which its step() needs."""
    def build(groups: list[dict], opt: Any) -> torch.optim.Optimizer:
        cls = getattr(_import(module, package or module), name)
        options = {"lr": opt.learning_rate, "weight_decay": opt.weight_decay,
                   **({"betas": tuple(opt.betas)} if betas else {}), **(defaults or {}), **opt.args}
        optimizer = cls(groups, **options)
        if is_schedule_free(optimizer):
            optimizer.train()
        return optimizer
    return build


def _bitsandbytes(name: str, **options: Any) -> Callable[[list[dict], Any], torch.optim.Optimizer]:
    """bitsandbytes' 8-bit (and paged) optimizers, kohya's AdamW8bit, PagedAdamW8bit, Lion8bit, ...: their state
    in 8 bits, a quarter of AdamW's memory.  On a CPU the paged ones run unpaged (bitsandbytes falls back)."""
    return _from_module("bitsandbytes.optim", name, "bitsandbytes", **options)


#: the dadaptation package's optimizers, by their class names (kohya's optimizer_type names)
_DADAPTATION = ("DAdaptAdam", "DAdaptLion", "DAdaptSGD", "DAdaptAdaGrad", "DAdaptAdan")

#: name -> builder(param_groups, OptimizerConfig)
OPTIMIZERS: dict[str, Callable[[list[dict], Any], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    # optimizer.betas for the AdamW kinds; Lion keeps its own
    "adamw8bit": _bitsandbytes("AdamW8bit", betas=True),
    "pagedadamw": _bitsandbytes("PagedAdamW", betas=True),
    "pagedadamw8bit": _bitsandbytes("PagedAdamW8bit", betas=True),
    "pagedadamw32bit": _bitsandbytes("PagedAdamW32bit", betas=True),
    "lion8bit": _bitsandbytes("Lion8bit"),
    "pagedlion8bit": _bitsandbytes("PagedLion8bit"),
    # kohya's SGDNesterov8bit: momentum 0.9 unless optimizer.args says otherwise (bitsandbytes' SGD8bit takes
    # nesterov and ignores it, in kohya too: a momentum SGD)
    "sgdnesterov8bit": _bitsandbytes("SGD8bit", defaults={"momentum": 0.9, "nesterov": True}),
    "sgd": _from_module("torch.optim", "SGD"),
    # kohya's SGDNesterov: SGD with Nesterov momentum, 0.9 unless optimizer.args sets it
    "sgdnesterov": _from_module("torch.optim", "SGD", defaults={"momentum": 0.9, "nesterov": True}),
    # The adaptive and sign-based ones kohya users pick keep their own default betas (Lion's are (0.9, 0.99), not
    # AdamW's).  Prodigy (Mishchenko & Defazio 2023) and D-Adaptation (Defazio & Mishchenko 2023, its predecessor:
    # kohya's DAdaptAdam, DAdaptLion, ...) estimate the step size: the learning rate is a multiplier, 1.0 as their
    # authors and kohya's guides set it.  Lion (Chen et al. 2023): sign updates; its rate 3-10 times below AdamW's.
    "prodigy": _from_module("prodigyopt", "Prodigy"),
    "lion": _from_module("lion_pytorch", "Lion", "lion-pytorch"),
    # transformers' Adafactor at the configured learning rate (no relative step, as kohya runs it with an lr)
    "adafactor": _from_module("transformers.optimization", "Adafactor", "transformers",
                              defaults={"relative_step": False, "scale_parameter": False, "warmup_init": False}),
    **{name.lower(): _from_module("dadaptation", name) for name in _DADAPTATION},
    # kohya's AdamWScheduleFree and kin; their own warm-up is optimizer.args = {warmup_steps = N}
    **{name: _from_module("schedulefree", cls, betas=betas) for name, (cls, betas) in SCHEDULE_FREE.items()},
}


class OptimizerNameError(ValueError):
    """``optimizer.optimizer`` names no optimizer lorakit knows and no class that can be imported."""


def optimizer_builder(name: str) -> Callable[[list[dict], Any], torch.optim.Optimizer]:
    """The builder for ``name``: one of ``OPTIMIZERS`` (any case), or a class by its full name, kohya's
    ``--optimizer_type torch.optim.RAdam`` (lr and weight decay from the config, the rest from optimizer.args).
    ``OptimizerNameError`` saying what is known, or what of the full name does not import."""
    if name.lower() in OPTIMIZERS:
        return OPTIMIZERS[name.lower()]
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise OptimizerNameError(f"{name!r} is no optimizer lorakit knows ({', '.join(OPTIMIZERS)}); or give an "
                                 "optimizer class by its full name, e.g. torch.optim.RAdam")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as err:
        raise OptimizerNameError(f"{name!r}: its module {module_name} cannot be imported ({err}); is its package "
                                 "installed?") from None
    except AttributeError:
        raise OptimizerNameError(f"{name!r}: the module {module_name} has no {class_name}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise OptimizerNameError(f"{name!r} is no torch optimizer class")
    return _from_module(module_name, class_name)


#: the optimizers that find their own step size: the learning rate multiplies it, and belongs near 1
ADAPTIVE = ("prodigy", *(name.lower() for name in _DADAPTATION))


def adaptive_lr_note(optimizer: str, learning_rates: list[float]) -> str | None:
    """A warning when an optimizer that estimates its own step size gets a learning rate far below 1 (the usual
    slip: AdamW's 1e-4 kept, so the estimated step is scaled 10 000 times down and nothing is learned)."""
    # the largest: block-wise learning-rate weights scale some groups down on purpose
    top = max(learning_rates, default=1.0)
    if optimizer.lower() not in ADAPTIVE or top >= 0.1:
        return None
    return (f"note: {optimizer} estimates its own step size and the learning rate multiplies it; {top:g} makes it "
            "learn almost nothing. Use --lr 1 (as kohya's guides do), or 0.5 for a gentler run")
