"""Which modules get which adapter: presets (target tables), rank rules, kohya names; apply and remove.

A preset is data: for the U-Net and the text encoder, a table of ``TargetRule`` rows (a glob over the
module path, the layer kinds it admits, and optionally the classes one of its ancestors must have).
A rank rule is any callable ``(kohya_name, layer) -> ModuleSpec | None`` (None: leave the module out), so
block-wise ranks (``lorakit.blocks.BlockRanks``) plug in beside the default ``UniformRanks``.  A preset may also
keep modules out (``exclude``) and give some layers another algorithm, rank or options (``settings``): LyCORIS's
preset files read so (``lorakit.lycoris_preset``), and ``with_filters`` adds a run's include/exclude globs.

``create_network`` replaces each chosen layer in its parent with the adapter wrapping it and returns an
``AdapterNetwork`` that holds the adapters by kohya name and can take them out again.

Names follow kohya: ``lora_unet_`` + diffusers module path with ``.`` -> ``_`` (SDXL: the original LDM path,
``lora_unet_input_blocks_4_1_...``, as kohya's SDXL scripts name it); ``lora_te_`` (SDXL: ``lora_te1_`` /
``lora_te2_``) + the text encoder's path in the transformers-4 layout, whose
``CLIPTextModel`` keeps its modules under ``text_model.`` (transformers 5 dropped that level; the prefix
is put back so files stay loadable in A1111/ComfyUI/kohya).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lorakit.adapters import make_adapter, option_names
from lorakit.adapters.base import NORM_LAYERS, Adapter
from lorakit.errors import InvalidValueError
from lorakit.ldm import kohya_unet_names, ldm_module_path
from lorakit.lycoris_preset import NAMED, is_preset_file, preset_from_table, read_preset

LINEAR, CONV1X1, CONV, NORM = "linear", "conv1x1", "conv", "norm"
#: what presets select: norm layers are reached only through ``train_norm`` (``norm_targets``)
ALL_KINDS = frozenset({LINEAR, CONV1X1, CONV})
NOT_KXK = frozenset({LINEAR, CONV1X1})

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"
LYCORIS_PREFIX = "lycoris"


def target_kind(module: nn.Module) -> str | None:
    """The kind a target rule matches: 'linear', 'conv1x1' or 'conv' (k x k, k > 1), or 'norm' (a LayerNorm or
    GroupNorm with a learned scale); None for layers adapters do not wrap.  (``lorakit.adapters.base.layer_kind``
    is the adapter's own check: 'linear' or 'conv'.)"""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv2d):
        return CONV1X1 if tuple(module.kernel_size) == (1, 1) else CONV
    if isinstance(module, NORM_LAYERS) and module.weight is not None:
        return NORM
    return None


def is_kxk_conv(module: nn.Module) -> bool:
    """A conv with a kernel larger than 1x1: kohya/LyCORIS give these the separate conv rank."""
    return target_kind(module) == CONV


# ---- presets ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetRule:
    """One row of a preset table.

    ``pattern`` is a glob (``fnmatch``, ``*`` also crosses dots) over the module path (U-Net: diffusers
    path; text encoder: transformers-4 path, ``text_model.encoder.layers.0.self_attn.q_proj``); with ``regex``
    a regular expression matched at the path's start (``re.match``, as LyCORIS's preset files name modules),
    tried on the model's own path too.  ``inside``: when not empty, one ancestor's class name must be in it
    (kohya and LyCORIS select this way).
    """

    pattern: str = "*"
    kinds: frozenset[str] = ALL_KINDS
    inside: tuple[str, ...] = ()
    regex: bool = False

    def names(self, path: str) -> bool:
        """Whether the pattern names ``path`` (kinds and ancestors aside)."""
        return bool(re.match(self.pattern, path)) if self.regex else fnmatch.fnmatchcase(path, self.pattern)


@dataclass(frozen=True)
class ModuleSettings:
    """Another algorithm, rank, alpha or options for some of a preset's layers (LyCORIS's ``module_algo_map``, by
    the class of a module holding the layer, the innermost one; ``name_algo_map``, by the layer's path, first)."""

    classes: tuple[str, ...] = ()
    path: TargetRule | None = None
    algorithm: str | None = None
    rank: int | None = None
    alpha: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def applied_to(self, spec: ModuleSpec) -> ModuleSpec:
        """``spec`` (what the rank rule gives the layer) with these settings over it."""
        return ModuleSpec(self.rank if self.rank is not None else spec.rank,
                          self.alpha if self.alpha is not None else spec.alpha,
                          self.algorithm or spec.algorithm, {**spec.options, **self.options})


@dataclass(frozen=True)
class Preset:
    name: str
    unet: tuple[TargetRule, ...]
    text_encoder: tuple[TargetRule, ...]
    description: str = ""
    #: module paths kept out whatever the rules select, with everything inside them (LyCORIS's exclude_name)
    exclude: tuple[TargetRule, ...] = ()
    #: per-layer settings over the network's (``ModuleSettings``)
    settings: tuple[ModuleSettings, ...] = ()

    def settings_for(self, paths: Sequence[str], ancestors: Sequence[str]) -> ModuleSettings | None:
        """The settings of a layer at ``paths`` inside modules of the classes ``ancestors`` (outermost first):
        the first whose path rule names it, else those of the innermost class that has some."""
        for settings in self.settings:
            if settings.path is not None and any(settings.path.names(p) for p in paths):
                return settings
        for cls in reversed(ancestors):
            for settings in self.settings:
                if cls in settings.classes:
                    return settings
        return None

    def excludes(self, paths: Sequence[str]) -> bool:
        """Whether one of ``paths`` (a layer's paths: canonical and the model's own) or a module holding it is
        excluded."""
        if not self.exclude:
            return False
        for path in paths:
            parts = path.split(".")
            for cut in range(1, len(parts) + 1):
                if any(rule.names(".".join(parts[:cut])) for rule in self.exclude):
                    return True
        return False


_ATTN = (
    TargetRule("*.transformer_blocks.*.attn[12].to_[qkv]"),
    TargetRule("*.transformer_blocks.*.attn[12].to_out.0"),
    TargetRule("*.attentions.*.proj_in"),
    TargetRule("*.attentions.*.proj_out"),
)
_FF = (
    TargetRule("*.transformer_blocks.*.ff.net.0.proj"),
    TargetRule("*.transformer_blocks.*.ff.net.2"),
)
_RESNET_SAMPLERS = (
    TargetRule("*.resnets.*.conv1"),
    TargetRule("*.resnets.*.conv2"),
    TargetRule("*.resnets.*.conv_shortcut"),
    TargetRule("*.resnets.*.time_emb_proj"),
    TargetRule("*.downsamplers.*.conv"),
    TargetRule("*.upsamplers.*.conv"),
)
# LyCORIS's `full` preset also adapts these (outside kohya's blocks: conv_in is IN00)
_LYCORIS_EXTRA = (
    TargetRule("conv_in"),
    TargetRule("conv_out"),
    TargetRule("time_embedding.linear_[12]"),
)
_TE_ATTN = (
    TargetRule("*.self_attn.q_proj"),
    TargetRule("*.self_attn.k_proj"),
    TargetRule("*.self_attn.v_proj"),
    TargetRule("*.self_attn.out_proj"),
)
_TE_MLP = (TargetRule("*.mlp.fc1"), TargetRule("*.mlp.fc2"))
# (IA)³'s layers (Liu et al. 2022): the keys and values of every attention and the feed-forward's inner activations,
# i.e. the input of its second layer; what LyCORIS's `ia3` preset names (its names, matched at the path's start,
# reach no layer of a diffusers or transformers model)
_IA3_FF_INPUT = (ModuleSettings(path=TargetRule("*.ff.net.2"), options={"on_input": True}),
                 ModuleSettings(path=TargetRule("*.mlp.fc2"), options={"on_input": True}))

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("attn-only", _ATTN, _TE_ATTN,
               "attention Linear layers (to_q/k/v/out, proj_in/out); CLIP q/k/v/out_proj"),
        Preset("attn-mlp", _ATTN + _FF, _TE_ATTN + _TE_MLP,
               "attention + feed-forward; CLIP attention + MLP"),
        Preset("full", _ATTN + _FF + _RESNET_SAMPLERS, _TE_ATTN + _TE_MLP,
               "attn-mlp + ResNet convs/time_emb_proj + down/up-samplers (LoCon, kohya conv_dim)"),
        Preset("lycoris-full", _ATTN + _FF + _RESNET_SAMPLERS + _LYCORIS_EXTRA, _TE_ATTN + _TE_MLP,
               "full + conv_in, conv_out, time_embedding (LyCORIS's own `full` preset)"),
        Preset("kohya",
               (TargetRule(kinds=NOT_KXK, inside=("Transformer2DModel",)),),
               (TargetRule(kinds=frozenset({LINEAR}), inside=("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")),),
               "kohya's default LoRA: Linear and 1x1 conv layers inside Transformer2DModel; CLIPAttention, "
               "CLIPMLP"),
        Preset("ia3", (TargetRule("*.transformer_blocks.*.attn[12].to_[kv]"),
                       TargetRule("*.transformer_blocks.*.ff.net.2")),
               (TargetRule("*.self_attn.[kv]_proj"), TargetRule("*.mlp.fc2")),
               "(IA)³'s layers: attention keys and values, the feed-forward's inner activations (the second layer's "
               "input, on_input); CLIP k/v_proj, fc2's input (LyCORIS's ia3 preset)", settings=_IA3_FF_INPUT),
    )
}


