"""Lower the rank of a LoRA/LoCon file, or turn any adapter file into a plain LoRA/LoCon (``to_lora``).

Resizing reads each module as the product of its factors (no ``ΔW`` is materialised for the SVD) and keeps the
rank a ``RankRule`` chooses; the source's ``alpha / rank`` ratio is kept, as kohya's ``resize_lora.py`` does, so
a learning rate tuned for the file still fits (one alpha for the whole file, ``ratio × largest rank``; see
``result.ToolResult``).  ``to_lora`` reads each module's ``ΔW`` through its adapter's
``delta_weight()`` (LoHa, LoKr, full, IA3, DoRA, Tucker: needs the base model) and factorises it; without a
rule it keeps every singular value above float noise, i.e. the conversion is exact up to rounding, and the
report says what every module kept.  The output loads in every client that reads kohya LoRA/LoCon files.
"""

from __future__ import annotations

import json
import os

import torch

from lorakit.adapters.base import alpha_from_file
from lorakit.formats import AdapterFile, read_adapter
from lorakit.models import BaseModel
from lorakit.tools import ToolError
from lorakit.tools.deltas import file_deltas, kohya_module_name, plain_lora, split_norm_updates
from lorakit.tools.lowrank import Factors, ModuleReport, RankRule, factorize
from lorakit.tools.result import ToolResult


def resize_adapter(source: str | os.PathLike | AdapterFile, rule: RankRule | None = None, *,
                   conv_rule: RankRule | None = None, to_lora: bool = False, model: BaseModel | None = None,
                   clamp_quantile: float | None = None, dtype: torch.dtype = torch.float32) -> ToolResult:
    """A plain LoRA/LoCon with the ranks ``rule`` (k×k convs: ``conv_rule``, default ``rule``) chooses.

    Without ``to_lora`` every module must be a plain LoRA/LoCon and a rule must be given.  With ``to_lora``
    other algorithms are converted through ``model`` (required for them).
    """
    file = source if isinstance(source, AdapterFile) else read_adapter(source)
    file, norms = split_norm_updates(file)  # kept as they are: a norm's update has no rank to lower
    modules = file.modules()
    if not modules:
        raise ToolError(f"{file.label}: no adapter modules in this file" + (
            " (only norm-layer updates, which have no rank)" if norms else ""))
    others = sorted(n for n, t in modules.items() if not plain_lora(t))
    if others and not to_lora:
        raise ToolError(f"{file.label}: {len(others)} module(s) are not plain LoRA/LoCon (e.g. {others[0]}); "
                        "resize lowers the rank of LoRA/LoCon files: convert with --to lora")
    if rule is None and not to_lora:
        raise ToolError("resize needs --rank N or --dynamic METHOD --param X")
    rule = rule or RankRule()
    conv_rule = conv_rule or rule
    if others and model is None:
        raise ToolError(f"{file.label}: converting {others[0]} to LoRA needs the base model it was trained for")
    unit = dylora_unit(file.metadata)
    if unit is not None and not to_lora and rule.rank is not None and rule.dynamic is None:
        return _cut_dylora(file, modules, rule, conv_rule, unit, dtype, norms)
    deltas = file_deltas(file, model if (to_lora and model is not None) else None)
    result = ToolResult("resize --to lora" if to_lora else "resize", dtype)
    result.keep(norms, "kept as they are")
    ratios = []
    by_kohya_name = {kohya_module_name(n): t for n, t in modules.items()}
    for name, delta in deltas.items():
        tensors = by_kohya_name.get(name, {})
        kxk = len(delta.shape) == 4 and delta.shape[2] * delta.shape[3] > 1
        factors = factorize(delta, conv_rule if kxk else rule, name=name, clamp_quantile=clamp_quantile,
                            dtype=dtype)
        if plain_lora(tensors) and "alpha" in tensors and float(tensors["alpha"]):
            ratios.append(float(tensors["alpha"]) / tensors["lora_down.weight"].shape[0])
        result.add(name, factors)
        if factors.rank == 0:
            why = "--conv-rank 0 leaves k x k convs out" if (conv_rule if kxk else rule).rank == 0 else \
                "ΔW is zero"
            result.notes.append(f"{name}: {why}; no module written")
    if to_lora:
        algos = sorted({_algorithm(t) for t in modules.values()})
        result.notes.append(f"converted from {', '.join(algos)}")
    rules = rule.describe() + (f"; k x k convs {conv_rule.describe()}" if conv_rule is not rule else "")
    # the source's alpha / rank (most files use one) is kept, so a learning rate tuned for it still fits
    ratio = max(set(ratios), key=ratios.count) if ratios else 1.0
    result.finish(file.metadata, alpha_per_rank=ratio, lorakit_source=str(file.label), lorakit_rank_rule=rules,
                  ss_training_comment=f"{result.tool} ({rules}) of {file.label}")
    return result


