"""The diffusers / PEFT layout of LoRA files: read as kohya modules, and written on request.

What diffusers' ``save_lora_weights`` writes (and most LoRAs made with diffusers' training scripts hold)::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (r, in)
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (out, r)
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight

with the scale in the ``lora_adapter_metadata`` entry of the header (a PEFT ``LoraConfig`` per component:
``unet.lora_alpha``, ``unet.alpha_pattern``, ``unet.use_rslora``, ...) or nowhere (then ``alpha = rank``,
scale 1, as diffusers loads it).  Also read: PEFT's ``get_peft_model_state_dict`` without a component prefix
(``down_blocks.0...lora_A.weight``, optionally under ``base_model.model.``, with or without an adapter name),
the older diffusers layouts (``...to_q.lora.down.weight``, ``...lora_linear_layer.up.weight``,
``...processor.to_q_lora.down.weight``) with ``.alpha`` keys as diffusers' kohya conversion leaves them, and
DoRA magnitudes (``lora_magnitude_vector``, PEFT's per-output-row norm).

Reading maps every module to its kohya name (``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` +
path) and its tensors to kohya keys (``lora_down.weight``, ``lora_up.weight``, ``alpha``, ``dora_scale``), so
the rest of lorakit sees one layout.  Writing (``save_network(..., format="diffusers")``) folds the scale
``alpha / rank`` into ``lora_B``, so every reader gets the same ΔW whatever it does with alpha, and records
``r = lora_alpha`` in ``lora_adapter_metadata`` for diffusers.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.network import kohya_name

#: the header entry in which diffusers stores each component's PEFT LoraConfig
METADATA_KEY = "lora_adapter_metadata"
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
_COMPONENTS = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_WRAPPERS = ("base_model.model.",)

# key ending -> kohya key; PEFT may put an adapter name before ``.weight`` (``lora_A.default.weight``)
_ENDINGS = (
    (re.compile(r"\.lora_A(?:\.[\w-]+)?\.weight$"), "lora_down.weight"),
    (re.compile(r"\.lora_B(?:\.[\w-]+)?\.weight$"), "lora_up.weight"),
    (re.compile(r"\.lora_B(?:\.[\w-]+)?\.bias$"), "lora_up.bias"),  # PEFT lora_bias: lorakit refuses it on load
    (re.compile(r"\.lora\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"\.lora\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"\.lora_linear_layer\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"\.lora_linear_layer\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$"), "dora_scale"),
    (re.compile(r"\.alpha$"), "alpha"),
)
# diffusers' attention-processor layout (before PEFT): `attn1.processor.to_q_lora.down.weight`
_PROCESSOR = re.compile(r"^(?P<block>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)"
                        r"\.weight$")
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


# PEFT's LoHa and LoKr keep LyCORIS's tensor names and shapes (peft/tuners/loha, lokr cite LyCORIS): the name is the
# kohya key as it is
_PEFT_LYCORIS = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)(?:\.[\w-]+)?$")


def split_key(key: str) -> tuple[str, str] | None:
    """``'unet.a.b.to_q.lora_A.weight'`` -> ``('unet.a.b.to_q', 'lora_down.weight')``; None for other keys."""
    found = _PEFT_LYCORIS.search(key)
    if found:
        return key[:found.start()], found.group(1)
    match = _PROCESSOR.match(key)
    if match:
        block = match["block"]
        proj = (_TE_PROJ if "self_attn" in block else _UNET_PROJ)[match["proj"]]
        return f"{block}.{proj}", f"lora_{match['role']}.weight"
    for pattern, role in _ENDINGS:
        found = pattern.search(key)
        if found:
            return key[:found.start()], role
    return None


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    """Whether a file's keys are in the diffusers/PEFT layout (dotted module paths), not kohya's."""
    keys = list(keys)
    if not keys or any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return False
    return any((s := split_key(k)) is not None and s[1] != "alpha" for k in keys)


def _component(path: str, has_second_encoder: bool) -> tuple[str, str, str]:
    """(config prefix, kohya prefix, module path) of a dotted path such as ``unet.down_blocks.0...``."""
    for wrapper in _WRAPPERS:
        path = path.removeprefix(wrapper)
    head, _, rest = path.partition(".")
    if head in _COMPONENTS and rest:
        prefix = _COMPONENTS[head]
        if head == "text_encoder" and has_second_encoder:
            prefix = "lora_te1"  # SDXL: the first of two encoders
        return head, prefix, rest
    if path.startswith(("text_model.", "encoder.layers.")):  # a bare text-encoder state dict
        return "", "lora_te", path
    if head in ("transformer", "prior", "controlnet"):  # other diffusers models: named, then reported unmatched
        return head, f"lora_{head}", rest
    return "", "lora_unet", path  # a bare U-Net state dict (PEFT's get_peft_model_state_dict)


def _configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The LoraConfig of each component ('' for an unprefixed one) from ``lora_adapter_metadata``."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        entries = json.loads(raw)
    except ValueError:
        return {}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in entries.items() if isinstance(entries, dict) else ():
        head, dot, field = key.partition(".")
        if dot and head in _COMPONENTS:
            configs.setdefault(head, {})[field] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


#: PEFT's ``save_pretrained`` writes the weights under this name and their LoraConfig (the scale) beside them
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
#: set by ``read_adapter`` on a file whose scale came from the ``adapter_config.json`` beside it (for inspect)
SCALE_SOURCE_KEY = "lorakit_scale_from"
#: the LoraConfig fields the scale of each module comes from (``_alpha``)
_SCALE_FIELDS = ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora")


def peft_folder_config(path: Path) -> dict[str, Any] | None:
    """The scale fields of the ``adapter_config.json`` PEFT's ``save_pretrained`` wrote beside ``path`` (an
    ``adapter_model.safetensors``), in ``lora_adapter_metadata``'s form; None when there is none.  PEFT keeps
    ``lora_alpha`` there, not in the file: read alone, a file trained at lora_alpha = 2r would apply half its ΔW.
    Raises ValueError naming the config when it cannot be read, or is not a LoRA's."""
    config_path = path.parent / PEFT_CONFIG_NAME
    if path.name != PEFT_WEIGHTS_NAME or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not readable JSON ({err}); it holds the scale (lora_alpha) of {path.name}, "
                         "which cannot be applied without it") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") not in ("LORA", "LOHA", "LOKR"):
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path}: a PEFT config of type {kind!r}; lorakit reads PEFT's LoRA, LoHa and LoKr "
                         "folders")
    if config.get("peft_type") in ("LOHA", "LOKR") and "alpha" in config:  # their LoraConfig field is "alpha"
        config = {**config, "lora_alpha": config["alpha"]}
    return {key: config[key] for key in _SCALE_FIELDS if config.get(key) is not None}


