"""Rewrite an adapter file in another key layout with the same ΔW: the kohya/LyCORIS names that A1111, ComfyUI,
kohya and LyCORIS read, or the diffusers/PEFT names of ``load_lora_weights`` (which A1111 cannot read).

The file is loaded into the base model first, strictly, so a file for another model is refused before anything
is written, and names come out canonical (``lycoris_`` files and a lone SD1 ``lora_te1_`` become ``lora_unet_``
/ ``lora_te_``).  The tensors are the loaded adapters' own: a kohya file is rewritten exactly; the diffusers
layout folds each module's scale ``alpha / rank`` into ``lora_B`` (``lorakit.diffusers_format``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.diffusers_format import diffusers_refusal
from lorakit.formats import AdapterFileError, load_network, read_adapter, save_network
from lorakit.models import BaseModel, dtype_name
from lorakit.tools import ToolError, not_loaded

LAYOUTS = ("kohya", "diffusers")

# what save_network derives from the tensors themselves (the module kind, rank, alpha, hashes, the layout): the
# source's values would describe the old file; the rest (training settings, ss_network_args, the preset) stays
_RECOMPUTED = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "sshs_", "lorakit_format",
               "lora_adapter_metadata", "lorakit_algorithm", "lorakit_scale_from")


@dataclass(frozen=True)
class Conversion:
    source: str
    source_layout: str
    out: Path
    layout: str
    modules: int
    algorithms: tuple[str, ...]
    renamed: int  # modules whose name changed (diffusers -> kohya: all of them; kohya -> kohya: made canonical)
    dtype_changed: str | None = None  # "fp32 -> fp16" when --dtype changed the tensors' dtype

    def summary(self) -> str:
        what = f"{self.modules} modules ({', '.join(self.algorithms)})"
        dtype = f"; tensors {self.dtype_changed}" if self.dtype_changed else ""
        if self.layout == self.source_layout:
            # the same layout asked for: say what changed, or that the file was a copy already
            changes = [f"{self.renamed} names made canonical"] if self.renamed else []
            changes += [f"tensors {self.dtype_changed}"] if self.dtype_changed else []
            if not changes:
                return (f"lorakit convert: {self.source} is already in the {self.layout} layout with canonical "
                        f"names; {self.out} is a copy of its {what}, the same ΔW (nothing to convert)")
            return (f"lorakit convert: {self.source} ({self.source_layout} layout) -> {self.out} ({self.layout} "
                    f"layout): {what}, the same ΔW; {'; '.join(changes)}")
        return (f"lorakit convert: {self.source} ({self.source_layout} layout) -> {self.out} ({self.layout} "
                f"layout): {what}, the same ΔW{dtype}")


def convert_adapter(source: str | os.PathLike, out: str | os.PathLike, layout: str, model: BaseModel, *,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Conversion:
    """Write ``source`` to ``out`` in ``layout`` ("kohya" or "diffusers"); its metadata is kept, except what
    describes the layout, and its tensors' dtype unless ``dtype`` is given."""
    if layout not in LAYOUTS:
        raise ToolError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    file = read_adapter(source)
    floats = Counter(t.dtype for t in file.tensors.values() if t.is_floating_point())
    own_dtype = floats.most_common(1)[0][0] if floats else None
    dtype_changed = None
    if dtype is None:  # the file's own (an fp16 download stays fp16), whatever the loaded adapters hold
        dtype = own_dtype
    elif own_dtype is not None and dtype != own_dtype:
        dtype_changed = f"{dtype_name(own_dtype)} -> {dtype_name(dtype)}"
    try:
        network, _ = load_network(file, model.unet, model.text_encoders)
    except AdapterFileError as err:
        raise not_loaded(err) from None
    try:
        if layout == "diffusers" and (why := diffusers_refusal(network)) is not None:
            raise ToolError(f"{file.label}: {why}")  # the file that holds them, not the one not written
        kept = {k: v for k, v in file.metadata.items() if not k.startswith(_RECOMPUTED)}
        written = save_network(network, out, kept, format=layout, overwrite=overwrite, dtype=dtype)
        names = set(network.names())
        algorithms = tuple(sorted({a.algorithm for a in network.adapters.values()}))
    finally:
        network.remove()
    return Conversion(file.label, file.layout, written, layout, len(names), algorithms,
                      len(names - set(file.modules())) if file.layout == "kohya" else len(names), dtype_changed)
