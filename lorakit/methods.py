"""What a training run changes in the base model: an adapter network, the native weights, new token
embeddings (textual inversion), or new embeddings and an adapter together (pivotal tuning).

Each method gives the trainer the same handful of things: optimizer parameter groups, the tensors that make
up its result (for checkpoints, resume and the early-stopping candidates), a CS meter for CS-Fluctuation
(None where there is no frozen weight to compare with), how prompts are rewritten (textual inversion expands
its token), and the files it writes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.adapters.base import FUSE_DTYPES
from lorakit.blocks import (
    KOHYA_SDXL,
    SD1,
    SDXL,
    BlockLrWeights,
    BlockRanks,
    WithoutZeroBlocks,
    blocks_block_dims,
    fine_tune_block_count,
    fine_tune_blocks_of,
    parse_block_lr_weights,
    sdxl_block_map,
    text_encoder_only,
)
from lorakit.checkpoint_names import PIVOTAL_EMBEDDING_PREFIX, TEXT_ENCODER_PREFIXES, split_pivotal
from lorakit.config import LORAPLUS_KEYS, SAVE_PRECISIONS, ConfigError, TrainConfig
from lorakit.earlystop.cs import CSMeter, CSReading, native_reading
from lorakit.embeddings import (
    ENCODER_KEYS,
    EmbeddingError,
    check_vectors,
    embedding_tensors,
    expand_tokens,
    register_tokens,
    token_names,
)
from lorakit.errors import InvalidValueError
from lorakit.file_kinds import TI_TOKEN_KEY
from lorakit.formats import (
    AdapterFile,
    ranks_from_file,
    read_adapter,
    save_network,
    start_network_from_file,
    write_adapter,
)
from lorakit.max_norm import MaxNormReading, apply_max_norm, check_max_norm_supported
from lorakit.models import BaseModel, check_sdxl_clip_skip, save_diffusers_folder, save_single_file_checkpoint
from lorakit.modelspec import as_embedding
from lorakit.network import (
    AdapterNetwork,
    Preset,
    UniformRanks,
    create_network,
    get_preset,
    patterns_naming_nothing,
    select_targets,
    with_filters,
)
from lorakit.network import components as network_components
from lorakit.run_messages import rank_words, text_encoder_part

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


class NativeCSMeter:
    """CS of native fine-tuning, ``ΔW = W - W0`` over (trained weight, saved pretrained copy) pairs."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pairs = pairs

    def read(self, spectral: bool = False) -> CSReading:
        return native_reading(((w.detach(), w0.to(w.device)) for w, w0 in self.pairs), spectral)

    def __call__(self) -> float:
        return self.read().cs


class TrainingMethod:
    """Base class: the defaults suit methods that do not touch prompts or need post-step fixes."""

    kind: str = ""

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that are the result of training (live references; copy before keeping them)."""
        raise NotImplementedError

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def file_form(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``trained_tensors()``-named tensors (a copy, an average) as a checkpoint file holds them; the same
        unless the file form folds some together (LyCORIS's ``use_scalar``)."""
        return tensors

    def cs_meter(self) -> CSMeter | NativeCSMeter | None:
        """What reads CS (and the update's size) after a step: ``meter()`` is CS, ``meter.read()`` both."""
        return None

    def expand_prompt(self, prompt: str) -> str:
        return prompt

    #: set once the text encoder no longer trains (native fine-tuning's text-encoder steps are over): the trainer
    #: then runs the plain module, without gradients
    text_encoder_stopped: bool = False

    def before_step(self, step: int) -> None:
        """Called before each batch of optimizer step ``step`` (counted from 0), a resumed run's first too."""

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (textual inversion restores the frozen embedding rows)."""

    def hold_untrained_gradients(self) -> None:
        """Called before a schedule-free optimizer's step: zero the gradients of what trains only in part (textual
        inversion's frozen embedding rows), which such an optimizer would otherwise move in its average, where the
        restoring after the step does not reach (``lorakit.schedule_free``)."""

    def step_record(self) -> dict[str, float]:
        """What the last ``after_optimizer_step`` did, for the run's log (max-norm: the modules scaled back)."""
        return {}

    def sampling(self) -> AbstractContextManager[None]:
        """The state the model samples in during training (adapters merged where that is exact enough)."""
        return nullcontext()

    def check_multiplier(self, multiplier: float) -> None:
        """Refuse a network_multiplier other than 1 for a method without an adapter (before the first step)."""
        if multiplier != 1.0:
            raise ConfigError(f"network_multiplier {multiplier:g}: only an adapter has a multiplier, and method "
                              f"{self.kind!r} trains none")

    def scaled(self, multiplier: float) -> AbstractContextManager[None]:
        """The adapter at ``multiplier`` for one batch (kohya's per-dataset network_multiplier)."""
        self.check_multiplier(multiplier)
        return nullcontext()

    def save(self, folder: Path, name: str, metadata: dict[str, str]) -> list[Path]:
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError


def save_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The dtype result files are written in (output.save_precision; None: as trained)."""
    name = SAVE_PRECISIONS[cfg.output.save_precision]
    return getattr(torch, name) if name else None


def fine_tune_blocks(cfg: TrainConfig, unet: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """kohya's block_lr (method.native_block_lr): each trained U-Net parameter's block in kohya's order; None
    without it.  A list of another length than this U-Net's blocks is refused, naming the count."""
    rates = cfg.method.native_block_lr
    if rates is None:
        return None
    count = fine_tune_block_count(unet.config)
    if len(rates) != count:
        raise ConfigError(f"method.native_block_lr: {len(rates)} values, and this U-Net has {count} blocks in "
                          f"kohya's order (time embeddings, {count - 5} input and output blocks, the middle "
                          "block's three parts, the output layers; kohya's block_lr for SDXL: 23)")
    return fine_tune_blocks_of(params, unet.config)


def _lr(cfg: TrainConfig, specific: float | None) -> float:
    return cfg.optimizer.learning_rate if specific is None else specific


# ---------------------------------------------------------------------------------------------- adapters
def loraplus_ratios(cfg: TrainConfig) -> dict[str, float]:
    """LoRA+'s learning-rate ratio of the up matrices per network ("unet", "text_encoder"), where it is on: the
    network's own ratio, else the shared one (kohya's rule)."""
    net = cfg.network
    ratios = {"unet": net.loraplus_unet_lr_ratio or net.loraplus_lr_ratio,
              "text_encoder": net.loraplus_text_encoder_lr_ratio or net.loraplus_lr_ratio}
    return {group: ratio for group, ratio in ratios.items() if ratio is not None}


def block_lr_weights(cfg: TrainConfig, sdxl: bool = False) -> BlockLrWeights | None:
    """kohya's block learning-rate weights on the model's blocks (SD1.x's 25, or kohya's 23 SDXL ones)."""
    net = cfg.network
    try:
        return parse_block_lr_weights(net.down_lr_weight, net.mid_lr_weight, net.up_lr_weight,
                                      net.block_lr_zero_threshold, KOHYA_SDXL if sdxl else SD1)
    except ValueError as err:
        raise ConfigError(f"network: {err}") from None


def adapted_preset(cfg: TrainConfig, model: BaseModel | None = None) -> Preset:
    """The preset whose layers may get adapters: with ``network.dim_from_weights`` the widest, since the file's
    modules choose the layers (as kohya builds the network from the file); otherwise ``network.preset``; with
    ``network.include``/``exclude`` applied.  Given the model, a pattern that names none of its modules is a
    ``ConfigError`` (a typo would otherwise train another network than meant, silently)."""
    net = cfg.network
    for key in ("include", "exclude"):
        if model is not None and getattr(net, key):
            unknown = patterns_naming_nothing(getattr(net, key), model.unet, model.text_encoders)
            if unknown:
                raise ConfigError(f"network.{key}: {unknown[0]!r} names no module of the model (globs over module "
                                  "paths such as 'down_blocks.0.attentions.0.proj_in', '*.attn1.*' or "
                                  "'text_model.encoder.layers.0.mlp.fc1')")
    preset = get_preset("lycoris-full" if net.dim_from_weights else net.preset)
    return with_filters(preset, net.include, net.exclude)


def block_dims_rule(cfg: TrainConfig, sdxl: bool = False) -> BlockRanks:
    """kohya's ``block_dims`` (and alphas, conv dims) as a rank rule: one value per block of the model's own map,
    SD1.x's (and SD2.x's) 25 or SDXL's 19; ConfigError for lists of another length (the dry run asks this too)."""
    net = cfg.network
    try:
        return BlockRanks(net.block_dims, block_alphas=net.block_alphas, conv_block_dims=net.conv_block_dims,
                          conv_block_alphas=net.conv_block_alphas, alpha=net.alpha,
                          conv_alpha=net.conv_alpha if net.conv_alpha is not None else net.alpha,
                          outside=UniformRanks(net.rank, net.alpha, net.conv_rank, net.conv_alpha),
                          block_map=sdxl_block_map(len(net.block_dims)) if sdxl else SD1)
    except ValueError as err:
        raise ConfigError(f"network: {err}") from None