def _pattern_value(patterns: Mapping[str, Any], path: str) -> Any:
    """PEFT's rule for ``alpha_pattern``/``rank_pattern``: a key matches a module path ending in it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def _alpha(config: Mapping[str, Any], path: str, rank: int) -> float | None:
    """kohya's alpha (scale = alpha / rank) for a module from its component's LoraConfig; None: not stated."""
    if not config:
        return None
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path)
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return None
    alpha = float(alpha)
    if config.get("use_rslora"):  # PEFT's rsLoRA: scale = lora_alpha / sqrt(r)
        alpha *= math.sqrt(rank)
    return alpha


def kohya_modules(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The modules of a diffusers/PEFT-layout file under kohya names and keys, and the keys that fit nowhere."""
    has_second = any(k.removeprefix(_WRAPPERS[0]).startswith("text_encoder_2.") for k in tensors)
    configs = _configs(metadata)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    where: dict[str, tuple[str, str]] = {}  # kohya name -> (config prefix, module path)
    loose = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            loose.append(key)
            continue
        path, role = split
        config_prefix, prefix, module_path = _component(path, has_second)
        name = kohya_name(prefix, module_path)
        if role == "dora_scale":  # PEFT: (out,) or (1, out, 1, 1); kohya rows: (out, 1, ...)
            tensor = tensor.reshape(-1, 1)
        modules.setdefault(name, {})[role] = tensor
        where[name] = (config_prefix, module_path)
    for name, module in modules.items():
        if "alpha" in module:
            continue
        config_prefix, module_path = where[name]
        config = configs.get(config_prefix) or configs.get("", {})
        rank_key = next((k for k in _RANK_KEYS if k in module), None)
        if rank_key is None:
            if "lokr_w1" in module and "lokr_w2" in module:  # both LoKr halves full: no rank, yet PEFT scales alpha/r
                scale = _full_lokr_scale(config, module_path)
                if scale is not None:
                    module["lokr_w1"] = module["lokr_w1"] * scale  # lorakit and LyCORIS apply such a module at scale 1
            continue
        alpha = _alpha(config, module_path, int(module[rank_key].shape[0]))
        if alpha is not None:
            module["alpha"] = torch.tensor(alpha)
    return modules, loose


