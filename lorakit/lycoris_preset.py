"""LyCORIS's preset files (its ``network_args`` ``preset=my_preset.toml``) read as lorakit presets.

A LyCORIS preset chooses modules two ways, and keeps some out:

- ``unet_target_module`` / ``text_encoder_target_module``: class names; every Linear and Conv2d inside a module
  of such a class gets an adapter (a rule's ``inside``);
- ``unet_target_name`` / ``text_encoder_target_name``: module paths, regular expressions matched at the path's
  start (``re.match``), or globs with ``use_fnmatch = true``;
- ``exclude_name``: module paths (the same kind of pattern) left out, with everything inside them;
- ``enable_conv = false`` leaves out the k×k convolutions (1×1 convolutions stay, as LyCORIS keeps them).

Its per-module settings (``module_algo_map``, ``name_algo_map``: another algorithm, rank or option for some
modules) are refused by name: a lorakit network trains one algorithm, and per-block ranks have their own settings
(``network.block_dims``).  LyCORIS's own named presets are built from the same tables (``NAMED``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import InvalidValueError

if TYPE_CHECKING:  # this module stays free of torch at import: the kohya translation reads its tables
    from lorakit.network import Preset

#: the keys of a LyCORIS preset file lorakit reads
_TARGET_KEYS = ("unet_target_module", "unet_target_name", "text_encoder_target_module", "text_encoder_target_name",
                "exclude_name")
_KEYS = ("enable_conv", "use_fnmatch", *_TARGET_KEYS)
#: per-module settings, which lorakit does not take (one algorithm per network)
_PER_MODULE = ("module_algo_map", "name_algo_map")

_SD_BLOCKS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
_SD_TEXT = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
#: LyCORIS's named presets lorakit has no own preset for, as LyCORIS's config.py defines them (the classes of
#: Stable Diffusion's U-Net and CLIP; its other architectures' classes select nothing here)
NAMED: dict[str, dict[str, Any]] = {
    "full-lin": {"enable_conv": False, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"],
                 "unet_target_name": ["time_embedding.linear_1", "time_embedding.linear_2"],
                 "text_encoder_target_module": _SD_TEXT},
    "unet-only": {"enable_conv": True, "unet_target_module": _SD_BLOCKS,
                  "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]},
    "unet-transformer-only": {"enable_conv": False, "unet_target_module": ["Transformer2DModel"]},
    "unet-convblock-only": {"enable_conv": True, "unet_target_module": ["ResnetBlock2D", "Downsample2D", "Upsample2D"],
                            "unet_target_name": ["conv_in", "conv_out"]},
}


def is_preset_file(preset: str) -> bool:
    """Whether a preset setting names a LyCORIS preset file rather than a preset."""
    return str(preset).lower().endswith(".toml")


def preset_from_table(table: Mapping[str, Any], name: str, where: str = "") -> Preset:
    """The lorakit preset a LyCORIS preset table describes; ``InvalidValueError`` (prefixed with ``where``) for
    what it cannot mean here."""
    from lorakit.network import ALL_KINDS, NOT_KXK, Preset, TargetRule

    where = f"{where}: " if where else ""
    per_module = [k for k in _PER_MODULE if table.get(k)]
    if per_module:
        raise InvalidValueError(f"{where}{' and '.join(per_module)} give some modules another algorithm or rank; a "
                                "lorakit network trains one algorithm (ranks per block: network.block_dims). "
                                "Remove them to train the preset's modules alike")
    unknown = sorted(set(table) - set(_KEYS) - set(_PER_MODULE))
    if unknown:
        raise InvalidValueError(f"{where}{', '.join(unknown)}: not keys of a LyCORIS preset (known: "
                                f"{', '.join(_KEYS)})")
    for key in _TARGET_KEYS:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidValueError(f"{where}{key} must be a list of strings, got {value!r}")
    for key in ("enable_conv", "use_fnmatch"):
        if not isinstance(table.get(key, False), bool):
            raise InvalidValueError(f"{where}{key} must be true or false, got {table[key]!r}")
    kinds = ALL_KINDS if table.get("enable_conv", True) else NOT_KXK
    regex = not table.get("use_fnmatch", False)

    def rules(part: str) -> tuple[TargetRule, ...]:
        classes = tuple(table.get(f"{part}_target_module", []))
        by_class = (TargetRule("*", kinds, classes),) if classes else ()
        return by_class + tuple(TargetRule(p, kinds, regex=regex) for p in table.get(f"{part}_target_name", []))

    exclude = tuple(TargetRule(p, regex=regex) for p in table.get("exclude_name", []))
    return Preset(name, rules("unet"), rules("text_encoder"), f"LyCORIS preset {name}", exclude)


def read_preset(path: str | os.PathLike) -> Preset:
    """A LyCORIS preset file as a lorakit preset, named by its path; ``InvalidValueError`` naming the file for a
    missing or unreadable file and for what it cannot mean here."""
    from lorakit.config import tomllib

    path = Path(path).expanduser()
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidValueError(f"{path}: no such LyCORIS preset file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InvalidValueError(f"{path}: not a readable LyCORIS preset file: {err}") from None
    return preset_from_table(table, str(path), str(path))
