"""An adapter file as per-module ``ΔW`` (``lowrank.Delta``), with multipliers and LoRA Block Weights.

``ADAPTER[:MULT[:LBW]]`` is how commands name an adapter (A1111's ``<lora:name:mult:lbw>`` habit): the file,
its multiplier (default 1) and a LoRA Block Weight string or preset (``ALL``, ``MIDD``, ``OUTALL``, ...).

A plain LoRA/LoCon module (no Tucker core, no DoRA) is read as the product of its factors, never materialised;
every other algorithm (LoHa, LoKr, full, IA3, DoRA, Tucker) goes through its adapter's ``delta_weight()``, which
needs the base model (DoRA and IA3 read ``W0``; the others need the layer's shape).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorakit.blocks import BLOCK_MAPS, BlockMap, BlockWeights, parse_block_weights
from lorakit.formats import AdapterFile, AdapterFileError, block_map_of, component_of, load_network, read_adapter
from lorakit.models import BaseModel
from lorakit.network import LYCORIS_PREFIX
from lorakit.tools import ToolError, not_loaded
from lorakit.tools.lowrank import Delta


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter as given on a command line: file, multiplier, optional LoRA Block Weights."""

    path: Path
    multiplier: float = 1.0
    block_weights: BlockWeights | None = None  # SD1.x's reading of ``lbw`` (None: no string, or one for SDXL only)
    lbw: str | None = None  # the block-weight text as given, for labels; weights_for reads it on a file's blocks

    def weight(self, name: str) -> float:
        """The multiplier of module ``name`` (block weight included)."""
        return self.multiplier * (self.block_weights(name) if self.block_weights is not None else 1.0)

    def weights_for(self, block_map: BlockMap) -> BlockWeights | None:
        """The block weights on ``block_map``'s blocks (an SDXL file's are not an SD1.x file's); None without
        them.  ToolError when the string does not fit that architecture."""
        if not self.lbw:
            return None
        try:
            return parse_block_weights(self.lbw, block_map)
        except ValueError as err:
            raise ToolError(f"{self.path}: {err}") from None

    @property
    def label(self) -> str:
        # a run's checkpoint is trained.safetensors: its folder (epoch-0005) names it
        name = self.path.parent.name if self.path.stem == "trained" and self.path.parent.name else self.path.stem
        text = f"{name}:{self.multiplier:g}"
        return text + (f":{self.lbw}" if self.lbw else "")


def parse_adapter_spec(text: str | os.PathLike | AdapterSpec) -> AdapterSpec:
    """``file.safetensors``, ``file.safetensors:0.8`` or ``file.safetensors:0.8:MIDD`` (or a 17/26-value string)."""
    if isinstance(text, AdapterSpec):
        return text
    text = os.fspath(text)
    parts = text.split(":")
    # the path may itself hold colons: the multiplier and LBW are the last one or two parts, when they parse
    for tail in (2, 1):
        if len(parts) <= tail:
            continue
        head, rest = ":".join(parts[:-tail]), parts[-tail:]
        try:
            multiplier = float(rest[0])
        except ValueError:
            continue
        if not math.isfinite(multiplier):
            raise ToolError(f"{text}: the multiplier {rest[0]!r} is not a finite number")
        lbw = rest[1].strip() if tail == 2 else None
        weights = None
        if lbw:  # checked now against every architecture; applied on the file's own blocks when it is read
            parsed, errors = {}, []
            for arch, block_map in BLOCK_MAPS.items():
                try:
                    parsed[arch] = parse_block_weights(lbw, block_map)
                except ValueError as err:
                    errors.append(str(err))
            if not parsed:
                raise ToolError(f"{text}: {'; '.join(errors)}")
            weights = parsed.get("sd1")  # what a model (SD1.x) applies
        return AdapterSpec(Path(head), multiplier, weights, lbw or None)
    for cut in range(len(parts) - 1, 0, -1):  # "a.safetensors:O.8": a file before a colon, then no multiplier
        head = ":".join(parts[:cut])
        if not Path(text).exists() and Path(head).is_file():
            raise ToolError(f"{text}: {head} is a file, but {':'.join(parts[cut:])!r} after it is no multiplier; "
                            "give FILE:MULTIPLIER[:BLOCK WEIGHTS], e.g. FILE:0.8 or FILE:0.8:MIDD")
    return AdapterSpec(Path(text))


def kohya_module_name(name: str) -> str:
    """A module name as kohya writes it: LyCORIS's own wrapper prefix ``lycoris_`` becomes ``lora_unet_`` or
    ``lora_te_text_model_`` (text-encoder paths written without the ``text_model`` level get it back)."""
    if not name.startswith(LYCORIS_PREFIX + "_"):
        return name
    rest = name[len(LYCORIS_PREFIX) + 1:]
    if component_of(name) == "text_encoder":
        return "lora_te_" + (rest if rest.startswith("text_model_") else "text_model_" + rest)
    return "lora_unet_" + rest


