"""The training configuration: one typed object, read from TOML and/or command-line flags.

Sections mirror the TOML file::

    [model]       base model, precision
    [data]        images, captions, resolution, batch size (lorakit.data.DataConfig)
    [method]      what is trained: an adapter, native weights, textual inversion, or pivotal (TI + adapter)
    [network]     adapter algorithm, where it goes, rank/alpha, block-wise dims
    [optimizer]   learning rates, optimizer, schedule
    [training]    epochs/steps, seed, loss options
    [sample]      prompts sampled during training
    [early_stop]  CS-Fluctuation
    [output]      where results go

Unknown keys are errors that name the key and the file: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.config import DataConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range (the message says which and where)."""


METHODS = ("adapter", "native", "ti", "pivotal")


@dataclass
class ModelConfig:
    #: a diffusers folder, a single-file .safetensors checkpoint, or None for the built-in shapes-world model
    base: str | None = None
    #: mixed precision for the frozen base model and autocast: "no", "fp16", "bf16"; adapters stay fp32
    mixed_precision: str = "no"
    #: override the model's prediction type ("epsilon" or "v_prediction"); None: the model's own
    prediction_type: str | None = None
    gradient_checkpointing: bool = False


@dataclass
class MethodConfig:
    #: "adapter" (LoRA family), "native" (fine-tune base weights; DreamBooth with prior preservation),
    #: "ti" (textual inversion), "pivotal" (textual inversion + adapter together)
    kind: str = "adapter"
    #: native: which U-Net layers are trained ("attn-only", "attn-mlp", "full" or "all")
    native_targets: str = "all"
    #: textual inversion: the new token(s); default the trigger word
    ti_token: str | None = None
    ti_init_word: str = "shape"
    ti_vectors: int = 1


@dataclass
class NetworkConfig:
    algorithm: str = "lora"
    preset: str = "attn-mlp"
    rank: int = 8
    alpha: float = 8.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = False
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_dora: bool = False
    #: extra algorithm options, as kohya's --network_args (e.g. factor = 8 for LoKr, use_tucker = true)
    args: dict[str, Any] = field(default_factory=dict)
    #: kohya block-wise dims: 25 values for SD1.x (IN00..IN11, MID, OUT00..OUT11); 0 = no module there
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    #: the block-wise LoRA paper's coarse blocks: "upper", "middle", "bottom", "all" or a comma list of them
    #: (or of coarse blocks IN0..IN3, MID, OUT0..OUT3); rank/alpha/conv_rank apply there, no module elsewhere
    blocks: str | None = None
    #: kohya's per-block learning-rate factors: 12 comma-separated values or a ramp (sine, cosine, linear,
    #: reverse_linear, zeros; "+0.5" adds an offset); blocks at factor <= block_lr_zero_threshold get no module
    down_lr_weight: str | None = None
    mid_lr_weight: float | None = None
    up_lr_weight: str | None = None
    block_lr_zero_threshold: float = 0.0


@dataclass
class OptimizerConfig:
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    ti_lr: float = 5e-3
    optimizer: str = "adamw"  # "adamw", "adamw8bit" (needs bitsandbytes), "sgd"
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: str = "constant"  # diffusers' schedule names: constant, constant_with_warmup, cosine, linear...
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1


@dataclass
class TrainingConfig:
    max_epochs: int = 10
    #: stop after this many optimizer steps even if epochs remain (None: epochs decide)
    max_steps: int | None = None
    seed: int = 0
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    prior_loss_weight: float = 1.0
    save_every_n_epochs: int = 1


@dataclass
class SampleConfig:
    #: kohya-syntax prompt file ("prompt --n neg --w 64 --h 64 --d seed --l cfg --s steps" per line)
    prompts: str | None = None
    every_n_epochs: int = 1
    sampler: str = "ddim"
    steps: int = 20
    cfg_scale: float = 7.0


