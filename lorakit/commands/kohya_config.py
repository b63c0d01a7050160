"""kohya sd-scripts' training config file (``train_network.py --config_file FILE.toml``: its command-line options as
flat TOML keys; also ``train_textual_inversion.py``'s, with ``token_string``, and ``train_db.py``'s and
``fine_tune.py``'s, with neither ``network_module`` nor ``token_string``: lorakit's native fine-tuning), or a
kohya_ss GUI config (JSON, ``lorakit.commands.kohya_gui``), read into a lorakit config.

Each key is translated with the table the trainer's error messages use for kohya's options
(``lorakit.commands.train.KOHYA_OPTIONS``), or a lorakit flag of the same name, so one table says how every kohya
option is spelled in lorakit.  A few need more than a rename: ``network_module`` + ``network_args`` (the algorithm,
its preset and options), ``optimizer_args``, ``resolution = "512,512"``.  kohya also trains the text encoder unless
``network_train_unet_only`` is set, where lorakit's default is the U-Net only: the translation keeps kohya's choice.

A key that is off (false, "", 0, an empty list) changes nothing and is skipped.  What cannot be translated is
listed, never dropped silently: keys lorakit has no counterpart for, and unknown keys.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.config import LORAPLUS_KEYS, ConfigError, TrainConfig, merge_into, tomllib  # tomli on 3.10
from lorakit.lycoris_preset import NAMED, is_preset_file
from lorakit.textfile import read_user_text

#: kohya's network modules -> lorakit's algorithm (lycoris.kohya names its algorithm in network_args: algo=...)
NETWORK_MODULES = {"networks.lora": "lora", "networks.lora_fa": "lora", "networks.dylora": "dylora",
                   "networks.oft": "oft"}
#: LyCORIS's algorithm names lorakit spells otherwise ("locon" is LyCORIS's LoRA with convolutions: lora + a
#: preset that reaches them)
LYCORIS_ALGORITHMS = {"locon": "lora"}
#: LyCORIS's presets -> lorakit's (LyCORIS's full also adapts conv_in, conv_out and the time embedding)
LYCORIS_PRESETS = {"full": "lycoris-full", "attn-mlp": "attn-mlp", "attn-only": "attn-only", "ia3": "ia3"}
#: kohya's values lorakit names otherwise
_KOHYA_VALUES = {"save_precision": {"float": "fp32"}}
#: network_args lorakit has as settings of their own (the rest go to network.args)
_NETWORK_ARG_SETTINGS = {"conv_dim": ("network", "conv_rank", int), "conv_alpha": ("network", "conv_alpha", float),
                         **{k: ("network", k, float) for k in LORAPLUS_KEYS}}
#: sd-scripts' max_train_steps when a config gives neither it nor max_train_epochs
KOHYA_DEFAULT_STEPS = 1600
#: options whose 0 kohya reads as a value, not as "not given": no clipping, no prior loss, alpha = rank (lorakit's
#: defaults are 1, 1 and 8)
ZERO_IS_A_SETTING = ("max_grad_norm", "prior_loss_weight", "network_alpha")
#: the lines around the options table in docs/kohya.md
DOC_MARKERS = ("<!-- kohya options table -->", "<!-- /kohya options table -->")
#: placeholders in the translation table, filled with the file's value
_PLACEHOLDERS = ("X", "N", "NAME", "DIR", "FILE", ".EXT", "MARK", "{KEY = VALUE}", "FILE.toml")


@dataclass
class KohyaTranslation:
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # {section: {key: value}}
    skipped: list[str] = field(default_factory=list)  # kohya keys that are lorakit's default anyway
    untranslated: list[str] = field(default_factory=list)  # "key = value: why"
    notes: list[str] = field(default_factory=list)  # taken over, differently from kohya: said, not refused

    def set(self, dotted: str, value: Any) -> None:
        section, key = dotted.split(".", 1)
        self.settings.setdefault(section, {})[key] = value


def is_off(value: Any) -> bool:
    """A kohya option that changes nothing: absent, false, empty, or 0."""
    return value is None or value is False or value == "" or value == [] or value == {} or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def _pairs(value: Any, key: str, path: Path) -> dict[str, Any]:
    """kohya's ``["k=v", ...]`` (or a table) -> {k: v} with TOML-typed values (numbers, booleans)."""
    if isinstance(value, dict):
        return dict(value)
    items = value if isinstance(value, list) else str(value).split()
    out = {}
    for item in items:
        name, sep, raw = str(item).partition("=")
        if not sep:
            raise ConfigError(f"{path}: {key}: expected key=value items, got {item!r}")
        out[name.strip()] = _literal(raw.strip())
    return out


