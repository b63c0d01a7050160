"""U-Net block maps: which block a module belongs to, block-wise ranks and LoRA Block Weight strings.

SD1.x has 25 blocks in the kohya / LoRA Block Weight convention (the LDM ``input_blocks``,
``middle_block`` and ``output_blocks``, named from diffusers module paths here):

- index 0 = IN00 = ``conv_in`` (never adapted by kohya);
- ``down_blocks.i.{resnets|attentions}.j`` -> IN{1+3i+j}, ``down_blocks.i.downsamplers`` -> IN{3i+3};
- ``mid_block`` -> MID (index 12);
- ``up_blocks.i.{resnets|attentions}.j`` -> OUT{3i+j}, ``up_blocks.i.upsamplers`` -> OUT{3i+2}
  (the upsampler sits in the last LDM output block of its level, as in kohya's ``get_block_index``).

Names may be diffusers paths (``down_blocks.0.attentions.0.proj_in``) or kohya/LyCORIS file names
(``lora_unet_down_blocks_0_attentions_0_proj_in``); files carry only the latter.  Text-encoder names have
no U-Net block (LoRA Block Weight calls them BASE).  Modules outside the 25 blocks (``conv_out``,
``time_embedding``) have no block either.

SDXL has 19 (LoRA Block Weight's SDXL layout: IN00-IN08, M00, OUT00-OUT08): kohya names its modules after the LDM
U-Net (``lora_unet_input_blocks_4_1_...`` -> IN04, ``middle_block`` -> MID, ``output_blocks_i`` -> OUT0i); files
with diffusers names map as SD1.x's do, on three levels (``down_blocks.1.attentions.0`` -> IN04).

Everything architecture-specific lives in a ``BlockMap``; ``BLOCK_MAPS`` holds both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from lorakit.errors import InvalidValueError
from lorakit.network import ModuleSpec, UniformRanks, is_kxk_conv

# ---- the SD1.x 25-block map -------------------------------------------------------------------

SD1_BLOCKS: tuple[str, ...] = (
    tuple(f"IN{i:02d}" for i in range(12)) + ("MID",) + tuple(f"OUT{i:02d}" for i in range(12))
)

# prefixes a U-Net module name can carry in files or in a pipeline; stripped before matching
_UNET_PREFIXES = ("lora_unet_", "lycoris_", "unet_")
_TEXT_PREFIXES = ("lora_te", "text_encoder", "text_model_", "encoder_layers_")
_UPDOWN = re.compile(r"^(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)(?:_|$)")


def _normalise(name: str) -> str | None:
    """A U-Net module name as underscored diffusers path without prefix; None for text-encoder names."""
    flat = name.replace(".", "_")
    for prefix in _UNET_PREFIXES:
        if flat.startswith(prefix):
            flat = flat[len(prefix):]
            break
    return None if flat.startswith(_TEXT_PREFIXES) else flat


def _diffusers_index(flat: str, mid: int) -> int | None:
    """The block of a diffusers module name in a U-Net whose middle block has index ``mid`` (12 in SD1.x, 9 in
    SDXL): level i's resnets/attentions j are LDM block 3i+j+1 (down) or mid+1+3i+j (up)."""
    m = _UPDOWN.match(flat)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        # a level's sampler sits in the last LDM block of that level
        local = 3 * i + (2 if kind.endswith("samplers") else j)
        return 1 + local if side == "down" else mid + 1 + local
    if flat.startswith("mid_block_") or flat == "mid_block":
        return mid
    if flat == "conv_in" or flat.startswith("conv_in_"):
        return 0
    return None


def _sd1_index(flat: str) -> int | None:
    return _diffusers_index(flat, mid=12)