def rank_rule(cfg: TrainConfig, ranks_file: AdapterFile | None = None, model: BaseModel | None = None):
    """Each module's rank and alpha as the config chooses; with ``network.dim_from_weights``, those of
    ``ranks_file``'s modules (matched to ``model``'s layers)."""
    net = cfg.network
    conv_alpha = net.conv_alpha if net.conv_alpha is not None else net.alpha
    sdxl = bool(getattr(model, "is_sdxl", False))  # which blocks the block-wise settings name
    if net.dim_from_weights:
        if ranks_file is None or model is None:
            raise ValueError("network.dim_from_weights: the rank rule needs the adapter file and the model")
        rule = ranks_from_file(ranks_file, UniformRanks(net.rank, net.alpha, net.conv_rank, net.conv_alpha),
                               model.unet if net.train_unet else None,
                               model.text_encoders if net.train_text_encoder else None, algorithm=net.algorithm)
    elif net.blocks is not None:
        if net.block_dims is not None:
            raise ValueError("network: blocks and block_dims both given; use one of them")
        block_map = SDXL if sdxl else SD1
        try:
            dims = blocks_block_dims(net.blocks, net.rank, block_map)
            conv_rank = net.rank if net.conv_rank is None else net.conv_rank  # as UniformRanks: None = rank
            conv_dims = blocks_block_dims(net.blocks, conv_rank, block_map) if conv_rank > 0 else None
        except ValueError as err:
            raise ConfigError(f"network.blocks: {err}") from None
        # outside the U-Net blocks only the text encoder is trained (if asked), as in the paper
        rule = BlockRanks(dims, alpha=net.alpha, conv_block_dims=conv_dims, conv_alpha=conv_alpha,
                          outside=text_encoder_only(UniformRanks(net.rank, net.alpha, net.conv_rank, net.conv_alpha)),
                          block_map=block_map)
    elif net.block_dims is not None:
        rule = block_dims_rule(cfg, sdxl=sdxl)
    else:
        rule = UniformRanks(net.rank, net.alpha, net.conv_rank, net.conv_alpha)
    weights = block_lr_weights(cfg, sdxl=sdxl)
    return rule if weights is None else WithoutZeroBlocks(rule, weights)