def _literal(raw: str) -> Any:
    """A kohya ``key=value`` value as kohya reads it (Python literals: 0.1, True, (0.9, 0.99)); a word as text."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(raw.lower(), raw)
    return list(value) if isinstance(value, tuple) else value


def _lycoris_preset(preset: str, config: Path) -> str | None:
    """lorakit's ``network.preset`` for LyCORIS's ``preset=`` network_arg: its named presets, or a preset file's
    path (a relative one as LyCORIS reads it, from the current folder, or else beside the kohya config); None for
    a name lorakit lacks."""
    if preset in LYCORIS_PRESETS:
        return LYCORIS_PRESETS[preset]
    if preset in NAMED:
        return f"lycoris-{preset}"
    if not is_preset_file(preset):
        return None
    file = Path(preset).expanduser()
    beside = config.parent / file
    return str(beside) if not file.is_absolute() and not file.exists() and beside.exists() else preset


def _numbers(kind: type) -> Any:
    """A per-block list as kohya writes it in network_args ("2,2,4", read as a tuple) -> a list of ``kind``."""
    def convert(value: Any) -> list:
        values = value if isinstance(value, list) else str(value).replace(" ", "").split(",")
        return [kind(v) for v in values if v != ""]
    return convert


def _weights_text(value: Any) -> str:
    """kohya's down/up_lr_weight: a ramp name ("sine+.5") or 12 numbers (read as a tuple) -> lorakit's text."""
    return ",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in value) \
        if isinstance(value, list) else str(value)


def _middle_weight(value: Any) -> float | str:
    """kohya's mid_lr_weight: one number (SD1.x), or SDXL's up to three (read as a tuple) as lorakit's text."""
    return _weights_text(value) if isinstance(value, list) else float(value)


#: kohya's networks.lora network_args that are lorakit network settings of the same name (block-wise dims and
#: learning rates, the dropouts): settings, so that the block-wise rules and the checks of those settings read them
_NETWORK_FIELD_ARGS = {"dropout": float, "rank_dropout": float, "module_dropout": float,
                       "block_dims": _numbers(int), "block_alphas": _numbers(float),
                       "conv_block_dims": _numbers(int), "conv_block_alphas": _numbers(float),
                       "down_lr_weight": _weights_text, "mid_lr_weight": _middle_weight, "up_lr_weight": _weights_text,
                       "block_lr_zero_threshold": float}


def _adapter_options(network_args: dict[str, Any], algorithm: str, out: KohyaTranslation) -> dict[str, Any]:
    """The network_args that are options of ``algorithm``'s adapters (``network.args``).  LyCORIS reads the
    options its algorithm has and ignores the rest, so an option of another algorithm (``factor`` beside LoHa) is
    left out with a note; an option no lorakit algorithm has is untranslated, unless it is off anyway."""
    from lorakit.adapters import any_option_names, option_names
    from lorakit.errors import InvalidValueError

    try:
        own = option_names(algorithm)
    except InvalidValueError:  # an algorithm lorakit lacks: the config check names it
        return network_args
    anyone = any_option_names()
    if "disable_conv_cp" in network_args:  # LyCORIS's older, negated spelling of use_tucker (default: disabled)
        network_args = dict(network_args)
        if not network_args.pop("disable_conv_cp"):
            network_args.setdefault("use_tucker", True)
    kept = {}
    for key, value in network_args.items():
        if key in own:
            kept[key] = value
        elif key in anyone:
            out.notes.append(f"network_args {key}={value!r}: not an option of {algorithm}, which LyCORIS ignores "
                             "too; left out")
        elif is_off(value):
            out.skipped.append(f"network_args {key}")
        else:
            out.untranslated.append(f"network_args {key}={value!r}: not an option lorakit's adapters have")
    return kept


