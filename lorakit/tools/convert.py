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
from lorakit.models import BaseModel
from lorakit.tools import ToolError, not_loaded

LAYOUTS = ("kohya", "diffusers")

# what save_network derives from the tensors themselves (the module kind, rank, alpha, hashes, the layout): the
# source's values would describe the old file; the rest (training settings, ss_network_args, the preset) stays
_RECOMPUTED = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "sshs_", "lorakit_format",
               "lora_adapter_metadata", "lorakit_algorithm")


@dataclass(frozen=True)
class Conversion:
    source: str
    source_layout: str
    out: Path
    layout: str
    modules: int
    algorithms: tuple[str, ...]
    renamed: int  # modules whose name changed (diffusers -> kohya: all of them; kohya -> kohya: made canonical)

    def summary(self) -> str:
        what = f"{self.modules} modules ({', '.join(self.algorithms)})"
        renamed = f"; {self.renamed} names made canonical" if self.layout == self.source_layout and self.renamed \
            else ""
        return (f"lorakit convert: {self.source} ({self.source_layout} layout) -> {self.out} ({self.layout} "
                f"layout): {what}, the same ΔW{renamed}")


def convert_adapter(source: str | os.PathLike, out: str | os.PathLike, layout: str, model: BaseModel, *,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Conversion:
    """Write ``source`` to ``out`` in ``layout`` ("kohya" or "diffusers"); its metadata is kept, except what
    describes the layout, and its tensors' dtype unless ``dtype`` is given."""
    if layout not in LAYOUTS:
        raise ToolError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    file = read_adapter(source)
    if dtype is None:  # the file's own (an fp16 download stays fp16), whatever the loaded adapters hold
        floats = Counter(t.dtype for t in file.tensors.values() if t.is_floating_point())
        dtype = floats.most_common(1)[0][0] if floats else None
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
                      len(names - set(file.modules())) if file.layout == "kohya" else len(names))