@dataclass(frozen=True)
class BlockMap:
    """The block layout of one U-Net architecture.

    ``index_of`` maps a normalised module name (underscored diffusers path) to a block index;
    ``lbw_layouts`` maps the number of values in a LoRA Block Weight string to the block ids they address
    (first id ``BASE`` = text encoder; None: a value this architecture has no block for, ignored).
    """

    arch: str
    names: tuple[str, ...]
    index_of: Callable[[str], int | None]
    lbw_layouts: Mapping[int, tuple[str | None, ...]]
    #: coarse groups of the block-wise LoRA paper: group name -> block indices
    coarse: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    #: the paper's presets on these groups: upper, middle, bottom -> the in and out groups of one resolution level
    paper: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def block_index(self, name: str) -> int | None:
        """Block index of a U-Net module (diffusers path or kohya name); None outside the blocks."""
        flat = _normalise(name)
        return None if flat is None else self.index_of(flat)

    def block_name(self, name: str) -> str | None:
        index = self.block_index(name)
        return None if index is None else self.names[index]

    def coarse_block(self, name: str) -> str | None:
        index = self.block_index(name)
        for group, indices in self.coarse.items():
            if index in indices:
                return group
        return None

    def parse_block_id(self, block_id: str) -> int:
        """'IN04', 'M00', 'MID', 'OUT11' -> index; a clear error for anything else."""
        key = block_id.strip().upper()
        key = {"M00": "MID", "MID00": "MID"}.get(key, key)
        if key not in self.names:
            raise InvalidValueError(f"unknown {self.arch} block {block_id!r}; blocks are {', '.join(self.names)}")
        return self.names.index(key)


_LBW17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
          "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
_LBW26 = ("BASE",) + SD1_BLOCKS

SD1 = BlockMap(
    arch="sd1",
    names=SD1_BLOCKS,
    index_of=_sd1_index,
    lbw_layouts={17: _LBW17, 26: _LBW26},
    # the paper's 4 + 1 + 4 scheme: in-block k = down_blocks.k, out-block k = up_blocks.k
    coarse={
        "IN0": (1, 2, 3), "IN1": (4, 5, 6), "IN2": (7, 8, 9), "IN3": (10, 11),
        "MID": (12,),
        "OUT0": (13, 14, 15), "OUT1": (16, 17, 18), "OUT2": (19, 20, 21), "OUT3": (22, 23, 24),
    },
    # upper = highest resolution: In0 + Out3
    paper={"upper": ("IN0", "OUT3"), "middle": ("IN1", "OUT2"), "bottom": ("IN2", "OUT1")},
)

# ---- the SDXL 19-block map ----------------------------------------------------------------------

SDXL_BLOCKS: tuple[str, ...] = tuple(f"IN{i:02d}" for i in range(9)) + ("MID",) + tuple(f"OUT{i:02d}" for i in range(9))
_LDM = re.compile(r"^(input_blocks|output_blocks)_(\d+)(?:_|$)")


def _sdxl_index(flat: str) -> int | None:
    m = _LDM.match(flat)
    if m:  # kohya's SDXL names: the LDM blocks themselves
        i = int(m.group(2))
        if i > 8:
            return None
        return i if m.group(1) == "input_blocks" else 10 + i
    if flat.startswith("middle_block_") or flat == "middle_block":
        return 9
    return _diffusers_index(flat, mid=9)  # diffusers names: three levels of three LDM blocks each


#: a 26-value SD1.x string on an SDXL file: the extension keeps the blocks SDXL has (IN09-IN11 and OUT09-OUT11 not)
_LBW26_ON_SDXL = tuple(None if b in ("IN09", "IN10", "IN11", "OUT09", "OUT10", "OUT11") else b for b in _LBW26)

#: the extension's 12-value SDXL shorthand: the blocks with attention layers (its BLOCKID12); every other block 0
_LBW12_SDXL = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")

SDXL = BlockMap(
    arch="sdxl",
    names=SDXL_BLOCKS,
    index_of=_sdxl_index,
    lbw_layouts={12: _LBW12_SDXL, 20: ("BASE",) + SDXL_BLOCKS, 26: _LBW26_ON_SDXL},
    # the same scheme on SDXL's three levels: in-block k = down_blocks.k, out-block k = up_blocks.k
    coarse={"IN0": (1, 2, 3), "IN1": (4, 5, 6), "IN2": (7, 8), "MID": (9,),
            "OUT0": (10, 11, 12), "OUT1": (13, 14, 15), "OUT2": (16, 17, 18)},
    # the paper's presets by resolution level (it measured SD1.x; on SDXL the top level has no attention layers)
    paper={"upper": ("IN0", "OUT2"), "middle": ("IN1", "OUT1"), "bottom": ("IN2", "OUT0")},
)

BLOCK_MAPS: dict[str, BlockMap] = {"sd1": SD1, "sdxl": SDXL}


# ---- kohya's own SDXL layout (networks/lora.py): 23 blocks -------------------------------------------------------

