"""kohya's fp8_base: the frozen base model's weights stored in fp8 and computed with in the dtype they had.

Every frozen ``nn.Linear``/``nn.Conv2d`` becomes an ``Fp8Linear``/``Fp8Conv2d`` (the same module, its class
swapped: names, hooks and ``isinstance`` checks are unchanged) whose weight is stored in float8_e4m3fn.  Its
forward upcasts the weight for the product, and autograd keeps the fp8 weight, not the upcast copy, for the
input's gradient (upcast again in the backward pass): a bf16 copy of every layer kept from the forward to the
backward pass would take back the memory fp8 saved.  An adapter computes its layer's own product through the same
op (``Adapter.frozen_forward``).  Norms, embeddings and biases keep their dtype (small, and kohya keeps the text
encoders' embeddings too); the adapters' own weights train in fp32 as always.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
#: every fp8 value in order of its bits, per dtype it is upcast to (the CPU's upcast is a lookup in it)
_VALUES: dict[torch.dtype, torch.Tensor] = {}
_CHUNK = 1 << 18  # weights a lookup takes at once (1 MiB of indices)


def upcast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp8 weight in ``dtype``, exactly.  On the CPU by looking each byte up in the 256 values fp8 has: torch's
    own conversion there is several times slower (``benchmarks/fp8_base.py --upcast`` measures both)."""
    if weight.device.type != "cpu":
        return weight.to(dtype)
    if dtype not in _VALUES:
        _VALUES[dtype] = torch.arange(256, dtype=torch.uint8).view(FP8).to(dtype)
    values, codes = _VALUES[dtype], weight.view(torch.uint8).reshape(-1)
    out = torch.empty(codes.shape, dtype=dtype)
    for start in range(0, codes.numel(), _CHUNK):  # the lookup's int32 indices a chunk at a time: little memory
        torch.index_select(values, 0, codes[start:start + _CHUNK].int(), out=out[start:start + _CHUNK])
    return out.view(weight.shape)


class _Fp8Product(torch.autograd.Function):
    """``F.linear``/``F.conv2d`` with an fp8 weight upcast to ``dtype``; the backward pass gives the input's
    gradient only (the weight and bias are frozen) and upcasts the saved fp8 weight again for it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                conv: tuple | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.conv, ctx.x_shape, ctx.x_dtype = dtype, conv, x.shape, x.dtype
        wide = upcast(weight, dtype)
        if conv is None:
            return F.linear(x, wide, bias)
        return F.conv2d(x, wide, bias, *conv)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (weight,) = ctx.saved_tensors
        wide = upcast(weight, grad.dtype)
        if ctx.conv is None:
            grad_x = grad @ wide
        elif len(ctx.x_shape) == 3:  # an unbatched image
            grad_x = torch.nn.grad.conv2d_input((1, *ctx.x_shape), wide, grad[None], *ctx.conv)[0]
        else:
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, wide, grad, *ctx.conv)
        return grad_x.to(ctx.x_dtype), None, None, None, None


def fp8_product(layer: nn.Linear | nn.Conv2d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's product with its fp8 weight (``bias`` in place of its own), keeping the fp8 weight for backward."""
    if bias is not None and bias.requires_grad:  # the backward pass gives the input's gradient only
        raise ValueError("an fp8 layer's bias is frozen with its weight; a trained bias needs its own path")
    conv = None if isinstance(layer, nn.Linear) else (layer.stride, layer.padding, layer.dilation, layer.groups)
    return _Fp8Product.apply(x, layer.weight, bias, layer.compute_dtype, conv)


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in fp8 and computed with in ``compute_dtype``."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_product(self, x, self.bias)


class Fp8Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (zero-padded) whose frozen weight is stored in fp8 and computed with in ``compute_dtype``."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_product(self, x, self.bias)


FP8_LAYERS = (Fp8Linear, Fp8Conv2d)


def frozen_bytes(module: nn.Module) -> int:
    """The bytes the module's frozen weights occupy (what fp8 storage shrinks)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a diffusers or transformers model computes in: with weights stored in fp8, the one most of them
    had, else its ``dtype``."""
    return getattr(model, "fp8_compute_dtype", None) or model.dtype


def store_frozen_in_fp8(module: nn.Module) -> tuple[int, int]:
    """Store the weights of ``module``'s frozen Linear and conv layers (zero-padded by numbers, as the backward
    pass computes them) in fp8, each computed with in the dtype it had; returns the module's frozen bytes before
    and after.  Layers whose weight is trained (an adapter's own, a native run's) are left as they are."""
    before = frozen_bytes(module)
    dtypes: Counter[torch.dtype] = Counter()
    for layer in module.modules():
        if type(layer) is nn.Linear:  # exactly these classes: a subclass may compute otherwise
            fp8_class: type[nn.Module] = Fp8Linear
        elif type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            fp8_class = Fp8Conv2d
        else:
            continue
        if layer.weight.requires_grad:
            continue
        layer.__class__ = fp8_class
        layer.compute_dtype = layer.weight.dtype
        dtypes[layer.compute_dtype] += 1
        layer.weight.data = layer.weight.data.to(FP8)
    if dtypes:  # what diffusers' and transformers' ``dtype`` would now read off the first weight: fp8
        module.fp8_compute_dtype = dtypes.most_common(1)[0][0]
    return before, frozen_bytes(module)
