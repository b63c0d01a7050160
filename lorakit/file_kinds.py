"""What a weights file (or folder) is when it is not an adapter: a full model, one model component, an embedding.

Read from the safetensors header only (key names and shapes), so a 4 GB checkpoint is recognised without
loading it.  ``check_adapter_path`` raises ``NotAnAdapterError`` with a sentence a user can act on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from lorakit.checkpoint_names import METHOD_KEY
from lorakit.errors import LorakitError

# key fragments only adapter files have (kohya/LyCORIS and diffusers/PEFT names)
_ADAPTER_KEY = re.compile(r"(lora_(down|up|mid|A|B)|hada_|lokr_|dora_scale|oft_|\.alpha$|\.diff(_b)?$|"
                          r"\.on_input$|lora_magnitude|^lora_(unet|te\d?)_|^lycoris_)")


class NotAnAdapterError(LorakitError):
    """The path exists but is not an adapter file; the message says what it is."""


def read_header(path: str | os.PathLike) -> tuple[dict[str, list[int]], dict[str, str]]:
    """{key: shape} and the metadata of a safetensors file, from its header alone (safetensors' errors pass)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})


def is_embedding(names: set[str]) -> bool:
    """Whether tensor names are a textual-inversion file's: A1111/ComfyUI ({"clip_l": ...}), SDXL (+ "clip_g"),
    ComfyUI's name for an SD2.x one ({"clip_h": ...}), the older A1111 formats."""
    return bool(names) and (names <= {"clip_l", "clip_g"} or names in ({"emb_params"}, {"clip_h"})
                            or all(k.startswith("string_to_param") for k in names))


def embedding_header(path: str | os.PathLike) -> tuple[dict[str, list[int]], dict[str, str]] | None:
    """{key: shape} and the metadata of a safetensors textual-inversion file; None for anything else."""
    try:
        keys, metadata = read_header(path)
    except Exception:  # not safetensors, truncated, ...
        return None
    return (keys, metadata) if is_embedding(set(keys)) else None


#: the metadata entry naming an embedding's token (in the embedding, and in a pivotal-tuning adapter beside it)
TI_TOKEN_KEY = "lorakit_ti_token"


def embedding_token(path: Path, metadata: dict[str, str]) -> str:
    """The word an embedding file stands for: the token its metadata names, else its file name (A1111 and
    ComfyUI call an embedding by its file name)."""
    return metadata.get(TI_TOKEN_KEY) or path.stem


def pivotal_embedding(path: str | os.PathLike) -> tuple[bool, Path | None]:
    """Whether ``path`` is a pivotal-tuning adapter (the trainer writes it with its embedding, ``NAME.safetensors``
    and ``NAME-TOKEN.safetensors``), and the embedding beside it (None when it is not there, or is ambiguous)."""
    path = Path(path)
    try:
        keys, metadata = read_header(path)
    except Exception:  # not safetensors, missing, truncated: not one
        return False, None
    if metadata.get(METHOD_KEY) != "pivotal" or is_embedding(set(keys)):  # the embedding says "pivotal" too
        return False, None
    token = metadata.get(TI_TOKEN_KEY)  # files from before it was recorded: any embedding named NAME-*
    candidates = [path.with_name(f"{path.stem}-{token}.safetensors")] if token else \
        sorted(path.parent.glob(f"{path.stem}-*.safetensors"))
    found = [c for c in candidates if c.is_file() and embedding_header(c) is not None]
    return True, found[0] if len(found) == 1 else None


def checkpoint_family(names: set[str]) -> str:
    """"SD1.x", "SD2.x", "SDXL" from a single-file checkpoint's key names (its text encoder's layout), else
    "Stable Diffusion"."""
    if any(k.startswith("conditioner.") for k in names):
        return "SDXL"
    if any(k.startswith("cond_stage_model.model.") for k in names):  # OpenCLIP's names
        return "SD2.x"
    if any(k.startswith("cond_stage_model.transformer.") for k in names):
        return "SD1.x"
    return "Stable Diffusion"


def describe_weights(keys: dict[str, list[int]]) -> str | None:
    """A description of a non-adapter safetensors file from its {key: shape}, or None if it may be an adapter."""
    if not keys:
        return "holds no tensors, so it is not an adapter"
    if any(_ADAPTER_KEY.search(k) for k in keys):
        return None
    names = set(keys)
    if is_embedding(names):
        shapes = ", ".join(f"{k} {'×'.join(map(str, keys[k]))}" for k in sorted(names))
        return f"a textual-inversion embedding ({shapes}), not an adapter"
    parts = [label for prefix, label in (("model.diffusion_model.", "U-Net"), ("cond_stage_model.", "text encoder"),
                                         ("conditioner.", "text encoders"), ("first_stage_model.", "VAE"))
             if any(k.startswith(prefix) for k in names)]
    if parts:
        return f"a full {checkpoint_family(names)} model checkpoint ({', '.join(parts)}), not an adapter; use it as " \
               "--model"
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in names) and \
            any(k.startswith("time_embedding.") for k in names):
        return "the weights of a diffusers U-Net (one model component), not an adapter"
    if any(k.startswith(("text_model.", "encoder.layers.")) for k in names) and \
            any("embeddings" in k for k in names):
        return "the weights of a CLIP text encoder (one model component), not an adapter"
    if any(k.startswith("encoder.") for k in names) and any(k.startswith("decoder.") for k in names):
        return "the weights of a VAE (one model component), not an adapter"
    example = sorted(names)[0]
    return f"not an adapter: none of its {len(names)} tensors has an adapter's key names (e.g. {example!r})"