#: how kohya's SDXL networks number blocks for block_dims and the block learning rates: the embeddings, the 9 input
#: blocks, the middle block's three parts, the 9 output blocks, the output layers
KOHYA_SDXL_BLOCKS: tuple[str, ...] = (("EMB",) + tuple(f"IN{i:02d}" for i in range(9)) + ("MID00", "MID01", "MID02")
                                      + tuple(f"OUT{i:02d}" for i in range(9)) + ("OUT",))
_MID_PART = re.compile(r"^middle_block_(\d+)(?:_|$)")
_DIFFUSERS_MID_PART = {"resnets_0": 10, "attentions_0": 11, "resnets_1": 12}


def _kohya_sdxl_index(flat: str) -> int | None:
    if flat.startswith(("time_embed", "label_emb", "add_embedding")):
        return 0
    if flat.startswith(("out_", "conv_out", "conv_norm_out")) or flat == "out":
        return 22
    m = _MID_PART.match(flat)
    if m:
        return 10 + int(m.group(1)) if int(m.group(1)) < 3 else None
    if flat.startswith("mid_block_"):  # diffusers names: resnet, attention, resnet
        return next((i for part, i in _DIFFUSERS_MID_PART.items() if flat[len("mid_block_"):].startswith(part)),
                    None)
    index = _sdxl_index(flat)  # the 19-block map's IN00..IN08 and OUT00..OUT08, one place on
    if index is None or index == 9:
        return None
    return 1 + index if index < 9 else 13 + (index - 10)


KOHYA_SDXL = BlockMap(arch="sdxl", names=KOHYA_SDXL_BLOCKS, index_of=_kohya_sdxl_index, lbw_layouts={})


def sdxl_block_map(values: int) -> BlockMap:
    """The SDXL block map per-block values follow: kohya's 23 blocks, or LoRA Block Weight's 19 (any other count is
    the 19-block map's error to give)."""
    return KOHYA_SDXL if values == len(KOHYA_SDXL) else SDXL


def block_index(name: str, block_map: BlockMap = SD1) -> int | None:
    """Index in the 25-block list of a U-Net module name (diffusers path or kohya key prefix)."""
    return block_map.block_index(name)


def block_name(name: str, block_map: BlockMap = SD1) -> str | None:
    """'IN04', 'MID', 'OUT11', ... for a U-Net module name; None for text encoder / outside blocks."""
    return block_map.block_name(name)


def count_by_block(names: Iterable[str], block_map: BlockMap = SD1) -> dict[str, int]:
    """Module counts per block in block order; text-encoder names under 'BASE', others under 'other'."""
    counts: dict[str, int] = {}
    for name in names:
        if _normalise(name) is None:
            key = "BASE"
        else:
            key = block_map.block_name(name) or "other"
        counts[key] = counts.get(key, 0) + 1
    order = ("BASE",) + block_map.names + ("other",)
    return {k: counts[k] for k in order if k in counts}


# ---- the coarse 4 + 1 + 4 scheme of the block-wise LoRA paper -----------------------------------

def coarse_block(name: str, block_map: BlockMap = SD1) -> str | None:
    """'IN0'..'IN3', 'MID', 'OUT0'..'OUT3' for a U-Net module name; None elsewhere."""
    return block_map.coarse_block(name)


def coarse_block_dims(groups: Iterable[str] | str, dim: int, block_map: BlockMap = SD1) -> list[int]:
    """25 ``block_dims`` values: ``dim`` in the blocks of the given coarse groups (or paper preset), 0 elsewhere."""
    if isinstance(groups, str):
        if groups not in block_map.paper:
            raise InvalidValueError(f"unknown block preset {groups!r}; presets are {', '.join(block_map.paper)}")
        groups = block_map.paper[groups]
    dims = [0] * len(block_map)
    for group in groups:
        key = group.strip().upper()
        if key not in block_map.coarse:
            raise InvalidValueError(f"unknown coarse block {group!r}; blocks are {', '.join(block_map.coarse)}")
        for index in block_map.coarse[key]:
            dims[index] = dim
    return dims


# ---- kohya block_dims as a rank rule --------------------------------------------------------------

