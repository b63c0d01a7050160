"""The LoRA family on one protocol (see ``base.py``).

- ``ALGORITHMS``: name → adapter class; ``make_adapter(algorithm, base, rank=..., alpha=..., **options)``
  builds a freshly initialised adapter; ``ALGORITHMS[name].from_file_tensors(base, tensors, multiplier)``
  rebuilds one from a file;
- ``detect_algorithm(keys)``: the algorithm of one module of a file, from its relative key names.
"""

from __future__ import annotations

from collections.abc import Iterable

from lorakit.adapters.base import Adapter, AdapterFormatError, AdapterShapeError, BaseLayer
from lorakit.adapters.full import Full
from lorakit.adapters.functional import factorization
from lorakit.adapters.ia3 import IA3
from lorakit.adapters.loha import LoHa
from lorakit.adapters.lokr import LoKr
from lorakit.adapters.lora import LoRA
from lorakit.adapters.lowrank import LowRankAdapter

ALGORITHMS: dict[str, type[Adapter]] = {
    "lora": LoRA,
    "loha": LoHa,
    "lokr": LoKr,
    "ia3": IA3,
    "full": Full,
}

# other names for the same algorithms: LyCORIS's module names ("locon", "kron"), kohya's network names
ALIASES: dict[str, str] = {"locon": "lora", "kron": "lokr"}

# option names of LyCORIS / kohya network_args, read as lorakit's
_OPTION_ALIASES = {"dora_wd": "dora", "weight_decompose": "dora", "wd_on_output": "wd_on_out",
                   "train_on_input": "on_input", "bypass_mode": "bypass", "use_cp": "use_tucker",
                   "use_conv_cp": "use_tucker"}


def algorithm_class(algorithm: str) -> type[Adapter]:
    """The adapter class for a name or alias (``"locon"`` → ``LoRA``); ``ValueError`` listing the known."""
    name = ALIASES.get(algorithm.lower(), algorithm.lower())
    if name not in ALGORITHMS:
        raise ValueError(f"unknown adapter algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def make_adapter(algorithm: str, base: BaseLayer, rank: int = 4, alpha: float | None = None,
                 **options) -> Adapter:
    """A freshly initialised adapter over ``base`` (``ΔW = 0``).

    ``rank``/``alpha`` are ignored by the algorithms without them (``ia3``, ``full``).  Options: ``multiplier``,
    ``dropout``, ``rank_dropout``, ``rank_dropout_scale``, ``module_dropout`` everywhere; ``dora``,
    ``wd_on_out``, ``use_tucker`` (lora, loha, lokr); ``factor``, ``decompose_both``, ``full_matrix``,
    ``unbalanced_factorization``, ``bypass`` (lokr); ``on_input`` (ia3).  LyCORIS's names (``dora_wd``,
    ``weight_decompose``, ``train_on_input``, ``bypass_mode``, ...) are accepted too.
    """
    cls = algorithm_class(algorithm)
    options = {_OPTION_ALIASES.get(k, k): v for k, v in options.items()}
    if issubclass(cls, LowRankAdapter):
        return cls(base, rank, alpha, **options)
    return cls(base, **options)


# key → algorithm, first match wins; names outside ALGORITHMS are recognised so callers can say
# "oft is not supported" instead of "unknown keys"
_DETECTION: tuple[tuple[str, str], ...] = (
    ("hada_w1_a", "loha"),
    ("lokr_w1", "lokr"),
    ("lokr_w1_a", "lokr"),
    ("lokr_w2", "lokr"),
    ("lokr_w2_a", "lokr"),
    ("lora_up.weight", "lora"),
    ("lora_down.weight", "lora"),
    ("lora_A.weight", "lora"),
    ("lora_B.weight", "lora"),
    ("diff", "full"),
    ("on_input", "ia3"),
    ("oft_blocks", "oft"),
    ("oft_diag", "oft"),
    ("a1.weight", "glora"),
    ("w_norm", "norm"),
    ("lambda_layer", "tlora"),
)


def detect_algorithm(keys: Iterable[str]) -> str:
    """The algorithm of one module from its key names relative to the module prefix.

    Returns a name of ``ALGORITHMS`` for what lorakit can load, or one of ``"oft"``, ``"glora"``,
    ``"norm"``, ``"tlora"`` for LyCORIS algorithms it recognises but does not implement.  DoRA files are
    their base algorithm (``dora_scale`` is an option), DyLoRA files are plain LoRA files.
    Raises ``ValueError`` when nothing is recognised.
    """
    keys = set(keys)
    for key, algorithm in _DETECTION:
        if key in keys:
            return algorithm
    raise ValueError(f"no adapter algorithm recognised from keys {sorted(keys)}")


__all__ = [
    "ALGORITHMS",
    "ALIASES",
    "Adapter",
    "AdapterFormatError",
    "AdapterShapeError",
    "Full",
    "IA3",
    "LoHa",
    "LoKr",
    "LoRA",
    "LowRankAdapter",
    "algorithm_class",
    "detect_algorithm",
    "factorization",
    "make_adapter",
]
