"""The kohya_ss GUI's saved configs (bmaltais/kohya_ss: the LoRA, textual-inversion, DreamBooth and fine-tuning
tabs' "Save" JSON, and their presets) as the sd-scripts options the GUI launches ``train_network.py``
(``train_textual_inversion.py``, ``train_db.py``, ``fine_tune.py``) with, so ``lorakit train --from-kohya
GUI.json`` reads them through the same translation as a ``--config_file`` TOML.

Most GUI keys are sd-scripts options already.  The others are GUI fields the GUI turns into options when it
starts a run, and this module does the same:

- ``LoRA_type`` (+ ``LyCORIS_preset``, ``conv_dim``, ``factor``, ``use_tucker``, ...) -> ``network_module`` and
  ``network_args``;
- ``epoch`` -> ``max_train_epochs`` (the GUI turns it into steps; lorakit counts epochs itself);
- ``max_resolution`` -> ``resolution``; ``optimizer`` -> ``optimizer_type``; ``optimizer_args`` and
  ``lr_scheduler_args`` (one string of ``"key=value"`` items) -> lists;
- ``lr_warmup`` (a percentage of the steps) -> ``lr_warmup_steps`` as a ratio (sd-scripts reads a float below 1
  as one);
- ``unet_lr`` / ``text_encoder_lr`` of 0 -> which network is trained, as the GUI decides it;
- ``noise_offset_type`` -> only the chosen kind of noise offset's settings;
- ``additional_parameters`` (extra command-line options) -> options of their own;
- ``xformers = "sdpa"`` etc. -> nothing (lorakit uses PyTorch's attention).

GUI and launcher settings that do not change what is trained (the model list, ``accelerate launch``'s threads
and dynamo) are skipped; ``num_processes`` above 1 and the GUI's inline sample prompts are listed, since they
need the user to do something.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from lorakit.commands.kohya_config import is_off
from lorakit.config import ConfigError

#: the GUI's LoRA types -> (sd-scripts network module, LyCORIS algorithm or None)
LORA_TYPES: dict[str, tuple[str, str | None]] = {
    "Standard": ("networks.lora", None), "Kohya LoCon": ("networks.lora", None),
    "Kohya DyLoRA": ("networks.dylora", None), "LoRA-FA": ("networks.lora_fa", None),
    "LoCon": ("lycoris.kohya", "locon"), "LyCORIS/LoCon": ("lycoris.kohya", "locon"),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha"), "LyCORIS/LoKr": ("lycoris.kohya", "lokr"),
    "LyCORIS/iA3": ("lycoris.kohya", "ia3"), "LyCORIS/DyLoRA": ("lycoris.kohya", "dylora"),
    "LyCORIS/GLoRA": ("lycoris.kohya", "glora"), "LyCORIS/BOFT": ("lycoris.kohya", "boft"),
    "LyCORIS/Diag-OFT": ("lycoris.kohya", "diag-oft"), "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", "full"),
    "Flux1": ("networks.lora_flux", None),
}
#: the GUI fields each LyCORIS algorithm passes as network_args (``unit`` is DyLoRA's block_size)
_LYCORIS_COMMON = ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "use_tucker", "use_scalar",
                   "rank_dropout_scale", "train_norm", "bypass_mode", "dora_wd")
_LYCORIS_ARGS: dict[str, tuple[str, ...]] = {
    "locon": _LYCORIS_COMMON, "loha": _LYCORIS_COMMON,
    "lokr": (*_LYCORIS_COMMON, "factor", "use_cp", "decompose_both"),
    "ia3": ("conv_dim", "conv_alpha", "train_on_input"),
    "dylora": ("conv_dim", "conv_alpha", "use_tucker", "unit", "rank_dropout", "module_dropout", "train_norm"),
    "glora": ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "rank_dropout_scale", "train_norm"),
    "boft": (*_LYCORIS_COMMON, "constrain", "rescaled"), "diag-oft": (*_LYCORIS_COMMON, "constrain", "rescaled"),
    "full": ("rank_dropout", "module_dropout", "use_tucker", "use_scalar", "rank_dropout_scale", "train_norm"),
}
#: kohya's networks.lora (and dylora) block-wise and dropout fields, passed when set
_KOHYA_NETWORK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                       "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
#: every GUI field that only feeds network_args
_NETWORK_FIELDS = {"LyCORIS_preset", "factor", "use_cp", "decompose_both", "constrain", "rescaled", "unit",
                   "train_on_input", *_LYCORIS_COMMON, *_KOHYA_NETWORK_ARGS}
#: noise_offset_type -> the settings it keeps (the GUI drops the other kind's)
_NOISE_KINDS = {"Original": ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"),
                "Multires": ("multires_noise_iterations", "multires_noise_discount")}
#: the GUI's own state and accelerate launch's settings: they do not change what is trained
GUI_ONLY = ("model_list", "save_as", "save_as_bool", "file_path", "headless", "print_only", "use_shell",
            "num_cpu_threads_per_process", "num_machines", "multi_gpu", "gpu_ids", "main_process_port",
            "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
            "extra_accelerate_launch_args", "stop_text_encoder_training_pct",
            "use_wandb", "log_config", "async_upload")
#: the GUI's SD3 and FLUX.1 fields: it passes them to sd-scripts only with its SD3 or FLUX.1 box ticked
SD3_FIELDS = ("clip_g", "clip_g_dropout_rate", "sd3_clip_l_dropout_rate", "sd3_enable_scaled_pos_embed", "logit_mean",
              "logit_std", "mode_scale", "pos_emb_random_crop_rate", "save_clip", "save_t5xxl", "sd3_t5_dropout_rate",
              "t5xxl_device", "t5xxl_dtype", "sd3_text_encoder_batch_size", "weighting_scheme",
              "sd3_cache_text_encoder_outputs", "sd3_cache_text_encoder_outputs_to_disk", "sd3_fused_backward_pass")
FLUX_FIELDS = ("ae", "clip_l", "t5xxl", "flux1_clip_l", "flux1_t5xxl", "discrete_flow_shift", "model_prediction_type",
               "timestep_sampling", "split_mode", "t5xxl_max_token_length", "guidance_scale", "mem_eff_save",
               "apply_t5_attn_mask", "cpu_offload_checkpointing", "blocks_to_swap", "single_blocks_to_swap",
               "double_blocks_to_swap", "flux1_cache_text_encoder_outputs",
               "flux1_cache_text_encoder_outputs_to_disk", "flux_fused_backward_pass", "t5xxl_lr", "train_blocks")


def is_gui_config(table: dict[str, Any]) -> bool:
    """A kohya_ss GUI config of its LoRA tab (every version saves the LoRA type), its textual-inversion tab
    (the token and the GUI's own resolution field), its DreamBooth tab (the resolution field and the text
    encoder's stop) or its fine-tuning tab (the resolution field and the image folder), not a ``--config_file``
    table."""
    return "LoRA_type" in table or ("max_resolution" in table and any(
        k in table for k in ("token_string", "stop_text_encoder_training", "image_folder")))


#: GUI fields that hold text even when it looks like a number (the rest are numbers the GUI saves as strings:
#: "clip_skip": "2", "seed": "42")
_TEXT_FIELDS = {"output_name", "training_comment", "metadata_title", "metadata_author", "metadata_description",
                "metadata_license", "metadata_tags", "wandb_run_name", "log_tracker_name", "log_prefix",
                "caption_extension", "sample_prompts", "additional_parameters", "vae", "network_weights",
                "lora_network_weights", "dataset_config", "resume", "model_list", "LoRA_type", "LyCORIS_preset",
                "optimizer_args", "lr_scheduler_args", "max_resolution", "resolution"}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number_or_text(key: str, value: Any) -> Any:
    """A number the GUI saved as a string, as the number; "False" (which some GUI versions save in empty text
    boxes, e.g. ``huggingface_repo_id``) as off; any other value as it is."""
    if value == "False":
        return False
    if not isinstance(value, str) or key in _TEXT_FIELDS or key.endswith(("_dir", "_path", "_file")) \
            or not _NUMBER.match(value.strip()):
        return value
    number = float(value)
    return int(number) if number.is_integer() and not any(c in value for c in ".eE") else number


def _arg_list(value: Any) -> list[str]:
    """The GUI's one-string option lists (``"d0=1e-5" "decouple=True"``) as sd-scripts' list, quotes removed."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value or "").replace('"', "").split()


def _extra_options(text: str, path: Path) -> dict[str, Any]:
    """``additional_parameters`` (``--max_token_length 150 --no_half_vae``) as option: value pairs."""
    try:
        tokens = shlex.split(text)
    except ValueError as err:
        raise ConfigError(f"{path}: additional_parameters = {text!r}: {err}") from None
    options: dict[str, Any] = {}
    key: str | None = None
    for token in tokens:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            key = name.replace("-", "_")
            options[key] = value if eq else True
            if eq:
                key = None
        elif key is None:
            raise ConfigError(f"{path}: additional_parameters = {text!r}: {token!r} follows no --option")
        else:
            previous = options[key]
            options[key] = token if previous is True else [*(previous if isinstance(previous, list) else
                                                             [previous]), token]
    return options


def _network(gui: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """network_module and network_args for the GUI's LoRA type; notes on what does not carry over."""
    lora_type = str(gui.pop("LoRA_type"))
    preset = gui.pop("LyCORIS_preset", None)
    fields = {k: gui.pop(k) for k in list(gui) if k in _NETWORK_FIELDS}
    if lora_type not in LORA_TYPES:
        return {}, [f"LoRA_type = {lora_type!r}: not a LoRA type of the kohya_ss GUI lorakit knows"]
    module, algo = LORA_TYPES[lora_type]
    out: dict[str, Any] = {"network_module": module}
    if algo is not None:
        names = _LYCORIS_ARGS[algo]
        args = [f"algo={algo}"] + ([f"preset={preset}"] if not is_off(preset) else [])
        args += [f"{'block_size' if k == 'unit' else k}={fields[k]}" for k in names if not is_off(fields.get(k))]
    else:
        names = _KOHYA_NETWORK_ARGS + (("conv_dim", "conv_alpha") if lora_type == "Kohya LoCon" else ()) + (
            ("conv_dim", "conv_alpha", "unit") if lora_type == "Kohya DyLoRA" else ())
        args = [f"{k}={fields[k]}" for k in names if not is_off(fields.get(k))]
    if args:
        out["network_args"] = args
    return out, []


def _fine_tuning_tab(gui: dict[str, Any]) -> None:
    """The fine-tuning tab's fields as the fine_tune.py options the GUI launches with: the images in
    ``image_folder``; their captions from its caption files (``create_caption``: the GUI merges them into the
    metadata JSON first, lorakit reads them directly) or from the metadata JSON in ``train_dir`` (the latents'
    one with ``use_latent_files``, whose captions are the same); the text encoder trained or not, said always."""
    gui["train_data_dir"] = gui.pop("image_folder")
    folder = str(gui.pop("train_dir", "") or "")
    captions, latents = (gui.pop(k, "") or "" for k in ("caption_metadata_filename", "latent_metadata_filename"))
    if gui.pop("create_caption", gui.pop("generate_caption_database", False)):
        gui["caption_extension"] = gui.get("caption_extension") or ".caption"  # the GUI's default for merging
    else:
        name = latents if gui.get("use_latent_files") == "Yes" else captions
        gui["in_json"] = str(Path(folder) / name)
    for key in ("use_latent_files", "create_buckets", "generate_image_buckets", "full_path", "batch_size"):
        gui.pop(key, None)  # bucket latents are prepared by lorakit itself; paths in the JSON are read either way
    gui["train_text_encoder"] = bool(gui.get("train_text_encoder"))


def gui_to_kohya(gui: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[str], list[str], list[str]]:
    """The sd-scripts options a kohya_ss GUI config launches with; (options, GUI keys skipped, notes on what
    lorakit cannot take over, notes on what it takes over otherwise than the GUI would)."""
    gui = {key: _number_or_text(key, value) for key, value in gui.items()}
    for box, family in (("flux1_checkbox", "FLUX.1"), ("sd3_checkbox", "SD3")):
        if gui.get(box):
            raise ConfigError(f"{path}: a {family} config (the GUI's {family} box is ticked); lorakit trains SD1.x, "
                              "SD2.x and SDXL models")
    # the GUI's own state, and the fields it passes only for SD3 and FLUX.1
    skipped = [k for k in (*GUI_ONLY, "flux1_checkbox", "sd3_checkbox", *SD3_FIELDS, *FLUX_FIELDS) if k in gui]
    for key in skipped:
        gui.pop(key)
    dreambooth_tab = "LoRA_type" not in gui and "token_string" not in gui
    options, notes = _network(gui) if "LoRA_type" in gui else ({}, [])
    stop = gui.pop("stop_text_encoder_training", None)
    if dreambooth_tab and stop not in (None, 0):
        gui["stop_text_encoder_training"] = stop  # the DreamBooth tab passes it (0: none); the LoRA tab ignores it
    if "image_folder" in gui:
        _fine_tuning_tab(gui)
    template = gui.pop("template", "caption")  # the textual-inversion tab: captions, or kohya's templates
    if template in ("object template", "style template"):  # as the GUI hands them to sd-scripts
        gui[f"use_{template.split()[0]}_template"] = True
    elif template not in ("caption", "", None):
        notes.append(f"template = {template!r}: not a template of the GUI's textual-inversion tab (caption, object "
                     "template, style template)")
    epochs = gui.pop("epoch", None)
    if not is_off(epochs) and is_off(gui.get("max_train_epochs")):
        gui["max_train_epochs"] = int(epochs)
    for gui_key, option in (("max_resolution", "resolution"), ("optimizer", "optimizer_type"),
                            ("lora_network_weights", "network_weights")):
        if gui_key in gui:
            value = gui.pop(gui_key)
            if option not in gui or is_off(gui[option]):
                gui[option] = value
    for key in ("optimizer_args", "lr_scheduler_args"):
        if key in gui:
            gui[key] = _arg_list(gui[key])
    warmup = gui.pop("lr_warmup", 0)
    if not is_off(warmup) and is_off(gui.get("lr_warmup_steps")):
        if float(warmup) >= 100:  # a share is below 1: a whole run of warm-up is a number of steps
            notes.append(f"lr_warmup = {warmup}: warming up for the whole run; set optimizer.lr_warmup_steps to "
                         "its number of steps")
        else:
            gui["lr_warmup_steps"] = float(warmup) / 100  # a percentage of the steps; sd-scripts: a ratio below 1
    # which network trains: the GUI reads a learning rate of 0 as "not this one"
    unet_lr, te_lr = (float(gui.get(k) or 0) for k in ("unet_lr", "text_encoder_lr"))
    if unet_lr or te_lr:
        gui.pop("learning_rate", None)  # the GUI does not pass it then
        if not te_lr:
            gui.pop("text_encoder_lr", None)
            gui["network_train_unet_only"] = True
        if not unet_lr:
            gui.pop("unet_lr", None)
            gui["network_train_text_encoder_only"] = True
    else:
        gui.pop("unet_lr", None)
        gui.pop("text_encoder_lr", None)
    kind = gui.pop("noise_offset_type", None)
    for other, keys in _NOISE_KINDS.items():
        if kind is not None and other != kind:
            for key in keys:
                gui.pop(key, None)
    if str(gui.get("xformers", "")).lower() in ("xformers", "sdpa", "none"):
        skipped.append("xformers")  # lorakit: PyTorch's scaled-dot-product attention
        gui.pop("xformers")
    processes = gui.pop("num_processes", None)
    if processes not in (None, "", 0, 1, "1"):
        notes.append(f"num_processes = {processes!r}: launch with `accelerate launch --num_processes {processes} -m "
                     "lorakit.cli train` instead")
    prompts = gui.pop("sample_prompts", "")
    if not is_off(prompts):
        notes.append("sample_prompts: the GUI keeps the prompts in its config; save them in a file (kohya's syntax) "
                     "and --set sample.prompts=FILE")
    # the GUI's SDXL box picks kohya's SDXL script; lorakit tells SDXL by the model, so only its VAE box is kept
    sdxl, sdxl_no_half_vae = gui.pop("sdxl", False), gui.pop("sdxl_no_half_vae", False)
    sdxl_cache = gui.pop("sdxl_cache_text_encoder_outputs", False)
    # the DreamBooth tab's text-encoder learning rates: one for SD1.x/2.x, one per encoder for SDXL
    for key in ("learning_rate_te1", "learning_rate_te2") if not sdxl else ("learning_rate_te",):
        gui.pop(key, None)
    if sdxl and sdxl_no_half_vae:
        gui["no_half_vae"] = True
    if sdxl and sdxl_cache:
        gui["cache_text_encoder_outputs"] = True
    said = []  # taken over differently from the GUI: said, not refused
    if gui.get("lr_scheduler") == "constant" and not is_off(gui.get("lr_warmup_steps")):
        given = f"lr_warmup = {warmup!r}" if not is_off(warmup) else f"lr_warmup_steps = {gui['lr_warmup_steps']!r}"
        gui.pop("lr_warmup_steps")
        said.append(f"{given}: left out, as the GUI leaves a warm-up out with the constant schedule "
                    "(constant_with_warmup warms up)")
    if sdxl and not is_off(gui.get("clip_skip")) and gui["clip_skip"] != 1:  # lorakit refuses it on SDXL
        said.append(f"clip_skip = {gui.pop('clip_skip')!r}: left out, as kohya's SDXL scripts ignore it")
    extra = gui.pop("additional_parameters", "")
    if not is_off(extra):  # command-line text: numbers as sd-scripts' argument types read them
        gui.update({k: [_number_or_text(k, v) for v in value] if isinstance(value, list) else
                    _number_or_text(k, value) for k, value in _extra_options(str(extra), path).items()})
    options.update(gui)
    return options, skipped, notes, said