@dataclass
class EarlyStopConfig:
    #: "cs-fluctuation" (stop at the turning point), "report" (compute and report, never stop), "off"
    mode: str = "cs-fluctuation"
    #: moving-average window in steps; None: steps per epoch (the paper's choice)
    window: int | None = None
    #: compute CS every this many steps
    interval: int = 1
    #: turning-point rule: "calm" (CSF stays small for a window; the default, nearer the measured overfitting
    #: onset on the shapes world, docs/early_stopping.md) or "second-valley" (the paper's Algorithm 1)
    rule: str = "calm"
    #: the rule's options, e.g. {prominence = 0.05} or {threshold = 0.1, patience = 1.0}
    rule_args: dict = field(default_factory=dict)

    def make_rule(self):
        """The configured turning-point rule (raises ValueError/TypeError for an unknown rule or option)."""
        from lorakit.earlystop import rule_from_dict

        return rule_from_dict({"name": self.rule.replace("-", "_"), **self.rule_args})


@dataclass
class OutputConfig:
    dir: str = "output"
    name: str = "lorakit"
    #: "error": refuse a non-empty output folder; "resume": continue the run found there; "overwrite"
    if_exists: str = "error"
    save_precision: str = "fp32"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> TrainConfig:
        """Check values that are wrong whatever the data (raises ConfigError naming the key)."""
        from lorakit.earlystop.rules import RULES

        checks = [
            (self.method.kind in METHODS, "method.kind", f"one of {', '.join(METHODS)}"),
            (self.model.mixed_precision in ("no", "fp16", "bf16"), "model.mixed_precision", "no, fp16 or bf16"),
            (self.network.rank > 0, "network.rank", "a positive integer"),
            (self.data.batch_size > 0, "data.batch_size", "a positive integer"),
            (self.training.max_epochs > 0, "training.max_epochs", "a positive integer"),
            (self.optimizer.learning_rate > 0, "optimizer.learning_rate", "positive"),
            (self.early_stop.mode in ("cs-fluctuation", "report", "off"), "early_stop.mode",
             "cs-fluctuation, report or off"),
            (self.early_stop.rule.replace("-", "_") in RULES, "early_stop.rule",  # the config spells it with "-"
             " or ".join(name.replace("_", "-") for name in RULES)),
            (self.output.if_exists in ("error", "resume", "overwrite"), "output.if_exists",
             "error, resume or overwrite"),
            (0 <= self.data.caption_dropout_rate <= 1, "data.caption_dropout_rate", "between 0 and 1"),
            (self.optimizer.gradient_accumulation_steps > 0, "optimizer.gradient_accumulation_steps", "positive"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"{key} must be {expected}")
        try:  # the rule's own checks (unknown option, prominence out of range, ...)
            self.early_stop.make_rule()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"early_stop.rule_args: {e}") from e
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------- loading
def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one TOML value against a dataclass field's type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if annotation is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _apply_section(obj: Any, values: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts (TOML tables); unknown sections/keys raise ConfigError."""
    cfg = TrainConfig()
    merge_into(cfg, values, source)
    return cfg


def merge_into(cfg: TrainConfig, values: dict[str, Any], source: str) -> None:
    """Set the values of nested dicts (``{section: {key: value}}``) on ``cfg``, checking every name and type."""
    sections = [f.name for f in dataclasses.fields(cfg)]
    for section, table in values.items():
        if section not in sections:
            close = difflib.get_close_matches(section, sections, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else f" (known: {', '.join(sections)})"
            raise ConfigError(f"{source}: unknown section [{section}]{hint}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        _apply_section(getattr(cfg, section), table, f"{source} [{section}]")


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML training config; errors name the file and the key."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(values, str(path))


def set_option(cfg: TrainConfig, dotted: str, raw: str) -> None:
    """Apply one ``section.key=value`` override from the command line (value parsed as TOML if it can be)."""
    section, _, key = dotted.partition(".")
    if not key:
        raise ConfigError(f"--set {dotted}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    merge_into(cfg, {section: {key: value}}, "--set")


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML (written next to every run so it can be repeated exactly)."""
    lines: list[str] = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is None:
                continue  # TOML has no null: absent means default (None)
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")