class AdapterMethod(TrainingMethod):
    """An adapter of the LoRA family on the U-Net and/or the text encoder."""

    kind = "adapter"

    def __init__(self, cfg: TrainConfig, model: BaseModel, start_file: AdapterFile | bool = True,
                 ranks_file: AdapterFile | None = None) -> None:
        """``start_file``: True reads ``network.weights`` when it is set, False leaves it unread, an
        ``AdapterFile`` is that file already read (the trainer reads it before the model, to refuse it early).
        ``ranks_file``: where ``network.dim_from_weights`` reads the ranks when the start file is not read (a
        resumed run: its checkpoint); by default the start file."""
        net = cfg.network
        # the file read once: it may give the ranks and start the weights
        start = start_file if isinstance(start_file, AdapterFile) else \
            read_adapter(Path(net.weights).expanduser()) if start_file and net.weights else None
        if net.dim_from_weights and ranks_file is None:
            ranks_file = start if start is not None else read_adapter(Path(net.weights).expanduser())
        if not (net.train_unet or net.train_text_encoder):
            raise ConfigError("network: train_unet and train_text_encoder are both false: nothing to train")
        options = dict(net.args)
        for key, value, default in (("dropout", net.dropout, 0.0), ("rank_dropout", net.rank_dropout, 0.0),
                                    ("module_dropout", net.module_dropout, 0.0), ("dora", net.use_dora, False)):
            if value != default:
                options[key] = value
        ranks = rank_rule(cfg, ranks_file, model)
        if net.dim_from_weights and getattr(ranks, "holds_norms", lambda: False)():
            options["train_norm"] = True  # the file's norm-layer updates are modules of its network too
        self.network: AdapterNetwork = create_network(
            model.unet if net.train_unet else None, model.text_encoders if net.train_text_encoder else None,
            preset=adapted_preset(cfg, model), ranks=ranks, algorithm=net.algorithm, options=options)
        self._max_norm: MaxNormReading | None = None
        if net.max_norm is not None:
            try:
                check_max_norm_supported(self.network)
            except ValueError as err:
                raise ConfigError(f"network.max_norm: {err}") from None
        if net.dim_from_weights:  # not a preset's name: the file chose the layers, and their algorithms
            self.network.args["preset"] = "from-weights"
            self.network.args["algo"] = next(iter(self._layer_algorithms()), net.algorithm)
        for key in ("include", "exclude"):  # the layer filters, in ss_network_args beside the preset
            if getattr(net, key):
                self.network.args[key] = ",".join(getattr(net, key))
        for key in LORAPLUS_KEYS:
            if getattr(net, key) is not None:  # recorded in ss_network_args, where kohya's network_args put them
                self.network.args[key] = f"{getattr(net, key):g}"
        if loraplus_ratios(cfg) and not any(k.startswith("lora_up.") for name in self.network.names()
                                            for k, _ in self.network[name].named_parameters()):
            raise ConfigError(f"network.loraplus_lr_ratio: LoRA+ speeds up the up matrices (lora_up) of LoRA, "
                              f"LoCon, DoRA and DyLoRA; {net.algorithm} has none")
        if len(self.network) == 0 and net.dim_from_weights:
            raise ConfigError(f"network.dim_from_weights: {ranks_file.label}: none of its modules is a layer this "
                              "run adapts (network.train_unet/train_text_encoder)")
        if len(self.network) == 0:
            raise ConfigError(f"network: preset {net.preset!r} with these ranks selects no module of the model")
        self.started_from = None
        # after the fresh initialisation, which it replaces (so the random stream stays the same)
        if start is not None:
            self.started_from = start_network_from_file(
                self.network, start, model.unet if net.train_unet else None,
                model.text_encoders if net.train_text_encoder else None)
        self.cfg = cfg
        self._sdxl = bool(getattr(model, "is_sdxl", False))  # which blocks kohya's block learning rates follow
        self._meter = CSMeter({n: self.network[n] for n in self.network.names("unet")}) \
            if self.network.names("unet") else None

    def _layer_algorithms(self) -> list[str]:
        """The algorithms of the network's layer modules, most modules first (norm-layer updates, which go beside
        them, aside): a file's, with ``network.dim_from_weights``."""
        counts = Counter(a.algorithm for a in self.network.adapters.values() if a.trains_layers)
        return [name for name, _ in counts.most_common()]

    def after_optimizer_step(self) -> None:
        if self.cfg.network.max_norm is not None:
            self._max_norm = apply_max_norm(self.network, self.cfg.network.max_norm)

    def step_record(self) -> dict[str, float]:
        return self._max_norm.to_record() if self._max_norm is not None else {}

    def param_groups(self) -> list[dict]:
        groups = []
        params = self.network.trainable_parameters()
        lrs = {"unet": _lr(self.cfg, self.cfg.optimizer.unet_lr),
               "text_encoder": _lr(self.cfg, self.cfg.optimizer.text_encoder_lr)}
        weights = block_lr_weights(self.cfg, self._sdxl)
        plus = loraplus_ratios(self.cfg)
        for group, plist in params.items():
            if not plist:
                continue
            lr = lrs.get(group, self.cfg.optimizer.learning_rate)
            by_block = weights is not None and group == "unet"
            ratio = plus.get(group)
            if not by_block and ratio is None:
                groups.append({"params": plist, "lr": lr, "name": group})
                continue
            # kohya's block learning rates (one group per factor) and LoRA+ (the up matrices in groups of their own)
            split: dict[tuple[float, bool], list] = {}
            for name in self.network.names(group):
                factor = weights(name) if by_block else 1.0
                for k, p in self.network[name].named_parameters():
                    if not k.startswith("base.") and p.requires_grad:
                        split.setdefault((factor, ratio is not None and k.startswith("lora_up.")), []).append(p)
            for (factor, up), own in split.items():
                label = f"{group} x{factor:g}" if by_block else group
                groups.append({"params": own, "lr": lr * factor * (ratio if up else 1.0),
                               "name": f"{label} plus" if up else label})
        return groups

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return self.network.trained_state()

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network.load_trained_state(tensors)

    def file_form(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.network.fold_state(tensors)

    def cs_meter(self) -> CSMeter | None:
        # CS over the U-Net's adapters, as the paper; a text-encoder-only network falls back to all of them
        if self._meter is None:
            self._meter = CSMeter(dict(self.network.adapters.items()))
        return self._meter

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample with ``W0 + ΔW`` baked into the base layers: one matmul per layer instead of the base one plus
        the update's own path (the built-in job's sampling took twice the base model's time unmerged).  Only in
        float32/64: in half precision the addition rounds a small ΔW away.  ``unmerge`` restores the weights
        bit for bit, so training continues exactly as without sampling.  Costs a copy of the adapted weights
        while it lasts."""
        weights = [a.base.weight for a in self.network.adapters.values()]
        if not weights or any(w.dtype not in FUSE_DTYPES for w in weights):
            yield
            return
        self.network.merge()
        try:
            yield
        finally:
            self.network.unmerge()

    def check_multiplier(self, multiplier: float) -> None:
        """Any multiplier scales an adapter."""

    @contextmanager
    def scaled(self, multiplier: float) -> Iterator[None]:
        if multiplier == 1.0:
            yield
            return
        self.network.set_multiplier(multiplier)
        try:
            yield
        finally:  # the meter, checkpoints and samples see the adapter as it is
            self.network.set_multiplier(1.0)

    def save(self, folder: Path, name: str, metadata: dict[str, str]) -> list[Path]:
        path = folder / f"{name}.safetensors"
        save_network(self.network, path, metadata=metadata, overwrite=True, dtype=save_dtype(self.cfg),
                     format=self.cfg.output.format)
        return [path]

    def summary(self) -> str:
        counts = {g: len(self.network.names(g)) for g in self.network.groups}
        n_params = sum(p.numel() for ps in self.network.trainable_parameters().values() for p in ps)
        where = ", ".join(f"{n} {g} modules" for g, n in counts.items())
        norms = sum(a.kind == "norm" for a in self.network.adapters.values())
        if norms:  # LyCORIS's train_norm
            where += f" ({norms} of them norm layers: train_norm)"
        net = self.cfg.network
        started = f"\n{self.started_from.summary()}" if self.started_from is not None else ""
        if net.dim_from_weights:
            ranks = [r for a in self.network.adapters.values() if isinstance(r := getattr(a, "rank", None), int)]
            algorithms = self._layer_algorithms()
            shape = "/".join(algorithms) + (
                f" ranks {'–'.join(str(r) for r in sorted({min(ranks), max(ranks)}))}" if ranks else "") + \
                " and layers from the file" + ("" if net.algorithm in algorithms else
                                               f" (not network.algorithm {net.algorithm}: the file decides)")
        else:
            size = rank_words(net.algorithm, net.rank, net.alpha)
            shape = f"{net.algorithm}{' ' + size if size else ''}, preset {net.preset}"
        return f"{shape}: {where}, {n_params:,} trainable parameters{started}"


# ------------------------------------------------------------------------------------------------ native
_TEXT_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def _text_encoder_rates(cfg: TrainConfig, encoders: int) -> list[float]:
    """Native fine-tuning's rate for each text encoder: text_encoder_lr (else the learning rate), and for SDXL's
    second text_encoder_2_lr where it is set (0: not trained)."""
    check_second_text_encoder_rate(cfg, encoders)
    first, second = _lr(cfg, cfg.optimizer.text_encoder_lr), cfg.optimizer.text_encoder_2_lr
    return [first, *([first if second is None else second] * (encoders - 1))]


def check_second_text_encoder_rate(cfg: TrainConfig, encoders: int) -> None:
    """Refuse optimizer.text_encoder_2_lr for a model with one text encoder (the trainer and its dry run)."""
    if cfg.optimizer.text_encoder_2_lr is not None and encoders < 2:
        raise ConfigError("optimizer.text_encoder_2_lr is the rate of SDXL's second text encoder, and this model has "
                          "one text encoder: remove it (optimizer.text_encoder_lr sets the rate of its one)")


def _text_parameter_read(model: BaseModel, encoder: int, name: str, clip_skip: int) -> bool:
    """Whether the U-Net's conditioning reads a text-encoder parameter (so a gradient reaches it): SD1.x/2.x's
    layers up to the clip skip's (and the final norm, which kohya applies to it); SDXL's first encoder's layers up
    to its penultimate, without the final norm; all of SDXL's second, whose pooled output runs through every
    layer, the final norm and the projection."""
    layers = model.text_encoders[encoder].config.num_hidden_layers
    if not model.is_sdxl:
        return _text_layer(name) < layers - (clip_skip - 1)
    if encoder == 1:
        return True
    return _text_layer(name) < layers - 1 and "final_layer_norm" not in name


def _text_layer(name: str) -> int:
    """The text encoder's layer a parameter belongs to (-1: embeddings and the final norm, read by every layer)."""
    match = _TEXT_LAYER.search(name)
    return int(match.group(1)) if match else -1


class NativeMethod(TrainingMethod):
    """Fine-tune the U-Net's own weights, and with ``method.native_text_encoder`` the text encoder's (DreamBooth
    when combined with prior preservation).

    CS-Fluctuation uses ``ΔW = W − W0`` over the adapted-layer kinds of the chosen targets; ``W0`` is a copy
    kept on the CPU.
    """

    kind = "native"

    def __init__(self, cfg: TrainConfig, model: BaseModel) -> None:
        self.cfg, self.model = cfg, model
        unet = model.unet
        unet.requires_grad_(False)
        targets = cfg.method.native_targets
        if targets == "all":
            self.params = {n: p for n, p in unet.named_parameters()}
            layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        else:
            comp = network_components(unet)[0]
            layers = select_targets(comp, get_preset(targets).unet)
            self.params = {f"{n}.{k}": p for n, m in layers for k, p in m.named_parameters()}
        # each trained encoder's rate (SDXL's second may have its own, or 0: not trained)
        self.text_rates = _text_encoder_rates(cfg, len(model.text_encoders)) if cfg.method.native_text_encoder else []
        # the text encoders' under a prefix of their own in checkpoints (``lorakit.evaluate`` reads them so); the
        # parameters the conditioning leaves unread get no gradient, and would stall a distributed run waiting for one
        self.text_params = {
            f"{prefix}{n}": p
            for k, (prefix, encoder) in enumerate(zip(TEXT_ENCODER_PREFIXES, model.text_encoders, strict=False))
            if self.text_rates and self.text_rates[k] > 0
            for n, p in encoder.named_parameters() if _text_parameter_read(model, k, n, cfg.model.clip_skip)
        }
        self.blocks = fine_tune_blocks(cfg, unet, self.params)
        if self.blocks is not None:  # kohya's block_lr: a block at 0 is not trained at all
            rates = cfg.method.native_block_lr
            self.params = {n: p for n, p in self.params.items() if rates[self.blocks[n]] > 0}
        for p in [*self.params.values(), *self.text_params.values()]:
            p.requires_grad_(True)
        # W0 of the layers whose ΔW CS-Fluctuation follows (the U-Net's trained ones, as the paper: a block that
        # native_block_lr leaves at 0 has no update to follow)
        self._pairs = [(m.weight, m.weight.detach().to("cpu", copy=True)) for _, m in layers if m.weight.requires_grad]

    def param_groups(self) -> list[dict]:
        if self.blocks is None:
            groups = [{"params": list(self.params.values()), "lr": _lr(self.cfg, self.cfg.optimizer.unet_lr),
                       "name": "unet"}]
        else:  # one group per block, in kohya's order, at its own rate
            by_block: dict[int, dict] = {}
            for n, p in self.params.items():
                block = self.blocks[n]
                by_block.setdefault(block, {"params": [], "lr": self.cfg.method.native_block_lr[block],
                                            "name": f"unet_block_{block}"})["params"].append(p)
            groups = [by_block[block] for block in sorted(by_block)]
        for k, (prefix, rate) in enumerate(zip(TEXT_ENCODER_PREFIXES, self.text_rates, strict=False)):
            params = [p for n, p in self.text_params.items() if n.startswith(prefix)]
            if params:
                groups.append({"params": params, "lr": rate, "name": "text_encoder" if k == 0 else "text_encoder_2"})
        return groups

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in {**self.params, **self.text_params}.items()}

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in {**self.params, **self.text_params}.items():
                p.copy_(tensors[n])

    def before_step(self, step: int) -> None:
        # kohya's stop_text_encoder_training: from this step on no gradient reaches the text encoder, so the
        # optimizer leaves it as it is (AdamW skips a parameter without a gradient, weight decay included)
        limit = self.cfg.method.native_text_encoder_steps
        if self.text_params and not self.text_encoder_stopped and limit is not None and step >= limit:
            for p in self.text_params.values():
                p.requires_grad_(False)
                p.grad = None
            self.text_encoder_stopped = True

    def cs_meter(self) -> NativeCSMeter | None:
        return NativeCSMeter(self._pairs)

    def save(self, folder: Path, name: str, metadata: dict[str, str]) -> list[Path]:
        if self.cfg.output.format == "diffusers":  # kohya's save_model_as = "diffusers": a folder from_pretrained reads
            return [save_diffusers_folder(self.model, folder / name, save_dtype(self.cfg), overwrite=True)]
        path = folder / f"{name}.safetensors"
        save_single_file_checkpoint(self.model, path, save_dtype(self.cfg), overwrite=True)
        return [path]

    def summary(self) -> str:
        n = sum(p.numel() for p in [*self.params.values(), *self.text_params.values()])
        return (f"native fine-tuning of the U-Net ({self.cfg.method.native_targets}){text_encoder_part(self.cfg)}: "
                f"{n:,} trainable parameters")


