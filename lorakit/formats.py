"""Adapter files: kohya/LyCORIS ``.safetensors`` keys and ``ss_*`` metadata, read, written and loaded.

A file maps ``<module name>.<tensor key>`` to tensors, e.g.
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``; the module
name is ``lora_unet_`` / ``lora_te_`` (SDXL ``lora_te1_`` / ``lora_te2_``) + the module path with
``.`` -> ``_``; LyCORIS's own wrapper writes ``lycoris_`` + the path.  Because ``_`` also occurs inside
module names, a name is resolved against the names the model's own modules produce, never by guessing
where the dots were.  Files in the diffusers/PEFT layout (``unet.<path>.lora_A.weight``, what diffusers'
``save_lora_weights`` writes) are seen under kohya names too (``AdapterFile.modules``, ``lorakit.diffusers_format``)
and can be written with ``save_network(..., format="diffusers")``.

Only safetensors is read: pickles (``.pt``, ``.ckpt``, ``.bin``) are refused, never unpickled.
Writes are atomic (a temporary file in the same folder, then a rename) and never replace an existing file
unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from lorakit.adapters import ALGORITHMS, ALIASES, KNOWN, algorithm_class
from lorakit.adapters import detect_algorithm as registry_detect
from lorakit.adapters.base import Adapter, AdapterFormatError
from lorakit.adapters.lowrank import LowRankAdapter
from lorakit.atomic import DestinationExistsError, atomic_write
from lorakit.blocks import BLOCK_MAPS, SD1, BlockMap
from lorakit.errors import LorakitError, WrongBaseModelError
from lorakit.file_kinds import NotAnAdapterError, check_adapter_path
from lorakit.metadata import metadata_value, ss_metadata, version_metadata
from lorakit.network import (
    LYCORIS_PREFIX,
    AdapterNetwork,
    Component,
    ModuleSpec,
    RankRule,
    adaptable_layers,
    components,
    is_kxk_conv,
    kohya_name,
)


class AdapterFileError(LorakitError, ValueError):
    """A file cannot be read or does not fit the model; the message names the file and the key."""


class AdapterFitError(AdapterFileError, WrongBaseModelError):
    """A readable adapter file whose modules do not fit the model it is loaded into (another architecture or size)."""


class AdapterFileNotFoundError(AdapterFileError, FileNotFoundError):
    """The adapter file does not exist."""


# ---- reading ------------------------------------------------------------------------------------------

@dataclass
class AdapterFile:
    """The tensors and string metadata of one adapter file (``path`` None when built in memory)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "<in memory>"

    @property
    def layout(self) -> str:
        """'kohya' (kohya/LyCORIS names: ``lora_unet_...``) or 'diffusers' (diffusers/PEFT: ``unet....lora_A``)."""
        from lorakit.diffusers_format import is_diffusers_layout

        return "diffusers" if is_diffusers_layout(self.tensors) else "kohya"

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors grouped by module name: {'lora_unet_..._to_q': {'lora_down.weight': ..., 'alpha': ...}}.

        Keys without a dot (no module, e.g. an embedding) are left out; see ``loose_keys``.  A file in the
        diffusers/PEFT layout is seen under kohya names and keys (``lorakit.diffusers_format``).
        """
        if self.layout == "diffusers":
            from lorakit.diffusers_format import kohya_modules

            return kohya_modules(self.tensors, self.metadata)[0]
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            module, dot, rel = key.partition(".")
            if dot:
                grouped.setdefault(module, {})[rel] = tensor
        return grouped

    def loose_keys(self) -> list[str]:
        if self.layout == "diffusers":
            from lorakit.diffusers_format import kohya_modules

            return kohya_modules(self.tensors, self.metadata)[1]
        return [k for k in self.tensors if "." not in k]


def _sniff(path: Path, head: bytes, size: int) -> None:
    """Refuse pickles and zip checkpoints by their first bytes, whatever the file is called."""
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return  # a safetensors header (its length can start with b"\x80\x03" too)
    # a pickle: PROTO opcode, protocol 2-5, then another opcode (never 0, unlike a short header length)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[2:3] not in (b"", b"\x00"):
        kind = "a Python pickle"
    elif head[:4] == b"PK\x03\x04":
        kind = "a PyTorch zip checkpoint (pickle inside)"
    else:
        return
    raise AdapterFileError(f"{path}: {kind} (.pt/.ckpt/.bin), not safetensors; lorakit never unpickles "
                           "files, since unpickling runs code. Convert it to .safetensors with a tool you trust")


def check_safetensors_header(path: str | os.PathLike) -> None:
    """Raise AdapterFileError naming ``path`` when it is a pickle or no readable safetensors file, from its first
    bytes and header alone (commands check what they were given before loading a model)."""
    path = Path(path)
    with open(path, "rb") as f:
        _sniff(path, f.read(9), path.stat().st_size)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.metadata()
    except Exception as err:  # SafetensorError (not public API) and whatever else; name the file in any case
        raise AdapterFileError(f"{path}: not a safetensors file, or a truncated or corrupt one ({err})") from err


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating tensors holding NaN or an infinity (a run that diverged, fp16 overflow on save)."""
    # fp8 tensors (files saved in float8_e4m3fn/e5m2) have no isfinite of their own: checked as float32
    return sorted(k for k, t in tensors.items() if t.is_floating_point()
                  and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all()))