def is_full_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole model: a diffusers folder, or a single-file checkpoint (its U-Net's original
    names), read from the header alone."""
    path = Path(path)
    if path.is_dir():
        return (path / "model_index.json").is_file()
    try:
        keys, _ = read_header(path)
    except Exception:  # not safetensors, missing, truncated: not a model this can read
        return False
    return any(k.startswith("model.diffusion_model.") for k in keys)


def model_folder_refusal(path: Path) -> str | None:
    """What to tell someone who gave a diffusers model folder where an adapter (or a run) goes; None otherwise."""
    if (path / "model_index.json").is_file():
        return f"{path}: a diffusers model folder, not an adapter; use it as --model"
    return None


#: PEFT's own names of the tensors of its other adapters (get_peft_model_state_dict, peft 0.21), by adapter (its
#: LoHa and LoKr are read: they keep LyCORIS's names, lorakit.diffusers_format)
_PEFT_NON_LORA = {"oft_R": "OFT", "boft_R": "BOFT", "ia3_l": "(IA)³", "vera_lambda_b": "VeRA"}


def peft_non_lora_kind(keys: Iterable[str]) -> str | None:
    """The adapter a PEFT state dict of another kind than LoRA holds (``base_model.model.<path>.hada_w1_a``: LoHa),
    None for anything else."""
    for key in keys:
        if key.startswith("base_model.model."):
            for part in key.split(".")[-2:]:
                if part in _PEFT_NON_LORA:
                    return _PEFT_NON_LORA[part]
    return None


def check_adapter_path(path: str | os.PathLike) -> None:
    """Raise NotAnAdapterError when ``path`` is a folder or a safetensors file that is not an adapter (files
    that cannot be read at all are left to the adapter reader, whose errors say why)."""
    path = Path(path)
    if path.is_dir():
        if refusal := model_folder_refusal(path):
            raise NotAnAdapterError(refusal)
        if (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file():
            raise NotAnAdapterError(f"{path}: a PEFT adapter folder (save_pretrained's); give its file, "
                                    f"{path / 'adapter_model.safetensors'} (the adapter_config.json beside it is read "
                                    "for the scale)")
        files = sorted(path.glob("*.safetensors"))
        # config.toml alone, not run_manifest.is_lorakit_run: runs of older lorakit have no manifest
        if (path / "config.toml").is_file() and files:
            hint = f" (a lorakit run: its result is {files[0]})" if len(files) == 1 else \
                f" (a lorakit run: its results are {', '.join(str(f) for f in files)})"
        else:  # a folder of adapters (ComfyUI's models/loras): the files to choose from
            listed = ", ".join(f.name for f in files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
            hint = f" (it holds {listed})" if files else ""
        raise NotAnAdapterError(f"{path}: is a folder, not a file; give one adapter .safetensors file{hint}")
    if not path.is_file():
        return
    try:
        keys, metadata = read_header(path)
    except Exception:  # not safetensors, truncated, ...: the reader's checks explain it
        return
    if metadata.get(METHOD_KEY) == "native":
        raise NotAnAdapterError(f"{path}: a lorakit native fine-tuning checkpoint (one epoch's weights of a --method "
                                f"native run), not an adapter; make it a model with: lorakit merge {path} --out "
                                "MODEL.safetensors")
    if (peft_kind := peft_non_lora_kind(keys)) is not None:  # read as kohya names: "algorithm 'unknown'"
        raise NotAnAdapterError(f"{path}: a PEFT {peft_kind} file (base_model.model.… keys); lorakit reads PEFT's "
                                "LoRA, LoHa and LoKr files, and OFT, BOFT and (IA)³ under kohya/LyCORIS names "
                                "(lora_unet_…), as A1111 and ComfyUI do")
    description = describe_weights(keys)
    if description is not None:
        raise NotAnAdapterError(f"{path}: {description}")