def _values(spec: Sequence[float] | str | None, n: int, what: str, cast: Callable,
            block_map: BlockMap | None = None) -> list | None:
    if spec is None:
        return None
    items = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if len(items) != n:
        which = f"{block_map.names[0]}..{block_map.names[-1]} of {block_map.arch}" if block_map else "block"
        also = (f"; or {len(KOHYA_SDXL)}, kohya's SDXL layout: EMB, IN00..IN08, MID00..MID02, OUT00..OUT08, OUT"
                if block_map is SDXL else "")
        raise InvalidValueError(f"{what} needs {n} values (one per block, {which}{also}), got {len(items)}")
    try:
        return [cast(v.strip() if isinstance(v, str) else v) for v in items]
    except ValueError as err:
        raise InvalidValueError(f"{what}: {err}") from None


@dataclass
class BlockRanks:
    """Rank rule from kohya's ``block_dims`` / ``block_alphas`` / ``conv_block_dims`` / ``conv_block_alphas``.

    Each takes one value per block of ``block_map`` (25 for SD1.x, 19 for SDXL; a list or a comma-separated
    string); a dim of 0
    leaves the block's modules out.  As in kohya: Linear and 1x1 conv layers use ``block_dims``; k x k convs
    use ``conv_block_dims`` and are left out when it is not given; missing alphas default to ``alpha`` /
    ``conv_alpha``.  Modules outside the U-Net blocks (the text encoder, ``conv_out``, ...) go to
    ``outside`` (None: left out), so a text-encoder rank can be given there.
    """

    block_dims: Sequence[int] | str
    block_alphas: Sequence[float] | str | None = None
    conv_block_dims: Sequence[int] | str | None = None
    conv_block_alphas: Sequence[float] | str | None = None
    alpha: float = 1.0
    conv_alpha: float = 1.0
    outside: Callable[[str, nn.Module], ModuleSpec | None] | None = None
    block_map: BlockMap = SD1

    def __post_init__(self) -> None:
        n, where = len(self.block_map), self.block_map
        self.dims = _values(self.block_dims, n, "block_dims", int, where)
        self.alphas = _values(self.block_alphas, n, "block_alphas", float, where) or [self.alpha] * n
        self.conv_dims = _values(self.conv_block_dims, n, "conv_block_dims", int, where)
        self.conv_alphas = (_values(self.conv_block_alphas, n, "conv_block_alphas", float, where)
                            or [self.conv_alpha] * n)

    def __call__(self, name: str, layer: nn.Module) -> ModuleSpec | None:
        index = self.block_map.block_index(name)
        if index is None:
            return self.outside(name, layer) if self.outside is not None else None
        if is_kxk_conv(layer):
            if self.conv_dims is None or self.conv_dims[index] == 0:
                return None
            return ModuleSpec(self.conv_dims[index], self.conv_alphas[index])
        if self.dims[index] == 0:
            return None
        return ModuleSpec(self.dims[index], self.alphas[index])

    def network_args(self) -> dict[str, str]:
        """The kohya ``ss_network_args`` entries that describe this rule."""
        args = {"block_dims": _join(self.dims), "block_alphas": _join(self.alphas)}
        if self.conv_dims is not None:
            args["conv_block_dims"] = _join(self.conv_dims)
            args["conv_block_alphas"] = _join(self.conv_alphas)
        return args


