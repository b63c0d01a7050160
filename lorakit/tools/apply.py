"""Several adapters on one model at once, for inference: unmerged (default) or merged, always undone afterwards.

Each adapter is read as per-module ``ΔW`` (multiplier and LoRA Block Weights applied; ``tools.deltas``) and the
updates of all adapters are summed per layer.  Unmerged, a forward hook adds the update's own path to the
layer's output (``x Dᵀ Uᵀ`` for LoRA factors, never ``W0 + ΔW``; for a norm layer's update, LyCORIS's
``train_norm``, the normalised input times the scale's update; a bias update added), so the base weights are not
touched and any number of adapters can share a layer (lorakit's ``load_network`` wraps a layer with one adapter
only).  Merged, ``W0 + ΣΔW`` (and the bias's update) is written into the weights, which are restored bit for bit on
exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import NORM_LAYERS
from lorakit.models import BaseModel
from lorakit.network import adaptable_layers, components
from lorakit.tools import ToolError
from lorakit.tools.deltas import AdapterSpec, file_deltas, parse_adapter_spec
from lorakit.tools.lowrank import Delta


def summed_deltas(model: BaseModel, adapters: Sequence[AdapterSpec | str]) -> dict[str, Delta]:
    """``Σ wᵢ ΔWᵢ`` per module over the adapters, by kohya name (files checked against ``model``)."""
    total: dict[str, Delta] = {}
    for spec in (parse_adapter_spec(a) for a in adapters):
        for name, delta in file_deltas(spec.path, model, spec=spec, layer_updates=True).items():
            total[name] = total[name] + delta if name in total else delta
    return total


def layers_by_name(model: BaseModel) -> dict[str, nn.Module]:
    """Every layer an adapter may change, by its kohya name (``lora_unet_…``, ``lora_te_…``)."""
    return {c.kohya_name(path): layer for c in components(model.unet, model.text_encoders)
            for path, layer in adaptable_layers(c)}


def _hook(layer: nn.Module, delta: Delta):
    dtype, device = layer.weight.dtype, layer.weight.device
    conv = isinstance(layer, nn.Conv2d)
    bias = None if delta.bias is None else delta.bias.to(device, dtype)
    if isinstance(layer, NORM_LAYERS):  # affine in its scale and shift: the normalised input times ΔW (+ Δb)
        scale = delta.weight().to(device, dtype)
        group = isinstance(layer, nn.GroupNorm)

        def path(x: torch.Tensor) -> torch.Tensor:
            if group:
                normalised = F.group_norm(x, layer.num_groups, None, None, layer.eps)
                return normalised * scale.to(x.device).reshape(scale.shape + (1,) * (x.dim() - 2))
            return F.layer_norm(x, layer.normalized_shape, None, None, layer.eps) * scale.to(x.device)
    elif delta.is_product:
        rank = delta.inner_rank
        down = delta.down.to(device, dtype)
        up = delta.up.to(device, dtype)
        if conv:
            down = down.reshape(rank, *delta.shape[1:])
            up = up.reshape(delta.shape[0], rank, 1, 1)

        def path(x: torch.Tensor) -> torch.Tensor:
            d, u = down.to(x.device), up.to(x.device)  # no copy unless the model moved since (generate(device=))
            if conv:
                h = F.conv2d(x, d, None, layer.stride, layer.padding, layer.dilation)
                return F.conv2d(h, u)
            return F.linear(F.linear(x, d), u)
    else:
        weight = delta.weight().to(device, dtype)

        def path(x: torch.Tensor) -> torch.Tensor:
            w = weight.to(x.device)
            if conv:
                return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation)
            return F.linear(x, w)

    # a bias update broadcasts over what follows the channel axis: nothing for a Linear or a LayerNorm, the
    # positions of a conv's or a GroupNorm's feature map
    channel_axis_first = conv or isinstance(layer, nn.GroupNorm)

    def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        d = path(x.to(dtype))
        if bias is not None:
            b = bias.to(d.device)
            d = d + (b.reshape(b.shape + (1,) * (d.dim() - 2)) if channel_axis_first else b)
        return output + d.to(output.dtype)

    return hook


@contextmanager
def applied(model: BaseModel, adapters: Sequence[AdapterSpec | str], *, merged: bool = False) -> Iterator[int]:
    """Apply the adapters inside the ``with`` block; yields the number of layers changed.

    The model is exactly as before afterwards (hooks removed, or the original weights copied back).
    """
    deltas = summed_deltas(model, adapters)
    layers = layers_by_name(model)
    missing = sorted(set(deltas) - set(layers))
    if missing:  # file_deltas resolved every name already; this would be a bug, not a user error
        raise ToolError(f"no layer for {missing[0]}")
    if merged:
        saved = {}
        try:
            with torch.no_grad():
                for name, delta in deltas.items():
                    layer = layers[name]
                    saved[name] = (layer.weight.detach().clone(),
                                   None if layer.bias is None else layer.bias.detach().clone())
                    layer.weight.add_(delta.weight().to(layer.weight.device, layer.weight.dtype))
                    if delta.bias is not None:
                        if layer.bias is None:  # a layer without bias gets one for the while
                            layer.bias = nn.Parameter(torch.zeros_like(delta.bias, dtype=layer.weight.dtype,
                                                                       device=layer.weight.device),
                                                      requires_grad=False)
                        layer.bias.add_(delta.bias.to(layer.bias.device, layer.bias.dtype))
            yield len(deltas)
        finally:
            with torch.no_grad():
                for name, (weight, bias) in saved.items():
                    layers[name].weight.copy_(weight)
                    if bias is None:
                        layers[name].bias = None
                    else:
                        layers[name].bias.copy_(bias)
        return
    handles = [layers[name].register_forward_hook(_hook(layers[name], delta)) for name, delta in deltas.items()]
    try:
        yield len(deltas)
    finally:
        for handle in handles:
            handle.remove()
