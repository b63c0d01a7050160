"""The training loop: a folder of images and a base model in, a trained adapter (or embedding, or model) out.

Read it top to bottom: ``train()`` sets everything up (``_set_up``: the model, what is trained, the data, the
optimizer, the early-stopping monitor, a resumed run's state), runs epochs of steps (``_TrainingLoop``: it asks
the early-stopping monitor after every step, and saves a checkpoint and samples at the end of each epoch), and
finishes with the result files and a summary (``_finish``).  Every step draws its randomness from (seed, step),
and the data order from (seed, epoch), so a run resumed from a checkpoint continues exactly as if it had never
stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list
from tqdm import tqdm

from lorakit.checkpoint_names import BASE_WEIGHTS_KEY, EMA_DECAY_KEY, METHOD_KEY
from lorakit.checkpoints import RunFolder
from lorakit.conditioning import ConditioningCache
from lorakit.config import (
    ConfigError,
    TrainConfig,
    TrainingConfig,
    load_config,
    missing_paths,
    resume_changes,
    to_toml,
    with_absolute_paths,
)
from lorakit.data import DataConfig, TrainingData
from lorakit.earlystop import CSFluctuationMonitor, plot_cs_fluctuation
from lorakit.earlystop.monitor import Decision, TurningPoint
from lorakit.earlystop.plot import plot_sample_scores
from lorakit.earlystop.rules import SIZE_SERIES
from lorakit.earlystop.samples import SampleStop, SampleTurningPoint, make_sample_stop
from lorakit.ema import WeightAverage
from lorakit.errors import LorakitError
from lorakit.formats import AdapterFile, AdapterFileError, nonfinite_tensors, read_adapter
from lorakit.fp8 import store_frozen_in_fp8
from lorakit.fused_backward import FusedBackwardOptimizer
from lorakit.loss import check_loss_options
from lorakit.metadata import base_model_fields, ss_metadata
from lorakit.methods import TrainingMethod, check_ti_token, make_method
from lorakit.models import (
    BaseModel,
    check_clip_skip,
    describe_base_model,
    load_base_model,
    prompt_token_counts,
    resolve_dtype,
)
from lorakit.modelspec import USER_FIELDS, modelspec_metadata
from lorakit.optimizers import OptimizerNameError, adaptive_lr_note, optimizer_builder
from lorakit.prior import RUN_CLASS_FOLDER, class_images_parent, ensure_class_images
from lorakit.prompt_weights import plain_text
from lorakit.run_manifest import RunManifest
from lorakit.run_messages import (
    count,
    early_stop_text,
    estimate_line,
    ia3_preset_note,
    next_steps,
    opening_line,
    setting_lines,
)
from lorakit.sample import SamplePrompt, generate, load_prompts, long_prompts_note, save_sample_grid
from lorakit.schedule_free import evaluation_weights, is_schedule_free
from lorakit.schedules import build_lr_schedule
from lorakit.step_loss import compute_loss, step_seed, validation_loss
from lorakit.tools.merge import merge_base_weights
from lorakit.trackers import (
    WANDB_RUN_FILE,
    check_tracker,
    hyperparameters,
    log_sample_images,
    logging_dir,
    merge_tracker_settings,
    read_tracker_settings,
    scalars,
    tracker_init_kwargs,
    tracker_names,
)
from lorakit.vae import use_vae, vae_name


class TrainingError(LorakitError):
    """Training cannot go on (non-finite loss, ...); the message says what happened and what was kept."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C during training: the message says where the run stopped and how to continue it."""

    exit_code = 130


@dataclass
class TrainResult:
    output_dir: Path
    files: list[Path]
    epochs: int
    steps: int
    stopped_early: bool
    turning_point: dict[str, Any] | None
    final_epoch: int
    losses: list[float] = field(default_factory=list)
    summary: str = ""


# ------------------------------------------------------------------------------------------------ set-up
def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    try:
        build = optimizer_builder(opt.optimizer)
    except OptimizerNameError as err:
        raise TrainingError(f"optimizer.optimizer: {err}") from None
    try:
        if opt.fused_backward_pass:  # an optimizer per weight, stepped during backward()
            return FusedBackwardOptimizer(groups, lambda part: build(part, opt), opt.max_grad_norm)
        return build(groups, opt)
    except ImportError as err:
        raise TrainingError(f"optimizer.optimizer = {opt.optimizer!r}: {err}") from None
    except (TypeError, ValueError) as err:  # an option the optimizer does not have, or a value it refuses
        raise TrainingError(f"optimizer.args = {opt.args!r} for {opt.optimizer}: {err}") from None


def group_rates(param_groups: list[dict]) -> dict[str, float]:
    """Each named parameter group's learning rate now, as ``lr/<name>`` (kohya's ``lr/unet``, ``lr/textencoder``),
    when a run trains more than one (the text encoder's rate, block rates, LoRA+); ``lr`` alone says it otherwise."""
    rates = {f"lr/{group.get('name', i)}": group["lr"] for i, group in enumerate(param_groups)}
    return rates if len(rates) > 1 else {}


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return resolve_dtype(mixed_precision)  # "no" (no mixed precision) is fp32


def prepare_model(cfg: TrainConfig, accelerator: Accelerator) -> BaseModel:
    """Load the base model; frozen parts in the mixed-precision dtype, everything trained stays fp32 (but under
    model.full_bf16, which trains native fine-tuning's weights in bf16)."""
    model = load_base_model(cfg.model.base, prediction_type=cfg.model.prediction_type)
    use_vae(model, cfg.model.vae)
    if cfg.model.base_weights:  # kohya's --base_weights: merged in before the adapters or anything else see W
        try:
            lines = merge_base_weights(model, cfg.model.base_weight_pairs())
        except LorakitError as err:
            raise ConfigError(f"model.base_weights: {err}") from None
        for line in lines:
            if accelerator.is_main_process:
                print(f"base weights: {line}")
    if cfg.model.prediction_type or cfg.model.zero_terminal_snr:
        model.set_schedule(cfg.model.prediction_type, cfg.model.zero_terminal_snr)
    check_loss_options(cfg.training, model.prediction_type, model.noise_scheduler.config.num_train_timesteps)
    model.vae.requires_grad_(False)
    model.unet.requires_grad_(False)
    for text_encoder in model.text_encoders:
        text_encoder.requires_grad_(False)
    low = weight_dtype(cfg.model.mixed_precision)
    if low != torch.float32:
        # SDXL's VAE overflows in fp16 (NaN latents: kohya's SDXL users pass --no_half_vae), so it stays fp32
        # unless its config says fp16 is safe (force_upcast false, as the fp16-fix VAE's does)
        unsafe_in_fp16 = model.is_sdxl and low == torch.float16 and model.vae.config.get("force_upcast", True)
        if not (cfg.model.no_half_vae or unsafe_in_fp16):
            model.vae.to(dtype=low)
        if cfg.method.kind != "native" or cfg.model.full_bf16:  # full_bf16: what native trains too
            model.unet.to(dtype=low)
        # a trained text encoder's weights stay float32 (mixed precision runs in autocast), but under full_bf16
        if cfg.trained_text_encoder_setting() is None or cfg.model.full_bf16:
            for text_encoder in model.text_encoders:
                text_encoder.to(dtype=low)
    model.to(accelerator.device)
    if cfg.model.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for text_encoder in model.text_encoders:
            text_encoder.gradient_checkpointing_enable()
    return model


def distributed_settings(training: TrainingConfig) -> list:
    """accelerate's handlers for kohya's ddp_timeout, ddp_gradient_as_bucket_view and ddp_static_graph (none when
    they are not set: accelerate's and torch's defaults)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list = []
    if training.ddp_timeout is not None:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=training.ddp_timeout)))
    if training.ddp_gradient_as_bucket_view or training.ddp_static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=training.ddp_gradient_as_bucket_view,
                                                      static_graph=training.ddp_static_graph))
    return handlers


def ddp_timeout_note(training: TrainingConfig) -> str | None:
    """A note when training.ddp_timeout cannot apply: the processes' group was set up before ``train()`` (by the
    calling script), with the timeout it was given then (printed by its first process only)."""
    import torch.distributed as dist

    if training.ddp_timeout is None or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() != 0:
        return None
    return (f"note: training.ddp_timeout = {training.ddp_timeout} does not apply: the processes' group was set up "
            "before train() (by this script), with the timeout given there; set it where the group is made, e.g. "
            "accelerate's InitProcessGroupKwargs(timeout=...)")


def keep_frozen_out_of_ddp(module: torch.nn.Module) -> None:
    """DistributedDataParallel leaves the module's frozen weights alone: each process loaded the same ones, and its
    broadcast of them from the first process at the start would copy the whole base model for nothing (and gloo,
    the CPU's backend, cannot send fp8 weights: model.fp8_base)."""
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)


def store_base_in_fp8(model: BaseModel, parts: tuple[str, ...]) -> str:
    """model.fp8_base / fp8_base_unet: the frozen weights of ``parts`` ("unet", "text_encoders") stored in fp8;
    the line the run prints about it."""
    modules = [model.unet, *(model.text_encoders if "text_encoders" in parts else ())]
    sizes = [store_frozen_in_fp8(module) for module in modules]
    before, after = (sum(size[i] for size in sizes) / 2**20 for i in (0, 1))
    names = "U-Net's and text encoders'" if "text_encoders" in parts else "U-Net's"
    return (f"fp8 base: the {names} frozen weights take {after:.1f} MiB with their linear and conv layers in fp8, "
            f"instead of {before:.1f} MiB")