def with_filters(preset: Preset, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Preset:
    """``preset`` with more layers (``include``: globs over module paths, as LyCORIS's target names add them) and
    fewer (``exclude``: globs over module paths, with everything inside the modules they name; as LyCORIS's
    exclude_name, OneTrainer's layer filter)."""
    if not include and not exclude:
        return preset
    added = tuple(TargetRule(pattern) for pattern in include)
    return replace(preset, unet=preset.unet + added, text_encoder=preset.text_encoder + added,
                   exclude=preset.exclude + tuple(TargetRule(pattern) for pattern in exclude))


def patterns_naming_nothing(patterns: Sequence[str], unet: nn.Module | None = None,
                            text_encoder: nn.Module | Sequence[nn.Module] | None = None) -> list[str]:
    """The glob patterns that name no module path of the given models (a typo, or another model's names)."""
    paths = [p for comp in components(unet, text_encoder) for path, _ in comp.model.named_modules() if path
             for p in (comp.canonical_path(path), path)]
    return [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(p, pattern) for p in paths)]


def preset_names() -> list[str]:
    """Every preset name: lorakit's own, then LyCORIS's named presets it has no own one for (``lycoris-…``)."""
    return [*PRESETS, *(f"{LYCORIS_PREFIX}-{name}" for name in NAMED)]


