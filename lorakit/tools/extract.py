"""An adapter from the difference of two models: ``ΔW = W_tuned − W_base`` per layer, factorised by SVD.

The layers are those a preset selects (default ``full``: attention, feed-forward, ResNet convs and samplers, i.e.
LoCon; the text encoder's attention and MLP too).  Linear and 1×1 layers follow ``rule``, k×k convs ``conv_rule``
(``RankRule(0)``: convs left out).  Layers whose weights are identical get no module.  A LoRA carries no bias:
bias differences (and differences in layers outside the preset: norms, embeddings) are reported, not written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lorakit.metadata import base_model_fields, ss_metadata
from lorakit.models import BaseModel
from lorakit.modelspec import modelspec_metadata
from lorakit.network import Component, Preset, components, get_preset, is_kxk_conv, norm_targets, select_targets
from lorakit.tools import MismatchError, ToolError
from lorakit.tools.lowrank import Delta, RankRule, factorize
from lorakit.tools.result import ToolResult


def check_same_architecture(tuned: BaseModel, base: BaseModel, text_encoder: bool = True) -> None:
    """``MismatchError`` naming the first tensors that differ in name or shape between the two models."""
    pairs = [("U-Net", tuned.unet, base.unet)]
    if text_encoder:
        if len(tuned.text_encoders) != len(base.text_encoders):
            raise MismatchError(f"{tuned.source or 'the tuned model'} has {len(tuned.text_encoders)} text encoder(s), "
                                f"{base.source or 'the base'} {len(base.text_encoders)}: not the same architecture")
        several = len(base.text_encoders) > 1
        pairs += [(f"text encoder{f' {i + 1}' if several else ''}", a, b)
                  for i, (a, b) in enumerate(zip(tuned.text_encoders, base.text_encoders, strict=True))]
    for what, a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
        if only_a or only_b:
            example = (only_a or only_b)[0]
            raise MismatchError(f"the two models' {what}s have different layers ({len(only_a)} only in "
                                f"{tuned.source or 'the tuned model'}, {len(only_b)} only in "
                                f"{base.source or 'the base'}, e.g. {example}): not the same architecture")
        for key in sa:
            if sa[key].shape != sb[key].shape:
                raise MismatchError(f"the two models differ in shape at {what} {key}: {tuple(sa[key].shape)} in "
                                    f"{tuned.source or 'the tuned model'}, {tuple(sb[key].shape)} in "
                                    f"{base.source or 'the base'}: not the same architecture")


@torch.no_grad()
def extract_adapter(tuned: BaseModel, base: BaseModel, rule: RankRule, conv_rule: RankRule | None = None, *,
                    preset: str = "full", text_encoder: bool = True, clamp_quantile: float | None = None,
                    min_diff: float = 0.0, dtype: torch.dtype = torch.float32, norms: bool = False,
                    progress: bool = False) -> ToolResult:
    """A LoRA/LoCon whose ``ΔW`` approximates ``tuned − base`` (both models unchanged).

    ``min_diff``: layers whose largest ``|ΔW|`` is at most this get no module (0: only identical layers).
    ``norms``: also the differences of the U-Net's norm layers in the blocks extracted from, exactly, as LyCORIS's
    norm-layer updates (``w_norm``/``b_norm``, which A1111, ComfyUI and LyCORIS apply): native fine-tuning
    changes them too.  ``progress``: a bar over the layers (an SVD for each: SD1.5's full preset has hundreds).
    """
    check_same_architecture(tuned, base, text_encoder)
    conv_rule = conv_rule or rule
    chosen = get_preset(preset)
    result = ToolResult("extract", dtype)
    tuned_comps = {c.group: c for c in components(tuned.unet, tuned.text_encoders if text_encoder else None)}
    bias_changed, unchanged, left_out, norm_updates = [], 0, 0, {}
    targets = [(comp, list(select_targets(comp, chosen.text_encoder if comp.is_text_encoder else chosen.unet, chosen)))
               for comp in components(base.unet, base.text_encoders if text_encoder else None)]
    bar = tqdm(total=sum(len(layers) for _, layers in targets), desc="extracting", unit="layer",
               disable=not progress, leave=False)
    for comp, layers in targets:
        other = tuned_comps[comp.group].model
        extracted = []
        for path, layer in layers:
            bar.update()
            name = comp.kohya_name(path)
            tuned_layer = other.get_submodule(path)
            diff = tuned_layer.weight.detach().double() - layer.weight.detach().double()
            if layer.bias is not None and not torch.equal(tuned_layer.bias, layer.bias):
                bias_changed.append(name)
            if float(diff.abs().max()) <= min_diff:
                unchanged += 1
                continue
            this_rule = conv_rule if is_kxk_conv(layer) else rule
            if this_rule.rank == 0:
                left_out += 1
                continue
            factors = factorize(Delta.from_weight(diff), this_rule, name=name, clamp_quantile=clamp_quantile,
                                dtype=dtype)
            result.add(name, factors)
            extracted.append(path)
        if norms and not comp.is_text_encoder:
            norm_updates |= _norm_differences(comp, other, extracted, chosen, min_diff)
    bar.close()
    result.keep(norm_updates, "written exactly (the norm layers' differences)")
    if not result.reports and left_out:
        raise ToolError(f"the only layers that differ are {left_out} k x k conv(s), and --conv-rank 0 leaves them "
                        "out: nothing to extract (give --conv-rank N to extract them)")
    if not result.reports:
        raise MismatchError(f"{tuned.source or 'the tuned model'} and {base.source or 'the base'} have the same "
                            f"weights in every layer the {preset!r} preset selects: nothing to extract")
    if unchanged:
        result.notes.append(f"{unchanged} layer(s) without a difference above {min_diff:g}: no module")
    if bias_changed:
        result.notes.append(f"{len(bias_changed)} layer(s) also changed their bias (e.g. {bias_changed[0]}); a LoRA "
                            "has no bias, so that part of the difference is not in the file")
    outside = _changed_outside(tuned, base, text_encoder, {r.name for r in result.reports} | set(norm_updates))
    if outside:
        hint = "" if norms or not any(".norm" in key for key in outside) else \
            " (--norms writes the norm layers' differences as LyCORIS norm updates)"
        result.notes.append(f"{len(outside)} other tensor(s) differ but are no adapted layer (e.g. {outside[0]}): "
                            f"not in the file{hint}")
    described = modelspec_metadata("lora", title=Path(tuned.source).stem if tuned.source else "extracted",
                                   resolution=(tuned.resolution, tuned.resolution),
                                   prediction_type=tuned.prediction_type, family=tuned.version)
    described |= ss_metadata(**base_model_fields(tuned.version, tuned.prediction_type))
    result.finish(None, lorakit_source=f"{tuned.source} - {base.source}", lorakit_rank_rule=rule.describe(),
                  lorakit_conv_rank_rule=conv_rule.describe(), lorakit_preset=preset, **described)
    return result


def _norm_differences(comp: Component, tuned: nn.Module, extracted: list[str], preset: Preset,
                      min_diff: float) -> dict[str, dict[str, torch.Tensor]]:
    """``w_norm``/``b_norm`` (tuned − base) of the norm layers beside the extracted layers (as ``train_norm`` places
    them) whose scale or shift changed by more than ``min_diff``."""
    updates = {}
    for path, layer in norm_targets(comp, extracted, preset):
        other = tuned.get_submodule(path)
        w = other.weight.detach().float() - layer.weight.detach().float()
        tensors = {"w_norm": w}
        if layer.bias is not None:
            tensors["b_norm"] = other.bias.detach().float() - layer.bias.detach().float()
        if max(float(t.abs().max()) for t in tensors.values()) > min_diff:
            updates[comp.kohya_name(path)] = tensors
    return updates


def _changed_outside(tuned: BaseModel, base: BaseModel, text_encoder: bool, adapted: set[str]) -> list[str]:
    """Tensors that differ between the models and are not the weight or bias of a layer considered above."""
    tuned_comps = {c.group: c for c in components(tuned.unet, tuned.text_encoders if text_encoder else None)}
    changed = []
    for comp in components(base.unet, base.text_encoders if text_encoder else None):
        sb = comp.model.state_dict()
        for key, tensor in tuned_comps[comp.group].model.state_dict().items():
            module, _, leaf = key.rpartition(".")
            if leaf in ("weight", "bias") and _kohya_name_or_none(comp, module) in adapted:
                continue
            if not torch.equal(tensor, sb[key]):
                changed.append(key)
    return changed


def _kohya_name_or_none(comp: Component, module: str) -> str | None:
    """The name an adapter of ``module`` would have; None for a module no adapter name reaches (an SDXL U-Net
    module outside the original layout's blocks)."""
    try:
        return comp.kohya_name(module)
    except KeyError:
        return None