def read_kohya_file(path: str | Path) -> dict[str, Any]:
    """The flat option table of a kohya config (TOML, as ``--config_file`` reads; or JSON)."""
    path = Path(path)
    try:
        text = read_user_text(path, ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such kohya config file") from None
    try:
        table = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not a readable kohya config: {err}") from None
    flat: dict[str, Any] = {}
    for key, value in table.items():  # sd-scripts also accepts its options grouped in tables
        if isinstance(value, dict) and key not in ("network_args", "optimizer_args", "lr_scheduler_args"):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def translate(table: dict[str, Any], path: Path) -> KohyaTranslation:
    """lorakit settings for a kohya option table (see the module's docstring)."""
    out = KohyaTranslation()
    options = dict(table)
    module = _network_options(options, out, path)
    _optimizer_options(options, out, path)
    te2 = options.pop("learning_rate_te2", None)  # sdxl_train.py's second text encoder: below, once native is known
    te_lr = options.get("text_encoder_lr")
    if isinstance(te_lr, list):  # sd-scripts takes several (nargs="*"); its SD/SDXL networks read the first
        options["text_encoder_lr"] = te_lr[0] if te_lr else None
        if len(set(te_lr)) > 1:
            out.notes.append(f"text_encoder_lr = {te_lr!r}: {te_lr[0]} for every text encoder, as kohya's SD and "
                             "SDXL networks read it (the other values are for its FLUX/SD3 networks)")
    if "resolution" in options:
        raw = options.pop("resolution")
        try:
            size = [int(v) for v in str(raw).replace(" ", "").split(",") if v]
        except ValueError:
            raise ConfigError(f"{path}: resolution = {raw!r}: expected a size or width,height (512 or \"512,768\")"
                              ) from None
        out.set("data.resolution", size[0] if len(size) == 1 or size[0] == size[1] else size[:2])
    token = options.pop("token_string", None)
    if token:  # train_textual_inversion.py: its learning rate is the embedding's
        out.set("method.kind", "ti")
        out.set("method.ti_token", str(token))
        if "learning_rate" in options:
            out.set("optimizer.ti_lr", options.pop("learning_rate"))
    native = module is None and not token  # train_db.py (DreamBooth) or fine_tune.py (with in_json)
    _trained_parts(options, out, path, native, bool(token), te2)
    _script_options(options, out, native)
    _options_by_table(options, out)
    return out


def _network_options(options: dict[str, Any], out: KohyaTranslation, path: Path) -> Any:
    """network_module and network_args: the algorithm, its preset and options; returns the module (None: no
    network, a native or textual-inversion script)."""
    network_args = _pairs(options.pop("network_args", []) or [], "network_args", path)
    module = options.pop("network_module", None)
    if module is not None:
        algo = str(network_args.pop("algo", "lora")) if module == "lycoris.kohya" else NETWORK_MODULES.get(module)
        if algo is None:
            out.untranslated.append(f"network_module = {module!r}: not a network lorakit trains")
        else:
            out.set("network.algorithm", LYCORIS_ALGORITHMS.get(algo, algo))
            if module == "lycoris.kohya":  # LyCORIS's own presets (its default: full), or a preset file
                preset = str(network_args.pop("preset", "full"))
                if (ours := _lycoris_preset(preset, path)) is not None:
                    out.set("network.preset", ours)
                else:
                    out.untranslated.append(f"network_args preset={preset}: a LyCORIS preset lorakit lacks (it has "
                                            f"{', '.join([*LYCORIS_PRESETS, *NAMED])}, and reads preset files)")
            else:  # kohya's LoCon reaches the ResNet convs
                out.set("network.preset", "full" if "conv_dim" in network_args else "kohya")
            if module == "networks.lora_fa":  # LoRA-FA: LoRA whose down matrices stay as they start
                network_args["frozen_down"] = True
    for name, (section, key, kind) in _NETWORK_ARG_SETTINGS.items():
        if name in network_args:
            out.set(f"{section}.{key}", kind(network_args.pop(name)))
    for name, kind in _NETWORK_FIELD_ARGS.items():
        if name in network_args:
            out.set(f"network.{name}", kind(network_args.pop(name)))
    network_args = _adapter_options(network_args, out.settings.get("network", {}).get("algorithm", "lora"), out)
    if network_args:
        out.set("network.args", network_args)
    return module


def _optimizer_options(options: dict[str, Any], out: KohyaTranslation, path: Path) -> None:
    """The optimizer, its arguments and the schedule's."""
    if "optimizer_args" in options:
        args = _pairs(options.pop("optimizer_args") or [], "optimizer_args", path)
        if args:
            out.set("optimizer.args", args)
    if "lr_scheduler_args" in options:  # ["T_0=100", ...] as kohya reads them (Python literals)
        args = _pairs(options.pop("lr_scheduler_args") or [], "lr_scheduler_args", path)
        if args:
            out.set("optimizer.lr_scheduler_args", args)
    if "optimizer_type" in options:  # kohya's names in any case; a class by its full name keeps its case
        from lorakit.schedule_free import names_schedule_free

        name = str(options.pop("optimizer_type"))
        out.set("optimizer.optimizer", name if "." in name else name.lower())
        if names_schedule_free(name):  # kohya steps a dummy schedule for them: a schedule it names is not used
            if options.get("lr_scheduler") == "constant":  # what it runs anyway: nothing to say
                options.pop("lr_scheduler")
            unused = [f"{key} = {options.pop(key)!r}" for key in ("lr_scheduler", "lr_warmup_steps",
                                                                    "lr_scheduler_type") if options.get(key)]
            if unused:
                out.notes.append(f"{', '.join(unused)}: not used with {name}, as in kohya (no schedule; its own "
                                 "warm-up is optimizer_args warmup_steps=N)")


def _trained_parts(options: dict[str, Any], out: KohyaTranslation, path: Path, native: bool, textual: bool,
                   te2: Any) -> None:
    """What trains: the U-Net, the text encoders (and SDXL's second one's rate), as the script's switches say."""
    if native:
        _native(options, out)
        if out.settings.get("method", {}).get("native_text_encoder") and _text_encoders_kept(options, te2, out):
            _second_text_encoder_rate(options, te2, out)
    else:  # the native scripts' text-encoder switches: for adapters, network_train_unet_only decides
        for key, script in (("stop_text_encoder_training", "train_db.py"), ("train_text_encoder", "fine_tune.py")):
            if key in options and not is_off(options[key]):
                out.untranslated.append(f"{key} = {options.pop(key)!r}: {script}'s; adapters train the text "
                                        "encoder unless network_train_unet_only is set")
        if not is_off(te2) and is_off(options.get("learning_rate_te1")):  # an adapter's encoders share one rate
            options["learning_rate_te1"] = te2
        elif not is_off(te2) and te2 != options.get("learning_rate_te1"):
            out.untranslated.append(f"learning_rate_te2 = {te2!r}: an adapter trains both SDXL text encoders at "
                                    f"one rate (learning_rate_te1 = {options.get('learning_rate_te1')!r}); give "
                                    "them the same value")
    # kohya trains the text encoder too unless told not to; lorakit's default is the U-Net only
    unet_only = bool(options.pop("network_train_unet_only", False))
    te_only = bool(options.pop("network_train_text_encoder_only", False))
    if not textual and not native:  # textual inversion and native fine-tuning train no network
        # kohya leaves a network's modules at a rate of 0 out of the optimizer: they stay zero, as if not there
        te_rate_zero = _zero(options.get("text_encoder_lr")) and not unet_only
        unet_rate_zero = _zero(options.get("unet_lr")) and not te_only
        for key, setting, zero in (("text_encoder_lr", "train_text_encoder", te_rate_zero),
                                   ("unet_lr", "train_unet", unet_rate_zero)):
            if zero:
                options.pop(key)
                out.notes.append(f"{key} = 0: kohya leaves those adapters out of the optimizer, at zero; lorakit "
                                 f"does not make them (network.{setting} = false)")
        te_only = te_only or unet_rate_zero
        out.set("network.train_text_encoder", not unet_only and not te_rate_zero)
        cached = any(not is_off(options.get(k)) for k in ("cache_text_encoder_outputs",
                                                          "cache_text_encoder_outputs_to_disk"))
        if not unet_only and cached:  # kohya asserts the same
            raise ConfigError(f"{path}: cache_text_encoder_outputs needs network_train_unet_only = true (without it "
                              "kohya trains the text encoder too, whose outputs then change every step)")
    if te_only:
        out.set("network.train_unet", False)


def _script_options(options: dict[str, Any], out: KohyaTranslation, native: bool) -> None:
    """Options that need more than a renaming: base weights, block rates, fused groups, the save ratio, the run's
    length, full-precision switches and the saved format."""
    for key, kind in (("base_weights", str), ("base_weights_multiplier", float)):  # nargs="*": one or several
        if not is_off(options.get(key)):
            value = options.pop(key)
            out.set(f"model.{key}", [kind(v) for v in (value if isinstance(value, list) else [value])])
    block_lr = options.pop("block_lr", None)
    if not is_off(block_lr):  # sdxl_train.py's "1e-6,1e-6,...": a rate per U-Net block
        try:
            out.set("method.native_block_lr", [float(v) for v in str(block_lr).split(",") if v.strip()])
        except ValueError:
            out.untranslated.append(f"block_lr = {block_lr!r}: not a comma-separated list of learning rates")
    groups = options.pop("fused_optimizer_groups", None)
    if not is_off(groups):  # sdxl_train.py's N optimizers, each stepped once its weights' gradients are all in
        out.set("optimizer.fused_backward_pass", True)
        out.notes.append(f"fused_optimizer_groups = {groups!r}: lorakit's fused backward pass steps each weight "
                         "alone as its gradient is ready (as fused_backward_pass), which frees at least as much memory")
    ratio = options.pop("save_n_epoch_ratio", None)
    if not is_off(ratio):  # kohya: save_every_n_epochs = floor(epochs / ratio) or 1, whatever it was set to
        epochs = options.get("max_train_epochs")
        if is_off(epochs):
            out.untranslated.append(f"save_n_epoch_ratio = {ratio!r}: it divides max_train_epochs, which this config "
                                    "does not set; give training.save_every_n_epochs")
        else:
            options.pop("save_every_n_epochs", None)
            out.set("training.save_every_n_epochs", math.floor(int(epochs) / float(ratio)) or 1)
    _run_length(options, out)
    for key, dtype in (("full_bf16", "bf16"), ("full_fp16", "fp16")):
        if not native and not is_off(options.get(key)):  # native fine-tuning: its table row (bf16 taken, fp16 not)
            options.pop(key)
            out.notes.append(f"{key} = true: the model runs in {dtype} (mixed_precision) and the trained weights and "
                             "their optimizer state stay fp32, as lorakit keeps them (an adapter's are small beside "
                             "the model)")
    saved_as = str(options.pop("save_model_as", "") or "")
    if saved_as == "diffusers" and native:  # DreamBooth / fine-tuning: the model as a diffusers folder
        out.set("output.format", "diffusers")
    elif saved_as == "diffusers":
        out.notes.append("save_model_as = 'diffusers': lorakit writes one .safetensors file (diffusers reads it with "
                         "from_single_file; a folder: lorakit merge RESULT --out FOLDER)")
    elif saved_as not in ("", "safetensors"):
        out.notes.append(f"save_model_as = {saved_as!r}: lorakit writes .safetensors (it never pickles), which "
                         f"A1111, ComfyUI and kohya load as they load a .{saved_as} file")


def _options_by_table(options: dict[str, Any], out: KohyaTranslation) -> None:
    """Every option left, through the table of kohya's options (``KOHYA_OPTIONS``): a lorakit flag or setting,
    a default (skipped), or one lorakit lacks (said)."""
    from lorakit.commands.train import FLAGS, KOHYA_OPTIONS

    for key, value in options.items():
        if key in _KOHYA_VALUES and isinstance(value, str):
            value = _KOHYA_VALUES[key].get(value, value)
        dashed = "--" + key.replace("_", "-")
        hint = KOHYA_OPTIONS.get(dashed) or (dashed if dashed in FLAGS else None)
        if is_off(value) and not (key in ZERO_IS_A_SETTING and _zero(value)):
            out.skipped.append(key)
            continue
        if hint is None:
            out.untranslated.append(f"{key} = {value!r}: not a kohya option lorakit knows")
        elif hint.startswith("(the default"):
            out.skipped.append(key)
        elif hint.startswith("(not in lorakit"):
            out.untranslated.append(f"{key} = {value!r}: {hint.strip('()')}")
        elif hint.startswith("--set "):
            for setting in hint.removeprefix("--set ").split(" --set "):
                dotted, _, literal = setting.strip("'").partition("=")
                if isinstance(value, bool):  # a switch: the table's literal when it is on
                    out.set(dotted, _setting_literal(literal) if literal not in _PLACEHOLDERS else value)
                else:
                    out.set(dotted, value)
        else:
            flag = hint.split()[0]
            if flag not in FLAGS:
                out.untranslated.append(f"{key} = {value!r}: lorakit spells it {hint}")
                continue
            out.set(FLAGS[flag][0], value)


def _native(options: dict[str, Any], out: KohyaTranslation) -> None:
    """train_db.py and fine_tune.py: native fine-tuning of the whole U-Net.  fine_tune.py (its captions in
    ``in_json``; the GUI's fine-tuning tab may read them from caption files instead, and always says
    ``train_text_encoder``) trains the text encoder with ``train_text_encoder``; train_db.py trains it unless
    told not to, for the first ``stop_text_encoder_training`` steps when that is given (-1 or 0: never)."""
    out.set("method.kind", "native")
    if "in_json" in options or "train_text_encoder" in options:
        out.set("method.native_text_encoder", bool(options.pop("train_text_encoder", False)))
        return
    stop = options.pop("stop_text_encoder_training", None)
    if stop is not None and not isinstance(stop, int):
        out.untranslated.append(f"stop_text_encoder_training = {stop!r}: not a number of steps")
        return
    out.set("method.native_text_encoder", stop is None or stop > 0)
    if stop is not None and stop > 0:
        out.set("method.native_text_encoder_steps", stop)


def _run_length(options: dict[str, Any], out: KohyaTranslation) -> None:
    """How long kohya trains: max_train_epochs when given (it overrides max_train_steps), else max_train_steps steps
    (sd-scripts' default: 1600), however many epochs they take; lorakit's own default (10 epochs) is neither."""
    epochs, steps = options.get("max_train_epochs"), options.get("max_train_steps")
    if not is_off(epochs):
        if not is_off(steps):
            options.pop("max_train_steps")
            out.notes.append(f"max_train_steps = {steps!r}: max_train_epochs = {epochs!r} overrides it, as in kohya")
        return
    defaulted = is_off(steps)
    steps = KOHYA_DEFAULT_STEPS if defaulted else int(steps)
    options.pop("max_train_steps", None)
    out.set("training.max_steps", steps)
    out.set("training.max_epochs", steps)  # a bound the steps reach first: each epoch takes at least one step
    out.notes.append(f"max_train_epochs is not given: kohya trains {steps} steps (max_train_steps"
                     f"{', its default' if defaulted else ''}) however many epochs they take; so does lorakit "
                     f"(training.max_steps = {steps}, training.max_epochs = {steps} as a bound)")


def _zero(value: Any) -> bool:
    """A number given as 0, not merely absent (or off): for the options whose 0 kohya reads as a value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _text_encoders_kept(options: dict[str, Any], te2: Any, out: KohyaTranslation) -> bool:
    """The native scripts' text-encoder rate of 0 (train_db.py's learning_rate_te, sdxl_train.py's
    learning_rate_te1 with learning_rate_te2): that encoder is not trained.  False when none is left to train."""
    if _zero(options.get("learning_rate_te")) or (_zero(options.get("learning_rate_te1")) and _zero(te2)):
        key = "learning_rate_te" if "learning_rate_te" in options else "learning_rate_te1"
        options.pop(key)
        out.set("method.native_text_encoder", False)
        out.notes.append(f"{key} = 0: kohya does not change the text encoder{'s' if key.endswith('1') else ''}; "
                         "lorakit does not train them (method.native_text_encoder = false)")
        return False
    if _zero(options.get("learning_rate_te1")):  # the second alone: the first's rate 0
        options.pop("learning_rate_te1")
        out.set("optimizer.text_encoder_lr", 0.0)
        out.notes.append(f"learning_rate_te1 = 0 with learning_rate_te2 = {te2!r}: kohya trains SDXL's second text "
                         "encoder alone; so does lorakit (optimizer.text_encoder_lr = 0)")
    return True


def _second_text_encoder_rate(options: dict[str, Any], te2: Any, out: KohyaTranslation) -> None:
    """sdxl_train.py's rates of the two text encoders: each its own (learning_rate_te1, learning_rate_te2), either
    defaulting to learning_rate (0: that encoder not trained), where lorakit's second defaults to the first's."""
    te1, lr = options.get("learning_rate_te1"), options.get("learning_rate")
    given = te2 is not None and not isinstance(te2, bool)  # 0 too: kohya's "not trained"
    second = te2 if given else (lr if not is_off(te1) and te1 != lr else None)
    if second is not None:
        out.set("optimizer.text_encoder_2_lr", second)


def _setting_literal(text: str) -> Any:
    """A value the option table writes after ``--set key=``: TOML where it is (true, 0.1), else a bare word."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_from_kohya(path: str | Path) -> tuple[TrainConfig, KohyaTranslation]:
    """A lorakit config from a kohya config file, and what was and was not translated (values are checked by
    type here and by range in ``TrainConfig.validate``, each error naming the file)."""
    from lorakit.commands.kohya_gui import gui_to_kohya, is_gui_config

    path = Path(path)
    table, gui_skipped, gui_notes, gui_said = read_kohya_file(path), [], [], []
    if is_gui_config(table):  # the kohya_ss GUI's saved config: the options it would launch sd-scripts with
        table, gui_skipped, gui_notes, gui_said = gui_to_kohya(table, path)
    translation = translate(table, path)
    translation.skipped += gui_skipped
    translation.untranslated += gui_notes
    translation.notes += gui_said
    cfg = TrainConfig()
    merge_into(cfg, translation.settings, f"{path} (kohya config)")
    return cfg, translation


def options_table() -> str:
    """The Markdown table of kohya's options and how lorakit says each (docs/kohya.md): the translation table the
    trainer's error messages and ``--from-kohya`` use, so the page cannot drift from what lorakit does."""
    from lorakit.commands.train import KOHYA_OPTIONS

    rows = ["| kohya option | in lorakit |", "|---|---|"]
    for option, says in sorted(KOHYA_OPTIONS.items()):
        kohya = "--" + option.removeprefix("--").replace("-", "_")
        text = (says.strip("()") if says.startswith("(") else f"`{says}`").replace("|", "\\|")
        rows.append(f"| `{kohya}` | {text} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.commands.kohya_config [--update-doc docs/kohya.md]``: print (or write) the table."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--update-doc", type=Path, help="write the table between the page's markers")
    args = parser.parse_args(argv)
    table = options_table()
    if args.update_doc:
        from lorakit.doc_blocks import update_doc_blocks

        update_doc_blocks(args.update_doc, {"kohya options": table}, {"kohya options": DOC_MARKERS})
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