def with_class_images(cfg: TrainConfig, model: BaseModel, run: RunFolder, is_main: bool,
                      accelerator: Accelerator) -> DataConfig:
    """The data config, with generated class images for prior preservation when they are asked for."""
    data = cfg.data
    if data.num_class_images <= 0:
        return data
    folder = class_images_parent(data.reg_data, run.path)  # data.class_prompt: checked by cfg.validate()
    if is_main:
        if not data.reg_data:
            run.make_dir(RUN_CLASS_FOLDER)
        ensure_class_images(model, folder, data.class_prompt, data.num_class_images, seed=cfg.training.seed,
                            steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale, clip_skip=cfg.model.clip_skip,
                            max_token_length=cfg.model.max_token_length)
        if not data.reg_data:
            run.record_tree(RUN_CLASS_FOLDER)
    accelerator.wait_for_everyone()
    return replace(data, reg_data=str(folder))


def sample_prompts(cfg: TrainConfig) -> list[SamplePrompt]:
    """The sample prompt file's prompts (none without one), with the run's sampling defaults; a size a prompt does
    not set is the model's own (``SamplePrompt``).  Raises what drawing them would raise, so it is read before the
    model loads."""
    if not cfg.sample.prompts:
        return []
    defaults = SamplePrompt("", steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale, sampler=cfg.sample.sampler)
    return load_prompts(cfg.sample.prompts, defaults)


#: what output.no_metadata keeps (kohya's --no_metadata keeps its SS_METADATA_MINIMUM_KEYS and the ModelSpec): the
#: file's kind and base model, and what tools need to load it and draw it as trained
MINIMUM_METADATA = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                    "ss_network_args", "ss_clip_skip", "ss_max_token_length", "ss_v_parameterization",
                    "ss_zero_terminal_snr", METHOD_KEY)


def base_weights_metadata(cfg: TrainConfig) -> dict[str, str]:
    """The entry recording model.base_weights (name, multiplier, content hash), read once per run: lorakit sample
    says when a file is given without them (known by content: every lorakit result is called lorakit.safetensors)."""
    if not cfg.model.base_weights:
        return {}
    from lorakit.evaluate.checkpoints import file_hash

    return {BASE_WEIGHTS_KEY: json.dumps([[Path(f).name, multiplier, file_hash(Path(f).expanduser())]
                                          for f, multiplier in cfg.model.base_weight_pairs()])}


def metadata_for(cfg: TrainConfig, data: TrainingData, model: BaseModel, epoch: int, step: int,
                 extra: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata of a file the run writes at ``epoch``/``step`` (``extra``: entries of its own, such as
    ``base_weights_metadata``); with output.no_metadata, only MINIMUM_METADATA and the ModelSpec."""
    meta = {**_all_metadata(cfg, data, model, epoch, step), **(extra or {})}
    if cfg.output.no_metadata:  # kohya's --no_metadata: no dataset folders, tags, comments or settings
        meta = {k: v for k, v in meta.items() if k in MINIMUM_METADATA or k.startswith("modelspec.")}
    return meta


def _all_metadata(cfg: TrainConfig, data: TrainingData, model: BaseModel, epoch: int, step: int) -> dict[str, str]:
    meta = ss_metadata(
        learning_rate=cfg.optimizer.learning_rate,
        unet_lr=cfg.optimizer.unet_lr or cfg.optimizer.learning_rate,
        text_encoder_lr=cfg.optimizer.text_encoder_lr or cfg.optimizer.learning_rate,
        epoch=epoch, steps=step, max_train_epochs=cfg.training.max_epochs, seed=cfg.training.seed,
        # the schedule that ran: a torch schedule by its class (kohya writes its --lr_scheduler, unused then)
        lr_scheduler=cfg.optimizer.lr_scheduler_type or cfg.optimizer.lr_scheduler, optimizer=cfg.optimizer.optimizer,
        noise_offset=cfg.training.noise_offset,
        min_snr_gamma=str(cfg.training.min_snr_gamma),  # kohya writes "None" when it is off
        prior_loss_weight=cfg.training.prior_loss_weight, mixed_precision=cfg.model.mixed_precision,
        sd_model_name=Path(model.source).name if model.source else "builtin", vae_name=vae_name(cfg.model.vae),
        **base_model_fields(model.version, model.prediction_type),
        # kohya's names: tools that read a LoRA's metadata learn what the base model predicts and its schedule
        v_parameterization=model.prediction_type == "v_prediction",
        zero_terminal_snr=bool(model.scheduler_config.get("rescale_betas_zero_snr", False)),
        resolution=model.resolution,
        clip_skip=cfg.model.clip_skip if cfg.model.clip_skip > 1 else "None",  # kohya: "None" when not set
        max_token_length=cfg.model.max_token_length if cfg.model.max_token_length > 75 else "None",
        scale_weight_norms=str(cfg.network.max_norm),
        # kohya writes these as given ("None" when off)
        multires_noise_iterations=cfg.training.multires_noise_iterations or "None",
        multires_noise_discount=cfg.training.multires_noise_discount,
        ip_noise_gamma=cfg.training.ip_noise_gamma or "None",
        noise_offset_random_strength=bool(cfg.training.noise_offset_random_strength),
        ip_noise_gamma_random_strength=bool(cfg.training.ip_noise_gamma_random_strength),
        adaptive_noise_scale=str(cfg.training.adaptive_noise_scale),
        debiased_estimation=bool(cfg.training.debiased_estimation_loss),
        v_pred_like_loss=cfg.training.v_pred_like_loss or "None",
        scale_v_pred_loss_like_noise_pred=bool(cfg.training.scale_v_pred_loss_like_noise_pred),
        loss_type=cfg.training.loss_type, huber_schedule=cfg.training.huber_schedule, huber_c=cfg.training.huber_c,
        huber_scale=cfg.training.huber_scale,
        output_name=cfg.output.name, training_comment=cfg.output.comment or "None",
    )
    if data.held_out:  # kohya's names, as it writes them
        meta.update(ss_metadata(max_validation_steps=str(cfg.training.max_validation_steps),
                                validate_every_n_epochs=str(cfg.training.validate_every_n_epochs),
                                validate_every_n_steps=str(cfg.training.validate_every_n_steps)))
    meta[METHOD_KEY] = cfg.method.kind  # a native checkpoint is told by it (lorakit.native_checkpoints)
    if cfg.training.ema_decay is not None:  # the weights are a moving average (lorakit.ema)
        meta[EMA_DECAY_KEY] = str(cfg.training.ema_decay)
    meta.update(data.kohya_metadata())
    meta.update(_modelspec(cfg, data, model))
    return meta


def _modelspec(cfg: TrainConfig, data: TrainingData, model: BaseModel) -> dict[str, str]:
    """The result's ModelSpec entries (an embedding's own are set where it is saved: pivotal saves both); none for
    native fine-tuning, whose result is a whole model and whose checkpoints are lorakit's own."""
    if cfg.method.kind == "native":
        return {}
    kind = "textual-inversion" if cfg.method.kind == "ti" else "lora"
    if kind == "textual-inversion":
        triggers = [cfg.method.ti_token or cfg.data.trigger or ""]
    else:
        triggers = [s.effective_trigger or "" for d in data.datasets for s in d.subsets
                    if not s.is_reg and not s.is_validation]
    size = cfg.data.resolution or model.resolution
    narrowed = cfg.training.min_timestep is not None or cfg.training.max_timestep is not None
    last = int(model.scheduler_config.get("num_train_timesteps", 1000))
    return modelspec_metadata(
        kind, title=cfg.output.name, resolution=(size, size) if isinstance(size, int) else tuple(size),
        prediction_type=model.prediction_type, family=model.version, clip_skip=cfg.model.clip_skip,
        timesteps=(cfg.training.min_timestep or 0, cfg.training.max_timestep or last) if narrowed else None,
        triggers=triggers, user={f: getattr(cfg.output, f"metadata_{f}") for f in USER_FIELDS})


# ----------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, progress: bool = True, config_file: str | Path | None = None) -> TrainResult:
    """Run a training job described by ``cfg`` and return what it produced.

    ``config_file``: the TOML ``cfg`` was read from; like the data, it is never in a folder that is overwritten.
    The main process holds the output folder's lock for the run, and lets it go however the run ends.
    """
    folders: list[RunFolder] = []
    try:
        return _train(cfg, progress, config_file, folders)
    finally:
        for folder in folders:
            folder.release()