# --------------------------------------------------------------------------------------- textual inversion
def check_ti_token(cfg: TrainConfig, tokenizers: Sequence[CLIPTokenizer]) -> str | None:
    """Refuse a textual-inversion token the tokenizers hold as a single token (it would not be new); say when it is
    a whole word of their vocabulary (``star</w>``), which the new token then stands in for in every prompt."""
    token = cfg.method.ti_token or cfg.data.trigger
    if not token:
        raise ConfigError("textual inversion needs a token: set method.ti_token or data.trigger")
    tokens = token_names(token, cfg.method.ti_vectors)
    vocabularies = [tokenizer.get_vocab() for tokenizer in tokenizers]  # each a new dict of ~49k entries
    if any(t in vocabulary for vocabulary in vocabularies for t in tokens):
        raise ConfigError(f"textual inversion: token {token!r} (or one of {tokens}) is already in the "
                          "tokenizer's vocabulary as a single token; choose a new word")
    words = [t for t in tokens if any(f"{t}</w>" in vocabulary for vocabulary in vocabularies)]
    if not words:
        return None
    return (f"note: textual inversion: {words[0]!r} is a word of the model's vocabulary: the new token takes its "
            f"place, so {words[0]!r} in any prompt means the trained concept from now on (as in A1111 with an "
            "embedding of that name); a made-up word such as 'zkz' leaves the vocabulary's words alone")


