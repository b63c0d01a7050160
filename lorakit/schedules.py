"""The learning-rate schedule of a run, chosen as kohya chooses it (sd-scripts' ``get_scheduler_fix``).

- ``optimizer.lr_scheduler``: a schedule by name: diffusers' (constant, constant_with_warmup, linear, cosine,
  cosine_with_restarts, polynomial, piecewise_constant) and transformers' (cosine_with_min_lr,
  warmup_stable_decay, inverse_sqrt), with kohya's arguments: warm-up, cycles, power, decay steps, the smallest
  rate as a share of the first (``lr_scheduler_min_lr_ratio``), the inverse square root's timescale.
- ``optimizer.lr_scheduler_type``: instead, a class of ``torch.optim.lr_scheduler`` by name (kohya's
  ``--lr_scheduler_type``, e.g. ``CosineAnnealingWarmRestarts``); kohya also imports a class from any module a
  config names, which would run that module's code: lorakit takes torch's schedules only.
- ``optimizer.lr_scheduler_args``: more keyword arguments of the schedule (kohya's ``--lr_scheduler_args``:
  ``step_rules`` of piecewise_constant, ``T_0`` of CosineAnnealingWarmRestarts, ...).

The schedule is stepped once per optimizer step, so every count here is in optimizer steps.  Nothing in this
module imports torch at import time: the config validates names against its tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit.config import ConfigError, OptimizerConfig, warmup_steps

if TYPE_CHECKING:
    import torch

DIFFUSERS_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                       "piecewise_constant")
TRANSFORMERS_SCHEDULES = ("cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt")
SCHEDULES = DIFFUSERS_SCHEDULES + TRANSFORMERS_SCHEDULES
#: the schedules that have no warm-up (kohya refuses a warm-up with them; lorakit would otherwise drop it unsaid)
WITHOUT_WARMUP = ("constant", "piecewise_constant")
TORCH_MODULE = "torch.optim.lr_scheduler"
#: torch's schedules built from Python functions or other schedules, which a config cannot give
TORCH_NEEDS_OBJECTS = ("LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler")


def torch_schedule_class(name: str) -> type:
    """The class of ``torch.optim.lr_scheduler`` that ``optimizer.lr_scheduler_type`` names (``StepLR`` or
    ``torch.optim.lr_scheduler.StepLR``); ConfigError for anything else."""
    import torch.optim.lr_scheduler as schedules

    module, _, short = name.rpartition(".")
    if module not in ("", TORCH_MODULE):
        raise ConfigError(f"optimizer.lr_scheduler_type = {name!r}: lorakit takes the schedules of {TORCH_MODULE} "
                          "by name (it does not import other modules named in a config), e.g. "
                          "CosineAnnealingWarmRestarts")
    if short in TORCH_NEEDS_OBJECTS:
        raise ConfigError(f"optimizer.lr_scheduler_type = {name!r}: it is built from Python functions or other "
                          "schedules, which a config cannot give")
    found = getattr(schedules, short, None)
    if isinstance(found, type) and issubclass(found, schedules.ReduceLROnPlateau):
        raise ConfigError(f"optimizer.lr_scheduler_type = {name!r}: it steps on a measured metric, and lorakit "
                          "steps the schedule once per optimizer step without one")
    if not (isinstance(found, type) and issubclass(found, schedules.LRScheduler)) or short.startswith("_") \
            or short == "LRScheduler":
        known = sorted(n for n, c in vars(schedules).items() if isinstance(c, type) and not n.startswith("_")
                       and issubclass(c, schedules.LRScheduler) and n != "LRScheduler"
                       and not issubclass(c, schedules.ReduceLROnPlateau) and n not in TORCH_NEEDS_OBJECTS)
        raise ConfigError(f"optimizer.lr_scheduler_type = {name!r}: not a schedule of {TORCH_MODULE}; one of "
                          f"{', '.join(known)}")
    return found


def schedule_steps(opt: OptimizerConfig, total_steps: int) -> tuple[int, int]:
    """(warm-up, decay) in optimizer steps: each a number of steps, or a share below 1 of ``total_steps``."""
    return warmup_steps(opt.lr_warmup_steps, total_steps), warmup_steps(opt.lr_decay_steps, total_steps)


def build_lr_schedule(opt: OptimizerConfig, optimizer: torch.optim.Optimizer, total_steps: int, *,
                      stand_in: bool = False) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``opt`` asks for, over a run of ``total_steps`` optimizer steps (``stand_in``: a length made up
    to check the settings before the run's is known, so what depends on it is not checked)."""
    kwargs = dict(opt.lr_scheduler_args)
    warmup, decay = schedule_steps(opt, total_steps)
    if opt.lr_scheduler_type:
        if warmup:
            raise ConfigError(f"optimizer.lr_warmup_steps = {opt.lr_warmup_steps!r}: a torch schedule "
                              f"(lr_scheduler_type = {opt.lr_scheduler_type!r}) has no warm-up; set it to 0")
        return _made(f"lr_scheduler_type = {opt.lr_scheduler_type!r}", torch_schedule_class(opt.lr_scheduler_type),
                     optimizer, {}, kwargs)
    name = opt.lr_scheduler
    if name in WITHOUT_WARMUP and warmup:
        instead = " (constant_with_warmup warms up)" if name == "constant" else ""
        raise ConfigError(f"optimizer.lr_warmup_steps = {opt.lr_warmup_steps!r}: the {name} schedule has no "
                          f"warm-up{instead}; set it to 0 or choose another schedule")
    if name == "warmup_stable_decay" and warmup + decay > total_steps and not stand_in:
        raise ConfigError(f"optimizer.lr_warmup_steps and lr_decay_steps: {warmup} + {decay} steps are more than "
                          f"the run's {total_steps}")
    floor_given = opt.lr_scheduler_min_lr_ratio is not None or {"min_lr", "min_lr_rate"} & set(kwargs)
    if name == "cosine_with_min_lr" and not floor_given:
        raise ConfigError("optimizer.lr_scheduler_min_lr_ratio: cosine_with_min_lr needs the smallest rate as a share "
                          "of the first (kohya's --lr_scheduler_min_lr_ratio), e.g. 0.1")
    if name in TRANSFORMERS_SCHEDULES:
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    elif name in DIFFUSERS_SCHEDULES:
        from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    else:
        raise ConfigError(f"optimizer.lr_scheduler = {name!r}: one of {', '.join(SCHEDULES)}")
    # each schedule's own arguments, as kohya passes them (its cosine_with_min_lr and warmup_stable_decay take
    # half the cycles: one cycle is a cosine from the top to the bottom)
    arguments: dict[str, Any] = {
        "constant": {},
        "piecewise_constant": {},
        "constant_with_warmup": {"num_warmup_steps": warmup},
        "inverse_sqrt": {"num_warmup_steps": warmup, "timescale": opt.lr_scheduler_timescale},
        "linear": {"num_warmup_steps": warmup, "num_training_steps": total_steps},
        "cosine": {"num_warmup_steps": warmup, "num_training_steps": total_steps},
        "cosine_with_restarts": {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                                 "num_cycles": opt.lr_scheduler_num_cycles},
        "polynomial": {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                       "power": opt.lr_scheduler_power},
        "cosine_with_min_lr": {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                               "num_cycles": opt.lr_scheduler_num_cycles / 2,
                               "min_lr_rate": opt.lr_scheduler_min_lr_ratio},
        "warmup_stable_decay": {"num_warmup_steps": warmup, "num_decay_steps": decay,
                                "num_stable_steps": total_steps - warmup - decay,
                                "num_cycles": opt.lr_scheduler_num_cycles / 2,
                                "min_lr_ratio": opt.lr_scheduler_min_lr_ratio or 0.0},
    }[name]
    return _made(f"lr_scheduler = {name!r}", function, optimizer, arguments, kwargs)


