"""Experiment trackers beside ``log.jsonl`` (kohya's ``--log_with tensorboard --logging_dir DIR``): the same step
records (loss, learning rate, CS, update size, ...) as TensorBoard scalars, through accelerate's tracker.

TensorBoard needs the ``tensorboard`` package (``pip install lorakit[tensorboard]``); without ``log_with`` nothing
is imported.  A resumed run appends to the same tracker run, so its curves continue at the step they left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.errors import InvalidValueError

#: the trackers lorakit can write, and the package each needs
TRACKERS = {"tensorboard": "tensorboard"}


def check_tracker(log_with: str | None) -> None:
    """Refuse an unknown tracker, or one whose package is missing, before the run starts (naming the option)."""
    if log_with is None:
        return
    if log_with not in TRACKERS:
        raise InvalidValueError(f"output.log_with = {log_with!r}: one of {', '.join(TRACKERS)} (or absent: "
                                "log.jsonl and the run page only)")
    try:
        from torch.utils import tensorboard  # noqa: F401  (imports the tensorboard package, or fails)
    except ImportError:
        raise InvalidValueError(f"output.log_with = {log_with!r} needs the {TRACKERS[log_with]} package (pip install "
                                f"{TRACKERS[log_with]}, or lorakit[tensorboard])") from None


def logging_dir(log_with: str | None, configured: str | None, run_folder: Path) -> Path | None:
    """Where the tracker writes: ``output.logging_dir``, else ``logs/`` in the run folder (None without one)."""
    if log_with is None:
        return None
    return Path(configured).expanduser() if configured else run_folder / "logs"


def hyperparameters(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's settings as TensorBoard's hparams take them: ``section.key`` -> a number, bool or text."""
    flat = {}
    for section, table in config.items():
        for key, value in table.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A log.jsonl record's numbers (the step and epoch are the axis, not values)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}