class TextualInversion(TrainingMethod):
    """New token(s) in the text encoder's vocabulary; only their embedding rows train.

    With ``ti_vectors`` = n > 1 the token stands for n embeddings: ``zkz`` is written in prompts and expanded
    to ``zkz zkz_1 ... zkz_{n-1}`` before tokenization.
    """

    kind = "ti"

    def __init__(self, cfg: TrainConfig, model: BaseModel, start: Sequence[torch.Tensor] | None = None) -> None:
        """``start``: the vectors to start from, one ``[n, d]`` tensor per text encoder (method.ti_weights)."""
        self.cfg, self.model = cfg, model
        check_ti_token(cfg, model.tokenizers)  # the trainer has said its note before the model loaded
        token = cfg.method.ti_token or cfg.data.trigger
        self.token = token
        self.tokens = token_names(token, cfg.method.ti_vectors)
        if isinstance(start, torch.Tensor):  # one encoder's vectors
            start = (start,)
        if start is not None:
            try:
                check_vectors(model, start, str(cfg.method.ti_weights))
            except EmbeddingError as err:
                raise ConfigError(f"method.ti_weights: {err}") from None
        ids = register_tokens(model, self.tokens)
        if ids is None:
            raise ConfigError(f"textual inversion: token {token!r} (or one of {self.tokens}) is already in the "
                             "tokenizer's vocabulary as a single token; choose a new word")
        init_ids = model.tokenizer(cfg.method.ti_init_word, add_special_tokens=False).input_ids
        if not init_ids:
            raise ConfigError(f"textual inversion: method.ti_init_word {cfg.method.ti_init_word!r} gives no tokens; "
                             "set it to a word close to the concept (e.g. \"dog\", \"style\") or \"*\"")
        self.ids = ids
        # one table of rows per text encoder (SDXL: two), each trained in the new tokens' rows only
        self.embeddings = [te.get_input_embeddings().weight for te in model.text_encoders]
        with torch.no_grad():
            for k, emb in enumerate(self.embeddings):  # from the file (kohya's --weights), else the init word
                for i, token_id in enumerate(self.ids):
                    emb[token_id] = start[k][i].to(emb.dtype) if start is not None else \
                        emb[init_ids[i % len(init_ids)]]
        for te, emb in zip(model.text_encoders, self.embeddings, strict=True):
            te.requires_grad_(False)
            emb.requires_grad_(True)
        self._frozen = [emb.detach().clone() for emb in self.embeddings]
        self._trained_rows = torch.zeros(self.embeddings[0].shape[0], dtype=torch.bool)
        self._trained_rows[self.ids] = True

    def param_groups(self) -> list[dict]:
        # no weight decay: it would shrink the frozen rows too (they are restored after each step anyway)
        return [{"params": list(self.embeddings), "lr": self.cfg.optimizer.ti_lr, "weight_decay": 0.0,
                 "name": "textual_inversion"}]

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            for emb, frozen in zip(self.embeddings, self._frozen, strict=True):
                keep = ~self._trained_rows.to(emb.device)
                emb[keep] = frozen.to(emb.device)[keep]

    def hold_untrained_gradients(self) -> None:
        for emb in self.embeddings:
            if emb.grad is not None:
                emb.grad[~self._trained_rows.to(emb.device)] = 0

    def vectors(self) -> tuple[torch.Tensor, ...]:
        """The trained vectors, one ``[n, d]`` tensor per text encoder."""
        return tuple(emb.detach()[self.ids] for emb in self.embeddings)

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return embedding_tensors(self.vectors())

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, emb in zip(ENCODER_KEYS, self.embeddings, strict=False):
                emb[self.ids] = tensors[key].to(emb.dtype)

    def expand_prompt(self, prompt: str) -> str:
        return expand_tokens(prompt, self.tokens)

    def save(self, folder: Path, name: str, metadata: dict[str, str]) -> list[Path]:
        path = folder / f"{name}-{self.token}.safetensors"
        # A1111, ComfyUI and diffusers read a single-tensor file; "clip_l" names the encoder (SDXL: + clip_g)
        write_adapter(path, {k: v.float().cpu().contiguous() for k, v in embedding_tensors(self.vectors()).items()},
                      {**as_embedding(metadata, self.token), TI_TOKEN_KEY: self.token,
                       "lorakit_ti_vectors": str(len(self.tokens))},
                      overwrite=True, dtype=save_dtype(self.cfg))
        return [path]

    def summary(self) -> str:
        start = f"from {self.cfg.method.ti_weights}" if self.cfg.method.ti_weights else \
            f"init {self.cfg.method.ti_init_word!r}"
        return f"textual inversion: token {self.token!r} × {len(self.tokens)} vector(s), {start}"