#: the tensor whose first dimension is a module's rank, by algorithm (LoRA, LoHa, LoKr's decomposed halves)
_RANK_KEYS = ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b")


def _full_lokr_scale(config: Mapping[str, Any], path: str) -> float | None:
    """PEFT's ``alpha / r`` of a LoKr module whose halves are both full (None: the config does not say)."""
    rank = _pattern_value(config.get("rank_pattern") or {}, path) or config.get("r")
    alpha = _alpha(config, path, int(rank)) if rank else None
    return None if alpha is None else alpha / float(rank)


# ---- writing -------------------------------------------------------------------------------------------------

_DIFFUSERS_COMPONENT = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_1": "text_encoder",
                        "text_encoder_2": "text_encoder_2"}


class NotDiffusersCompatible(ValueError):
    """A network holds modules the diffusers/PEFT layout cannot express (LoHa, LoKr, Tucker, per-input DoRA)."""


def _module_path(name: str, path: str) -> str:
    """The path a kohya name stands for: the model's own path, or the transformers-4 one kohya names use."""
    flat = path.replace(".", "_")
    if name.endswith("_text_model_" + flat) and not flat.startswith("text_model_"):
        return "text_model." + path
    return path


def diffusers_refusal(network) -> str | None:
    """Why a network has no diffusers/PEFT layout, naming its modules that have none; None when it has one.

    Only LoRA/LoCon modules (DoRA with output-row norms included, as PEFT's ``lora_magnitude_vector``) have
    that layout."""
    from lorakit.adapters.lora import LoRA

    refused = []
    for name, adapter in network.adapters.items():
        if not isinstance(adapter, LoRA):
            refused.append(f"{name} ({adapter.algorithm})")
        elif adapter.lora_mid is not None:
            refused.append(f"{name} (Tucker LoCon)")
        elif adapter.dora_scale is not None and not adapter.wd_on_out:
            refused.append(f"{name} (DoRA with input-column norms; PEFT normalises output rows)")
    if not refused:
        return None
    return (f"the diffusers/PEFT layout holds plain LoRA/LoCon modules only; {len(refused)} module(s) are not: "
            f"{', '.join(refused[:3])}{' ...' if len(refused) > 3 else ''}. Write the kohya layout (A1111, ComfyUI "
            "and LyCORIS load it), or convert to plain LoRA first (lorakit resize --to lora)")


def diffusers_tensors(network) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A network's tensors in the diffusers/PEFT layout, and the ``lora_adapter_metadata`` header entry;
    ``NotDiffusersCompatible`` for a network that has none (``diffusers_refusal``)."""
    if (why := diffusers_refusal(network)) is not None:
        raise NotDiffusersCompatible(why)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    dora: set[str] = set()
    for name, adapter in network.adapters.items():
        component = _DIFFUSERS_COMPONENT[network.group_of(name)]
        path = _module_path(name, network.module_path(name))
        down, up = adapter.lora_down.weight.detach(), adapter.lora_up.weight.detach()
        # the scale rides on lora_B: alpha = rank in the file, so no reader can apply alpha differently
        tensors[f"{component}.{path}.lora_A.weight"] = down
        tensors[f"{component}.{path}.lora_B.weight"] = up * adapter.scale if adapter.scale != 1 else up
        # PEFT matches target_modules and patterns as path suffixes: without `text_model.` they fit
        # CLIPTextModel in transformers 4 and 5 alike
        ranks.setdefault(component, {})[path.removeprefix("text_model.")] = adapter.rank
        if adapter.dora_scale is not None:  # PEFT's magnitude: (out,) for Linear, (1, out, 1, 1) for Conv2d
            magnitude = adapter.dora_scale.detach().reshape(-1)
            if adapter.kind == "conv":
                magnitude = magnitude.reshape(1, -1, 1, 1)
            tensors[f"{component}.{path}.lora_magnitude_vector"] = magnitude
            dora.add(component)
    config: dict[str, Any] = {}
    for component, by_path in ranks.items():
        rank = Counter(by_path.values()).most_common(1)[0][0]
        pattern = {p: r for p, r in by_path.items() if r != rank}
        config.update({f"{component}.r": rank, f"{component}.lora_alpha": rank,
                       f"{component}.rank_pattern": pattern, f"{component}.alpha_pattern": dict(pattern),
                       f"{component}.target_modules": sorted(by_path), f"{component}.use_dora": component in dora,
                       f"{component}.use_rslora": False, f"{component}.lora_dropout": 0.0,
                       f"{component}.init_lora_weights": True, f"{component}.bias": "none"})
    return tensors, {METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