def _train(cfg: TrainConfig, progress: bool, config_file: str | Path | None,
           folders: list[RunFolder]) -> TrainResult:
    cfg.validate()
    started = time.time()
    if cfg.model.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("model.mixed_precision = \"fp16\" needs a GPU; on the CPU use \"bf16\" or \"no\"")
    _reset_accelerate_settings()
    if (note := ddp_timeout_note(cfg.training)) is not None:
        print(note)
    check_tracker(cfg.output.log_with)
    tracker_dir = logging_dir(cfg.output.log_with, cfg.output.logging_dir, Path(cfg.output.dir))
    accelerator = _make_accelerator(cfg, tracker_dir)
    check_paths(cfg, config_file)
    prompts = sample_prompts(cfg)  # a prompt file that does not parse stops the run before the model loads
    tracker_settings = read_tracker_settings(cfg.output.log_tracker_config, cfg.output.log_with)
    run = _open_run_folder(cfg, accelerator, paths_read(cfg, config_file), folders)
    try:  # a run that fails before its first step leaves nothing behind (the same command can run again)
        parts = _set_up(cfg, accelerator, run, prompts, tracker_dir)
    except BaseException:
        if accelerator.is_main_process and not run.resuming:
            RunManifest(run.path).remove_all()
            if run.created and run.path.is_dir() and not any(run.path.iterdir()):
                run.path.rmdir()
        raise
    if tracker_dir is not None:  # once the run is set up: one that fails before leaves no tracker files behind
        _start_trackers(parts, tracker_settings)
    loop = _TrainingLoop(parts)
    loop.run(progress)
    accelerator.wait_for_everyone()
    return _finish(parts, loop, started)


@dataclass
class _Position:
    """Where training starts: after ``epoch`` epochs and ``step`` steps (with their ``losses``), ``skip`` batches
    into the next epoch (a checkpoint saved mid-epoch)."""
    epoch: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    skip: int = 0


@dataclass
class _RunParts:
    """Everything a run is set up with before its first step; the training loop and the result read it."""
    cfg: TrainConfig
    accelerator: Accelerator
    run: RunFolder
    prompts: list[SamplePrompt]
    tracker_dir: Path | None
    sample_stop: SampleStop | None
    model: BaseModel
    method: TrainingMethod
    data: TrainingData
    file_entries: dict[str, str]  # metadata every file the run writes carries
    ema: WeightAverage | None
    optimizer: Any  # accelerate's wrapper of the optimizer
    schedule_free: Any  # the unwrapped optimizer when it is schedule-free (its average is what is handed back)
    lr_schedule: Any
    meter: Any  # the CS meter, None for a method without one
    monitor: CSFluctuationMonitor | None
    steps_per_epoch: int
    total_steps: int
    fingerprint: str  # the data's, kept in checkpoints: a resume refuses other data
    wrapped: dict[int, torch.nn.Module]  # id(trained module) -> the module accelerate wrapped (DDP)
    run_unet: Any  # the U-Net the training step runs (wrapped, compiled), None when it runs the plain one
    run_text: tuple[Any, ...]
    position: _Position

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def _make_accelerator(cfg: TrainConfig, tracker_dir: Path | None) -> Accelerator:
    # the schedule is stepped here once per optimizer step: accelerate's own stepping would advance it once per
    # process, so that a schedule set in optimizer steps ended halfway through a 2-process run
    accelerator = Accelerator(mixed_precision=cfg.model.mixed_precision, step_scheduler_with_optimizer=False,
                              kwargs_handlers=distributed_settings(cfg.training),
                              cpu=not torch.cuda.is_available(), log_with=tracker_names(cfg.output.log_with) or None,
                              project_dir=None if tracker_dir is None else str(tracker_dir))
    if cfg.optimizer.fused_backward_pass and accelerator.num_processes > 1:
        # each process would step on its own gradient before the processes have averaged them
        raise TrainingError(f"optimizer.fused_backward_pass steps each weight during the backward pass, before "
                            f"the {accelerator.num_processes} processes have averaged its gradient: run one process, "
                            "or turn it off")
    return accelerator


def _open_run_folder(cfg: TrainConfig, accelerator: Accelerator, protect: list[str | Path],
                     folders: list[RunFolder]) -> RunFolder:
    """The output folder: the main process creates (or takes over) it and holds its lock; the others open it once
    it is there."""
    run = None
    if accelerator.is_main_process:
        run = RunFolder(cfg.output.dir, cfg.output.if_exists, protect=protect, name=cfg.output.name, lock=True)
        folders.append(run)
    accelerator.wait_for_everyone()
    return run if run is not None else RunFolder(cfg.output.dir, "resume", name=cfg.output.name)


def _set_up(cfg: TrainConfig, accelerator: Accelerator, run: RunFolder, prompts: list[SamplePrompt],
            tracker_dir: Path | None) -> _RunParts:
    """The model, what is trained, the data, the optimizer and the early-stopping monitor, as a resumed run left
    them; the trained modules prepared by accelerate."""
    is_main = accelerator.is_main_process
    if is_main:
        if run.resuming and (run.path / "config.toml").exists():
            check_resume_settings(run.path / "config.toml", cfg)
        run.write_text("config.toml", to_toml(with_absolute_paths(cfg)))
        print(opening_line(cfg))
    sample_stop = _sample_stop(cfg)  # its prompt file is read before the model is loaded
    # a resumed run's checkpoint holds what the adapter file started: the file is not read (it may be gone)
    continuing = run.resuming and run.latest_checkpoint() is not None
    start_file = (None if continuing else start_adapter(cfg)) or False
    ti_start = ti_start_vectors(cfg) if not continuing else None
    if (note := ti_token_note(cfg)) and is_main:
        print(note)
    # a resumed run takes the ranks from its own checkpoint, which has the network's shapes
    ranks_file = read_adapter(run.latest_checkpoint().tensors_path) \
        if cfg.network.dim_from_weights and not isinstance(start_file, AdapterFile) else None

    model = prepare_model(cfg, accelerator)
    file_entries = base_weights_metadata(cfg)
    try:
        check_clip_skip(model, cfg.model.clip_skip)
    except ValueError as err:
        raise ConfigError(f"model.clip_skip: {err}") from None
    if is_main and (note := long_prompts_note(model, [t for p in prompts for t in (p.prompt, p.negative_prompt)],
                                              cfg.model.max_token_length, what="sample prompts",
                                              option="model.max_token_length = ")):
        print(note)
    torch.manual_seed(cfg.training.seed)  # after loading: adapter init must not depend on how the model was read
    method = make_method(cfg, model, start_file=start_file, ranks_file=ranks_file, ti_start=ti_start)
    for group in method.param_groups():  # trained tensors in fp32 whatever the base model's dtype (full_bf16: bf16)
        for p in group["params"]:
            p.data = p.data.to(weight_dtype(cfg.model.mixed_precision) if cfg.model.full_bf16 else torch.float32)
    # the moving average starts at the weights training starts from (a resume loads its own below)
    ema = WeightAverage(method.trained_tensors(), cfg.training.ema_decay) \
        if cfg.training.ema_decay is not None else None
    if cfg.model.fp8_parts():  # once the adapters are in place: their own layers are trained, not stored
        line = store_base_in_fp8(model, cfg.model.fp8_parts())
        if is_main:
            print(line)
    data = _training_data(cfg, model, method, run, accelerator, sample_stop)
    steps_per_epoch, total_steps = planned_steps(cfg, data, accelerator.num_processes)
    data.count_steps(total_steps, accelerator.num_processes * cfg.optimizer.gradient_accumulation_steps)

    optimizer = build_optimizer(method.param_groups(), cfg)
    # the unwrapped optimizer (accelerate wraps it below): a schedule-free one shows its average (schedule_free)
    schedule_free = optimizer if is_schedule_free(optimizer) else None
    lr_schedule = build_lr_schedule(cfg.optimizer, optimizer, total_steps)
    meter = method.cs_meter()
    monitor = _make_monitor(cfg, meter, steps_per_epoch, sample_stop)
    fingerprint = data.fingerprint()
    position = _resume_position(cfg, run, is_main, data, fingerprint, total_steps, method, ema, optimizer,
                                lr_schedule, monitor, sample_stop)

    trained = [m for m in (model.unet, *model.text_encoders) if any(p.requires_grad for p in m.parameters())]
    for module in trained:
        keep_frozen_out_of_ddp(module)
    prepared = accelerator.prepare(*trained, optimizer, lr_schedule)
    optimizer, lr_schedule = prepared[-2], prepared[-1]
    # run the wrapped modules (DDP in a distributed run); sampling and saving use the plain ones
    wrapped = {id(m): w for m, w in zip(trained, prepared[:-2], strict=True)}
    run_unet = wrapped.get(id(model.unet))
    run_text = tuple(wrapped.get(id(te), te) for te in model.text_encoders)
    if cfg.model.compile:
        # the training step's U-Net only (a frozen one too: textual inversion runs it forward and backward);
        # it shares the parameters, so sampling and saving keep using the plain module
        run_unet = torch.compile(model.unet if run_unet is None else run_unet, mode=cfg.model.compile_mode,
                                 backend=cfg.model.compile_backend)
    for module in trained:
        module.train()
    if is_main:
        _print_plan(cfg, data, method, steps_per_epoch, total_steps, meter is not None)
    return _RunParts(cfg=cfg, accelerator=accelerator, run=run, prompts=prompts, tracker_dir=tracker_dir,
                     sample_stop=sample_stop, model=model, method=method, data=data, file_entries=file_entries,
                     ema=ema, optimizer=optimizer, schedule_free=schedule_free, lr_schedule=lr_schedule, meter=meter,
                     monitor=monitor, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                     fingerprint=fingerprint, wrapped=wrapped, run_unet=run_unet, run_text=run_text,
                     position=position)


