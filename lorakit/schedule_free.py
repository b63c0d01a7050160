"""Schedule-free optimizers (Defazio et al. 2024, the ``schedulefree`` package; kohya's AdamWScheduleFree,
RAdamScheduleFree, SGDScheduleFree): no learning-rate schedule, and two sets of weights.  The gradient is taken at
an interpolation ``y`` (what the parameters hold while training); the weights to use are the average ``x``, which
``optimizer.eval()`` puts into the parameters and ``optimizer.train()`` takes out again.

So, as kohya does, the trainer trains in training mode and shows ``x`` to everything that judges or keeps the
weights: samples, validation, checkpoints and the result (``evaluation_weights``), the way it shows an EMA's average.
``train()`` after ``eval()`` gives ``y`` back only to rounding, so the parameters are restored from a copy: a run
that sampled or saved goes on exactly as one that did not, and a resumed run as a straight one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: kohya's optimizer_type names (lowercased) -> the schedulefree class and whether it takes optimizer.betas
SCHEDULE_FREE = {"adamwschedulefree": ("AdamWScheduleFree", True), "radamschedulefree": ("RAdamScheduleFree", True),
                 "sgdschedulefree": ("SGDScheduleFree", False)}


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__module__.split(".")[0] == "schedulefree"


def names_schedule_free(name: str) -> bool:
    """Whether ``optimizer.optimizer`` names a schedule-free optimizer (kohya's name, or the class's full name)."""
    return name.lower() in SCHEDULE_FREE or name.split(".")[0] == "schedulefree"


def schedule_free_refusal(name: str, lr_scheduler: str, warmup: float, ema_decay: float | None,
                          fused_backward_pass: bool) -> str | None:
    """Why these settings cannot go with a schedule-free optimizer (None: they can, or it is none)."""
    if not names_schedule_free(name):
        return None
    if lr_scheduler != "constant" or warmup:
        return (f"{name} replaces the learning-rate schedule (kohya runs it without one): keep "
                "optimizer.lr_scheduler = \"constant\" without lr_warmup_steps; it warms up itself with "
                "optimizer.args = {warmup_steps = N}")
    if ema_decay is not None:
        return f"{name} averages the weights itself: leave training.ema_decay unset"
    if fused_backward_pass:
        return (f"{name} switches all its weights between training and evaluation together, and the fused pass "
                "makes an optimizer per weight: turn optimizer.fused_backward_pass off")
    return None


@contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The parameters hold the schedule-free average ``x`` inside; the training point ``y``, bit for bit, after."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    live = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, y in zip(params, live, strict=True):
                p.copy_(y)