def get_preset(preset: str | Preset) -> Preset:
    """A preset by name (``preset_names``), or read from a LyCORIS preset file (a ``.toml`` path)."""
    if isinstance(preset, Preset):
        return preset
    if preset in PRESETS:
        return PRESETS[preset]
    if is_preset_file(preset):
        return read_preset(preset)
    lycoris_name = str(preset).removeprefix(f"{LYCORIS_PREFIX}-")
    if lycoris_name in NAMED and lycoris_name != preset:
        return preset_from_table(NAMED[lycoris_name], preset)
    raise InvalidValueError(f"unknown preset {preset!r}; presets are {', '.join(preset_names())}, or a LyCORIS "
                            "preset file (.toml)")


# ---- components and names -------------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    """One model an adapter network covers: the U-Net or a text encoder."""

    group: str  # key of trainable_parameters(): 'unet', 'text_encoder', 'text_encoder_2'
    prefix: str  # kohya key prefix: 'lora_unet', 'lora_te', 'lora_te1', 'lora_te2'
    model: nn.Module
    path_prefix: str = ""  # put in front of module paths so names follow kohya's layout
    is_text_encoder: bool = False
    # SDXL's U-Net: diffusers module path -> original (LDM) path, which kohya names its modules by
    original_names: Mapping[str, str] | None = None

    def canonical_path(self, path: str) -> str:
        """The path presets match: diffusers' for the U-Net, transformers 4's for a text encoder."""
        return self.path_prefix + path

    def kohya_name(self, path: str) -> str:
        named = ldm_module_path(path, self.original_names) if self.original_names is not None else \
            self.canonical_path(path)
        return kohya_name(self.prefix, named)