def _training_data(cfg: TrainConfig, model: BaseModel, method: TrainingMethod, run: RunFolder,
                   accelerator: Accelerator, sample_stop: SampleStop | None) -> TrainingData:
    """The images and captions (with class images made when prior preservation needs them), checked against the
    model and the method, the latents cached when asked; and the notes a user should read before the run."""
    is_main = accelerator.is_main_process
    data = TrainingData(with_class_images(cfg, model, run, is_main, accelerator), seed=cfg.training.seed,
                        default_resolution=model.resolution)
    check_data_settings(cfg, data)
    if is_main and sample_stop is not None and hasattr(sample_stop.scorer, "set_reference"):
        sample_stop.scorer.set_reference(data.trained_image_paths())  # what its samples are compared with
    for dataset in data.datasets:
        method.check_multiplier(dataset.network_multiplier)
    if is_main and (note := long_captions_note(model, data, cfg.model.max_token_length)):
        print(note)
    if is_main and (note := adaptive_lr_note(cfg.optimizer.optimizer, [g["lr"] for g in method.param_groups()])):
        print(note)
    if is_main and (note := ia3_preset_note(cfg)):
        print(note)
    if cfg.data.cache_latents:
        own_cache = cfg.data.cache_latents_to_disk and not cfg.data.cache_dir
        if own_cache and is_main:
            run.make_dir("latent_cache")
        data.cache_latents(model.vae, directory=(cfg.data.cache_dir or run.path / "latent_cache")
                           if cfg.data.cache_latents_to_disk else None, batch_size=cfg.data.vae_batch_size)
        if own_cache and is_main:
            run.record_tree("latent_cache")
    return data