class PivotalTuning(TrainingMethod):
    """Textual inversion and an adapter trained together (new token at a high lr, adapter at a low lr)."""

    kind = "pivotal"

    def __init__(self, cfg: TrainConfig, model: BaseModel, start_file: AdapterFile | bool = True,
                 ranks_file: AdapterFile | None = None, ti_start: Sequence[torch.Tensor] | None = None) -> None:
        self.ti = TextualInversion(cfg, model, ti_start)
        self.adapter = AdapterMethod(cfg, model, start_file, ranks_file)

    def param_groups(self) -> list[dict]:
        return self.ti.param_groups() + self.adapter.param_groups()

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.adapter.trained_tensors(),
                **{f"{PIVOTAL_EMBEDDING_PREFIX}{k}": v for k, v in self.ti.trained_tensors().items()}}

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        adapter, embedding = split_pivotal(tensors)
        self.adapter.load_trained_tensors(adapter)
        self.ti.load_trained_tensors(embedding)

    def file_form(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        adapter, embedding = split_pivotal(tensors)
        return {**self.adapter.file_form(adapter),
                **{f"{PIVOTAL_EMBEDDING_PREFIX}{k}": v for k, v in embedding.items()}}

    def cs_meter(self) -> Callable[[], float] | None:
        return self.adapter.cs_meter()

    def expand_prompt(self, prompt: str) -> str:
        return self.ti.expand_prompt(prompt)

    def after_optimizer_step(self) -> None:
        self.ti.after_optimizer_step()
        self.adapter.after_optimizer_step()

    def hold_untrained_gradients(self) -> None:
        self.ti.hold_untrained_gradients()

    def step_record(self) -> dict[str, float]:
        return self.adapter.step_record()

    def sampling(self) -> AbstractContextManager[None]:
        return self.adapter.sampling()

    def check_multiplier(self, multiplier: float) -> None:
        self.adapter.check_multiplier(multiplier)

    def scaled(self, multiplier: float) -> AbstractContextManager[None]:
        return self.adapter.scaled(multiplier)

    def save(self, folder: Path, name: str, metadata: dict[str, str]) -> list[Path]:
        # the adapter names its token: eval and sample find the embedding beside it (file_kinds.pivotal_embedding)
        return (self.adapter.save(folder, name, {**metadata, TI_TOKEN_KEY: self.ti.token})
                + self.ti.save(folder, name, metadata))

    def summary(self) -> str:
        return f"pivotal tuning: {self.ti.summary()}; {self.adapter.summary()}"


def check_sdxl_settings(cfg: TrainConfig) -> None:
    """Refuse what does not fit SDXL, before any work: block-wise groups and kohya's block learning rates that name
    SD1.x's blocks (SDXL has 3 levels: IN0-IN2, MID, OUT0-OUT2; 9 blocks per side), and a clip skip, which SDXL
    has not."""
    try:
        check_sdxl_clip_skip(cfg.model.clip_skip, cfg.model.base)
    except InvalidValueError as err:  # as the trainer says it (its check_clip_skip)
        raise ConfigError(f"model.clip_skip: {err}") from None
    if cfg.network.blocks is not None:  # SDXL's coarse groups: IN0-IN2, MID, OUT0-OUT2
        try:
            blocks_block_dims(cfg.network.blocks, 1, SDXL)
        except ValueError as err:
            raise ConfigError(f"network.blocks: {err}") from None
    block_lr_weights(cfg, sdxl=True)  # kohya's SDXL lists: 9 per side, up to 3 middle values


def make_method(cfg: TrainConfig, model: BaseModel, start_file: AdapterFile | bool = True,
                ranks_file: AdapterFile | None = None, ti_start: Sequence[torch.Tensor] | None = None
                ) -> TrainingMethod:
    """The configured method; ``start_file`` and ``ranks_file`` as ``AdapterMethod`` takes them (False leaves
    ``network.weights`` unread: a resumed run's checkpoint holds what the file started); ``ti_start``: the vectors
    a new embedding starts from (method.ti_weights)."""
    if model.is_sdxl:
        check_sdxl_settings(cfg)
    if cfg.method.kind == "adapter":
        return AdapterMethod(cfg, model, start_file, ranks_file)
    if cfg.method.kind == "pivotal":
        return PivotalTuning(cfg, model, start_file, ranks_file, ti_start)
    if cfg.method.kind == "ti":
        return TextualInversion(cfg, model, ti_start)
    return NativeMethod(cfg, model)
