"""LyCORIS's preset files (its ``network_args`` ``preset=my_preset.toml``) read as lorakit presets.

A LyCORIS preset chooses modules two ways, and keeps some out:

- ``unet_target_module`` / ``text_encoder_target_module``: class names; every Linear and Conv2d inside a module
  of such a class gets an adapter (a rule's ``inside``);
- ``unet_target_name`` / ``text_encoder_target_name``: module paths, regular expressions matched at the path's
  start (``re.match``), or globs with ``use_fnmatch = true``;
- ``exclude_name``: module paths (the same kind of pattern) left out, with everything inside them;
- ``enable_conv = false`` leaves out the k×k convolutions (1×1 convolutions stay, as LyCORIS keeps them).

Its per-module settings give some layers another algorithm (``algo``), rank (``dim``), alpha or options:
``module_algo_map`` by the class of a module holding the layer (the innermost mapped one), ``name_algo_map`` by the
layer's path (first).  LyCORIS's own named presets are built from the same tables (``NAMED``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import InvalidValueError

if TYPE_CHECKING:  # this module stays free of torch at import: the kohya translation reads its tables
    from lorakit.network import ModuleSettings, Preset

#: the keys of a LyCORIS preset file lorakit reads
_TARGET_KEYS = ("unet_target_module", "unet_target_name", "text_encoder_target_module", "text_encoder_target_name",
                "exclude_name")
_KEYS = ("enable_conv", "use_fnmatch", *_TARGET_KEYS)
#: per-module settings: {class name or path pattern: {algo, dim, alpha, options...}}
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
    settings = tuple(_settings(key, conf, by_class=False, regex=regex, where=where)
                     for key, conf in _table(table, "name_algo_map", where).items())
    settings += tuple(_settings(key, conf, by_class=True, regex=regex, where=where)
                      for key, conf in _table(table, "module_algo_map", where).items())
    return Preset(name, rules("unet"), rules("text_encoder"), f"LyCORIS preset {name}", exclude, settings)


def _table(table: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = table.get(key, {})
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise InvalidValueError(f"{where}{key} must be a table of tables ([{key}.NAME] with algo, dim, ...), "
                                f"got {value!r}")
    return value


def _settings(key: str, conf: Mapping[str, Any], *, by_class: bool, regex: bool, where: str) -> ModuleSettings:
    """One entry of module_algo_map (``by_class``) or name_algo_map as ``ModuleSettings``; its algorithm and
    options checked (an option no algorithm has, or one the named algorithm lacks, is refused here)."""
    from lorakit.adapters import algorithm_class, any_option_names, check_options
    from lorakit.network import ModuleSettings, TargetRule

    table = "module_algo_map" if by_class else "name_algo_map"
    conf = dict(conf)
    algo, dim, alpha = conf.pop("algo", None), conf.pop("dim", None), conf.pop("alpha", None)
    here = f"{where}[{table}.{key}] "
    try:
        cls = algorithm_class(str(algo)) if algo is not None else None
        algorithm = cls.algorithm if cls is not None else None
        if cls is not None and not cls.trains_layers:
            raise InvalidValueError(f"algo {algo!r} updates norm layers only; they get it beside the layers' own "
                                    "algorithm with train_norm = true")
        if algorithm is not None:
            check_options(algorithm, conf)
        else:  # the network's algorithm, known when the network is made: a name some algorithm takes
            unknown = sorted(set(conf) - any_option_names())
            if unknown:
                raise InvalidValueError(f"{unknown[0]}: not an option of any algorithm")
    except InvalidValueError as err:
        raise InvalidValueError(f"{here}{err}") from None
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise InvalidValueError(f"{here}dim must be a positive whole number, got {dim!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0):
        raise InvalidValueError(f"{here}alpha must be a number, 0 or more, got {alpha!r}")
    return ModuleSettings(classes=(key,) if by_class else (), path=None if by_class else TargetRule(key, regex=regex),
                          algorithm=algorithm, rank=dim, alpha=None if alpha is None else float(alpha),
                          options=conf)


def read_preset(path: str | os.PathLike) -> Preset:
    """A LyCORIS preset file as a lorakit preset, named by its path; ``InvalidValueError`` naming the file for a
    missing or unreadable file and for what it cannot mean here."""
    from lorakit.config import tomllib

    path = Path(path).expanduser()
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise InvalidValueError(f"{path}: no such LyCORIS preset file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InvalidValueError(f"{path}: not a readable LyCORIS preset file: {err}") from None
    return preset_from_table(table, str(path), str(path))