def plain_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    """A module that is exactly ``scale · up @ down`` (no Tucker core, no DoRA magnitude)."""
    keys = set(tensors)
    return {"lora_down.weight", "lora_up.weight"} <= keys and not keys & {"lora_mid.weight", "dora_scale"}


def _lora_product(down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...], scale: float) -> Delta:
    rank = down.shape[0]
    return Delta(shape, up=up.reshape(up.shape[0], rank).double() * scale, down=down.reshape(rank, -1).double())


def module_weights(file: AdapterFile, multiplier: float = 1.0, block_weights: BlockWeights | None = None,
                   spec: AdapterSpec | None = None) -> Callable[[str], float]:
    """Each module's multiplier in ``file``: ``multiplier`` times its block weight (``spec``'s, read on the file's
    own blocks, when given)."""
    if spec is not None:
        multiplier, block_weights = spec.multiplier, spec.weights_for(block_map_of(file))

    def weight(name: str) -> float:
        return multiplier * (block_weights(name) if block_weights is not None else 1.0)
    return weight


def is_norm_update(tensors: Mapping[str, torch.Tensor]) -> bool:
    """A module that updates a norm layer's scale and shift (LyCORIS's ``train_norm``: ``w_norm``, ``b_norm``)."""
    return "w_norm" in tensors


def split_norm_updates(file: AdapterFile) -> tuple[AdapterFile, dict[str, dict[str, torch.Tensor]]]:
    """``file`` without its norm-layer updates, and those updates by kohya name.  They are linear in their tensors,
    so the tools that write a LoRA carry them over as they are (scaled, summed) beside the low-rank modules."""
    modules = file.modules()
    norms = {kohya_module_name(n): t for n, t in modules.items() if is_norm_update(t)}
    if not norms:
        return file, {}
    kept = {n for n, t in modules.items() if not is_norm_update(t)}
    rest = {k: v for k, v in file.tensors.items() if k.split(".", 1)[0] in kept or "." not in k}
    return AdapterFile(rest, dict(file.metadata), file.path), norms


def file_deltas(source: str | os.PathLike | AdapterFile, model: BaseModel | None = None, *,
                multiplier: float = 1.0, block_weights: BlockWeights | None = None,
                spec: AdapterSpec | None = None, layer_updates: bool = False) -> dict[str, Delta]:
    """``ΔW`` of every module of a file (multiplier and block weights applied), by kohya name.

    With ``model`` the file is first loaded into it (strictly: a file for another architecture is refused with
    ``MismatchError``) and names come out canonical (``lycoris_`` files as ``lora_unet_``/``lora_te_``); the
    model is left as it was.  Without ``model`` only plain LoRA/LoCon files can be read.
    Modules whose multiplier is 0 are left out.  ``layer_updates``: also read what a LoRA cannot carry, for
    applying the file to a model: bias updates (``Delta.bias``) and norm-layer updates (LyCORIS's
    ``train_norm``: ``ΔW`` shaped like the norm's scale); without it such a module is a ``ToolError``.
    """
    file = source if isinstance(source, AdapterFile) else read_adapter(source)
    weight = module_weights(file, multiplier, block_weights, spec)
    if model is None:
        deltas = {}
        for name, tensors in file.modules().items():
            if not plain_lora(tensors):
                raise ToolError(f"{file.label}: module {name} is not a plain LoRA/LoCon (keys "
                                f"{', '.join(sorted(tensors))}); its ΔW needs the base model")
            w = weight(name)
            if w == 0:
                continue
            down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
            rank = down.shape[0]
            alpha = tensors.get("alpha")
            alpha = float(rank) if alpha is None or float(alpha) == 0 else float(alpha)
            shape = (up.shape[0],) + tuple(down.shape[1:])
            deltas[kohya_module_name(name)] = _lora_product(down, up, shape, w * alpha / rank)
        return deltas
    try:
        network, _ = load_network(file, model.unet, model.text_encoders)
    except AdapterFileError as err:
        raise not_loaded(err) from None
    try:
        deltas = {}
        with torch.no_grad():
            for name, adapter in network.adapters.items():
                w = weight(name)
                if w == 0:
                    continue
                shape = tuple(adapter.weight_shape)
                tensors = adapter.file_tensors()
                if adapter.algorithm == "lora" and plain_lora(tensors):
                    deltas[name] = _lora_product(tensors["lora_down.weight"], tensors["lora_up.weight"], shape,
                                                 w * adapter.scale)
                else:
                    if adapter.kind == "norm" and not layer_updates:
                        raise ToolError(f"{file.label}: module {name} updates a norm layer (LyCORIS's train_norm), "
                                        "which a LoRA cannot carry")
                    adapter.multiplier = w
                    delta = Delta.from_weight(adapter.delta_weight().detach().double())
                    bias = adapter.delta_bias()
                    if bias is not None and bool(bias.any()):
                        if not layer_updates:
                            raise ToolError(f"{file.label}: module {name} also changes the bias, which a LoRA "
                                            "cannot carry")
                        delta = replace(delta, bias=bias.detach().double())
                    deltas[name] = delta
    finally:
        network.remove()
    return deltas
