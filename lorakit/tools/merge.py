"""Bake adapters into a base model, or combine several adapters into one adapter file.

``bake``: each adapter is loaded into the model, scaled by its multiplier and LoRA Block Weights, merged into the
base weights and taken out again; a module whose weight comes out 0 is not touched at all, so the layers of a
block weighted 0 stay bit-identical.  ``save_model`` writes a diffusers folder or a single-file LDM
``.safetensors`` (what A1111, ComfyUI, diffusers ``from_single_file`` and lorakit load).

``combine``: one adapter file holding ``Σ wᵢ ΔWᵢ``.  For plain LoRA/LoCon inputs without a rank rule it is
exact: the factors are concatenated (rank = sum of ranks) with each file's ``multiplier · alpha / rank`` folded
into its up factors.  Otherwise the summed ``ΔW`` (still a product where every input is a LoRA: the SVD then
never materialises it) is re-factored by SVD to the rule's rank, and the report gives the energy kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lorakit.blocks import BLOCK_MAPS, SD1
from lorakit.checkpoint_names import TEXT_ENCODER_PREFIXES
from lorakit.file_kinds import is_full_model
from lorakit.formats import AdapterFile, AdapterFileError, load_network, read_adapter
from lorakit.model_blend import ModelMismatchError, load_like, model_parts, move_towards, weights_copy
from lorakit.models import BaseModel, save_diffusers_folder, save_single_file_checkpoint
from lorakit.native_checkpoints import NativeCheckpointError, apply_native_checkpoint, is_native_checkpoint
from lorakit.tools import MismatchError, ToolError, check_output, not_loaded
from lorakit.tools.deltas import AdapterSpec, file_deltas, module_weights, parse_adapter_spec, split_norm_updates
from lorakit.tools.lowrank import Delta, Factors, ModuleReport, RankRule, factorize
from lorakit.tools.result import ToolResult


@torch.no_grad()
def bake(model: BaseModel, adapters: Sequence[AdapterSpec | str]) -> list[str]:
    """Merge the adapters into ``model``'s weights in place; one line per adapter says what was merged.  A whole
    model among them (``FILE_OR_FOLDER:m``) moves every weight ``m`` of the way from the base to its own (kohya's
    ``merge_models.py`` weighted sum: ``a:0.3`` on base ``b`` is ``0.7 b + 0.3 a``)."""
    specs = [parse_adapter_spec(a) for a in adapters]
    # whole models are differences from the base as it was given, whatever was baked before them
    original = weights_copy(model) if any(is_full_model(s.path) for s in specs) else None
    lines = []
    for spec in specs:
        if is_native_checkpoint(spec.path):  # one epoch of a --method native run: its weights, not an update
            lines.append(_bake_native(model, spec))
            continue
        if original is not None and is_full_model(spec.path):
            lines.append(_bake_model(model, spec, original))
            continue
        # on the model's own blocks (SD2.x shares SD1.x's); refused before the model is touched
        weights = spec.weights_for(BLOCK_MAPS["sdxl"] if model.is_sdxl else SD1)
        try:
            network, _ = load_network(spec.path, model.unet, model.text_encoders)
        except AdapterFileError as err:
            raise not_loaded(err) from None
        network.set_multiplier(spec.multiplier, weights)
        merged = 0
        for adapter in network.adapters.values():
            if adapter.multiplier != 0:  # weight 0: leave the layer alone (W + 0·ΔW can flip -0.0)
                adapter.merge()
                merged += 1
        total = len(network)
        network.remove(keep_merged=True)
        lines.append(f"{spec.label}: {merged} of {total} modules merged"
                     + (f", {total - merged} left alone (weight 0)" if merged < total else ""))
    return lines


def _bake_model(model: BaseModel, spec: AdapterSpec, original: dict[str, dict[str, torch.Tensor]]) -> str:
    """``W ← W + m·(W_other − W_base)`` for every tensor of every part (base: ``original``, the model as given)."""
    if spec.lbw is not None:
        raise ToolError(f"{spec.path}: a whole model takes a multiplier, not LoRA Block Weights")
    try:
        other = load_like(spec.path, model)
    except ModelMismatchError as err:
        raise MismatchError(str(err)) from None
    move_towards(model, other, original, spec.multiplier)
    return f"{spec.label}: a whole model, every weight {spec.multiplier:g} of the way from the base to its own " \
           f"({', '.join(model_parts(model))})"


def merge_base_weights(model: BaseModel, weights: Sequence[tuple[str, float]]) -> list[str]:
    """kohya's ``--base_weights``: merge each adapter file of ``weights`` (file, multiplier) into ``model``; one
    line per file."""
    specs = [AdapterSpec(Path(f).expanduser(), multiplier) for f, multiplier in weights]
    # named by path: a run's checkpoints are all called trained.safetensors
    return [f"{spec.path} at {spec.multiplier:g}{line.removeprefix(spec.label)}"
            for spec, line in zip(specs, bake(model, specs), strict=True)]


def _bake_native(model: BaseModel, spec: AdapterSpec) -> str:
    """A native fine-tuning checkpoint's weights put into the model (``W0 + m·(W − W0)``: 1 the trained model)."""
    if spec.lbw is not None:
        raise ToolError(f"{spec.path}: a native fine-tuning checkpoint takes a multiplier, not LoRA Block Weights")
    try:
        replaced = apply_native_checkpoint(spec.path, model.unet, model.text_encoders, spec.multiplier)
    except NativeCheckpointError as err:
        raise MismatchError(str(err)) from None
    text = sum(n.startswith(TEXT_ENCODER_PREFIXES) for n in replaced)
    which = f"{len(replaced) - text} U-Net" + (f" and {text} text-encoder" if text else "")
    return f"{spec.label}: native fine-tuning checkpoint, {which} weights put in (×{spec.multiplier:g})"


