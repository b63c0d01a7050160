"""The adapter protocol every algorithm of the LoRA family implements.

An adapter wraps one frozen base layer (``nn.Linear`` or ``nn.Conv2d``) holding ``W0`` (+ bias) and adds a
trained update ``ΔW``.  Everything else in lorakit (CS-Fluctuation, merging, block weights, SVD extraction,
file I/O) talks to adapters only through this class:

- ``delta_weight()``: ``ΔW`` shaped like ``W0``, the scale (``multiplier * alpha / rank``) included;
- ``delta_bias()``: the update of the bias, or ``None`` (only ``full`` has one);
- ``forward(x)``: equals ``F.linear/F.conv2d(x, W0 + delta_weight(), b + delta_bias())``; each algorithm
  picks its cheapest correct path;
- ``merge()`` / ``unmerge()``: bake the update into the base layer and take it out again;
- ``file_tensors()`` / ``from_file_tensors()``: the tensors under one module prefix of a kohya/LyCORIS
  ``.safetensors`` file (``lora_down.weight``, ``hada_w1_a``, ``alpha``, ...), both ways.

Parameters and buffers of an adapter are named exactly as the keys of the file format, so
``file_tensors()`` is the adapter's own state minus the base layer.

Training options shared by all adapters (active only in ``.train()`` mode and only when > 0):
``dropout`` (on the adapter's own path), ``rank_dropout`` (drop ranks, or output rows of ``ΔW`` where an
algorithm has no rank axis), ``rank_dropout_scale`` (rescale the kept part by ``1 / (1 - p)``) and
``module_dropout`` (skip the whole update with probability ``p``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import InvalidValueError, LorakitError
from lorakit.fp8 import FP8_LAYERS, fp8_product, upcast

BaseLayer = nn.Linear | nn.Conv2d
#: the normalisation layers LyCORIS's ``train_norm`` updates (``lorakit.adapters.norm``)
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)

# The fused path adds ΔW into W0 before the matmul; in half precision that addition rounds a small ΔW away,
# so there the update runs as a separate product instead.
FUSE_DTYPES = (torch.float32, torch.float64)


class AdapterFormatError(LorakitError, ValueError):
    """The tensors of a file do not make an adapter: a key is missing, unexpected, or does not fit."""


class AdapterShapeError(AdapterFormatError):
    """A tensor does not fit the layer it is meant for (the message names the key and both shapes)."""


def layer_kind(base: nn.Module) -> str:
    """'linear' or 'conv' for the layers adapters can wrap; a clear error for anything else."""
    if isinstance(base, nn.Linear):
        return "linear"
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise TypeError(f"adapters wrap ungrouped convolutions, this one has groups={base.groups}")
        if base.padding_mode != "zeros":
            raise TypeError(f"adapters wrap zero-padded convolutions, not padding_mode={base.padding_mode!r}")
        return "conv"
    raise TypeError(f"adapters wrap nn.Linear or nn.Conv2d layers, not {type(base).__name__}")


def norm_kind(base: nn.Module) -> str:
    """'norm' for a LayerNorm/GroupNorm with a learned scale; a clear error for anything else."""
    if not isinstance(base, NORM_LAYERS):
        raise TypeError(f"a norm-layer update wraps nn.LayerNorm or nn.GroupNorm, not {type(base).__name__}")
    if base.weight is None:
        raise TypeError(f"this {type(base).__name__} has no learned scale (elementwise_affine/affine is off): "
                        "there is nothing to update")
    return "norm"


def _probability(name: str, p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise InvalidValueError(f"{name} must lie in [0, 1], got {p}")
    return p


class Adapter(nn.Module):
    """Base class: a frozen layer plus an update ``ΔW``.

    Subclasses implement ``_deltas(train)`` (``ΔW``, ``Δb``; with ``train=True`` the rank dropout of the
    algorithm applied) and may override ``forward`` with a cheaper path.  They describe themselves with class
    attributes, from which every table of lorakit is derived (``lorakit.adapters.ALGORITHMS``, algorithm
    detection, ranks and widths in ``lorakit.formats``, names in ``lorakit inspect``, the ``--algorithm`` help):
    ``algorithm`` (the name used in files and on the command line), ``aliases``, ``display_name``,
    ``file_keys`` (the tensor names, relative to the module prefix, by which a file is recognised as theirs),
    ``rank_keys`` and ``width_keys``.
    """

    algorithm: ClassVar[str] = ""
    #: other names for it on the command line and in kohya's network_args (``"locon"`` for LoRA)
    aliases: ClassVar[tuple[str, ...]] = ()
    #: how people write it (``lorakit inspect``)
    display_name: ClassVar[str] = ""
    #: keys whose presence identifies this algorithm in a file (any one of them is enough)
    file_keys: ClassVar[tuple[str, ...]] = ()
    #: keys whose first dimension is the rank, in the order to look for them (none: the algorithm has no rank)
    rank_keys: ClassVar[tuple[str, ...]] = ()
    #: keys whose second dimension is the adapted layer's input width (tells base models apart)
    width_keys: ClassVar[tuple[str, ...]] = ()
    #: the name LyCORIS's kohya wrapper takes in ``network_args`` (``algo=...``) when it differs from ``algorithm``
    lycoris_algo: ClassVar[str] = ""
    #: whether the algorithm has a bias update (``delta_bias`` is then not always ``None``)
    updates_bias: ClassVar[bool] = False
    #: the file key of the algorithm's Tucker core, when it has one (``use_tucker``)
    tucker_key: ClassVar[str] = ""
    #: whether a network can be trained with it (``network.algorithm``): it wraps Linear/Conv2d layers (the norm
    #: layers' update only goes beside another algorithm, LyCORIS's ``train_norm``)
    trains_layers: ClassVar[bool] = True

    def __init__(self, base: BaseLayer, multiplier: float = 1.0, *, dropout: float = 0.0,
                 rank_dropout: float = 0.0, rank_dropout_scale: bool = False,
                 module_dropout: float = 0.0) -> None:
        super().__init__()
        self.kind = self.wrapped_kind(base)
        base.requires_grad_(False)
        self.base = base
        # a plain float: changing it at run time must not touch autograd or the parameters
        self.multiplier = float(multiplier)
        self.dropout = _probability("dropout", dropout)
        self.rank_dropout = _probability("rank_dropout", rank_dropout)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        self.module_dropout = _probability("module_dropout", module_dropout)
        self.merged = False
        self._original: tuple[torch.Tensor, torch.Tensor | None, bool] | None = None

    @staticmethod
    def wrapped_kind(base: nn.Module) -> str:
        """The kind of layer this algorithm wraps ('linear' or 'conv'; the norm update: 'norm'), or TypeError."""
        return layer_kind(base)

    # ---- the layer being adapted -------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        """``W0`` as the layer computes with it: a weight stored in fp8 (model.fp8_base) is upcast, per use."""
        weight = self.base.weight
        return upcast(weight, self.base.compute_dtype) if isinstance(self.base, FP8_LAYERS) else weight

    @property
    def base_bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def original_weight(self) -> torch.Tensor:
        """``W0`` even while merged (the algorithms whose update depends on ``W0`` read this)."""
        return self._original[0] if self.merged else self.base_weight

    @property
    def in_features(self) -> int:
        return self.base.in_features if self.kind == "linear" else self.base.in_channels

    @property
    def out_features(self) -> int:
        return self.base.out_features if self.kind == "linear" else self.base.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return () if self.kind == "linear" else tuple(self.base.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.base.weight.shape)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's operation with another weight (stride, padding, ... of the base layer).

        Calls ``F.linear``/``F.conv2d`` directly, never ``self.base(x)``: no module hooks, and no recursion
        when a network patches the base layer's ``forward`` to point here.
        """
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        conv = self.base
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)

    def frozen_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The frozen layer's own product ``W0 x`` (+ ``bias``).  A weight stored in fp8 (model.fp8_base) is upcast
        for it, and autograd keeps the fp8 weight for the backward pass rather than the upcast copy."""
        if isinstance(self.base, FP8_LAYERS):
            return fp8_product(self.base, x, bias)
        return self.base_forward(x, self.base.weight, bias)

    def positions(self, x: torch.Tensor) -> int:
        """How many output positions the layer computes for ``x``: tokens (× batch) for a Linear, batch ×
        output pixels for a conv.  Shapes only, so a branch on it is static for ``torch.compile``."""
        if self.kind == "linear":
            return x.numel() // max(x.shape[-1], 1)
        conv = self.base
        n = x.shape[0] if x.dim() == 4 else 1
        if isinstance(conv.padding, str):  # 'same' keeps the size; 'valid' shrinks it a little
            return n * x.shape[-2] * x.shape[-1]
        sizes = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                 zip(x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True)]
        return n * sizes[0] * sizes[1]

    # ---- the protocol ------------------------------------------------------------------------
    def _deltas(self, train: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(ΔW, Δb)`` with multiplier and scale; ``train=True`` applies the algorithm's rank dropout."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` shaped like ``W0``, scale and multiplier included (deterministic: no dropout).

        It carries autograd history to the adapter's parameters and may share storage with one of them
        (``full`` at multiplier 1): read it, do not modify it in place.
        """
        return self._deltas(False)[0]

    def delta_bias(self) -> torch.Tensor | None:
        """The update of the bias, or ``None`` when the algorithm leaves the bias alone."""
        return self._deltas(False)[1] if self.updates_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Materialise ``ΔW`` (and ``Δb``) and run the base operation with them."""
        if self.merged:
            return self.base_forward(x, self.base.weight, self.base.bias)
        train = self.training
        dw, db = self._deltas(train)
        if train and self.module_dropout > 0:
            keep = self._module_keep(dw)
            dw = dw * keep
            db = None if db is None else db * keep
        return self._forward_with_delta(x, dw, db)

    def _forward_with_delta(self, x: torch.Tensor, dw: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor:
        w0, b0 = self.base.weight, self.base.bias  # stored in fp8 it is not fused (not in FUSE_DTYPES)
        output_dropout = self.training and self.dropout > 0
        if not output_dropout and x.dtype == w0.dtype == dw.dtype and w0.dtype in FUSE_DTYPES:
            # one matmul/conv with W0 + ΔW: the cheapest path when no precision is lost
            bias = b0 if db is None else (db if b0 is None else b0 + db)
            return self.base_forward(x, w0 + dw, bias)
        y = self.frozen_forward(x, b0)
        h = x if x.dtype == dw.dtype else x.to(dw.dtype)
        d = self.base_forward(h, dw, db)
        if output_dropout:
            d = F.dropout(d, self.dropout, training=True)
        return y + d.to(y.dtype)

    # ---- training-time randomness (static Python branches only; no data-dependent control flow) ------
    def _module_keep(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-dim 0/1 tensor: 0 with probability ``module_dropout`` (multiplied in, never branched on)."""
        return (torch.rand((), device=like.device) >= self.module_dropout).to(like.dtype)

    def _rank_mask(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask of ``shape`` dropping entries with probability ``rank_dropout`` (rescaled if asked)."""
        mask = (torch.rand(shape, device=like.device) >= self.rank_dropout).to(like.dtype)
        if self.rank_dropout_scale and self.rank_dropout < 1:
            mask = mask * (1.0 / (1.0 - self.rank_dropout))
        return mask

    def _add_factorised_update(self, y: torch.Tensor, d: torch.Tensor, train: bool) -> torch.Tensor:
        """``y + d`` for an update ``d`` computed from the factors (LoHa's and LoKr's factorised paths), with the
        training-time dropouts applied to it as the materialised path applies them to ``ΔW``."""
        if train and self.rank_dropout > 0:  # output rows of ΔW, as in the materialised path
            rows = self._rank_mask((self.out_features,), d)
            d = d * (rows if self.kind == "linear" else rows.reshape(-1, 1, 1))
        if train and self.dropout > 0:
            d = F.dropout(d, self.dropout, training=True)
        return y + d.to(y.dtype)

    def _row_mask(self, like: torch.Tensor) -> torch.Tensor:
        """Rank dropout for algorithms without a rank axis (as LyCORIS): drop output rows of ``ΔW``."""
        return self._rank_mask((like.shape[0],) + (1,) * (like.dim() - 1), like)

    # ---- merging -------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base layer; ``forward`` then runs the base layer alone."""
        if self.merged:
            return
        if isinstance(self.base, FP8_LAYERS):
            raise LorakitError(f"cannot merge into a base weight stored in {self.base.weight.dtype} (model.fp8_base): "
                               "the update would be rounded to its few bits")
        dw, db = self.delta_weight(), self.delta_bias()
        bias = self.base.bias
        # keep the originals: unmerge restores them bit for bit (W0 + ΔW - ΔW is not W0 in floating point)
        self._original = (self.base.weight.detach().clone(),
                          None if bias is None else bias.detach().clone(), bias is None)
        self.base.weight.add_(dw.to(self.base.weight.dtype))
        if db is not None:
            self._add_to_bias(db)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore exactly the weights ``merge`` found (the multiplier may have changed since)."""
        if not self.merged:
            return
        weight, bias, had_no_bias = self._original
        self.base.weight.copy_(weight)
        if bias is not None:
            self.base.bias.copy_(bias)
        elif had_no_bias:
            self.base.bias = None
        self._original = None
        self.merged = False

    def _add_to_bias(self, delta: torch.Tensor) -> None:
        if self.base.bias is None:
            self.base.bias = nn.Parameter(torch.zeros_like(delta, dtype=self.base.weight.dtype),
                                          requires_grad=False)
        self.base.bias.add_(delta.to(self.base.bias.dtype))

    # ---- files -------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors under the key names of the file format, detached, on their device."""
        return {k: v.detach() for k, v in self.state_dict().items() if not k.startswith("base.")}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What training changes, as live tensors under their state-dict names (a resume puts them back bit for
        bit): ``file_tensors()``, unless the file form folds some of them together (LyCORIS's ``use_scalar``)."""
        return self.file_tensors()

    def fold_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``trained_state()``-named tensors (an average of them, say) in the file's form."""
        return state

    def load_trained(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put trained tensors in place: ``trained_state()``'s, or a file's (``file_tensors()`` keys)."""
        with torch.no_grad():
            for key, value in self.trained_state().items():
                value.copy_(tensors[key].to(dtype=value.dtype, device=value.device))

    @classmethod
    def from_file_tensors(cls, base: BaseLayer, tensors: dict[str, torch.Tensor],
                          multiplier: float = 1.0) -> Adapter:
        """Build an adapter over ``base`` from the tensors of one module in a file: made with ``file_arguments``,
        then the tensors loaded into it.

        Raises ``AdapterShapeError`` naming the key when a tensor does not fit ``base``.
        """
        arguments = cls.file_arguments(base, tensors)
        adapter = cls(base, multiplier=multiplier, **arguments)
        adapter._check_file_fit(tensors, arguments)
        adapter._load_file_tensors(tensors)
        return adapter

    def _check_file_fit(self, tensors: dict[str, torch.Tensor], arguments: dict[str, Any]) -> None:
        """``AdapterShapeError`` saying why a file's module, built into this adapter, cannot fit its layer, before
        the tensors are loaded (which would only name a shape): here, a Tucker core on a layer without a spatial
        kernel."""
        if arguments.get("use_tucker") and not getattr(self, "tucker", False):
            raise AdapterShapeError(f"{self.tucker_key}: a Tucker core {tuple(tensors[self.tucker_key].shape)} needs a "
                                    f"conv with a spatial kernel, this layer's weight is {self.weight_shape}")

    @classmethod
    def file_arguments(cls, base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments of ``lorakit.adapters.make_adapter`` (``rank``, ``alpha`` where the algorithm has
        them, and the options that shape it: Tucker, DoRA, LoKr's factors, OFT's blocks, ...) that build a fresh
        adapter over ``base`` with the keys and shapes of one module in a file: what kohya's and LyCORIS's
        ``dim_from_weights`` build each module from.  ``from_file_tensors`` builds from them too.
        ``AdapterFormatError`` naming the key when the tensors do not make one."""
        raise NotImplementedError

    def _load_file_tensors(self, tensors: dict[str, torch.Tensor], skip: tuple[str, ...] = ("alpha",)) -> None:
        """Put file tensors into the parameters/buffers of the same name.

        Half-precision and fp8 values are upcast to the adapter's own dtype (float32): a file's dtype is a storage
        choice, and an fp16/bf16 adapter path would round the update (as ComfyUI, we compute in float32).
        """
        own = {k: v for k, v in self.state_dict(keep_vars=True).items() if not k.startswith("base.")}
        unexpected = sorted(set(tensors) - set(own) - set(skip))
        if unexpected:
            raise AdapterFormatError(f"{', '.join(unexpected)}: not a key of {self.algorithm} "
                                     f"for this layer (expected {', '.join(sorted(own))})")
        device = self.base.weight.device
        with torch.no_grad():
            for key, target in own.items():
                if key in skip or key not in tensors:
                    continue
                value = fit_shape(key, tensors[key], tuple(target.shape))
                dtype = value.dtype
                if value.is_floating_point() and target.is_floating_point():
                    fp8 = value.element_size() == 1  # no promotion rule: taken at the adapter's own dtype
                    dtype = target.dtype if fp8 else torch.promote_types(value.dtype, target.dtype)
                target.data = value.detach().to(device=device, dtype=dtype, copy=True)

    def extra_repr(self) -> str:
        return f"algorithm={self.algorithm}, multiplier={self.multiplier}, merged={self.merged}"


def prefer_factorised(positions: int, factorised_per_position: int, materialised_fixed: int,
                      materialised_per_position: int) -> bool:
    """Whether the update should run as its factor chain on the input rather than as a materialised ``ΔW``.

    Costs in multiply-adds over the frozen layer's own step: the chain costs its forward three times
    (forward, input gradient, factor gradients); materialising costs building ``ΔW`` and its backward (the
    fixed part) plus the gradient of the full weight, which the frozen model never computes
    (``positions × out × in·k·k``).
    """
    return 3 * positions * factorised_per_position < materialised_fixed + positions * materialised_per_position


def require(tensors: dict[str, torch.Tensor], key: str, algorithm: str) -> torch.Tensor:
    """``tensors[key]``, or an ``AdapterFormatError`` naming the missing key."""
    if key not in tensors:
        raise AdapterFormatError(f"{key}: missing, {algorithm} needs it (found {', '.join(sorted(tensors))})")
    return tensors[key]


def check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ``AdapterShapeError`` naming ``key`` when ``tensor`` is not of shape ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise AdapterShapeError(f"{key}: shape {tuple(tensor.shape)} does not fit the layer, "
                                f"expected {tuple(expected)}")


def fit_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` reshaped to ``expected`` when they differ only by size-1 axes, else ``AdapterShapeError``.

    Files carry 1×1-conv tensors ``(r, in, 1, 1)`` for layers that are Linear in another version of a model
    (SD's ``proj_in``/``proj_out``), and A1111/ComfyUI accept them; so do we.
    """
    shape = tuple(tensor.shape)
    if shape == tuple(expected):
        return tensor
    squeezed = tuple(s for s in shape if s != 1)
    if squeezed == tuple(s for s in expected if s != 1) and tensor.numel() == math.prod(expected):
        return tensor.reshape(expected)
    check_shape(key, tensor, expected)  # raises with the message naming the key
    return tensor


def alpha_from_file(tensors: dict[str, torch.Tensor], rank: int) -> float:
    """kohya/LyCORIS convention: a missing or zero ``alpha`` means ``alpha = rank`` (scale 1)."""
    alpha = tensors.get("alpha")
    if alpha is None:
        return float(rank)
    value = float(alpha.float().reshape(-1)[0])
    return float(rank) if value == 0 else value