def dylora_unit(metadata) -> int | None:
    """The block size of a DyLoRA file from its metadata (kohya: ``networks.dylora`` with ``unit``; LyCORIS:
    ``algo=dylora`` with ``block_size``, default 4), or None for any other file."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        return None
    if not isinstance(args, dict):
        return None
    if metadata.get("ss_network_module") == "networks.dylora":
        return int(args.get("unit", 1))
    if str(args.get("algo", "")).lower() == "dylora":
        return int(args.get("block_size", 4))
    return None


def _cut_dylora(file: AdapterFile, modules, rule: RankRule, conv_rule: RankRule, unit: int,
                dtype: torch.dtype, norms: dict[str, dict[str, torch.Tensor]]) -> ToolResult:
    """A DyLoRA file at rank N is its first N ranks: ``ΔW_N = (alpha / N) · up[:, :N] @ down[:N]`` (what it was
    trained to be at N), not the best rank-N approximation an SVD would give; N a multiple of the block size."""
    result = ToolResult("resize (DyLoRA cut)", dtype)
    result.keep(norms, "kept as they are")
    alphas = []
    for name, tensors in modules.items():
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        kxk = down.dim() == 4 and down.shape[2] * down.shape[3] > 1
        n, full = (conv_rule if kxk else rule).rank, int(down.shape[0])
        if n % unit or not 0 < n <= full:
            raise ToolError(f"{file.label}: {name}: a DyLoRA file is cut at a multiple of its block size {unit} "
                            f"up to its rank {full}, not at {n}")
        alpha = alpha_from_file(tensors, full)
        alphas.append(alpha)
        shape = (int(up.shape[0]), *down.shape[1:])
        a = down.reshape(full, -1).double()
        b = up.reshape(up.shape[0], full).double()
        kept_up, kept_down = b[:, :n] * (alpha / n), a[:n]
        whole = (alpha / full) * (b @ a)
        kept = kept_up @ kept_down
        norm2 = float(whole.square().sum())
        error = whole - kept
        fro = float(error.norm() / whole.norm()) if norm2 > 0 else 0.0
        peak = float(whole.abs().max())
        report = ModuleReport(kohya_module_name(name), shape, n, full, float(kept.square().sum()) / norm2
                              if norm2 > 0 else 1.0, fro, float(error.abs().max()) / peak if peak > 0 else 0.0,
                              norm2, note=f"DyLoRA: first {n} of {full} ranks")
        result.add(kohya_module_name(name), Factors(kept_up, kept_down, shape, report))
    # the source's alpha is kept: the cut file reads as (alpha / N) · up[:, :N] down[:N], like the training step
    alpha = max(set(alphas), key=alphas.count)
    top = max(f.rank for f in result.factors.values())
    result.finish(file.metadata, alpha_per_rank=alpha / top, lorakit_source=str(file.label),
                  lorakit_rank_rule=f"DyLoRA cut at rank {rule.rank}",
                  ss_training_comment=f"{result.tool} of {file.label}")
    return result


def _algorithm(tensors) -> str:
    from lorakit.formats import detect_algorithm

    return detect_algorithm(tensors)
