"""The LoRA family on one protocol (see ``base.py``).

- ``ALGORITHMS``: name → adapter class; ``make_adapter(algorithm, base, rank=..., alpha=..., **options)``
  builds a freshly initialised adapter; ``ALGORITHMS[name].from_file_tensors(base, tensors, multiplier)``
  rebuilds one from a file;
- ``detect_algorithm(keys)``: the algorithm of one module of a file, from its relative key names.

Every table here is derived from the classes' own attributes (``algorithm``, ``aliases``, ``display_name``,
``file_keys``, ``rank_keys``, ``width_keys``): adding an algorithm means writing its class and listing it in
``_CLASSES``.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.adapters.base import Adapter, AdapterFormatError, AdapterShapeError, BaseLayer
from lorakit.adapters.boft import BOFT
from lorakit.adapters.dylora import DyLoRA
from lorakit.adapters.full import Full
from lorakit.adapters.functional import factorization
from lorakit.adapters.glora import GLoRA
from lorakit.adapters.ia3 import IA3
from lorakit.adapters.loha import LoHa
from lorakit.adapters.lokr import LoKr
from lorakit.adapters.lora import LoRA
from lorakit.adapters.lowrank import LowRankAdapter
from lorakit.adapters.norm import Norm
from lorakit.adapters.oft import OFT
from lorakit.errors import InvalidValueError

_CLASSES: tuple[type[Adapter], ...] = (LoRA, LoHa, LoKr, IA3, Full, OFT, BOFT, GLoRA, DyLoRA, Norm)

ALGORITHMS: dict[str, type[Adapter]] = {cls.algorithm: cls for cls in _CLASSES}

#: the algorithms a network is trained with (``network.algorithm``, ``--algorithm``): all but the norm-layer update
NETWORK_ALGORITHMS: tuple[str, ...] = tuple(name for name, cls in ALGORITHMS.items() if cls.trains_layers)

# other names for the same algorithms: LyCORIS's module names ("locon", "kron"), kohya's network names
ALIASES: dict[str, str] = {alias: cls.algorithm for cls in _CLASSES for alias in cls.aliases}


@dataclass(frozen=True)
class ForeignAlgorithm:
    """A LyCORIS algorithm lorakit recognises in a file, so that it can say "not supported", but does not
    implement; it describes itself with the same attributes as the adapter classes."""

    algorithm: str
    display_name: str
    file_keys: tuple[str, ...]
    rank_keys: tuple[str, ...] = ()
    width_keys: tuple[str, ...] = ()


FOREIGN: tuple[ForeignAlgorithm, ...] = (
    # LyCORIS 1.x's OFT (``oft_diag``), a different parametrisation from today's ``oft_blocks``
    ForeignAlgorithm("oft-legacy", "OFT (LyCORIS 1.x)", ("oft_diag",)),
    ForeignAlgorithm("tlora", "T-LoRA", ("lambda_layer",)),
)

#: every algorithm a file may hold, by name: the adapter classes, then the recognised foreign ones
KNOWN: dict[str, type[Adapter] | ForeignAlgorithm] = {**ALGORITHMS, **{f.algorithm: f for f in FOREIGN}}

# option names of LyCORIS / kohya network_args, read as lorakit's
_OPTION_ALIASES = {"dora_wd": "dora", "weight_decompose": "dora", "wd_on_output": "wd_on_out",
                   "train_on_input": "on_input", "bypass_mode": "bypass", "use_cp": "use_tucker",
                   "use_conv_cp": "use_tucker", "unit": "block_size"}  # unit: kohya's DyLoRA


def algorithm_class(algorithm: str) -> type[Adapter]:
    """The adapter class for a name or alias (``"locon"`` → ``LoRA``); ``ValueError`` listing the known."""
    name = ALIASES.get(algorithm.lower(), algorithm.lower())
    if name not in ALGORITHMS:
        raise InvalidValueError(f"unknown adapter algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def make_adapter(algorithm: str, base: BaseLayer, rank: int = 4, alpha: float | None = None,
                 **options) -> Adapter:
    """A freshly initialised adapter over ``base`` (``ΔW = 0``).

    ``rank``/``alpha`` are ignored by the algorithms without them (``ia3``, ``full``).  Options: ``multiplier``,
    ``dropout``, ``rank_dropout``, ``rank_dropout_scale``, ``module_dropout`` everywhere; ``dora``,
    ``wd_on_out``, ``use_tucker`` (lora, loha, lokr); ``factor``, ``decompose_both``, ``full_matrix``,
    ``unbalanced_factorization``, ``bypass`` (lokr); ``on_input`` (ia3); ``constraint``, ``rescaled`` (oft, boft,
    where ``rank`` bounds the block size); ``use_tucker`` (glora); ``block_size`` (dylora, kohya's ``unit``);
    ``frozen_down`` (lora: LoRA-FA); ``rs_lora`` (lora, loha, lokr, glora: rank-stabilised scaling);
    ``use_scalar`` (lora, loha, lokr: LyCORIS's trained scalar on the update).
    LyCORIS's names (``dora_wd``, ``weight_decompose``, ``train_on_input``, ``bypass_mode``, ...) are accepted
    too.
    """
    cls = algorithm_class(algorithm)
    options = {_OPTION_ALIASES.get(k, k): v for k, v in options.items()}
    if options.pop("rs_lora", False):
        alpha = rank_stabilised_alpha(cls, rank, alpha)
    if issubclass(cls, LowRankAdapter):
        return cls(base, rank, alpha, **options)
    if getattr(cls, "takes_rank", False):  # OFT/BOFT: rank is LyCORIS's lora_dim (a block size)
        return cls(base, rank, **options)
    return cls(base, **options)


#: options read by the network or by ``make_adapter`` rather than by one adapter class
NETWORK_OPTIONS = ("rs_lora", "train_norm")
# keyword-only parameters of the classes that are not options a user gives (set from a file or by the trainer)
_INTERNAL_PARAMETERS = frozenset({"layout", "with_bias", "alpha"})


def option_defaults(algorithm: str) -> dict[str, Any]:
    """The options ``make_adapter`` takes for ``algorithm`` (``network.args``) with their defaults: the class's own
    keyword parameters, LyCORIS's names for them, and ``NETWORK_OPTIONS`` (off by default)."""
    own: dict[str, Any] = {}
    for cls in algorithm_class(algorithm).__mro__:  # up the classes while one passes **options on to its parent
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters.values()
        own.update({p.name: p.default for p in parameters
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in own})
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    for name in _INTERNAL_PARAMETERS:
        own.pop(name, None)
    aliases = {alias: own[name] for alias, name in _OPTION_ALIASES.items() if name in own}
    return {**own, **aliases, **dict.fromkeys(NETWORK_OPTIONS, False)}


def option_names(algorithm: str) -> frozenset[str]:
    """The names of ``option_defaults``."""
    return frozenset(option_defaults(algorithm))


def any_option_names() -> frozenset[str]:
    """The options some algorithm takes (one LyCORIS would read for another algorithm than the one chosen)."""
    return frozenset().union(*(option_names(name) for name in ALGORITHMS))


def check_options(algorithm: str, options: Mapping[str, Any]) -> None:
    """``InvalidValueError`` for an option ``algorithm`` does not take (naming a close one) or a value of the wrong
    kind (a number for a switch, text for a number), before any adapter is built."""
    defaults = option_defaults(algorithm)
    for name, value in options.items():
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InvalidValueError(f"{name}: not an option of {algorithm}{hint}; its options: "
                                    f"{', '.join(sorted(defaults))}")
        default = defaults[name]
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int) or default is None:  # None: a count (block_size, stages) left to the layer
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif isinstance(default, float):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            ok, kind = True, ""
        if not ok:
            raise InvalidValueError(f"{name} must be {kind}, got {value!r}")


def rank_stabilised_alpha(cls: type[Adapter], rank: int, alpha: float | None) -> float:
    """rsLoRA (Kalajdzievski 2023; LyCORIS's ``rs_lora``, PEFT's ``use_rslora``): the scale ``alpha / √rank``
    instead of ``alpha / rank``, so that a higher rank learns as fast.  Written as LyCORIS writes it, an alpha of
    ``alpha · √rank``: every reader's ``alpha / rank`` then gives the scale, with no option to know of."""
    if not issubclass(cls, LowRankAdapter) or issubclass(cls, DyLoRA):
        why = "trains every rank up to its own, so no one rank sets the scale" if issubclass(cls, DyLoRA) else \
            "has no alpha / rank scale"
        raise InvalidValueError(f"rs_lora scales alpha by √rank, and {cls.__name__} {why}")
    return (float(alpha) if alpha else float(rank)) * math.sqrt(rank)


# key → the algorithms using it (OFT and BOFT share ``oft_blocks``; its number of axes tells them apart); names
# outside ALGORITHMS are recognised so callers can say "T-LoRA is not supported" instead of "unknown keys"
_DETECTION: dict[str, list[type[Adapter] | ForeignAlgorithm]] = {}
for _spec in KNOWN.values():
    for _key in _spec.file_keys:
        _DETECTION.setdefault(_key, []).append(_spec)


def detect_algorithm(keys: Iterable[str] | Mapping[str, torch.Tensor]) -> str:
    """The algorithm of one module from its key names relative to the module prefix.

    Returns a name of ``ALGORITHMS`` for what lorakit can load, or ``"oft-legacy"`` or ``"tlora"`` for
    LyCORIS algorithms it recognises but does not implement.  DoRA files are
    their base algorithm (``dora_scale`` is an option), DyLoRA files are plain LoRA files.  Given the tensors
    (a mapping) rather than key names, classes with a ``matches(tensors)`` check use it (OFT's ``oft_blocks``
    has 3 axes, BOFT's 4).
    Raises ``ValueError`` when nothing is recognised.
    """
    tensors = keys if isinstance(keys, Mapping) else None
    keys = set(keys)
    for key, specs in _DETECTION.items():
        if key in keys:
            for spec in specs:
                matches = getattr(spec, "matches", None)
                # with key names only, the first listed wins (OFT before BOFT)
                if tensors is None or matches is None or matches(tensors):
                    return spec.algorithm
    raise ValueError(f"no adapter algorithm recognised from keys {sorted(keys)}")


__all__ = [
    "ALGORITHMS",
    "ALIASES",
    "FOREIGN",
    "KNOWN",
    "Adapter",
    "ForeignAlgorithm",
    "AdapterFormatError",
    "AdapterShapeError",
    "BOFT",
    "DyLoRA",
    "Full",
    "GLoRA",
    "IA3",
    "LoHa",
    "LoKr",
    "LoRA",
    "LowRankAdapter",
    "OFT",
    "algorithm_class",
    "detect_algorithm",
    "factorization",
    "make_adapter",
]