def save_model(model: BaseModel, out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (), *,
               overwrite: bool = False, dtype: str | torch.dtype | None = None) -> Path:
    """A ``*.safetensors`` path: single-file LDM checkpoint; anything else: a diffusers folder (atomic both)."""
    out = Path(out)
    check_output(out, inputs, overwrite=overwrite)
    if out.suffix.lower() == ".safetensors":
        return save_single_file_checkpoint(model, out, dtype, overwrite=overwrite)
    if out.suffix:
        raise ToolError(f"{out}: write a model to a folder (diffusers) or a .safetensors file (single file)")
    return save_diffusers_folder(model, out, dtype, overwrite=overwrite)


def combine(adapters: Sequence[AdapterSpec | str], model: BaseModel | None = None, rule: RankRule | None = None,
            *, clamp_quantile: float | None = None, dtype: torch.dtype = torch.float32) -> ToolResult:
    """One adapter with ``Σ wᵢ ΔWᵢ`` (see the module doc); ``model`` checks the files and reads non-LoRA ones."""
    specs = [parse_adapter_spec(a) for a in adapters]
    if not specs:
        raise ToolError("combine needs at least one adapter")
    summed: dict[str, Delta] = {}
    norms: dict[str, dict[str, torch.Tensor]] = {}
    first_metadata: dict[str, str] | None = None  # the result describes itself as the first file does
    for spec in specs:
        source = read_adapter(spec.path)
        first_metadata = source.metadata if first_metadata is None else first_metadata
        file, file_norms = split_norm_updates(source)
        _add_norm_updates(norms, file_norms, module_weights(file, spec=spec), spec.path, model)
        for name, delta in file_deltas(file, model, spec=spec).items():
            if name in summed and tuple(summed[name].shape) != tuple(delta.shape):
                raise MismatchError(f"{spec.path}: module {name} has shape {delta.shape}, another file "
                                    f"{summed[name].shape}: the adapters are for different models")
            summed[name] = summed[name] + delta if name in summed else delta
    exact = rule is None and all(d.is_product for d in summed.values())
    result = ToolResult("merge --to-adapter", dtype)
    result.keep(norms, "summed exactly, each file's multiplier applied")
    for name, delta in summed.items():
        if exact:
            result.add(name, Factors(delta.up, delta.down, tuple(delta.shape), _exact_report(name, delta)))
        else:
            result.add(name, factorize(delta, rule or RankRule(), name=name, clamp_quantile=clamp_quantile,
                                       dtype=dtype))
    how = "exact: ranks concatenated" if exact else f"ΔW summed and re-factored ({(rule or RankRule()).describe()})"
    result.notes.append(f"combined {len(specs)} adapter(s), {how}")
    labels = ", ".join(s.label for s in specs)
    result.finish(first_metadata, lorakit_source=labels,
                  ss_training_comment=f"lorakit merge --to-adapter of {labels}")
    return result


def _add_norm_updates(total: dict[str, dict[str, torch.Tensor]], norms: dict[str, dict[str, torch.Tensor]],
                      weight: Callable[[str], float], source: Path, model: BaseModel | None) -> None:
    """Add one file's norm-layer updates, scaled by their multipliers, into ``total`` (the update is linear in
    ``w_norm``/``b_norm``, so the sum is exact); checked against ``model`` when given."""
    if norms and model is not None:  # they fit its norm layers (a file for another model is refused by name)
        parts = AdapterFile({f"{n}.{k}": v for n, t in norms.items() for k, v in t.items()}, {}, Path(source))
        try:
            network, _ = load_network(parts, model.unet, model.text_encoders)
        except AdapterFileError as err:
            raise not_loaded(err) from None
        network.remove()
    for name, tensors in norms.items():
        w = weight(name)
        if w == 0:
            continue
        scaled = {k: v.double() * w for k, v in tensors.items()}
        if name not in total:
            total[name] = scaled
            continue
        for key, value in scaled.items():
            have = total[name].get(key)
            if have is not None and have.shape != value.shape:
                raise MismatchError(f"{source}: module {name} has {key} of shape {tuple(value.shape)}, another file "
                                    f"{tuple(have.shape)}: the adapters are for different models")
            total[name][key] = value if have is None else have + value


def _exact_report(name: str, delta: Delta) -> ModuleReport:
    norm2 = float((delta.up.T @ delta.up * (delta.down @ delta.down.T)).sum())  # ‖UD‖² = tr(UᵀU DDᵀ)
    return ModuleReport(name, tuple(delta.shape), delta.inner_rank, delta.inner_rank, 1.0, 0.0, 0.0, norm2,
                        "exact")