def kohya_name(prefix: str, path: str) -> str:
    """'lora_unet', 'down_blocks.0.attentions.0.proj_in' -> 'lora_unet_down_blocks_0_attentions_0_proj_in'."""
    return f"{prefix}_{path}".replace(".", "_")


def _text_path_prefix(model: nn.Module) -> str:
    # transformers >= 5 CLIPTextModel has no `text_model` level; kohya names assume it
    children = dict(model.named_children())
    if "text_model" in children or "encoder" not in children:
        return ""
    return "text_model."


def components(unet: nn.Module | None = None,
               text_encoder: nn.Module | Sequence[nn.Module] | None = None) -> list[Component]:
    """The U-Net and the text encoder(s), with the kohya prefix each gets (two encoders: te1/te2)."""
    result = []
    if unet is not None:
        config = getattr(unet, "config", None)
        result.append(Component("unet", UNET_PREFIX, unet,
                                original_names=kohya_unet_names(config) if isinstance(config, Mapping) else None))
    encoders = [] if text_encoder is None else (
        [text_encoder] if isinstance(text_encoder, nn.Module) else list(text_encoder))
    for i, te in enumerate(encoders):
        if len(encoders) == 1:
            group, prefix = "text_encoder", TE_PREFIX
        else:
            group, prefix = f"text_encoder_{i + 1}", f"{TE_PREFIX}{i + 1}"
        result.append(Component(group, prefix, te, _text_path_prefix(te), is_text_encoder=True))
    return result