def _join(values: Iterable[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def paper_block_ranks(preset: str, rank: int, alpha: float, conv_rank: int | None = None,
                      conv_alpha: float | None = None, text_encoder: bool = False) -> BlockRanks:
    """Block-wise LoRA of the paper: train only the blocks of ``preset`` ('upper', 'middle', 'bottom').

    ``text_encoder=True`` keeps the text encoder at ``rank``/``alpha`` (the paper trains the U-Net only).
    """
    conv_dims = coarse_block_dims(preset, conv_rank) if conv_rank else None
    outside = UniformRanks(rank, alpha) if text_encoder else None
    return BlockRanks(coarse_block_dims(preset, rank), alpha=alpha, conv_block_dims=conv_dims,
                      conv_alpha=conv_alpha if conv_alpha is not None else alpha,
                      outside=text_encoder_only(outside) if outside else None)


def text_encoder_only(rule: UniformRanks) -> Callable[[str, nn.Module], ModuleSpec | None]:
    def only_text(name: str, layer: nn.Module) -> ModuleSpec | None:
        return rule(name, layer) if _normalise(name) is None else None
    return only_text


# ---- LoRA Block Weight ----------------------------------------------------------------------------

#: presets of the sd-webui-lora-block-weight extension (17 values: BASE, IN01 ... OUT11)
LBW_PRESETS: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}


@dataclass(frozen=True)
class BlockWeights:
    """Per-module multipliers from a LoRA Block Weight string; call it with a module name.

    ``base`` applies to the text encoder, ``blocks`` (one per block of ``block_map``) to the U-Net.
    Blocks a short string does not list get 0, as in the extension (a 17-value string on a LoCon file
    switches off IN00, IN03, IN06, IN09-IN11 and OUT00-OUT02).  U-Net modules outside every block
    (``conv_out``, ``time_embedding``) keep ``outside``.
    """

    base: float
    blocks: tuple[float, ...]
    outside: float = 1.0
    block_map: BlockMap = SD1

    def __call__(self, name: str) -> float:
        if _normalise(name) is None:
            return self.base
        index = self.block_map.block_index(name)
        return self.outside if index is None else self.blocks[index]

    def by_block(self) -> dict[str, float]:
        return {"BASE": self.base, **dict(zip(self.block_map.names, self.blocks, strict=True))}


def parse_block_weights(spec: str | Sequence[float], block_map: BlockMap = SD1,
                        presets: Mapping[str, str] = LBW_PRESETS) -> BlockWeights:
    """Parse '1,0,0,...' (17 or 26 values for SD1.x; 12, 20, or SD1.x's 26, for SDXL) or a preset name ('ALL',
    'MIDD', ...: SD1.x's 17-value strings)."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.upper() in {k.upper() for k in presets}:
            text = next(v for k, v in presets.items() if k.upper() == text.upper())
        items: list = [t for t in text.split(",")]
    else:
        items = list(spec)
    layout = block_map.lbw_layouts.get(len(items))
    if layout is None:
        counts = [str(n) for n in sorted(block_map.lbw_layouts)]
        sizes = ", ".join(counts[:-1]) + " or " + counts[-1] if len(counts) > 1 else counts[0]
        fitting = [k for k, v in presets.items() if len(v.split(",")) in block_map.lbw_layouts]
        named = f" (or is one of {', '.join(fitting)})" if fitting else ""
        raise InvalidValueError(f"a {block_map.arch} block-weight string has {sizes} values{named}, got "
                                f"{len(items)}: {spec!r}")
    try:
        values = [float(v) for v in items]
    except ValueError:
        raise InvalidValueError(f"block weights must be numbers: {spec!r}") from None
    if not all(math.isfinite(v) for v in values):  # nan or inf would turn the block's images to noise
        raise InvalidValueError(f"block weights must be finite numbers: {spec!r}")
    blocks = [0.0] * len(block_map)
    for block_id, value in zip(layout[1:], values[1:], strict=True):
        if block_id is not None:  # None: a block of another architecture's layout this one lacks
            blocks[block_map.parse_block_id(block_id)] = value
    return BlockWeights(base=values[0], blocks=tuple(blocks), block_map=block_map)


# ---- the paper's blocks as a training option ---------------------------------------------------------

def coarse_groups(spec: str | Iterable[str], block_map: BlockMap = SD1) -> tuple[str, ...]:
    """'upper', 'upper,middle', 'all', 'IN0,OUT3' -> the coarse groups they name (paper presets or group names)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [s.strip() for s in spec]
    groups: list[str] = []
    for item in items:
        key = item.lower()
        if key == "all":
            chosen: Iterable[str] = block_map.coarse
        elif key in block_map.paper:
            chosen = block_map.paper[key]
        elif item.upper() in block_map.coarse:
            chosen = (item.upper(),)
        else:
            raise ValueError(f"unknown blocks {item!r}: use upper, middle, bottom, all or coarse blocks "
                             f"({', '.join(block_map.coarse)}), comma-separated")
        groups += [g for g in chosen if g not in groups]
    if not groups:
        raise ValueError("blocks: name at least one of upper, middle, bottom, all")
    return tuple(groups)


def blocks_block_dims(spec: str | Iterable[str], dim: int, block_map: BlockMap = SD1) -> list[int]:
    """``block_dims`` for ``--blocks`` (SD1.x: 25, SDXL: 19): ``dim`` in the named coarse groups, 0 (no module)
    elsewhere."""
    return coarse_block_dims(coarse_groups(spec, block_map), dim, block_map)


# ---- kohya's per-block learning-rate weights --------------------------------------------------------------

#: kohya's ramps over the 12 down (or up) blocks, optionally '+base' (e.g. 'sine+.5')
LR_RAMPS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
_SIDE = 12  # SD1.x blocks per side (down: IN00..IN11, up: OUT00..OUT11)


def lr_weight_list(spec: str | Sequence[float], what: str = "lr weight", side: int = _SIDE) -> list[float]:
    """``side`` weights (12 on SD1.x, 9 on SDXL) from a kohya ``down_lr_weight``/``up_lr_weight``: a ramp name
    (+ offset) or up to ``side`` numbers.

    Values run in block order: IN00..IN11 (shallow to deep) or OUT00..OUT11 (deep to shallow).  Ramps:
    ``sine`` 0 -> 1, ``cosine`` 1 -> 0 (quarter periods), ``linear`` 0 -> 1, ``reverse_linear`` 1 -> 0, ``zeros``;
    ``+x`` adds ``x`` to each.  A shorter list is filled with 1, as kohya does; a longer one is an error.
    """
    import math

    if isinstance(spec, str):
        text = spec.strip()
        name, _, offset = text.partition("+")
        if name in LR_RAMPS:
            try:
                base = float(offset) if offset else 0.0
            except ValueError:
                raise ValueError(f"{what}: cannot read the offset of {spec!r}") from None
            steps = [i / (side - 1) for i in range(side)]
            ramp = {"sine": [math.sin(math.pi * s / 2) for s in steps],
                    "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
                    "linear": steps, "reverse_linear": list(reversed(steps)), "zeros": [0.0] * side}[name]
            return [v + base for v in ramp]
        items: list = [t for t in text.split(",") if t.strip()]
    else:
        items = list(spec)
    return _filled(items, side, what, f"up to {side} numbers, one per block of that side, or one of "
                                      f"{', '.join(LR_RAMPS)}")


def _filled(items: Sequence, n: int, what: str, expected: str) -> list[float]:
    """``items`` as numbers, filled with 1 up to ``n`` as kohya fills them; ValueError naming ``what``."""
    try:
        values = [float(v) for v in items]
    except ValueError:
        raise ValueError(f"{what}: {','.join(map(str, items))!r}: expected {expected}") from None
    if len(values) > n:
        raise ValueError(f"{what}: {len(values)} values, at most {n} (expected {expected})")
    return values + [1.0] * (n - len(values))


@dataclass(frozen=True)
class BlockLrWeights:
    """kohya's ``down_lr_weight`` / ``mid_lr_weight`` / ``up_lr_weight``: a learning-rate factor per U-Net block.

    Weights at or below ``zero_threshold`` become 0, and a block of weight 0 gets no modules at all.
    Text-encoder modules and U-Net modules outside the blocks keep factor 1.  ``blocks`` holds one value per
    block of ``block_map``: SD1.x's 25, or kohya's 23 SDXL blocks (its embeddings and output layers at 1).
    """

    blocks: tuple[float, ...]
    block_map: BlockMap = SD1

    def __call__(self, name: str) -> float:
        if _normalise(name) is None:
            return 1.0
        index = self.block_map.block_index(name)
        return 1.0 if index is None else self.blocks[index]

    def network_args(self) -> dict[str, str]:
        side, mids, first = _lr_layout(self.block_map)
        down, mid = self.blocks[first:first + side], self.blocks[first + side:first + side + mids]
        up = self.blocks[first + side + mids:first + 2 * side + mids]
        return {"down_lr_weight": _join(down), "mid_lr_weight": _join(mid), "up_lr_weight": _join(up)}


def _lr_layout(block_map: BlockMap) -> tuple[int, int, int]:
    """(blocks per side, middle parts, index of the first down block) of kohya's block learning rates."""
    if block_map is SD1:
        return _SIDE, 1, 0
    if block_map is KOHYA_SDXL:
        return 9, 3, 1
    raise ValueError(f"block learning-rate weights follow SD1.x's 25 blocks or kohya's 23 SDXL blocks, not the "
                     f"{len(block_map)} of {block_map.arch}'s map")


def parse_block_lr_weights(down: str | Sequence[float] | None = None, mid: float | str | None = None,
                           up: str | Sequence[float] | None = None, zero_threshold: float = 0.0,
                           block_map: BlockMap = SD1) -> BlockLrWeights | None:
    """The weights from kohya's three options (None when none is given), on SD1.x's blocks or (``block_map``
    ``SDXL`` or ``KOHYA_SDXL``) on kohya's SDXL ones: 9 per side, and up to 3 middle values (its middle block's
    resnet, attention, resnet), as kohya's networks read them."""
    if down is None and mid is None and up is None:
        return None
    block_map = KOHYA_SDXL if block_map is SDXL else block_map
    side, mids, first = _lr_layout(block_map)
    middle = [1.0] * mids if mid is None else _filled(
        str(mid).replace(" ", "").split(",") if isinstance(mid, str) else [mid], mids, "mid_lr_weight",
        f"up to {mids} numbers, one per part of the middle block" if mids > 1 else
        "one number: SD1.x's middle block is one block")
    given = ((lr_weight_list(down, "down_lr_weight", side) if down is not None else [1.0] * side) + middle
             + (lr_weight_list(up, "up_lr_weight", side) if up is not None else [1.0] * side))
    # kohya's SDXL embeddings and output layers stay at 1, whatever the threshold
    values = [1.0] * first + [v if v > zero_threshold else 0.0 for v in given]
    return BlockLrWeights(tuple(values + [1.0] * (len(block_map) - len(values))), block_map)


@dataclass
class WithoutZeroBlocks:
    """A rank rule with the modules of blocks whose learning-rate weight is 0 left out (rank 0: no key)."""

    rule: Callable[[str, nn.Module], ModuleSpec | None]
    weights: BlockLrWeights

    def __call__(self, name: str, layer: nn.Module) -> ModuleSpec | None:
        return None if self.weights(name) == 0 else self.rule(name, layer)

    def network_args(self) -> dict[str, str]:
        describe = getattr(self.rule, "network_args", None)
        return {**(describe() if callable(describe) else {}), **self.weights.network_args()}

    # a file's rule (dim_from_weights) also says which norm layers get an update: asked through this one
    @property
    def chooses_norms(self) -> bool:
        return bool(getattr(self.rule, "chooses_norms", False))

    def holds_norms(self) -> bool:
        return bool(getattr(self.rule, "holds_norms", lambda: False)())


# ---- kohya's block_lr (sdxl_train.py): a learning rate per block of the whole U-Net, for native fine-tuning ------

def _ldm_block_counts(modules: Mapping[str, str]) -> tuple[int, int]:
    """How many LDM input and output blocks a U-Net's module map (``ldm.unet_module_map``) names."""
    def count(kind: str) -> int:
        return 1 + max(int(n.split(".")[1]) for n in modules.values() if n.startswith(kind + "."))

    return count("input_blocks"), count("output_blocks")


def fine_tune_block_count(unet_config: Mapping) -> int:
    """How many learning rates kohya's ``block_lr`` takes for this U-Net: the time (and SDXL's label) embeddings,
    each LDM input block, the middle block's three parts, each output block, the output layers (SDXL: 23)."""
    from lorakit.ldm import unet_module_map

    inputs, outputs = _ldm_block_counts(unet_module_map(unet_config))
    return 1 + inputs + 3 + outputs + 1


def fine_tune_blocks_of(parameters: Iterable[str], unet_config: Mapping) -> dict[str, int]:
    """Each U-Net parameter's (diffusers name) index in kohya's ``block_lr`` order, by its LDM name as kohya's
    ``get_block_params_to_optimize`` reads it: 0 time/label embeddings, then input blocks, middle block parts, output
    blocks, and the output layers last.  The module map and block counts are made once for all of them."""
    from lorakit.ldm import ldm_module_path, unet_module_map

    modules = unet_module_map(unet_config)
    inputs, outputs = _ldm_block_counts(modules)
    first = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 1 + inputs,
             "output_blocks": 1 + inputs + 3, "out": 1 + inputs + 3 + outputs}
    found = {}
    for parameter in parameters:
        name = ldm_module_path(parameter, modules)
        kind, _, rest = name.partition(".")
        if kind not in first:
            raise ValueError(f"U-Net parameter {parameter!r} ({name}) is in none of kohya's blocks")
        numbered = kind in ("input_blocks", "middle_block", "output_blocks")
        found[parameter] = first[kind] + (int(rest.split(".")[0]) if numbered else 0)
    return found
