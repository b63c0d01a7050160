"""What LoRA, LoHa and LoKr share: a rank, ``alpha`` (``scale = alpha / rank``) and the DoRA option."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorakit.adapters.base import FUSE_DTYPES, Adapter, BaseLayer
from lorakit.adapters.functional import dora_weight, weight_norm
from lorakit.errors import InvalidValueError


class Factor(nn.Module):
    """Holds one tensor as ``.weight``, so that state-dict keys read ``lora_down.weight`` as in kohya files.

    It is never called: adapters use ``.weight`` in their own ``F.linear``/``F.conv2d`` calls.
    """

    def __init__(self, *shape: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, device=device))


class _TimesScalar(nn.Module):
    """LyCORIS's ``use_scalar``: a trained scalar, starting at 0, times one factor of the update, so that the update
    starts at 0 while every factor starts random (and learns from the first step)."""

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        self.scalar = nn.Parameter(torch.zeros((), device=device))

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return factor * self.scalar


class LowRankAdapter(Adapter):
    """Base of the algorithms with ``alpha``: ``ΔW = multiplier · (alpha / rank) · update``.

    Subclasses implement ``_update(scale, train)``: the update times ``scale``, shaped like ``W0``, with the
    algorithm's rank dropout applied when ``train``.  With ``dora=True`` the weight is re-normalised:
    ``W' = (W0 + γ·update) · dora_scale / ‖W0 + γ·update‖`` and ``ΔW = multiplier · (W' − W0)``, as A1111
    and ComfyUI apply it: multiplier 0 is the base model exactly, and ΔW is linear in the multiplier like
    every other algorithm's (LyCORIS puts the multiplier inside the rescale instead).  The norm is taken per
    input column by default (``wd_on_out=False``: the DoRA paper's ``‖·‖_c``, and the layout A1111 and ComfyUI
    both load correctly; see docs/compatibility.md), per output row with ``wd_on_out=True`` (LyCORIS's
    default, PEFT's).  DoRA needs the full weight, so its forward always builds ``ΔW``; ``dropout`` then acts
    on the update's output (LyCORIS ignores it with DoRA).
    """

    #: LoHa/LoKr: "auto" picks the factorised or the materialised forward by cost (from shapes); "factorised"
    #: or "materialised" pins one (tests, benchmarks)
    forward_path: str = "auto"

    def __init__(self, base: BaseLayer, rank: int, alpha: float | None = None, multiplier: float = 1.0, *,
                 dora: bool = False, wd_on_out: bool = False, **dropouts: float) -> None:
        super().__init__(base, multiplier, **dropouts)
        if int(rank) < 1:
            raise InvalidValueError(f"rank must be a positive integer, got {rank}")
        self.rank = int(rank)
        # kohya/LyCORIS: alpha absent or 0 means alpha = rank (scale 1)
        alpha = float(rank) if not alpha else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, device=base.weight.device))
        self._alpha_value = alpha
        # the scale is a Python float read in forward; keep it in step when a state dict is loaded
        self.register_load_state_dict_post_hook(_sync_alpha_hook)
        self.wd_on_out = bool(wd_on_out)
        if dora:
            magnitude = weight_norm(base.weight.detach().float(), self.wd_on_out)
            self.dora_scale = nn.Parameter(magnitude)
        else:
            self.register_parameter("dora_scale", None)

    #: with LyCORIS's ``use_scalar``: (the file key of the factor the scalar multiplies, its trained tensor's
    #: state-dict name, the scalar's); None without
    _scalar_keys: tuple[str, str, str] | None = None

    def _use_scalar(self, owner: str, attribute: str) -> None:
        """Train a scalar (from 0) times the factor ``attribute`` of the submodule ``owner`` ("" for the adapter
        itself); every access of the factor reads the product, so each path through the update includes it."""
        module = self.get_submodule(owner) if owner else self
        parametrize.register_parametrization(module, attribute, _TimesScalar(self.base.weight.device))
        at = f"{owner}." if owner else ""
        self._scalar_keys = (f"{at}{attribute}", f"{at}parametrizations.{attribute}.original",
                             f"{at}parametrizations.{attribute}.0.scalar")

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors; with ``use_scalar`` the scalar folded into its factor, as LyCORIS writes it."""
        return self.fold_state(super().file_tensors())

    def trained_state(self) -> dict[str, torch.Tensor]:
        return super().file_tensors()  # with use_scalar, the factor and the scalar apart

    def fold_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._scalar_keys is None:
            return state
        key, factor, scalar = self._scalar_keys
        folded = {k: v for k, v in state.items() if k not in (factor, scalar)}
        folded[key] = (state[factor] * state[scalar]).detach()
        return folded

    def load_trained(self, tensors: dict[str, torch.Tensor]) -> None:
        """With ``use_scalar``, a file's tensors go in with the scalar at 1 (as LyCORIS loads a file into its
        module); the trained state's, as they are."""
        if self._scalar_keys is None or self._scalar_keys[0] not in tensors:
            return super().load_trained(tensors)
        key, factor, scalar = self._scalar_keys
        with torch.no_grad():
            for name, value in self.trained_state().items():
                source = tensors[key] if name == factor else torch.ones(()) if name == scalar else tensors[name]
                value.copy_(source.to(dtype=value.dtype, device=value.device))

    @property
    def scale(self) -> float:
        """``alpha / rank``: the multiplier is not included."""
        return self._alpha_value / self.rank

    def _sync_alpha(self) -> None:
        self._alpha_value = float(self.alpha)

    def _update(self, scale: float, train: bool) -> torch.Tensor:
        raise NotImplementedError

    def _deltas(self, train: bool) -> tuple[torch.Tensor, None]:
        if self.dora_scale is None:
            return self._update(self.scale * self.multiplier, train), None
        magnitude = self.dora_scale
        dtype = torch.promote_types(magnitude.dtype, torch.float32)
        w0 = self.original_weight.to(dtype)
        merged = w0 + self._update(self.scale, train).to(dtype)
        delta = dora_weight(merged, magnitude.to(dtype), 1.0, self.wd_on_out) - w0
        # strength m: W0 + m·(W' − W0) (A1111, ComfyUI); m = 0 gives W0 exactly
        return delta if self.multiplier == 1 else delta * self.multiplier, None

    def _chain_applies(self, x: torch.Tensor, *factors: torch.Tensor) -> bool:
        """Whether a one-node chain (``functional.loha_chain``) can compute ``forward(x)``: no
        training-time dropout, a frozen base layer, one float32/float64 dtype for ``x``, ``W0`` and the factors,
        no autocast, a batched conv input with integer padding (shapes, types and flags only: a static branch
        for ``torch.compile``)."""
        if torch.is_autocast_enabled(x.device.type):
            return False
        if self.training and (self.dropout > 0 or self.rank_dropout > 0 or self.module_dropout > 0):
            return False
        base = self.base
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return False
        dtype = x.dtype
        if dtype not in FUSE_DTYPES or base.weight.dtype != dtype or any(f.dtype != dtype for f in factors):
            return False
        return self.kind == "linear" or (x.dim() == 4 and not isinstance(base.padding, str))

    def extra_repr(self) -> str:
        extra = f", dora(on_out={self.wd_on_out})" if self.dora_scale is not None else ""
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self._alpha_value:g}{extra}"


def _sync_alpha_hook(module: LowRankAdapter, _incompatible_keys) -> None:
    module._sync_alpha()  # a module-level function, not a lambda: adapters stay picklable


def dora_options(base: BaseLayer, tensors: dict[str, torch.Tensor]) -> dict[str, bool]:
    """``dora``/``wd_on_out`` for a file's tensors: ``dora_scale`` of ``(out, 1, ...)`` normalises rows
    (LyCORIS's default), ``(1, in, ...)`` input columns (its ``wd_on_out=False``, A1111's convention)."""
    magnitude = tensors.get("dora_scale")
    if magnitude is None:
        return {"dora": False, "wd_on_out": True}
    shape = tuple(magnitude.shape)
    n_out, n_in = base.weight.shape[:2]
    on_input = len(shape) >= 2 and shape[0] == 1 and shape[1] == n_in and n_out != 1
    return {"dora": True, "wd_on_out": not on_input}