def adaptable_layers(component: Component) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every Linear/Conv2d (and norm layer) of a component, not looking inside adapters
    already there."""
    inside_adapter: list[str] = []
    for path, module in component.model.named_modules():
        if any(path.startswith(p + ".") for p in inside_adapter):
            continue
        if isinstance(module, Adapter):
            inside_adapter.append(path)
            yield path, module
        elif target_kind(module) is not None:
            yield path, module


# ---- target selection -------------------------------------------------------------------------------

def _rule_matches(rule: TargetRule, paths: Sequence[str], kind: str, ancestors: Sequence[str]) -> bool:
    if kind not in rule.kinds or not any(rule.names(p) for p in (paths if rule.regex else paths[:1])):
        return False
    return not rule.inside or any(cls in rule.inside for cls in ancestors)


def select_targets(component: Component, rules: Sequence[TargetRule],
                   exclude: Preset | None = None) -> list[tuple[str, nn.Module]]:
    """(module path, layer) of the layers of ``component`` that a row of ``rules`` admits, in model order, less
    those ``exclude`` (a preset's exclusions) keeps out.

    Raises when a chosen layer already carries an adapter (merge it or remove that network first).
    """
    model = component.model
    classes = {path: type(m).__name__ for path, m in model.named_modules()}
    chosen = []
    for path, module in adaptable_layers(component):
        layer = module.base if isinstance(module, Adapter) else module
        ancestors = _ancestor_classes(path, classes)
        paths = (component.canonical_path(path), path)  # the preset's path first; a regex is tried on both
        if exclude is not None and exclude.excludes(paths):
            continue
        if any(_rule_matches(r, paths, target_kind(layer), ancestors) for r in rules):
            if isinstance(module, Adapter):
                raise ValueError(f"{component.group} module {path!r} already carries an adapter; "
                                 "merge() and remove() that network first")
            chosen.append((path, module))
    return chosen


#: the blocks whose norm layers ``train_norm`` updates when the block holds an adapted layer: the U-Net's
#: attention and ResNet blocks, as LyCORIS's target modules (its text-encoder targets, CLIPAttention and CLIPMLP,
#: hold no norm layer)
NORM_BLOCKS = ("Transformer2DModel", "ResnetBlock2D")


def norm_targets(component: Component, adapted: Sequence[str],
                 exclude: Preset | None = None) -> list[tuple[str, nn.Module]]:
    """(path, layer) of the norm layers LyCORIS's ``train_norm`` updates beside the layers at the paths
    ``adapted``: those inside a ``NORM_BLOCKS`` block that holds one of them, in model order, less those
    ``exclude`` keeps out.  So a block-wise network whose block has rank 0 trains none of that block's norms."""
    blocks = [path for path, m in component.model.named_modules() if path and type(m).__name__ in NORM_BLOCKS]

    def block_of(path: str) -> str | None:
        inside = [b for b in blocks if path.startswith(b + ".")]
        return max(inside, key=len) if inside else None

    chosen_blocks = {block_of(path) for path in adapted} - {None}
    chosen = []
    for path, module in adaptable_layers(component):
        layer = module.base if isinstance(module, Adapter) else module
        if target_kind(layer) != NORM or block_of(path) not in chosen_blocks:
            continue
        if exclude is not None and exclude.excludes((component.canonical_path(path), path)):
            continue
        if isinstance(module, Adapter):
            raise ValueError(f"{component.group} module {path!r} already carries an adapter; "
                             "merge() and remove() that network first")
        chosen.append((path, module))
    return chosen


#: the adapter options a norm-layer update takes from the network's (the rest are the matrix algorithms')
_NORM_OPTIONS = ("rank_dropout", "rank_dropout_scale", "module_dropout")


# ---- rank rules ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleSpec:
    """What one module gets: rank, alpha, and optionally another algorithm or extra adapter options."""

    rank: int
    alpha: float
    algorithm: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


RankRule = Callable[[str, nn.Module], "ModuleSpec | None"]


@dataclass(frozen=True)
class UniformRanks:
    """One rank/alpha for Linear and 1x1 conv layers, another for k x k convs (LoCon ``conv_dim``/``conv_alpha``).

    ``conv_rank`` None: same as ``rank`` (LyCORIS's default); 0: leave k x k convs out.
    """

    rank: int = 4
    alpha: float = 1.0
    conv_rank: int | None = None
    conv_alpha: float | None = None

    def __call__(self, name: str, layer: nn.Module) -> ModuleSpec | None:
        if is_kxk_conv(layer):
            rank = self.rank if self.conv_rank is None else self.conv_rank
            alpha = self.alpha if self.conv_alpha is None else self.conv_alpha
            return ModuleSpec(rank, alpha) if rank > 0 else None
        return ModuleSpec(self.rank, self.alpha) if self.rank > 0 else None

    def network_args(self) -> dict[str, str]:
        conv_rank = self.rank if self.conv_rank is None else self.conv_rank
        conv_alpha = self.alpha if self.conv_alpha is None else self.conv_alpha
        return {"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"}


# ---- the network ----------------------------------------------------------------------------------------

@dataclass
class _Slot:
    group: str
    parent: nn.Module
    attr: str
    original: nn.Module
    requires_grad: dict[str, bool]
    path: str = ""  # the layer's module path in its model


AdapterFactory = Callable[..., Adapter]


def _grad_flags(layer: nn.Module) -> dict[str, bool]:
    return {k: p.requires_grad for k, p in layer.named_parameters()}


class AdapterNetwork(nn.Module):
    """The adapters placed in a model, by kohya name; knows how to take them out again.

    ``adapters`` is an ``nn.ModuleDict`` (kohya names contain no dots).  Each adapter holds its base layer,
    so ``network.to(...)`` and ``network.parameters()`` include the frozen base layers too;
    ``trainable_parameters()`` gives the adapters' own parameters per group.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._slots: dict[str, _Slot] = {}
        #: how the network was made (preset, algorithm, rank rule), for ss_network_args
        self.args: dict[str, str] = {}
        #: the file it was loaded from, if any
        self.source: str | None = None

    def __len__(self) -> int:
        return len(self.adapters)

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def __getitem__(self, name: str) -> Adapter:
        return self.adapters[name]

    def names(self, group: str | None = None) -> list[str]:
        return [n for n, s in self._slots.items() if group is None or s.group == group]

    def group_of(self, name: str) -> str:
        return self._slots[name].group

    def module_path(self, name: str) -> str:
        """The module path of an adapted layer in its own model (``down_blocks.0.attentions.0.proj_in``)."""
        return self._slots[name].path

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(s.group for s in self._slots.values()))

    def attach(self, name: str, group: str, model: nn.Module, path: str, adapter: Adapter,
               requires_grad: Mapping[str, bool] | None = None) -> None:
        """Put ``adapter`` in place of the layer at ``path`` of ``model`` (the adapter's base).

        ``requires_grad``: the layer's flags before the adapter froze it, restored by ``remove()``.
        """
        if name in self.adapters:
            raise ValueError(f"the network already has a module named {name!r}")
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        original = getattr(parent, attr)
        if adapter.base is not original:
            raise ValueError(f"adapter for {name!r} does not wrap the layer at {path!r}")
        grads = dict(requires_grad) if requires_grad is not None else _grad_flags(original)
        setattr(parent, attr, adapter)
        self._slots[name] = _Slot(group, parent, attr, original, grads, path)
        self.adapters[name] = adapter

    @torch.no_grad()
    def remove(self, keep_merged: bool = False) -> None:
        """Put the original layers back (the same objects, weights and ``requires_grad`` as before).

        A merged network is unmerged first unless ``keep_merged`` (then its update stays in the base weights:
        the way to stack several networks).
        """
        if not keep_merged:
            self.unmerge()
        for name, slot in self._slots.items():
            if getattr(slot.parent, slot.attr) is not self.adapters[name]:
                raise RuntimeError(f"{name}: the model no longer holds this network's adapter")
            setattr(slot.parent, slot.attr, slot.original)
            for key, param in slot.original.named_parameters():
                param.requires_grad_(slot.requires_grad.get(key, param.requires_grad))
        self._slots.clear()
        self.adapters = nn.ModuleDict()

    def merge(self) -> None:
        for adapter in self.adapters.values():
            adapter.merge()

    def unmerge(self) -> None:
        for adapter in self.adapters.values():
            adapter.unmerge()

    @property
    def merged(self) -> bool:
        return any(a.merged for a in self.adapters.values())

    def set_multiplier(self, multiplier: float, block_weights: Callable[[str], float] | None = None) -> None:
        """Scale every adapter by ``multiplier`` (times ``block_weights(name)``, e.g. a LoRA Block Weight).

        A merged network is re-merged with the new multipliers.
        """
        merged = self.merged
        self.unmerge()
        for name, adapter in self.adapters.items():
            adapter.multiplier = float(multiplier) * (block_weights(name) if block_weights else 1.0)
        if merged:
            self.merge()

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Adapter parameters that require grad, per group ('unet', 'text_encoder', ...), base layers excluded."""
        result: dict[str, list[nn.Parameter]] = {g: [] for g in self.groups}
        for name, adapter in self.adapters.items():
            params = [p for k, p in adapter.named_parameters() if not k.startswith("base.") and p.requires_grad]
            result[self._slots[name].group].extend(params)
        return result

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter's file tensors under its kohya name: ``lora_unet_..._to_q.lora_down.weight``, ..."""
        out = {}
        for name, adapter in self.adapters.items():
            for key, tensor in adapter.file_tensors().items():
                out[f"{name}.{key}"] = tensor
        return out

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Every adapter's ``trained_state()`` (live tensors) under its kohya name: ``file_tensors()`` unless an
        adapter's file form folds tensors together (LyCORIS's ``use_scalar``)."""
        return {f"{name}.{key}": tensor for name, adapter in self.adapters.items()
                for key, tensor in adapter.trained_state().items()}

    def fold_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``trained_state()``-named tensors (a copy, an average) in the file's form, as ``file_tensors()`` has them."""
        return {f"{name}.{key}": tensor for name, adapter in self.adapters.items()
                for key, tensor in adapter.fold_state(_under(state, name)).items()}

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put ``trained_state()``'s tensors, or a file's (``file_tensors()``), into the adapters, in place."""
        for name, adapter in self.adapters.items():
            adapter.load_trained(_under(tensors, name))


def _under(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of module ``name``, keyed without its prefix."""
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def create_network(unet: nn.Module | None = None,
                   text_encoder: nn.Module | Sequence[nn.Module] | None = None,
                   *,
                   preset: str | Preset = "kohya",
                   ranks: RankRule | None = None,
                   algorithm: str = "lora",
                   options: Mapping[str, Any] | None = None,
                   multiplier: float = 1.0,
                   factory: AdapterFactory | None = None) -> AdapterNetwork:
    """Wrap the layers ``preset`` selects in adapters of ``algorithm`` and return the network.

    ``ranks`` decides rank/alpha (or skip) per module (default ``UniformRanks()``: rank 4, alpha 1);
    ``options`` go to every adapter (e.g. ``factor`` for LoKr); ``factory(algorithm, base, rank=, alpha=,
    **options)`` builds one adapter (default ``lorakit.adapters.make_adapter``).  The option ``train_norm``
    (LyCORIS's) also updates the norm layers of the U-Net blocks the network adapts (``norm_targets``) with
    ``norm`` adapters.  Nothing in the model changes until every adapter has been built.
    """
    preset = get_preset(preset)
    ranks = ranks if ranks is not None else UniformRanks()
    factory = factory or make_adapter
    shared = dict(options or {})
    train_norm = bool(shared.pop("train_norm", False))
    planned = []
    for comp in components(unet, text_encoder):
        rules = preset.text_encoder if comp.is_text_encoder else preset.unet
        classes = {path: type(m).__name__ for path, m in comp.model.named_modules()} if preset.settings else {}
        adapted = []
        for path, layer in select_targets(comp, rules, preset):
            name = comp.kohya_name(path)
            spec = ranks(name, layer)
            if spec is None:
                continue
            settings = preset.settings_for((comp.canonical_path(path), path), _ancestor_classes(path, classes)) \
                if preset.settings else None
            if settings is not None:
                spec = settings.applied_to(spec)
            algo = spec.algorithm or algorithm
            module_options = {**_options_for(algo, algorithm, shared), **spec.options}
            if settings is not None:  # a preset's per-layer options reach the algorithms that take them, as LyCORIS
                known = option_names(algo)  # passes every option and each module reads its own
                module_options = {k: v for k, v in module_options.items() if k in known or k not in settings.options}
            grads = _grad_flags(layer)  # before the adapter freezes the layer
            adapter = factory(algo, layer, rank=spec.rank, alpha=spec.alpha, **module_options)
            adapter.multiplier = float(multiplier)
            planned.append((name, comp, path, adapter, grads))
            adapted.append(path)
        if train_norm and not comp.is_text_encoder:
            norm_options = {k: v for k, v in shared.items() if k in _NORM_OPTIONS}
            for path, layer in norm_targets(comp, adapted, preset):
                if getattr(ranks, "chooses_norms", False) and ranks(comp.kohya_name(path), layer) is None:
                    continue  # a file's network (dim_from_weights): its own norm modules only
                grads = _grad_flags(layer)
                adapter = factory("norm", layer, **norm_options)
                adapter.multiplier = float(multiplier)
                planned.append((comp.kohya_name(path), comp, path, adapter, grads))
    network = AdapterNetwork()
    for name, comp, path, adapter, grads in planned:
        network.attach(name, comp.group, comp.model, path, adapter, grads)
    network.args = _network_args(preset, algorithm, ranks, options,
                                 any(is_kxk_conv(p[3].base) for p in planned))
    return network


def _ancestor_classes(path: str, classes: Mapping[str, str]) -> list[str]:
    """The class names of the modules holding the layer at ``path``, outermost first (the model itself included)."""
    parts = path.split(".")
    return [classes[".".join(parts[:i])] for i in range(len(parts))]


def _options_for(algo: str, network_algorithm: str, shared: Mapping[str, Any]) -> dict[str, Any]:
    """The network's options for a layer trained with ``algo``: all of them for the network's own algorithm; for
    another (a preset's per-layer algorithm) those it takes, as LyCORIS passes every option and each module reads
    its own."""
    if algo == network_algorithm or not shared:
        return dict(shared)
    known = option_names(algo)
    return {k: v for k, v in shared.items() if k in known}


def _network_args(preset: Preset, algorithm: str, ranks: RankRule, options: Mapping[str, Any] | None,
                  has_kxk: bool) -> dict[str, str]:
    args = {"preset": preset.name, "algo": algorithm}
    describe = getattr(ranks, "network_args", None)
    if callable(describe):
        rule_args = describe()
        if not has_kxk:
            rule_args = {k: v for k, v in rule_args.items() if not k.startswith("conv_")}
        args.update(rule_args)
    args.update({k: str(v) for k, v in (options or {}).items()})
    return args