def _made(setting: str, make: Any, optimizer: torch.optim.Optimizer, arguments: dict[str, Any],
          given: dict[str, Any]) -> Any:
    """``make(optimizer, **arguments, **given)``; an argument the schedule does not take, or a value it refuses,
    is said with the settings that gave it (``given``: the user's lr_scheduler_args)."""
    try:
        return make(optimizer, **{**arguments, **given})
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        args = ", ".join(f"{k} = {v!r}" for k, v in given.items())
        raise ConfigError(f"optimizer.{setting} with lr_scheduler_args {{{args}}}: the schedule could not be made: "
                          f"{err}") from None


def check_schedule(opt: OptimizerConfig) -> None:
    """Make the schedule once on a stand-in parameter, so that a wrong name or argument is said before a run
    loads anything (the run's length is not known yet: what depends on it is checked again when it starts)."""
    import torch

    shares = [v for v in (opt.lr_warmup_steps, opt.lr_decay_steps) if isinstance(v, float) and v < 1]
    if opt.lr_scheduler == "warmup_stable_decay" and len(shares) == 2 and sum(shares) > 1:
        raise ConfigError(f"optimizer.lr_warmup_steps = {shares[0]!r} and lr_decay_steps = {shares[1]!r}: shares of "
                          "the run that add up to more than all of it")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    build_lr_schedule(opt, optimizer, 2 * max(1000, sum(schedule_steps(opt, 1000))), stand_in=True)
