"""Experiment trackers beside ``log.jsonl`` (kohya's ``--log_with tensorboard|wandb|all --logging_dir DIR``): the
same step records (loss, learning rate, CS, update size, ...) as TensorBoard scalars or a Weights & Biases run,
through accelerate's trackers.

Each tracker needs its package (``pip install lorakit[tensorboard]`` / ``lorakit[wandb]``); without ``log_with``
nothing is imported.  A resumed run appends to the same tracker run, so its curves continue at the step they left:
TensorBoard by its folder, W&B by the run id kept in the run folder (``wandb-run.json``).  The W&B API key is read
where W&B itself keeps it (``wandb login``, ``WANDB_API_KEY``), never from the config: the config is copied into
the run folder and the adapter's metadata.
"""

from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lorakit.errors import InvalidValueError

#: the trackers lorakit can write, and the package each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: kohya's log_with = "all": every tracker above
ALL = "all"
#: the run folder's record of its W&B run, so that a resumed run continues it
WANDB_RUN_FILE = "wandb-run.json"
#: W&B modes that write locally and need no login (``wandb sync`` uploads an offline run later)
_LOCAL_MODES = ("offline", "disabled", "dryrun")


def tracker_names(log_with: str | None) -> list[str]:
    """The trackers ``output.log_with`` asks for ("all": every one lorakit writes)."""
    if log_with is None:
        return []
    return list(TRACKERS) if log_with == ALL else [log_with]


def check_tracker(log_with: str | None) -> None:
    """Refuse an unknown tracker, one whose package is missing, or W&B without a login, before the run starts
    (naming the option)."""
    if log_with is not None and log_with not in (*TRACKERS, ALL):
        raise InvalidValueError(f"output.log_with = {log_with!r}: one of {', '.join(TRACKERS)} or {ALL} (or absent: "
                                "log.jsonl and the run page only)")
    for name in tracker_names(log_with):
        try:
            if name == "tensorboard":
                from torch.utils import tensorboard  # noqa: F401  (imports the tensorboard package, or fails)
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise InvalidValueError(f"output.log_with = {log_with!r} needs the {TRACKERS[name]} package (pip install "
                                    f"{TRACKERS[name]}, or lorakit[{name}])") from None
    if "wandb" in tracker_names(log_with) and not wandb_can_log():
        raise InvalidValueError(f"output.log_with = {log_with!r}: W&B has no API key here; run `wandb login`, set "
                                "WANDB_API_KEY, or set WANDB_MODE=offline to write the run locally and upload it "
                                "later with `wandb sync` (lorakit never reads the key from its config, which is "
                                "copied into the run folder)")


#: W&B settings lorakit keeps for itself: a resumed run continues the W&B run by them
_WANDB_OWN = ("id", "resume")


def read_tracker_settings(path: str | Path | None, log_with: str | None) -> dict[str, dict[str, Any]]:
    """kohya's --log_tracker_config: a TOML file with a table of each tracker's own settings (``[wandb]`` entity,
    tags, notes, ...; ``[tensorboard]`` flush_secs, filename_suffix, ...), passed to the tracker as it starts.
    Refused, naming the file, when it is unreadable, when a table names a tracker the run does not write, or when it
    sets the W&B run id that resuming relies on."""
    if path is None:
        return {}
    from lorakit.config import tomllib  # the standard library's, or tomli on Python 3.10

    where = f"output.log_tracker_config: {path}"
    try:
        table = tomllib.loads(Path(path).expanduser().read_text(encoding="utf-8-sig"))
    except OSError as err:
        raise InvalidValueError(f"{where}: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InvalidValueError(f"{where}: not a TOML file ({err})") from None
    used = tracker_names(log_with)
    for name, settings in table.items():
        if not isinstance(settings, dict):
            raise InvalidValueError(f"{where}: {name} = {settings!r}: each tracker's settings are a table, e.g. "
                                    "[wandb] with entity = \"my-team\" under it")
        if name not in used:
            raise InvalidValueError(f"{where}: [{name}] is not a tracker this run writes (output.log_with = "
                                    f"{log_with!r}: {', '.join(used) or 'none'})")
        if name == "wandb" and (own := [k for k in _WANDB_OWN if k in settings]):
            raise InvalidValueError(f"{where}: [wandb] {', '.join(own)}: lorakit sets them, so that a resumed run "
                                    "continues its W&B run; remove them")
    return table


def merge_tracker_settings(own: dict[str, dict[str, Any]],
                           given: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """accelerate's ``init_kwargs``: lorakit's own settings per tracker, with the file's (output.log_tracker_config)
    over them."""
    return {name: {**own.get(name, {}), **given.get(name, {})} for name in {*own, *given}}


def wandb_can_log() -> bool:
    """Whether W&B will start without asking for a key: a local mode, a key in the environment, or the login
    that ``wandb login`` keeps in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_MODE", "").lower() in _LOCAL_MODES or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def tracker_init_kwargs(log_with: str | None, tracker_dir: Path | None, run_folder: Path, run_name: str | None,
                        resuming: bool) -> tuple[dict[str, dict[str, Any]], str | None]:
    """accelerate's ``init_kwargs`` per tracker, and the W&B run id to record in the run folder (None without
    W&B).  A resumed run continues the W&B run its folder recorded; a new run (or an overwrite) starts one."""
    if "wandb" not in tracker_names(log_with):
        return {}, None
    run_id = None
    record = run_folder / WANDB_RUN_FILE
    if resuming and record.is_file():
        try:
            run_id = json.loads(record.read_text(encoding="utf-8"))["id"]
        except (ValueError, KeyError, TypeError):
            run_id = None  # unreadable: a new W&B run rather than a failed resume
    run_id = run_id or uuid.uuid4().hex[:12]
    settings = {"name": run_name or run_folder.name, "id": run_id, "resume": "allow"}
    if tracker_dir is not None:
        tracker_dir.mkdir(parents=True, exist_ok=True)
        settings["dir"] = str(tracker_dir)
    return {"wandb": settings}, run_id


def log_sample_images(accelerator: Any, log_with: str | None, images: list[Any], prompts: list[str],
                      step: int) -> None:
    """The sample images of ``step`` in the W&B run, captioned with their prompts (TensorBoard keeps to scalars:
    the grids are in samples/ and on the run page)."""
    if "wandb" not in tracker_names(log_with):
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    run.log({"samples": [wandb.Image(image, caption=prompt) for image, prompt in zip(images, prompts, strict=True)]},
            step=step)


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