def read_adapter(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> AdapterFile:
    """Read a ``.safetensors`` adapter file (kohya or LyCORIS keys), checking it before loading: a file whose tensors
    hold NaN or infinities is refused (it draws black or noise images, and a merge would spread it into a model)
    unless ``allow_nonfinite`` (``lorakit inspect``, which reports them)."""
    path = Path(path)
    if path.is_dir():  # said as a folder (a run folder: which file to give), not as a missing file
        try:
            check_adapter_path(path)
        except NotAnAdapterError as err:
            raise AdapterFileError(str(err)) from None
    if not path.is_file():
        raise AdapterFileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        _sniff(path, f.read(9), path.stat().st_size)  # before safetensors sees it: a pickle is named as one
    try:  # a model, a model component or an embedding: said from the header, before gigabytes are read
        check_adapter_path(path)
    except NotAnAdapterError as err:
        raise AdapterFileError(str(err)) from None
    try:
        # safetensors checks the header against the file (a truncated or corrupt file fails here, whole)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # SafetensorError (not public API) and whatever else; name the file in any case
        raise AdapterFileError(f"{path}: not a safetensors file, or a truncated or corrupt one ({err})") from err
    from lorakit.diffusers_format import (
        METADATA_KEY,
        PEFT_CONFIG_NAME,
        SCALE_SOURCE_KEY,
        is_diffusers_layout,
        peft_folder_config,
    )

    metadata = {str(k): str(v) for k, v in metadata.items()}
    if METADATA_KEY not in metadata and is_diffusers_layout(tensors):  # PEFT's save_pretrained: the scale beside
        try:
            peft_config = peft_folder_config(path)
        except ValueError as err:
            raise AdapterFileError(str(err)) from None
        if peft_config:
            metadata[METADATA_KEY] = json.dumps(peft_config)
            metadata[SCALE_SOURCE_KEY] = PEFT_CONFIG_NAME
    if not allow_nonfinite and (broken := nonfinite_tensors(tensors)):
        raise AdapterFileError(f"{path}: {len(broken)} of {len(tensors)} tensors hold NaN or infinite values (e.g. "
                               f"{broken[0]}): the file is broken (its training diverged, or fp16 overflowed when it "
                               "was saved) and would draw black or noise images; lorakit inspect lists them")
    return AdapterFile(tensors, metadata, path)


# ---- writing ------------------------------------------------------------------------------------------

def write_adapter(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False,
                  dtype: torch.dtype | None = None) -> Path:
    """Write tensors (+ metadata, values turned into strings) to ``path`` atomically.

    ``dtype`` converts floating tensors (e.g. ``torch.float16`` for distribution).  An existing file is
    replaced only with ``overwrite=True``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapter files must end in .safetensors")
    if path.exists() and not overwrite:
        raise DestinationExistsError(f"{path} exists; pass overwrite=True to replace it")
    data = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        data[key] = tensor.contiguous().clone()  # own storage: safetensors refuses shared tensors
    meta = {str(k): metadata_value(v) for k, v in (metadata or {}).items()}
    # with overwrite=False a file that appeared while writing is not replaced either (lorakit.atomic)
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(data, str(tmp), metadata=meta),
                        overwrite=overwrite)


# ---- what a file holds -----------------------------------------------------------------------------------

# the blocks and names that tell base models apart: cross-attention width of the U-Net, CLIP width
_CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_WIDTH = {768: "sd1", 1024: "sd2"}


def detect_algorithm(relative_keys: Iterable[str]) -> str:
    """The algorithm of one module from its tensor keys ('lora', 'loha', 'lokr', 'oft', ...; 'unknown')."""
    try:
        return registry_detect(relative_keys)
    except ValueError:
        return "unknown"


def module_rank(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """Rank of one module from its tensors; None for rankless algorithms (IA3, full, full-matrix LoKr)."""
    for spec in KNOWN.values():  # each algorithm names its own rank keys (LoRA: lora_down.weight)
        for key in spec.rank_keys:
            if key in tensors:
                return int(tensors[key].shape[0])
    return None


def module_alpha(tensors: Mapping[str, torch.Tensor]) -> float | None:
    """The stored alpha, or None when the file has none (then alpha = rank)."""
    alpha = tensors.get("alpha")
    return None if alpha is None else float(alpha.float().reshape(-1)[0])


def component_of(module_name: str) -> str:
    """'unet', 'text_encoder', 'text_encoder_1', 'text_encoder_2' or 'unknown' from a module name."""
    for prefix, comp in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder_1"), ("lora_te2_", "text_encoder_2"),
                         ("lora_te_", "text_encoder")):
        if module_name.startswith(prefix):
            return comp
    if module_name.startswith(LYCORIS_PREFIX + "_"):
        rest = module_name[len(LYCORIS_PREFIX) + 1:]
        return "text_encoder" if rest.startswith(("text_model_", "encoder_layers_")) else "unet"
    return "unknown"


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    component: str
    algorithm: str
    rank: int | None
    alpha: float | None
    block: str | None
    dtypes: tuple[str, ...]


def describe_modules(file: AdapterFile, block_map: BlockMap = SD1) -> list[ModuleInfo]:
    """Algorithm, rank, alpha and block of every module of a file."""
    infos = []
    for name, tensors in file.modules().items():
        comp = component_of(name)
        infos.append(ModuleInfo(
            name=name,
            component=comp,
            algorithm=detect_algorithm(tensors),
            rank=module_rank(tensors),
            alpha=module_alpha(tensors),
            block=block_map.block_name(name) if comp == "unet" else None,
            dtypes=tuple(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})),
        ))
    return infos


def guess_base_model(file: AdapterFile) -> str | None:
    """'sd1', 'sd2' or 'sdxl' from the file's names and widths; None when nothing tells."""
    modules = file.modules()
    ldm_names = any(n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for n in modules)
    te1 = any(n.startswith("lora_te1_") for n in modules)  # alone, also what diffusers' converter writes for SD1
    if any(n.startswith("lora_te2_") for n in modules) or (te1 and ldm_names):
        return "sdxl"
    for name, tensors in modules.items():
        if name.endswith("attn2_to_k") or name.endswith("attn2_to_v"):
            width = _input_width(tensors)
            if width in _CROSS_ATTN_WIDTH:
                return _CROSS_ATTN_WIDTH[width]
    for name, tensors in modules.items():
        if name.startswith(("lora_te_", "lora_te1_")) and name.endswith("self_attn_q_proj"):
            width = _input_width(tensors)
            if width in _TE_WIDTH:
                return _TE_WIDTH[width]
    if any(n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for n in modules):
        return "sdxl"  # kohya names SDXL modules after the LDM U-Net, SD1.x after diffusers
    return None


def block_map_of(file: AdapterFile) -> BlockMap:
    """The U-Net block map a file's module names follow: SDXL's for an SDXL file, else SD1.x's (SD2 shares it)."""
    return BLOCK_MAPS["sdxl"] if guess_base_model(file) == "sdxl" else SD1


def _input_width(tensors: Mapping[str, torch.Tensor]) -> int | None:
    for spec in KNOWN.values():
        for key in spec.width_keys:
            if key in tensors:
                return int(tensors[key].shape[1])
    return None


# ---- metadata -----------------------------------------------------------------------------------------------

def training_metadata(**fields: Any) -> dict[str, str]:
    """kohya ``ss_*`` entries from keyword arguments; see ``lorakit.metadata.ss_metadata``."""
    return ss_metadata(**fields)


def _most_common(values: Iterable[Any]) -> Any:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def network_metadata(network: AdapterNetwork, base_model_version: str = "sd_v1") -> dict[str, str]:
    """The ``ss_*`` entries that describe a network, as kohya / LyCORIS write them, plus ``lorakit_*``."""
    algos = {a.algorithm for a in network.adapters.values()}
    # network_dim/alpha as kohya records them: the setting of the linear (and 1×1) layers, read from the
    # adapters themselves (conv_dim/conv_alpha go in ss_network_args); rankless algorithms have none
    adapters = list(network.adapters.values())
    linear = [a for a in adapters if not is_kxk_conv(a.base)] or adapters
    low_rank = [a for a in linear if isinstance(a, LowRankAdapter)]
    rank = _most_common(a.rank for a in low_rank)
    alpha = _most_common(float(a.alpha) for a in low_rank)
    args = {k: v for k, v in network.args.items() if k != "preset"}
    dora = any("dora_scale" in a.file_tensors() for a in network.adapters.values())
    if algos <= {"lora"} and not dora:
        module = "networks.lora"  # kohya's own LoRA / LoCon
        args.pop("algo", None)
    elif algos == {"dylora"}:
        module = "networks.dylora"  # kohya's DyLoRA: a plain LoRA file, its block size as network_args unit
        args.pop("algo", None)
        args.pop("block_size", None)
        args["unit"] = str(_most_common(a.block_size for a in adapters))
    else:
        module = "lycoris.kohya"  # how kohya + LyCORIS record LoHa, LoKr, DoRA, ...
        args["algo"] = args.get("algo") or (_most_common(a.algorithm for a in network.adapters.values()) or "")
        cls = ALGORITHMS.get(ALIASES.get(args["algo"].lower(), args["algo"].lower()))
        if cls is not None and cls.lycoris_algo:  # LyCORIS's own name (OFT is "diag-oft" there)
            args["algo"] = cls.lycoris_algo
        if dora:
            args["dora_wd"] = "True"
            # the norm axis, under LyCORIS's argument name (its default is rows; lorakit's input columns)
            args["wd_on_output"] = str(any(getattr(a, "wd_on_out", False) for a in network.adapters.values()
                                           if getattr(a, "dora_scale", None) is not None))
    return {
        **ss_metadata(network_module=module, network_dim=str(rank),
                      network_alpha=f"{alpha:g}" if alpha is not None else "None", network_args=json.dumps(args),
                      base_model_version=base_model_version, v2=base_model_version.startswith("sd_v2")),
        **version_metadata(),
        "lorakit_preset": network.args.get("preset", ""),
        "lorakit_algorithm": ",".join(sorted(algos)),
    }


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` as kohya precomputes them for sd-webui-additional-networks.

    Both hash the file as it would be with only the ``ss_*`` metadata, so adding other metadata later
    does not change them.
    """
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, ss)
    (n,) = struct.unpack("<Q", blob[:8])
    buf = BytesIO(blob)
    buf.seek(0x100000)
    legacy = hashlib.sha256(buf.read(0x10000)).hexdigest()[:8]
    return {"sshs_model_hash": hashlib.sha256(blob[8 + n:]).hexdigest(), "sshs_legacy_hash": legacy}


def save_network(network: AdapterNetwork, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
                 *, base_model_version: str = "sd_v1", overwrite: bool = False,
                 dtype: torch.dtype | None = None, format: str = "kohya") -> Path:
    """Write a network's tensors with ``ss_*``/``lorakit_*`` metadata (``metadata`` wins).

    ``format``: ``"kohya"`` (kohya/LyCORIS names, every algorithm; what A1111, ComfyUI and LyCORIS read) or
    ``"diffusers"`` (diffusers/PEFT names as ``save_lora_weights`` writes them; plain LoRA/LoCon only, the
    scale folded into ``lora_B``; see ``lorakit.diffusers_format``).
    """
    if format not in ("kohya", "diffusers"):
        raise ValueError(f"unknown adapter file format {format!r}; formats: kohya, diffusers")
    extra: dict[str, str] = {}
    if format == "diffusers":
        from lorakit.diffusers_format import NotDiffusersCompatible, diffusers_tensors

        try:
            tensors, extra = diffusers_tensors(network)
        except NotDiffusersCompatible as err:
            raise AdapterFileError(f"{path}: {err}") from None
        extra["lorakit_format"] = "diffusers"
    else:
        tensors = network.file_tensors()
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = network_metadata(network, base_model_version)
    meta.update(extra)
    meta.update({k: metadata_value(v) for k, v in (metadata or {}).items()})
    meta.update(model_hashes(tensors, meta))
    return write_adapter(path, tensors, meta, overwrite=overwrite)


# ---- loading into a model ---------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What happened to each module of a file when it was loaded into a model."""

    source: str
    matched: list[str] = field(default_factory=list)
    #: module names of the file with no layer in the model (another architecture, or a typo)
    unmatched: list[str] = field(default_factory=list)
    #: module names for a model that was not given (e.g. text-encoder modules when loading the U-Net only)
    skipped: list[str] = field(default_factory=list)
    #: module name -> why its tensors do not fit the layer (names the key and both shapes)
    mismatched: dict[str, str] = field(default_factory=dict)
    #: module name -> why no adapter could be built (unknown algorithm)
    unsupported: dict[str, str] = field(default_factory=dict)
    #: module name -> the earlier module name of the file for the same layer (e.g. lora_unet_X and lycoris_X)
    duplicates: dict[str, str] = field(default_factory=dict)
    #: keys that belong to no module at all (no dot in the key)
    loose_keys: list[str] = field(default_factory=list)
    file_base_model: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.mismatched or self.unsupported or self.loose_keys or self.duplicates)

    def problems(self) -> list[str]:
        lines = []
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} module(s) of the file name no layer of the model, "
                         f"e.g. {self.unmatched[0]!r}")
        for name, why in list(self.mismatched.items())[:3]:
            lines.append(f"{name}.{why}")
        if len(self.mismatched) > 3:
            lines.append(f"... {len(self.mismatched) - 3} more shape mismatches")
        for name, why in list(self.unsupported.items())[:3]:
            lines.append(f"{name}: {why}")
        for name, first in list(self.duplicates.items())[:3]:
            lines.append(f"{name!r} names the same layer as {first!r} (two adapters for one layer; two files "
                         "joined into one?)")
        if len(self.duplicates) > 3:
            lines.append(f"... {len(self.duplicates) - 3} more modules that name a layer twice")
        if self.loose_keys:
            lines.append(f"{len(self.loose_keys)} key(s) belong to no module, e.g. {self.loose_keys[0]!r}")
        return lines

    def summary(self) -> str:
        parts = [f"{len(self.matched)} modules loaded"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (model not given)")
        parts += self.problems()
        return f"{self.source}: " + "; ".join(parts)


def _lookup(comps: Sequence[Component]) -> dict[str, tuple[Component, str]]:
    """Every name a file may use for a layer of the given models -> (component, module path)."""
    table: dict[str, tuple[Component, str]] = {}
    for comp in comps:
        for path, _ in adaptable_layers(comp):
            names = {comp.kohya_name(path), kohya_name(comp.prefix, path)}  # also raw transformers-5 paths
            if comp.group in ("unet", "text_encoder"):
                # LyCORIS's own wrapper names the path of the model it wrapped: transformers 4 or 5 layout
                names |= {kohya_name(LYCORIS_PREFIX, path), kohya_name(LYCORIS_PREFIX, comp.canonical_path(path))}
            for name in names:
                other = table.get(name)
                if other is not None and other != (comp, path):
                    raise ValueError(f"two layers share the file name {name!r}: {other[1]!r}, {path!r}")
                table[name] = (comp, path)
    return table


def _given(name: str, comps: Sequence[Component]) -> bool:
    """Whether the model a module name is meant for was given at all."""
    kind = component_of(name)
    if kind == "unet":
        return any(not c.is_text_encoder for c in comps)
    if kind.startswith("text_encoder"):
        return any(c.is_text_encoder for c in comps)
    return True  # unknown prefixes are always reported


def load_network(source: str | os.PathLike | AdapterFile, unet: nn.Module | None = None,
                 text_encoder: nn.Module | Sequence[nn.Module] | None = None, *, multiplier: float = 1.0,
                 strict: bool = True) -> tuple[AdapterNetwork, LoadReport]:
    """Load an adapter file into the U-Net and/or text encoder(s); return the network and a report.

    Each module name is looked up among the names the model's own layers produce; the algorithm comes
    from the module's keys and its adapter is built with ``from_file_tensors``.  Everything is planned
    (names, shapes, algorithms, two names for one layer) before anything is attached.  With ``strict``
    (default) any module that names no layer, does not fit its layer, has an unknown algorithm or names a
    layer another module of the file already names raises ``AdapterFileError`` naming the file and key, and
    the model is left untouched (same modules, same ``requires_grad`` flags); otherwise the modules that fit
    are loaded and the rest is listed in the report.  Modules for a model not given (the text encoder when
    only ``unet`` is passed) are skipped and listed.
    """
    file = source if isinstance(source, AdapterFile) else read_adapter(source)
    comps = components(unet, text_encoder)
    # building an adapter freezes its base layer: remember every flag to undo that for whatever is not attached
    frozen = {id(p): (p, p.requires_grad) for c in comps for p in c.model.parameters()}
    try:
        report, planned = _plan(file, comps, multiplier)
    except AdapterFileError:
        _restore_grads(frozen)
        raise
    except Exception as err:  # a model or file this code did not foresee: still name the file, still untouched
        _restore_grads(frozen)
        raise AdapterFileError(f"{file.label}: cannot be loaded into this model: {type(err).__name__}: {err}") \
            from err
    if strict and not report.ok:
        _restore_grads(frozen)
        raise AdapterFitError(_failure_message(file, report, unet))
    network = AdapterNetwork()
    try:
        for step in planned:
            network.attach(step.name, step.comp.group, step.comp.model, step.path, step.adapter,
                           {k: frozen[id(p)][1] for k, p in step.adapter.base.named_parameters()})
            report.matched.append(step.name)
    except Exception as err:  # planning rules this out; if it happens anyway, take back what was attached
        network.remove()
        _restore_grads(frozen)
        raise AdapterFileError(f"{file.label}: attaching failed, the model is left as it was: {err}") from err
    attached = {id(p) for step in planned for p in step.adapter.base.parameters()}
    _restore_grads({k: v for k, v in frozen.items() if k not in attached})
    network.source = file.label
    return network, report


@dataclass
class _Step:
    """One module of a file, ready to attach."""

    name: str
    comp: Component
    path: str
    adapter: Adapter


def _layer_finder(file: AdapterFile, comps: Sequence[Component]) -> Callable[[str], tuple[Component, str] | None]:
    """How ``file``'s module names find the model's layers: by their kohya names, and a lone text encoder named
    ``lora_te1_`` (SDXL's first, and what diffusers' kohya converter writes for SD1's only one) as ``lora_te_``
    unless the file is SDXL's."""
    try:
        table = _lookup(comps)
    except ValueError as err:  # two layers of the model with one kohya name: no file can address them
        raise AdapterFileError(f"{file.label}: cannot be matched to this model: {err}") from err
    te1_alias = guess_base_model(file) != "sdxl" and not any(n.startswith("lora_te2_") for n in file.modules())

    def find(name: str) -> tuple[Component, str] | None:
        if name not in table and te1_alias and name.startswith("lora_te1_"):
            name = "lora_te_" + name.removeprefix("lora_te1_")
        return table.get(name)
    return find


def _plan(file: AdapterFile, comps: Sequence[Component], multiplier: float) -> tuple[LoadReport, list[_Step]]:
    """Build every adapter of ``file`` without touching the model; the report says what does not fit."""
    find_layer = _layer_finder(file, comps)
    report = LoadReport(file.label, loose_keys=file.loose_keys(), file_base_model=guess_base_model(file))
    planned: list[_Step] = []
    claimed: dict[tuple[int, str], str] = {}  # (component, layer path) -> the file's first module name for it
    for name, tensors in file.modules().items():
        if not _given(name, comps):
            report.skipped.append(name)
            continue
        # the algorithm first: a LyCORIS norm or OFT module is unsupported, not a missing layer
        algorithm = detect_algorithm(tensors)
        cls = ALGORITHMS.get(algorithm)
        if cls is None:
            keys = sorted(tensors)
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            report.unsupported[name] = (f"algorithm {algorithm!r} (keys {shown}) is not one lorakit "
                                        f"implements ({', '.join(ALGORITHMS)})")
            continue
        found = find_layer(name)
        if found is None:
            report.unmatched.append(name)
            continue
        comp, path = found
        target = (id(comp.model), path)
        if target in claimed:  # e.g. lora_unet_X and lycoris_X: two files joined into one
            report.duplicates[name] = claimed[target]
            continue
        layer = comp.model.get_submodule(path)
        if isinstance(layer, Adapter):
            report.mismatched[name] = "the model already carries an adapter here; remove() that network first"
            continue
        try:
            adapter = cls.from_file_tensors(layer, tensors, multiplier)
        except (AdapterFormatError, TypeError, ValueError) as err:  # a shape that does not fit, a missing key
            report.mismatched[name] = str(err)
            continue
        claimed[target] = name
        planned.append(_Step(comp.kohya_name(path), comp, path, adapter))
    return report, planned


def _restore_grads(flags: Mapping[int, tuple[nn.Parameter, bool]]) -> None:
    for param, requires_grad in flags.values():
        param.requires_grad_(requires_grad)


def _failure_message(file: AdapterFile, report: LoadReport, unet: nn.Module | None) -> str:
    model_arch = None
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if isinstance(width, int):
        model_arch = _CROSS_ATTN_WIDTH.get(width, f"cross-attention width {width}")
    hint = ""
    if report.file_base_model and model_arch and report.file_base_model != model_arch:
        hint = f" (the file looks like {report.file_base_model}, the model is {model_arch})"
    elif report.file_base_model and (report.unmatched or report.mismatched):
        hint = f" (the file looks like {report.file_base_model}; is the model another architecture or size?)"
    return f"{file.label}: does not fit the model{hint}: " + "; ".join(report.problems())


# ---- starting a network from a file (kohya's --network_weights) ---------------------------------------------

@dataclass
class StartReport:
    """How an adapter file started a new network: the modules it filled, the ones that start fresh."""

    source: str
    loaded: list[str]
    fresh: list[str]

    def summary(self) -> str:
        fresh = f"; {len(self.fresh)} start fresh (the file has none for them)" if self.fresh else ""
        return f"network weights from {self.source}: {len(self.loaded)} modules{fresh}"


def _with_alpha(adapter: Adapter, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A file module's tensors with its alpha filled in where the file leaves it out (kohya: alpha = rank)."""
    if "alpha" in adapter.file_tensors() and "alpha" not in tensors and module_rank(tensors) is not None:
        return {**tensors, "alpha": torch.tensor(float(module_rank(tensors)))}
    return tensors


def _module_mismatch(adapter: Adapter, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why a file module cannot start this adapter (algorithm, keys, shapes, alpha), in the words of the setting
    to change; None when it can.  Worded without the module's name, so that modules failing alike group."""
    own = adapter.file_tensors()
    algorithm, trained = detect_algorithm(tensors), type(adapter).algorithm
    if algorithm != trained:
        return f"the file's modules are {algorithm}, this run trains {trained} (--algorithm)"
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        return (f"the file's keys differ from this run's adapter (missing {missing or 'none'}, extra "
                f"{extra or 'none'}: DoRA, Tucker or another option differs)")
    rank, file_rank = module_rank(own), module_rank(tensors)
    if rank != file_rank:
        return (f"rank {file_rank} in the file, {rank} here (--rank, or network.conv_rank for 3×3 convs; or "
                "--dim-from-weights to take the file's)")
    for key, value in own.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            return f"{key} has shape {tuple(tensors[key].shape)} in the file, {tuple(value.shape)} here"
    if "alpha" in own and not torch.equal(tensors["alpha"].float(), own["alpha"].float()):
        return (f"alpha {module_alpha(tensors):g} in the file, {module_alpha(own):g} here (--alpha, or "
                "network.conv_alpha for 3×3 convs: the update would be scaled differently; or --dim-from-weights)")
    return None


@dataclass(frozen=True)
class FileRanks:
    """A rank rule that builds each layer's module as an adapter file holds it (kohya's and LyCORIS's
    ``--dim_from_weights``): its algorithm, rank, alpha and the options that shape it; a layer the file has no
    module for gets none.  A module the file's keys do not name an algorithm for takes ``fallback``'s spec, and
    ``start_network_from_file`` refuses it by name."""

    source: str
    specs: Mapping[str, ModuleSpec | None]  # the model's kohya module name -> the file's module, as a spec
    fallback: RankRule
    #: it says which norm layers get an update too (``create_network`` asks it for each, with train_norm)
    chooses_norms = True

    def __call__(self, name: str, layer: nn.Module) -> ModuleSpec | None:
        if name not in self.specs:
            return None
        spec = self.specs[name]
        return spec if spec is not None else self.fallback(name, layer)

    def holds_norms(self) -> bool:
        """Whether the file updates norm layers (LyCORIS's train_norm): the network then does too."""
        return any(spec is not None and spec.algorithm == "norm" for spec in self.specs.values())

    def ranks(self) -> list[int]:
        """The ranks of the file's modules that have one (not IA3's, full's or OFT's)."""
        return sorted({spec.rank for spec in self.specs.values()
                       if spec is not None and algorithm_class(spec.algorithm).rank_keys})


def ranks_from_file(source: str | os.PathLike | AdapterFile, fallback: RankRule, unet: nn.Module | None = None,
                    text_encoder: nn.Module | Sequence[nn.Module] | None = None,
                    algorithm: str | None = None) -> FileRanks:
    """The rank rule that builds the network ``source`` holds, module by module as LyCORIS builds a network from
    weights: each module's algorithm (a file may mix them, as LyCORIS's algorithm maps make), rank, alpha (alpha =
    rank where the file leaves it out) and what shapes it (Tucker, DoRA, LoKr's factors, OFT's blocks).
    ``algorithm``, the run's own, is kept for modules of the kind it writes (DyLoRA writes LoRA files).  Modules
    that name no layer are left to ``start_network_from_file``, which refuses them by name; a module whose tensors
    do not fit its layer is refused here, naming the file and the module."""
    file = source if isinstance(source, AdapterFile) else read_adapter(source)
    find_layer = _layer_finder(file, components(unet, text_encoder))
    own = algorithm_class(algorithm) if algorithm else None
    specs: dict[str, ModuleSpec | None] = {}
    for name, tensors in file.modules().items():
        found = find_layer(name)
        if found is None:
            continue
        comp, path = found
        detected = detect_algorithm(tensors)
        if detected == "unknown":
            specs[comp.kohya_name(path)] = None
            continue
        cls = own if own is not None and getattr(own, "file_algorithm", own.algorithm) == detected \
            else algorithm_class(detected)
        layer = comp.model.get_submodule(path)
        try:
            arguments = dict(cls.file_arguments(layer, tensors))
        except (AdapterFormatError, TypeError) as err:
            raise AdapterFileError(f"{file.label}: module {name}: {err}") from None
        default = fallback(comp.kohya_name(path), layer) or ModuleSpec(1, 1.0)  # for modules without a rank
        specs[comp.kohya_name(path)] = ModuleSpec(arguments.pop("rank", default.rank),
                                                 arguments.pop("alpha", default.alpha), cls.algorithm, arguments)
    return FileRanks(file.label, specs, fallback)


def start_network_from_file(network: AdapterNetwork, source: str | os.PathLike | AdapterFile,
                            unet: nn.Module | None = None,
                            text_encoder: nn.Module | Sequence[nn.Module] | None = None) -> StartReport:
    """Start ``network``'s adapters from an adapter file instead of their fresh initialisation (kohya's
    ``--network_weights``: continue a LoRA, or train on from someone else's).

    The file's modules are matched to the network's by the names the models' layers produce (kohya, LyCORIS and
    diffusers layouts alike).  Every module of the file must have its counterpart in the network with the same
    algorithm, keys, shapes and alpha; the network's modules the file lacks keep their fresh initialisation (a
    wider preset than the file's).  Otherwise ``AdapterFileError`` names the file and the first problems, in
    terms of the setting to change, and nothing is changed.
    """
    file = source if isinstance(source, AdapterFile) else read_adapter(source)
    comps = components(unet, text_encoder)
    find_layer = _layer_finder(file, comps)
    adapters = dict(network.adapters.items())
    problems: dict[str, list[str]] = {}  # why -> the file's modules that fail so
    pairs: list[tuple[str, Adapter, Mapping[str, torch.Tensor]]] = []
    for name, tensors in file.modules().items():
        found = find_layer(name)
        own_name = found[0].kohya_name(found[1]) if found is not None else None
        if own_name not in adapters:
            if not _given(name, comps):  # the text encoder's modules when only the U-Net is trained, say
                why = (f"this run does not train the {component_of(name).replace('_', ' ')} "
                       "(network.train_unet, network.train_text_encoder)")
            elif found is None:
                why = "they name no layer of this model"
            else:
                why = "their layers are not adapted in this run (--preset, --blocks)"
            problems.setdefault(why, []).append(name)
            continue
        tensors = _with_alpha(adapters[own_name], tensors)
        why = _module_mismatch(adapters[own_name], tensors)
        if why is not None:
            problems.setdefault(why, []).append(name)
            continue
        pairs.append((own_name, adapters[own_name], tensors))
    if file.loose_keys():
        problems[f"keys that belong to no module, e.g. {file.loose_keys()[0]!r}"] = file.loose_keys()
    if problems or not pairs:
        total = len(file.modules())
        shown = [f"{len(names)} of its {total} modules ({names[0]}{', ...' if len(names) > 1 else ''}): {why}"
                 for why, names in list(problems.items())[:3]]
        more = f"; and {len(problems) - 3} other problems" if len(problems) > 3 else ""
        raise AdapterFileError(f"{file.label}: cannot start this run's network from it: "
                               + ("; ".join(shown) + more if shown else "it holds no module"))
    for _, adapter, tensors in pairs:
        adapter.load_trained(tensors)  # with LyCORIS's use_scalar: the scalar at 1, as LyCORIS loads a file
    loaded = {own_name for own_name, _, _ in pairs}
    return StartReport(file.label, sorted(loaded), sorted(set(adapters) - loaded))