def _make_monitor(cfg: TrainConfig, meter: Any, steps_per_epoch: int,
                  sample_stop: SampleStop | None) -> CSFluctuationMonitor | None:
    """The CS-Fluctuation monitor, when early stopping is on and the method has a CS meter."""
    if cfg.early_stop.mode == "off" or meter is None:
        return None
    # the moving averages need at least 2 points: a 1-step epoch gets the smallest window that works
    window = cfg.early_stop.window or max(2, steps_per_epoch // cfg.early_stop.interval)
    # stopping on the samples: the weight rule is still recorded, as in report mode
    return CSFluctuationMonitor(window=window, lr=cfg.optimizer.unet_lr or cfg.optimizer.learning_rate,
                                rule=cfg.early_stop.make_rule(),
                                report_only=cfg.early_stop.mode == "report" or sample_stop is not None)


def _resume_position(cfg: TrainConfig, run: RunFolder, is_main: bool, data: TrainingData, fingerprint: str,
                     total_steps: int, method: TrainingMethod, ema: WeightAverage | None, optimizer: Any,
                     lr_schedule: Any, monitor: CSFluctuationMonitor | None,
                     sample_stop: SampleStop | None) -> _Position:
    """A resumed run's weights, optimizer, schedule and monitors as its last checkpoint left them, and where it
    goes on (mid-epoch when that checkpoint was saved mid-epoch: max_steps or an early stop); a new run's start."""
    if not run.resuming:
        return _Position()
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        if is_main:
            run.truncate_log(-1)  # killed before the first checkpoint: its log lines will be written again
            print(f"resuming {run.path}: no checkpoint was saved yet, starting from the beginning")
        return _Position()
    state = ckpt.load_state()
    _check_resumable(state, fingerprint, data, ckpt.path, run, total_steps, cfg)
    # the checkpoint holds what the run hands back (the average, or a file's folded form); the state, when they
    # differ, the weights training goes on from (and the average as it is kept)
    live = state.get("live_tensors")
    method.load_trained_tensors(live if live is not None else ckpt.load_tensors())
    if ema is not None:
        ema.load(state["ema"], state.get("ema_average") or ckpt.load_tensors())
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    skip = state.get("batches_done", 0)
    position = _Position(state["epoch"] - (1 if skip else 0), state["step"], list(state["losses"]), skip)
    if monitor is not None and state.get("monitor") is not None:
        monitor.load_state_dict(state["monitor"])
    if sample_stop is not None and state.get("sample_stop") is not None:
        sample_stop.rule.load_state_dict(state["sample_stop"])
    if is_main:
        run.truncate_log(position.step)
        where = f"{skip} steps into epoch {position.epoch + 1}" if skip else f"after epoch {position.epoch}"
        print(f"resuming {run.path} {where} (step {position.step})")
    return position


def _print_plan(cfg: TrainConfig, data: TrainingData, method: TrainingMethod, steps_per_epoch: int,
                total_steps: int, has_meter: bool) -> None:
    print(data.summary())
    print(method.summary())
    epochs_planned = planned_epochs(cfg, steps_per_epoch, total_steps)
    print(f"{count(steps_per_epoch, 'step')} per epoch, up to {count(epochs_planned, 'epoch')} "
          f"({count(total_steps, 'step')}); early stopping: {early_stop_text(cfg, has_meter)}")
    for line in setting_lines(cfg):
        print(line)
    if cfg.model.compile:
        print(f"the U-Net is compiled (torch.compile, backend {cfg.model.compile_backend}, mode "
              f"{cfg.model.compile_mode}): the first steps are slow while it compiles")


def _start_trackers(parts: _RunParts, tracker_settings: dict[str, dict[str, Any]]) -> None:
    """TensorBoard / W&B started on the run's settings; their files recorded as the run's own."""
    cfg, run, accelerator, tracker_dir = parts.cfg, parts.run, parts.accelerator, parts.tracker_dir
    if parts.is_main and tracker_dir.resolve() == (run.path / "logs").resolve():
        run.make_dir("logs")  # the run's own: an overwrite removes it with the rest
    init_kwargs, wandb_id = ({}, None) if not parts.is_main else tracker_init_kwargs(
        cfg.output.log_with, tracker_dir, run.path, cfg.output.wandb_run_name, run.resuming)
    if wandb_id is not None:
        run.write_json(WANDB_RUN_FILE, {"id": wandb_id})  # a resumed run continues this W&B run
    accelerator.init_trackers(cfg.output.log_tracker_name or cfg.output.name, config=hyperparameters(cfg.to_dict()),
                              init_kwargs=merge_tracker_settings(init_kwargs, tracker_settings))
    if parts.is_main:
        run.record_tree("logs")  # the tracker's files as they start: a run killed later still owns them


class _TrainingLoop:
    """Epochs of steps from where the run starts: the early-stopping monitor asked after every step, validation,
    checkpoints and samples when they are due.  ``step``, ``epoch``, ``losses`` and ``stop_decision`` say where
    it ended."""

    def __init__(self, parts: _RunParts) -> None:
        self.parts = parts
        start = parts.position
        self.epoch, self.step, self.losses, self.skip = start.epoch, start.step, start.losses, start.skip
        self.stop_decision: Decision | None = None
        # kohya's cache_text_encoder_outputs: each caption encoded once (the settings that forbid it were refused)
        self.captions_cache = ConditioningCache() if parts.cfg.data.cache_text_encoder_outputs else None
        self.validated: dict[int, float] = {}  # step -> validation loss, this session

    # ---- running
    def run(self, progress: bool) -> None:
        p = self.parts
        timer = _StepTimer(first_step=self.step, warmup=3 if p.cfg.model.compile else 1)  # compiling: a few steps
        bar = tqdm(total=p.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not (progress and p.is_main))
        try:  # from here on, the tracker's files are recorded in the run's manifest however the run ends
            self._before_first_step()
            while self.epoch < p.cfg.training.max_epochs and self.step < p.total_steps and self.stop_decision is None:
                done, local_batches = self._train_epoch(bar, timer)
                self.epoch += 1
                self.skip = 0
                self._end_epoch(done, local_batches)
        except KeyboardInterrupt:
            last = p.run.latest_checkpoint()
            kept = f"from {last.path.name}" if last else "from the start (no checkpoint yet)"
            raise TrainingInterrupted(f"interrupted at step {self.step} (epoch {self.epoch + 1}); run the same "
                                      f"command with --resume --out {p.run.path} to continue {kept}") from None
        finally:
            bar.close()
            if p.tracker_dir is not None:
                p.accelerator.end_training()  # flushes the event files, also of an interrupted run
                if p.is_main:
                    p.run.record_tree("logs")

    def _before_first_step(self) -> None:
        """What a new run measures of the base model before it trains: its sample score, samples, validation."""
        p = self.parts
        if self.step != 0:
            return
        if p.sample_stop is not None:  # the base model's own score (epoch 0): epoch 1's smoothing needs it
            _score_samples(p.sample_stop, 0, 0, p.model, p.method, p.cfg, p.run, p.accelerator)
        if p.is_main and p.prompts and p.cfg.sample.at_first:  # what the run starts from, to compare with
            _sample(p.model, p.method, p.prompts, p.run.sample_path("epoch-0000-before-training"), p.accelerator,
                    p.cfg, log_step=0)
        if p.data.held_out:  # the base model's validation loss: what training is measured against
            with fail_together(p.accelerator, "validating the base model"):
                if p.is_main:
                    self._record_validation(0, 0)

    def _train_epoch(self, bar: tqdm, timer: _StepTimer) -> tuple[int, int]:
        """The epoch's batches from ``skip`` on, until it ends, the run's steps are done or the monitor stops it;
        returns how many of this process's ``local_batches`` were trained, and that count."""
        p = self.parts
        n_proc, rank = p.accelerator.num_processes, p.accelerator.process_index
        accumulate = p.cfg.optimizer.gradient_accumulation_steps
        local_batches = len(p.data.epoch_batches(self.epoch, processes=n_proc)[rank::n_proc])
        # the plan of the epoch minus the batches already trained, dealt out to the processes
        batches = p.data.epoch_batches(self.epoch, skip=self.skip * n_proc, processes=n_proc)[rank::n_proc]
        done = self.skip
        for i, batch in enumerate(batches, start=self.skip):
            done = i + 1
            # gradient accumulation: an optimizer step every `accumulate` batches, and at the epoch's last one
            # (its group may be smaller: a step never takes batches of two epochs)
            micro, group = i % accumulate, min(accumulate, local_batches - i // accumulate * accumulate)
            loss = self._forward_backward(batch, i, micro, group)
            if micro + 1 != group:
                continue
            self._optimizer_step(loss)
            self._after_step(done == local_batches, bar, timer)
            if self.stop_decision is not None or self.step >= p.total_steps:
                break  # the epoch's end saves this step's checkpoint
            if self._step_checkpoint_due(self.step) and done < local_batches:  # an epoch's end is saved there
                with fail_together(p.accelerator, f"saving the checkpoint of step {self.step}"):
                    if p.is_main:
                        p.run.flush_log()  # the log as far as the checkpoint: a resume continues both
                        self._save_step_checkpoint(self.epoch + 1, done, local_batches)
        return done, local_batches

    def _forward_backward(self, batch: Any, index: int, micro: int, group: int) -> torch.Tensor:
        """One batch's loss and its share of the step's gradient (the step's: the mean over its ``group``)."""
        p = self.parts
        p.method.before_step(self.step)
        with ExitStack() as no_sync:
            if micro + 1 != group:  # a distributed run exchanges gradients once, at the group's last batch
                for module in p.wrapped.values():
                    no_sync.enter_context(p.accelerator.no_sync(module))
            torch.manual_seed(step_seed(p.cfg.training.seed + 1, self.step * 1000 + index))  # adapter dropout
            with p.method.scaled(batch.network_multiplier):
                loss = compute_loss(p.cfg, p.model, p.method, batch, self.step, p.accelerator, p.run_unet,
                                    None if p.method.text_encoder_stopped else p.run_text, self.captions_cache,
                                    micro=micro)
            if not torch.isfinite(loss):
                # at the first step nothing was updated yet: a broken model file, not the learning rate
                broken = nonfinite_weights(p.model.networks) if self.step == 0 else []
                raise TrainingError(_nan_message(p.run, self.step, self.epoch, broken))
            p.accelerator.backward(loss / group)
        return loss

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        p = self.parts
        if p.schedule_free is not None:
            p.method.hold_untrained_gradients()
        if p.cfg.optimizer.max_grad_norm and not p.cfg.optimizer.fused_backward_pass:  # fused: clipped in backward
            p.accelerator.clip_grad_norm_([t for g in p.optimizer.param_groups for t in g["params"]],
                                          p.cfg.optimizer.max_grad_norm)
        p.optimizer.step()
        if not p.optimizer.step_was_skipped:  # fp16: an overflow skips it
            p.lr_schedule.step()
        p.optimizer.zero_grad(set_to_none=True)
        p.method.after_optimizer_step()
        if p.ema is not None:
            p.ema.update(p.method.trained_tensors())
        self.step += 1
        self.losses.append(loss.item())

    def _after_step(self, epoch_ends: bool, bar: tqdm, timer: _StepTimer) -> None:
        """The step's record (CS, the monitor's decision, validation) logged; the progress bar; samples due."""
        p, cfg, step = self.parts, self.parts.cfg, self.step
        record = {"step": step, "epoch": self.epoch + 1, "loss": self.losses[-1],
                  "lr": p.lr_schedule.get_last_lr()[0], **group_rates(p.optimizer.param_groups),
                  **p.method.step_record()}
        # the spectral size costs an SVD per layer: read at epoch ends, where its rule decides
        spectral = p.monitor is not None and p.monitor.rule.series == "spectral" and epoch_ends
        if p.monitor is not None and (step % cfg.early_stop.interval == 0 or spectral):
            reading = p.meter.read(spectral=spectral)
            record["cs"], record["update_size"] = reading.cs, reading.update
            if reading.spectral is not None:
                record["spectral_size"] = reading.spectral
            decision = p.monitor.update(step, reading.cs, epoch=self.epoch + 1, update=reading.update,
                                        spectral=reading.spectral)
            if decision.stop:
                self.stop_decision = decision
        if p.data.held_out and cfg.training.validate_every_n_steps and step % cfg.training.validate_every_n_steps == 0:
            with fail_together(p.accelerator, f"validating at step {step}"):  # the main process measures
                if p.is_main:
                    with self._judged():
                        record["val_loss"] = self.validated[step] = _validate(cfg, p.model, p.method, p.data,
                                                                              p.accelerator, self.captions_cache)
        if p.is_main:
            p.run.log(record)
        if p.tracker_dir is not None:
            p.accelerator.log(scalars(record), step=step)
        bar.update(1)
        if p.is_main and (seconds := timer.measured(step)) is not None:
            stops_early = p.monitor is not None and not p.monitor.report_only
            bar.write(estimate_line(seconds, p.total_steps - step, stops_early))
        scaled = {"scaled": record["keys_scaled"]} if "keys_scaled" in record else {}  # max-norm, as kohya
        bar.set_postfix(loss=f"{self.losses[-1]:.4f}", lr=f"{record['lr']:.2e}", epoch=self.epoch + 1, **scaled)
        every = cfg.sample.every_n_steps
        if p.is_main and p.prompts and every and step % every == 0 and step < p.total_steps:
            # named to sort before its epoch's own grid (the run page lists them in name order)
            with self._judged():
                _sample(p.model, p.method, p.prompts, p.run.sample_path(f"epoch-{self.epoch + 1:04d}-step-{step:06d}"),
                        p.accelerator, cfg, log_step=step)

    def _end_epoch(self, done: int, local_batches: int) -> None:
        """The epoch ended (``self.epoch`` counts it): the samples scored, validation, its checkpoint and samples."""
        p, cfg, epoch, step = self.parts, self.parts.cfg, self.epoch, self.step
        if p.sample_stop is not None:  # scored before saving: the checkpoint's state holds it
            with self._judged():
                found = _score_samples(p.sample_stop, epoch, step, p.model, p.method, cfg, p.run, p.accelerator)
            if found is not None and self.stop_decision is None and cfg.early_stop.mode == "cs-fluctuation":
                self.stop_decision = _sample_decision(found, p.steps_per_epoch, step, p.monitor)
        # the main process's checkpoint and samples; the others wait for it at the next step's all-reduce
        with fail_together(p.accelerator, f"validating, saving or sampling epoch {epoch}"):
            if p.is_main and p.data.held_out and epoch % (cfg.training.validate_every_n_epochs or 1) == 0 \
                    and step not in self.validated:  # before the checkpoint: a resumed run does it again
                self._record_validation(step, epoch)
            if p.is_main:
                p.run.flush_log()  # lines a full disk refused during the epoch: now, or the run stops here
                if p.tracker_dir is not None:
                    p.run.record_tree("logs")  # files the tracker opened since (record_tree: run's own only)
            if p.is_main and (saves_epoch(cfg, epoch) or self.stop_decision is not None or step >= p.total_steps):
                p.run.save_checkpoint(epoch, self.handed_back(), self._training_state(epoch, done, local_batches),
                                      metadata=metadata_for(cfg, p.data, p.model, epoch, step, p.file_entries))
                # native: a whole U-Net per epoch, so only what may be handed back is kept, as with kohya's
                # save_last_n_epochs (plus the last N)
                if cfg.method.kind == "native" or cfg.training.save_last_n_epochs is not None:
                    earliest = _earliest_handed_back_step(cfg, self.stop_decision, p.sample_stop, p.monitor,
                                                          p.steps_per_epoch)
                    p.run.prune_checkpoints(checkpoints_to_keep([c.epoch for c in p.run.checkpoints()],
                                                                p.steps_per_epoch, earliest,
                                                                cfg.training.save_last_n_epochs))
            elif p.is_main and self._step_checkpoint_due(step):  # the epoch's end, not saved as the epoch's
                self._save_step_checkpoint(epoch, done, local_batches)
            if p.is_main and p.prompts and (epoch % cfg.sample.every_n_epochs == 0 or self.stop_decision is not None):
                with self._judged():
                    _sample(p.model, p.method, p.prompts, p.run.sample_path(f"epoch-{epoch:04d}"), p.accelerator, cfg,
                            log_step=step)

    # ---- what is measured and saved
    def _record_validation(self, at_step: int, at_epoch: int) -> None:
        """The held-out loss now, on its own log line (the main process; steps inside an epoch log it with their
        step's record instead)."""
        p = self.parts
        with self._judged():
            self.validated[at_step] = _validate(p.cfg, p.model, p.method, p.data, p.accelerator, self.captions_cache)
        p.run.log({"step": at_step, "epoch": at_epoch, "val_loss": self.validated[at_step]})
        if p.tracker_dir is not None:
            p.accelerator.log({"val_loss": self.validated[at_step]}, step=at_step)

    def _training_state(self, at_epoch: int, done: int, local_batches: int) -> dict[str, Any]:
        """What a resume needs, ``done`` of the epoch's ``local_batches`` batches trained (``at_epoch``: the epoch
        ended, or the one in progress)."""
        p = self.parts
        return {"optimizer": p.optimizer.state_dict(), "lr_schedule": p.lr_schedule.state_dict(),
                "epoch": at_epoch, "step": self.step, "losses": self.losses,
                "monitor": p.monitor.state_dict() if p.monitor is not None else None,
                "sample_stop": p.sample_stop.rule.state_dict() if p.sample_stop is not None else None,
                # batches of this epoch trained when it was saved mid-epoch (0: the whole epoch)
                "batches_done": done if done < local_batches else 0,
                "stopped_early": self.stop_decision is not None, "data": p.fingerprint, **self._live_state()}

    def _live_state(self) -> dict[str, Any]:
        """What the checkpoint file does not hold as training keeps it: the weights, when the file holds their
        average (training.ema_decay) or their folded form (LyCORIS's use_scalar), and then the average too."""
        p = self.parts
        live = p.method.trained_tensors()
        folded = p.method.file_form(live).keys() != live.keys()
        state = {"live_tensors": live} if p.ema is not None or folded or p.schedule_free is not None else {}
        if p.ema is not None:
            state["ema"] = p.ema.state_dict()
            if folded:
                state["ema_average"] = p.ema.tensors_like(live)
        return state

    def handed_back(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: what the run would hand back now (the average, with training.ema_decay
        or a schedule-free optimizer), in the file's form."""
        p = self.parts
        if p.schedule_free is not None:
            with evaluation_weights(p.schedule_free):
                return p.method.file_form({k: v.clone() for k, v in p.method.trained_tensors().items()})
        tensors = p.method.trained_tensors()
        return p.method.file_form(tensors if p.ema is None else p.ema.tensors_like(tensors))

    def _judged(self) -> AbstractContextManager[None]:
        """The weights samples and validation see: the average's, with training.ema_decay or a schedule-free
        optimizer."""
        p = self.parts
        if p.schedule_free is not None:
            return evaluation_weights(p.schedule_free)
        return nullcontext() if p.ema is None else p.ema.applied(p.method)

    def _step_checkpoint_due(self, at_step: int) -> bool:
        every = self.parts.cfg.training.save_every_n_steps
        return bool(every) and at_step % every == 0

    def _save_step_checkpoint(self, at_epoch: int, done: int, local_batches: int) -> None:
        """kohya's save_every_n_steps: the adapter and the state of this step, then save_last_n_steps's pruning."""
        p = self.parts
        p.run.save_checkpoint(at_epoch, self.handed_back(), self._training_state(at_epoch, done, local_batches),
                              metadata=metadata_for(p.cfg, p.data, p.model, at_epoch, self.step, p.file_entries),
                              step=self.step)
        if p.cfg.training.save_last_n_steps is not None:
            p.run.prune_step_checkpoints(self.step - p.cfg.training.save_last_n_steps)


def _finish(parts: _RunParts, loop: _TrainingLoop, started: float) -> TrainResult:
    """The result: the turning point's checkpoint when early stopping fired, else the last weights, saved with the
    CS record, its plot, the final samples and the summary."""
    cfg, run, method, monitor, sample_stop = parts.cfg, parts.run, parts.method, parts.monitor, parts.sample_stop
    turning = loop.stop_decision.turning_point if loop.stop_decision is not None else None
    final_epoch = loop.epoch
    if parts.ema is not None:  # the run hands back the average (a turning point's checkpoint holds its own)
        parts.ema.copy_to(method)
    if parts.schedule_free is not None:  # and the schedule-free average, as its checkpoints hold it
        parts.schedule_free.eval()
    if turning is not None:
        final_epoch = _checkpoint_epoch_for(turning.step, parts.steps_per_epoch, run)
        method.load_trained_tensors(run.checkpoint(final_epoch).load_tensors())
    files: list[Path] = []
    summary_text = ""
    if parts.is_main:
        run.flush_log()
        found = dict(parts.file_entries)
        if monitor is not None:
            found["lorakit_early_stop"] = cfg.early_stop.mode
            if turning is not None:
                found["lorakit_turning_point_step"] = str(turning.step)
                found["lorakit_turning_point_epoch"] = str(turning.epoch)
                found["lorakit_checkpoint_epoch"] = str(final_epoch)  # the saved epoch handed back
        files = method.save(run.path, cfg.output.name,
                            metadata_for(cfg, parts.data, parts.model, final_epoch, loop.step, found))
        run.record(f for f in files if not f.is_dir())
        for folder in (f for f in files if f.is_dir()):  # a native run's diffusers folder
            run.record_folder(folder)
        reported = monitor.turning_point if monitor is not None else None
        sample_record = None
        if sample_stop is not None:
            sample_record = sample_stop.record()
            run.write_json("sample_scores.json", sample_record)
            files += [run.file("sample_scores.json"), plot_sample_scores(sample_record, run.file("sample_scores.png"))]
        if monitor is not None and len(monitor.history.steps) > 1:
            # the CS series itself: other stopping rules can be replayed on it without training again
            run.write_json("cs_history.json", monitor.history.to_dict())
            files.append(plot_cs_fluctuation(monitor.history, run.file("cs_fluctuation.png"),
                                             turning_point=turning or reported,
                                             budget=getattr(monitor.rule, "budget", None),
                                             budget_series=monitor.rule.series))
        if parts.prompts:
            _sample(parts.model, method, parts.prompts, run.sample_path("final"), parts.accelerator, cfg)
            files.append(run.sample_path("final"))
        losses, per_epoch = loop.losses, parts.steps_per_epoch
        summary = {
            "output_dir": str(run.path), "files": [str(f) for f in files], "method": cfg.method.kind,
            "epochs_run": loop.epoch, "steps": loop.step, "final_epoch": final_epoch,
            "stopped_early": loop.stop_decision is not None,
            "turning_point": turning.to_dict() if turning is not None else None,
            # report mode: where it would have stopped
            "turning_point_found": reported.to_dict() if reported is not None else None,
            "sample_scores": sample_record,
            "undecided": _undecided(monitor) if monitor is not None and reported is None else None,
            "final_loss": losses[-1] if losses else None,
            "mean_loss_last_epoch": sum(losses[-per_epoch:]) / max(1, len(losses[-per_epoch:])),
            "seconds": round(time.time() - started, 1), "data": parts.data.summary(), "trained": method.summary(),
            "validation": _validation_summary(run, len(parts.data.held_out)) if parts.data.held_out else None,
            "step_checkpoints": [c.step() for c in run.step_checkpoints()],
            "ema_decay": cfg.training.ema_decay,
        }
        run.write_json("summary.json", summary)
        summary_text = "\n".join([_summary_text(summary), *next_steps(run.path, files, cfg)])
        run.write_text("summary.txt", summary_text + "\n")
    return TrainResult(run.path, files, loop.epoch, loop.step, loop.stop_decision is not None,
                       turning.to_dict() if turning is not None else None, final_epoch, loop.losses, summary_text)


# ----------------------------------------------------------------------------------------------- helpers
def paths_read(cfg: TrainConfig, config_file: str | Path | None) -> list[str | Path]:
    """What a run reads and so never deletes: its training data, regularization images and config file."""
    return [p for p in (cfg.data.train_data, cfg.data.reg_data, config_file) if p]


def start_adapter(cfg: TrainConfig) -> AdapterFile | None:
    """network.weights read as the run starts from it (None when not set): a missing file, a folder, a pickle, a
    model or a cut file is refused before the model loads, naming the setting."""
    if not cfg.network.weights:
        return None
    try:
        return read_adapter(Path(cfg.network.weights).expanduser())
    except AdapterFileError as err:
        raise ConfigError(f"network.weights: {err}") from None


def ti_token_note(cfg: TrainConfig) -> str | None:
    """A textual-inversion token checked against the model's vocabulary before the model loads (its tokenizers
    alone are read): refused when it is not new, a note when it takes a word's place (``check_ti_token``)."""
    if cfg.method.kind not in ("ti", "pivotal"):
        return None
    return check_ti_token(cfg, describe_base_model(cfg.model.base, cfg.model.prediction_type).tokenizers())


def ti_start_vectors(cfg: TrainConfig) -> tuple[torch.Tensor, ...] | None:
    """The vectors a textual-inversion run starts from (method.ti_weights, kohya's --weights), one tensor per text
    encoder, checked before the model loads: a missing or unreadable file, or one with another number of vectors,
    is refused."""
    path = cfg.method.ti_weights
    if not path:
        return None
    from lorakit.embeddings import EmbeddingError, read_embedding

    try:
        vectors, _ = read_embedding(Path(path).expanduser())
    except EmbeddingError as err:
        raise ConfigError(f"method.ti_weights: {err}") from None
    except OSError as err:
        raise ConfigError(f"method.ti_weights: {path}: {err.strerror or err}") from None
    count = vectors[0].shape[0]
    if count != cfg.method.ti_vectors:
        raise ConfigError(f"method.ti_weights: {path} holds {count} vector(s) per token, but "
                          f"method.ti_vectors is {cfg.method.ti_vectors}: set --set method.ti_vectors={count}")
    return vectors


_VALIDATION_SETTINGS = ("validate_every_n_epochs", "validate_every_n_steps", "max_validation_steps")


def planned_steps(cfg: TrainConfig, data: TrainingData, processes: int = 1) -> tuple[int, int]:
    """Optimizer steps per epoch and in the whole run (max_epochs, cut at max_steps) on ``processes`` processes."""
    per_epoch = math.ceil(data.steps_per_epoch / processes / cfg.optimizer.gradient_accumulation_steps)
    total = per_epoch * cfg.training.max_epochs
    return per_epoch, total if cfg.training.max_steps is None else min(total, cfg.training.max_steps)


def planned_epochs(cfg: TrainConfig, per_epoch: int, total: int) -> int:
    """The epochs the planned steps take: max_epochs, or fewer when max_steps ends the run first (a kohya config
    without max_train_epochs sets max_epochs only as a bound)."""
    return min(cfg.training.max_epochs, math.ceil(total / max(per_epoch, 1)))


def saves_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the end of ``epoch`` is saved as an epoch checkpoint by the schedule (every
    ``save_every_n_epochs``, and the last epoch); a run that stops or ends mid-plan saves its end too."""
    return epoch % cfg.training.save_every_n_epochs == 0 or epoch == cfg.training.max_epochs


def check_data_settings(cfg: TrainConfig, data: TrainingData) -> None:
    """The settings that depend on the data (the run and its dry run check them alike): validation settings with
    no image held out would silently do nothing; cached text-encoder outputs need captions that repeat."""
    given = [f"training.{k}" for k in _VALIDATION_SETTINGS if getattr(cfg.training, k) is not None]
    if given and not data.held_out:
        raise ConfigError(f"{', '.join(given)}: no image is held out for validation; set data.validation_split "
                          "(kohya's --validation_split, e.g. 0.1) or validation_split in the dataset TOML, or give "
                          "a folder of held-out images: data.validation_data (--validation-data)")
    if cfg.data.cache_text_encoder_outputs:
        data.check_captions_cacheable()


def _validate(cfg: TrainConfig, model: BaseModel, method: TrainingMethod, data: TrainingData,
              accelerator: Accelerator, captions_cache: ConditioningCache | None = None) -> float:
    """The held-out images' loss now (the same images, timesteps and noise each time)."""
    seed = next((d.validation_seed for d in data.datasets if d.validation_seed is not None), cfg.training.seed)
    loss = validation_loss(cfg, model, method, data.validation_batches(), accelerator, seed,
                           cfg.training.max_validation_steps, captions_cache)
    return round(float(loss), 6) if loss is not None else float("nan")


def _validation_summary(run: RunFolder, images: int) -> dict[str, Any]:
    """The run's validation losses (from its log, so a resumed run's earlier ones count): the last and the
    lowest, with their step and epoch."""
    run.flush_log()
    points = [{"step": r["step"], "epoch": r["epoch"], "val_loss": r["val_loss"]} for r in run.read_log()
              if isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"])]
    base = next((p for p in points if p["step"] == 0), None)
    return {"held_out_images": images, "measured": len(points), "base_model": base["val_loss"] if base else None,
            "last": points[-1] if points else None,
            "lowest": min(points, key=lambda p: p["val_loss"]) if points else None}


def _earliest_handed_back_step(cfg: TrainConfig, stop_decision: Decision | None, sample_stop: SampleStop | None,
                               monitor: CSFluctuationMonitor | None, steps_per_epoch: int) -> int | None:
    """The earliest step whose checkpoint the run may still hand back: the turning point once decided, else the
    earliest step the stopping rule (on the samples, or on the weights) could still choose; None when only the
    last checkpoint is handed back (early stopping off or report only)."""
    if stop_decision is not None and stop_decision.turning_point is not None:
        return stop_decision.turning_point.step
    if cfg.early_stop.mode != "cs-fluctuation":
        return None
    if sample_stop is not None:
        candidate = sample_stop.rule.earliest_candidate()
        return candidate * steps_per_epoch if candidate is not None else 0
    return monitor.earliest_candidate_step() if monitor is not None else None


class _StepTimer:
    """Seconds per step over the first few steps after start (the very first one pays for warm-up)."""

    MEASURE = 3

    def __init__(self, first_step: int, warmup: int = 1) -> None:
        self.start_step = first_step + warmup
        self.started: float | None = None
        self.done = False

    def measured(self, step: int) -> float | None:
        """Seconds per step once, when enough steps were timed; None before and after."""
        if self.done:
            return None
        if step == self.start_step:
            self.started = time.perf_counter()
        elif self.started is not None and step == self.start_step + self.MEASURE:
            self.done = True
            return (time.perf_counter() - self.started) / self.MEASURE
        return None


def check_resume_settings(previous: Path, cfg: TrainConfig) -> None:
    """Resume continues the run as configured in ``previous`` (its config.toml): settings that can change
    mid-run are applied (and said), any other difference is refused with the list, before the model loads."""
    applied, refused = resume_changes(load_config(previous), cfg)
    if refused:
        listed = "; ".join(refused)
        raise ConfigError(f"--resume: these settings differ from the run's {previous}: {listed}. They cannot change "
                          "in the middle of a run: use the run's values, or start a new run (--overwrite, or "
                          "another --out)")
    if applied:
        print("resume: applying changed settings: " + "; ".join(applied))


def check_paths(cfg: TrainConfig, config_file: str | Path | None = None) -> None:
    """The files and folders the config names exist (checked before anything is loaded or written). Relative
    paths are read from the current directory, as kohya reads them; when one exists beside the config file
    instead, the error says so."""
    for key, value in missing_paths(cfg):
        hint = ""
        beside = Path(config_file).parent / value if config_file else None
        if beside is not None and not Path(value).is_absolute() and beside.exists():
            hint = (f" (relative paths are read from the current directory, {Path.cwd()}; there is a {value} "
                    f"beside {config_file}: run from {Path(config_file).parent.resolve()}, or write the path "
                    "absolute)")
        raise ConfigError(f"{key}: {value}: no such file or folder{hint}")


def _check_resumable(state: dict[str, Any], fingerprint: str, data: TrainingData, ckpt: Path, run: RunFolder,
                     total_steps: int, cfg: TrainConfig) -> None:
    """Refuse to resume on other data (it would not continue the same run) or a run that has nothing left."""
    if state.get("data") not in (None, fingerprint):
        raise TrainingError(f"--resume: the training data changed since {ckpt} was saved (now "
                            f"{data.num_train_images} samples, {data.steps_per_epoch} steps per epoch): resuming "
                            "would not continue the same run. Restore the data, or start a new run (--overwrite, "
                            "or another --out)")
    finished = state.get("stopped_early") or state["step"] >= total_steps or (
        state["epoch"] >= cfg.training.max_epochs and not state.get("batches_done"))
    if finished and (run.path / "summary.json").exists():
        why = "stopped early at its turning point" if state.get("stopped_early") else \
            f"finished after {count(state['step'], 'step')} ({count(state['epoch'], 'epoch')})"
        raise TrainingError(f"--resume: the run in {run.path} {why}; there is nothing to continue. To train "
                            "longer, raise --epochs or --max-steps")


def _sample_trigger(cfg: TrainConfig) -> str | None:
    """The trigger a sample-stop prompt file that names none is filled with: the data's."""
    from lorakit.data.discovery import kohya_phrase

    return cfg.data.trigger or (kohya_phrase(cfg.data.train_data) if cfg.data.train_data else None)


def _sample_stop(cfg: TrainConfig) -> SampleStop | None:
    """The sample stop the config asks for (``early_stop.samples``), its prompts read and checked."""
    if not cfg.early_stop.samples or cfg.early_stop.mode == "off":
        return None
    es = cfg.early_stop
    try:
        return make_sample_stop(es.samples, es.sample_prompts, es.sample_seeds, es.sample_reach, es.sample_patience,
                                trigger=_sample_trigger(cfg))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def sample_stop_line(cfg: TrainConfig) -> str:
    """``--dry-run``'s line on the sample stop, checked as ``_sample_stop`` checks it but without loading the
    scorer's model (``lorakit.earlystop.samples.check_sample_stop``)."""
    from lorakit.earlystop.samples import check_sample_stop

    es = cfg.early_stop
    try:
        return check_sample_stop(es.samples, es.sample_prompts, es.sample_seeds, trigger=_sample_trigger(cfg))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _score_samples(sample_stop: SampleStop, epoch: int, step: int, model: BaseModel, method: TrainingMethod,
                   cfg: TrainConfig, run: RunFolder, accelerator: Accelerator) -> SampleTurningPoint | None:
    """Draw and score the sample stop's prompts with the adapter as it is at the end of ``epoch``; the images go
    to ``samples/scored-epoch-NNNN.png`` (what the score was computed on), the score to the log.  In a
    multi-process run the main process draws and scores, and every process records its score, so all of them
    decide the same stop."""
    def draw(jobs: list[tuple[Any, int]]) -> list[Any]:
        prompts = [SamplePrompt(p.text, p.negative, seed=seed, steps=cfg.sample.steps,
                                cfg_scale=cfg.sample.cfg_scale, sampler=cfg.sample.sampler) for p, seed in jobs]
        return _sample(model, method, prompts, run.sample_path(f"scored-epoch-{epoch:04d}"), accelerator, cfg)

    score = None
    with fail_together(accelerator, f"scoring the samples of epoch {epoch}"):
        if accelerator.is_main_process:
            score = sample_stop.score_images(draw)
    if accelerator.num_processes > 1:
        score = broadcast_object_list([score], from_process=0)[0]
    found = sample_stop.record_score(epoch, score)
    if accelerator.is_main_process:
        run.log({"step": step, "epoch": epoch, "sample_score": score})
    if cfg.output.log_with is not None:
        accelerator.log(scalars({"sample_score": score}), step=step)
    return found


def _reset_accelerate_settings() -> None:
    """Forget accelerate's per-process settings of an earlier run in this process (a sweep may use others).

    Its process-level state (``PartialState``: how many processes, which one this is) is kept, since the process
    group it set up cannot be made again, except when it does not match the launcher's: a ``PartialState()`` made
    by a user's script before ``train()`` on a machine without a GPU sets itself up for one process even under a
    multi-process launcher, and every process would then believe it is the main one and write the same files.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    made = PartialState._shared_state.get("num_processes")
    AcceleratorState._reset_state(reset_partial_state=made is not None and made != launched)


@contextmanager
def fail_together(accelerator: Accelerator, what: str) -> Iterator[None]:
    """Work that only the main process does (saving, sampling, scoring), failing in every process at once: the
    others would otherwise wait for the main one at their next collective operation, until the launcher kills
    them (torchrun) or the process group times out.  The main process re-raises its own error; the others raise a
    TrainingError that names it."""
    if accelerator.num_processes == 1:
        yield
        return
    failure: Exception | None = None
    try:
        yield
    except Exception as err:
        failure = err
    message = broadcast_object_list([f"{type(failure).__name__}: {failure}" if failure else None], from_process=0)[0]
    if failure is not None:
        raise failure
    if message is not None:
        raise TrainingError(f"the main process failed {what}: {message}")


def _sample_decision(found: SampleTurningPoint, steps_per_epoch: int, step: int,
                     monitor: CSFluctuationMonitor | None) -> Decision:
    """The sample rule's turning point as the trainer's stop decision: the end of its epoch (a saved checkpoint);
    on the CS record, the sample nearest that step."""
    turning_step = found.epoch * steps_per_epoch
    steps = list(monitor.history.steps) if monitor is not None else []
    index = min(range(len(steps)), key=lambda i: abs(steps[i] - turning_step)) if steps else 0
    reason = f"samples: {found.reason}"
    return Decision(True, reason, TurningPoint(step=turning_step, epoch=found.epoch, index=index, valley_index=index,
                                               found_at_step=step, found_at_index=max(0, len(steps) - 1), csf=None,
                                               reason=reason))


def _sample(model: BaseModel, method: TrainingMethod, prompts: list[SamplePrompt], path: Path,
            accelerator: Accelerator, cfg: TrainConfig, log_step: int | None = None) -> list[Any]:
    """The prompts drawn with the adapter as it is now (their trigger expanded), saved as a grid at ``path``;
    with ``log_step``, also sent to W&B when the run logs there (as kohya's samples are)."""
    expanded = [replace(p, prompt=method.expand_prompt(p.prompt),
                        negative_prompt=method.expand_prompt(p.negative_prompt)) for p in prompts]
    with method.sampling():
        images = generate(model, expanded, device=accelerator.device, progress=False, clip_skip=cfg.model.clip_skip,
                          max_token_length=cfg.model.max_token_length)
    save_sample_grid(images, prompts, path)
    if log_step is not None:
        log_sample_images(accelerator, cfg.output.log_with, images, [p.prompt for p in prompts], log_step)
    return images


def checkpoints_to_keep(saved: list[int], steps_per_epoch: int, earliest_step: int | None,
                        last_n: int | None = None) -> set[int]:
    """The saved epochs that ``_checkpoint_epoch_for`` may still hand back, the last one (resume, result), and
    the last ``last_n`` (kohya's save_last_n_epochs).

    ``earliest_step``: no turning point can come before it (``monitor.earliest_candidate_step()``); None when
    nothing is ever handed back (early stopping off).  An epoch ending before another that ends at or before
    ``earliest_step`` can never be the nearest to a later turning point.
    """
    keep = set(sorted(saved)[-last_n:]) if last_n else set()
    keep |= {max(saved)} if saved else set()
    if earliest_step is not None:
        before = [e for e in saved if e * steps_per_epoch <= earliest_step]
        first = max(before) if before else min(saved, default=0)
        keep |= {e for e in saved if e >= first}
    return keep


def _checkpoint_epoch_for(turning_step: int, steps_per_epoch: int, run: RunFolder) -> int:
    """The saved epoch whose end is nearest to the turning-point step (the paper reports epochs)."""
    saved = [c.epoch for c in run.checkpoints()]
    return min(saved, key=lambda e: (abs(e * steps_per_epoch - turning_step), e))


def long_captions_note(model: BaseModel, data: TrainingData, limit: int) -> str | None:
    """What the text encoder does not read: captions longer than ``limit`` tokens are cut there (silently, in
    kohya); None when every caption fits.  A caption of several lines (``enable_wildcard``) counts by its
    longest line; weighted captions count their words only."""
    captions = [r.caption for r in data.records]
    lines = [c.split("\n") for c in captions]
    if data.config.weighted_captions:  # brackets and weights are not read as tokens
        lines = [[plain_text(line) for line in ls] for ls in lines]
    flat = prompt_token_counts(model.tokenizer, [line for ls in lines for line in ls])
    counts, start = [], 0
    for ls in lines:
        counts.append(max(flat[start:start + len(ls)]))
        start += len(ls)
    long = [(r, n) for r, n in zip(data.records, counts, strict=True) if n > limit]
    if not long:
        return None
    record, n = max(long, key=lambda pair: pair[1])
    longer = (f"; model.max_token_length = {150 if limit == 75 else 225} reads more (kohya's max_token_length: 150 "
              "or 225)" if limit < 225 else "")
    return (f"note: {len(long)} of {len(captions)} captions are longer than the {limit} tokens the text encoder "
            f"reads and are cut there (the longest: the caption of {record.path}, {n} tokens){longer}")


def _nan_message(run: RunFolder, step: int, epoch: int, broken: Sequence[str] = ()) -> str:
    last = run.latest_checkpoint()
    kept = f"the last good checkpoint is {last.path}" if last else "no checkpoint had been saved yet"
    said = f"the loss became NaN or infinite at step {step + 1} (epoch {epoch + 1}); training stopped and {kept}. "
    if broken:
        return said + (f"The base model itself holds NaN or infinite values ({count(len(broken), 'tensor')}, e.g. "
                       f"{broken[0]}): its file is broken; use another copy of the model")
    return said + "Lower the learning rate, turn off fp16 (use bf16 or no mixed precision), or check the images."


def nonfinite_weights(networks: Sequence[torch.nn.Module]) -> list[str]:
    """The names of the floating parameters and buffers of ``networks`` holding NaN or an infinity (read only when
    a loss came out NaN: a scan of the whole model)."""
    found = []
    for network in networks:
        found += nonfinite_tensors({f"{type(network).__name__}.{name}": tensor.detach()
                                    for name, tensor in [*network.named_parameters(), *network.named_buffers()]})
    return found


def _undecided(monitor: CSFluctuationMonitor) -> str:
    """Why the rule found no turning point, in the rule's own terms."""
    rule = monitor.rule
    sizes = monitor.history.size(rule.series) if rule.series in SIZE_SERIES else None
    return rule.undecided(sizes, monitor.window)


def _summary_text(s: dict[str, Any]) -> str:
    lines = [f"lorakit train: {s['method']} — {count(s['steps'], 'step')} in {count(s['epochs_run'], 'epoch')}, "
             f"{s['seconds']} s",
             "  data: " + s["data"].replace("\n", "\n        "),
             "  trained: " + s["trained"].replace("\n", "\n           ")]
    if s.get("ema_decay") is not None:
        lines.append(f"  handed back: the moving average of the trained weights (EMA, decay {s['ema_decay']:g})")
    if s["stopped_early"]:
        tp = s["turning_point"]
        why = f" ({tp['reason']})" if tp.get("reason") else ""
        lines.append(f"  early stop: turning point at step {tp['step']}{why}; "
                     f"result = checkpoint of epoch {s['final_epoch']}")
    else:
        found = s.get("turning_point_found")
        note = f"; turning point found at step {found['step']} (report only)" if found else ""
        lines.append(f"  result = epoch {s['final_epoch']} (no early stop{note})")
        if s.get("undecided"):
            lines.append(f"  early stop: {s['undecided']}")
    if (v := s.get("validation")) and v["last"]:
        low = v["lowest"]
        where = "before training (the base model)" if low["step"] == 0 else \
            f"at step {low['step']} (epoch {low['epoch']})"
        base = f"base model {v['base_model']:.4f}, " if v.get("base_model") is not None else ""
        lines.append(f"  validation loss ({count(v['held_out_images'], 'held-out image')}): {base}last "
                     f"{v['last']['val_loss']:.4f}, lowest {low['val_loss']:.4f} {where}")
    if s["final_loss"] is not None:
        lines.append(f"  loss: last {s['final_loss']:.4f}, mean over the last epoch {s['mean_loss_last_epoch']:.4f}")
    if steps := s.get("step_checkpoints"):
        lines.append(f"  step checkpoints (with their training state): step {', '.join(map(str, steps))} in "
                     f"{Path(s['output_dir']) / 'checkpoints'}")
    lines += [f"  wrote {f}" for f in s["files"]]
    return "\n".join(lines)
