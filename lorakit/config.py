"""The training configuration: one typed object, read from TOML and/or command-line flags.

Sections mirror the TOML file::

    [model]       base model, precision
    [data]        images, captions, resolution, batch size (lorakit.data.DataConfig)
    [method]      what is trained: an adapter, native weights, textual inversion, or pivotal (TI + adapter)
    [network]     adapter algorithm, where it goes, rank/alpha, block-wise dims
    [optimizer]   learning rates, optimizer, schedule
    [training]    epochs/steps, seed, loss options
    [sample]      prompts sampled during training
    [early_stop]  CS-Fluctuation
    [output]      where results go

Unknown keys are errors that name the key and the file: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from lorakit.data.config import DataConfig
from lorakit.earlystop.rules import RULES, rule_from_dict  # numpy only: config must stay free of torch
from lorakit.earlystop.samples import SamplePlateau
from lorakit.errors import InvalidValueError
from lorakit.textfile import read_user_text
from lorakit.tomlcheck import set_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(InvalidValueError):
    """A configuration value is missing, unknown or out of range (the message says which and where)."""


METHODS = ("adapter", "native", "ti", "pivotal")
#: output.save_precision -> the dtype name files are written in (None: as trained, fp32)
SAVE_PRECISIONS = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}
#: a learning rate above this is a typo (typical values: 1e-4 for LoRA, 5e-3 for textual inversion)
MAX_LEARNING_RATE = 10.0


@dataclass
class ModelConfig:
    #: a diffusers folder, a single-file .safetensors checkpoint, or None for the built-in shapes-world model
    base: str | None = None
    #: kohya's --vae: another VAE for the base model (a .safetensors VAE such as vae-ft-mse-840000, a diffusers VAE
    #: folder, or a checkpoint whose VAE to take); latents, class images and samples use it.  None: the model's own
    vae: str | None = None
    #: kohya's --base_weights: adapter files merged into the base model before training, so that the new adapter
    #: learns on top of them (lorakit eval merges them too; to sample or merge the result, give them beside it)
    base_weights: list[str] = field(default_factory=list)
    #: kohya's --base_weights_multiplier: each file's multiplier, in order (1 for a file without one)
    base_weights_multiplier: list[float] = field(default_factory=list)
    #: mixed precision for the frozen base model and autocast: "no", "fp16", "bf16"; adapters stay fp32
    mixed_precision: str = "no"
    #: kohya's --no_half_vae: the VAE stays fp32 under fp16/bf16 mixed precision (some VAEs give NaN latents or
    #: black images in fp16)
    no_half_vae: bool = False
    #: kohya's --fp8_base: the frozen linear and conv weights of the U-Net and text encoders stored in fp8
    #: (float8_e4m3fn) and upcast layer by layer as they compute: about half a bf16 model's memory, for 3 mantissa
    #: bits in those weights (norms, embeddings and biases keep theirs; adapters and textual inversion's token
    #: train in fp32 as always); needs mixed_precision fp16 or bf16, and not native fine-tuning (it trains them)
    fp8_base: bool = False
    #: kohya's --fp8_base_unet: the U-Net's weights alone in fp8; the text encoders stay as mixed_precision has them
    fp8_base_unet: bool = False
    #: kohya's --full_bf16, for native fine-tuning: the weights it trains, their gradients and the optimizer's state
    #: in bf16 instead of fp32, about half the memory of the whole model's training (an SDXL U-Net's: 21 GB instead
    #: of 42 GB with AdamW), for bf16's 8 mantissa bits in the weights' updates; needs mixed_precision bf16.  An
    #: adapter's weights stay fp32 (they are small)
    full_bf16: bool = False
    #: override the model's prediction type ("epsilon" or "v_prediction"); None: the model's own
    prediction_type: str | None = None
    #: kohya's --zero_terminal_snr (Lin et al. 2024): the noise schedule rescaled so that its last step is pure
    #: noise, sampled from that step ("trailing" spacing), for the full range of brightness; needs a v-prediction
    #: model (prediction_type = "v_prediction"): an ε-prediction model cannot denoise pure noise.  Models whose
    #: own schedule says so (rescale_betas_zero_snr) already train and sample this way
    zero_terminal_snr: bool = False
    #: recompute each block's activations in the backward pass instead of keeping them (kohya's
    #: --gradient_checkpointing): much less memory for a slower step
    gradient_checkpointing: bool = False
    #: kohya's and A1111's clip skip: 1 conditions the U-Net on the text encoder's last layer, 2 on the one before
    #: (through the final layer norm), as SD1.x anime models were trained; sampling during training uses it too
    clip_skip: int = 1
    #: kohya's max_token_length: captions (and sample prompts) of up to 75 tokens, CLIP's own, or 150 / 225 read
    #: in chunks of 75 (long tag lists); longer ones are cut, and the trainer says how many were
    max_token_length: int = 75
    #: run the training step's U-Net through torch.compile: the first steps pay for compiling (minutes), later
    #: ones skip most of the per-layer Python and launch overhead (a GPU gains most; on a CPU it can be slower,
    #: docs/performance.md).  Sampling stays eager.
    compile: bool = False
    #: torch.compile's mode ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    compile_mode: str = "default"
    #: torch.compile's backend ("inductor"; "aot_eager" traces without generating code, to check a model compiles)
    compile_backend: str = "inductor"

    def fp8_parts(self) -> tuple[str, ...]:
        """The parts of the base model model.fp8_base/fp8_base_unet store in fp8: (), ("unet",) or both."""
        return ("unet", "text_encoders") if self.fp8_base else ("unet",) if self.fp8_base_unet else ()

    def base_weight_pairs(self) -> list[tuple[str, float]]:
        """(file, multiplier) of each of base_weights, as kohya pairs them (1 where no multiplier is given)."""
        return pair_base_weights(self.base_weights, self.base_weights_multiplier)


#: torch.compile's modes (torch._inductor.list_mode_options)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class MethodConfig:
    #: "adapter" (LoRA family), "native" (fine-tune base weights; DreamBooth with prior preservation),
    #: "ti" (textual inversion), "pivotal" (textual inversion + adapter together)
    kind: str = "adapter"
    #: native: which U-Net layers are trained ("attn-only", "attn-mlp", "full" or "all")
    native_targets: str = "all"
    #: native: fine-tune the whole text encoder too, at optimizer.text_encoder_lr (default the learning rate), as
    #: kohya's train_db.py and diffusers' train_dreambooth.py --train_text_encoder do; the result holds both
    native_text_encoder: bool = False
    #: native: the text encoder trains for the first N optimizer steps only, then stays as it is (kohya's
    #: stop_text_encoder_training); None: the whole run
    native_text_encoder_steps: int | None = None
    #: native: kohya's --block_lr (sdxl_train.py), a learning rate per U-Net block in kohya's order: the time (and
    #: SDXL's label) embeddings, each LDM input block, the middle block's three parts, each output block, the output
    #: layers; 0 leaves a block untrained.  SDXL: 23 values; SD1.x/2.x: 29 (12 input and 12 output blocks)
    native_block_lr: list[float] | None = None
    #: textual inversion: the new token(s); default the trigger word
    ti_token: str | None = None
    #: textual inversion: the word whose embedding the new token(s) start from; "*" is A1111's default
    #: ("Initialization text"); a word close to the concept ("dog", "style") usually learns faster
    ti_init_word: str = "*"
    #: textual inversion: vectors per new token (kohya's num_vectors_per_token); more hold more detail and take more of
    #: the prompt's 75 tokens
    ti_vectors: int = 1
    #: textual inversion: start the token(s) from this embedding file instead of ti_init_word (kohya's --weights:
    #: continue an embedding); it must hold ti_vectors vectors for this text encoder
    ti_weights: str | None = None


@dataclass
class NetworkConfig:
    #: the adapter: lora (LoCon with a conv preset), loha, lokr, ia3, full, glora, oft, boft, dylora (lorakit.adapters)
    algorithm: str = "lora"
    #: which layers get an adapter: attn-only, attn-mlp (attention and feed-forward), kohya (kohya's networks.lora),
    #: full (also the convolutions: LoCon), lycoris-full, ia3 ((IA)³'s keys, values and feed-forward inputs, as
    #: LyCORIS's ia3 preset means them; lorakit.network); LyCORIS's full-lin, unet-only,
    #: unet-transformer-only, unet-convblock-only as lycoris-NAME; or a LyCORIS preset file (a .toml path: target
    #: classes and names, exclude_name, and per-layer algorithms and ranks in module_algo_map / name_algo_map)
    preset: str = "attn-mlp"
    #: the rank of each linear layer's adapter (kohya's network_dim)
    rank: int = 8
    #: kohya's network_alpha: the update is scaled by alpha / rank (alpha = rank: no scaling)
    alpha: float = 8.0
    #: the rank of each convolution's adapter with a conv preset (kohya's conv_dim; absent: rank)
    conv_rank: int | None = None
    #: the alpha of the convolutions' adapters (kohya's conv_alpha; absent: alpha)
    conv_alpha: float | None = None
    #: put adapters on the U-Net (false with train_text_encoder: kohya's network_train_text_encoder_only)
    train_unet: bool = True
    #: also put adapters on the text encoder(s) (kohya trains them unless network_train_unet_only)
    train_text_encoder: bool = False
    #: kohya's network_dropout: dropout on each adapter's hidden features while training
    dropout: float = 0.0
    #: kohya's rank_dropout: each step drops this share of each adapter's ranks
    rank_dropout: float = 0.0
    #: kohya's module_dropout: each step leaves out each adapter with this probability
    module_dropout: float = 0.0
    #: DoRA (LyCORIS's dora_wd): the adapter also learns each output's magnitude apart from its direction
    use_dora: bool = False
    #: extra algorithm options, as kohya's --network_args (e.g. factor = 8 for LoKr, use_tucker = true; train_norm
    #: = true also trains the norm layers of the adapted blocks, as LyCORIS does; use_scalar = true, LyCORIS's
    #: trained scalar on the update); a name the algorithm does not take is refused before the model loads
    args: dict[str, Any] = field(default_factory=dict)
    #: kohya block-wise dims: 25 values for SD1.x (IN00..IN11, MID, OUT00..OUT11); 0 = no module there
    block_dims: list[int] | None = None
    #: kohya's block_alphas: an alpha per block, in block_dims' order
    block_alphas: list[float] | None = None
    #: kohya's conv_block_dims: a convolution rank per block, in block_dims' order (0: no conv adapter there)
    conv_block_dims: list[int] | None = None
    #: kohya's conv_block_alphas: a convolution alpha per block, in block_dims' order
    conv_block_alphas: list[float] | None = None
    #: the block-wise LoRA paper's coarse blocks: "upper", "middle", "bottom", "all" or a comma list of them
    #: (or of coarse blocks IN0..IN3, MID, OUT0..OUT3; SDXL: IN0..IN2, OUT0..OUT2, its three levels); rank/alpha/
    #: conv_rank apply there, no module elsewhere
    blocks: str | None = None
    #: kohya's per-block learning-rate factors: 12 comma-separated values (SDXL: 9) or a ramp (sine, cosine, linear,
    #: reverse_linear, zeros; "+0.5" adds an offset); blocks at factor <= block_lr_zero_threshold get no module
    down_lr_weight: str | None = None
    #: kohya's mid_lr_weight: the middle block's learning-rate factor (see down_lr_weight); on SDXL up to 3,
    #: comma-separated, for its middle block's resnet, attention and resnet, as kohya reads it
    mid_lr_weight: float | str | None = None
    #: kohya's up_lr_weight: the 12 up blocks' factors or a ramp (see down_lr_weight)
    up_lr_weight: str | None = None
    #: kohya's block_lr_zero_threshold: blocks whose factor is at most this get no adapter
    block_lr_zero_threshold: float = 0.0
    #: kohya's --network_weights: start the adapter from this .safetensors adapter file (continue a LoRA, or train
    #: on from another); its modules must match this network's (algorithm, rank, alpha); modules it lacks start
    #: fresh
    weights: str | None = None
    #: kohya's --dim_from_weights: each module is built as ``weights`` holds it, as LyCORIS builds a network from
    #: weights: its algorithm, rank, alpha and shape options (a resized file's varying ranks, a LyCORIS file mixing
    #: LoRA, LoHa and LoKr); the network is the file's modules, whatever the preset, and algorithm, rank, alpha,
    #: conv_rank, conv_alpha and the options that shape a module are not read for them
    dim_from_weights: bool = False
    #: more layers than the preset's: globs over module paths (the U-Net's diffusers paths, e.g. "conv_in" or
    #: "*.resnets.*.conv1"; the text encoder's "text_model.encoder.layers.*"), as LyCORIS's target names
    include: list[str] = field(default_factory=list)
    #: layers left out, with everything inside the modules a glob names (e.g. "*.attn1.*", "up_blocks.3"; LyCORIS's
    #: exclude_name, OneTrainer's layer filter); a pattern that names nothing in the model is refused
    exclude: list[str] = field(default_factory=list)
    #: kohya's --scale_weight_norms: after each step a module whose ‖ΔW‖ exceeds this is scaled back onto it
    #: (max-norm regularisation; kohya's guides suggest 1); LoRA/LoCon, LoHa, LoKr; None: off
    max_norm: float | None = None
    #: LoRA+ (kohya's network_args loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio): the
    #: up matrices (B, ``lora_up``) learn this many times faster than the rest (the LoRA+ paper suggests about
    #: 16); the U-Net's or the text encoder's own ratio, else the shared one; None: off.  LoRA/LoCon (and DoRA),
    #: DyLoRA: the algorithms with an up matrix
    loraplus_lr_ratio: float | None = None
    #: LoRA+ for the U-Net's adapters only (see loraplus_lr_ratio)
    loraplus_unet_lr_ratio: float | None = None
    #: LoRA+ for the text encoder's adapters only (see loraplus_lr_ratio)
    loraplus_text_encoder_lr_ratio: float | None = None


#: the LoRA+ ratios, under the names kohya's network_args give them
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


@dataclass
class OptimizerConfig:
    #: the learning rate (typical: 1e-4 for LoRA, 1e-6-5e-6 native; 1 for Prodigy and D-Adaptation)
    learning_rate: float = 1e-4
    #: kohya's unet_lr: the U-Net's rate (absent: learning_rate)
    unet_lr: float | None = None
    #: kohya's text_encoder_lr: the text encoder's rate, its adapters' or (native) its own (absent: learning_rate);
    #: in native fine-tuning of SDXL 0 leaves the first encoder as it is while text_encoder_2_lr trains the second
    text_encoder_lr: float | None = None
    #: native fine-tuning of SDXL's second text encoder (OpenCLIP ViT-bigG; kohya's learning_rate_te2): its own
    #: rate; None: text_encoder_lr's; 0: it stays as it is and only the first trains (as kohya reads 0)
    text_encoder_2_lr: float | None = None
    #: textual inversion's rate for the new token's vectors (and pivotal tuning's embedding)
    ti_lr: float = 5e-3
    #: "adamw", "sgd", "sgdnesterov", "prodigy" (learning_rate 1.0; needs prodigyopt), "lion" (needs lion-pytorch),
    #: "adafactor", D-Adaptation's "dadaptadam", "dadaptlion", "dadaptsgd", "dadaptadagrad", "dadaptadan"
    #: (learning_rate 1.0; needs dadaptation), bitsandbytes' "adamw8bit", "pagedadamw8bit", "pagedadamw",
    #: "pagedadamw32bit", "lion8bit", "pagedlion8bit", "sgdnesterov8bit", schedulefree's "adamwschedulefree",
    #: "radamschedulefree", "sgdschedulefree" (a constant schedule; warm-up: args = {warmup_steps = N}) (kohya's
    #: names, any case); or, as kohya's optimizer_type, any optimizer class by its full name: "torch.optim.RAdam"
    optimizer: str = "adamw"
    #: the optimizer's own options (kohya's --optimizer_args), e.g. {d_coef = 0.5, use_bias_correction = true}
    args: dict = field(default_factory=dict)
    #: the optimizer's weight decay (AdamW's decoupled decay; 0: none)
    weight_decay: float = 1e-2
    #: AdamW's (and 8-bit AdamW's) betas; the other optimizers keep their own unless optimizer.args sets them
    betas: tuple[float, float] = (0.9, 0.999)
    #: the schedule by name (kohya's): constant, constant_with_warmup, linear, cosine, cosine_with_restarts,
    #: polynomial, piecewise_constant (its step_rules in lr_scheduler_args), cosine_with_min_lr, warmup_stable_decay,
    #: inverse_sqrt (lorakit.schedules)
    lr_scheduler: str = "constant"
    #: kohya's lr_scheduler_num_cycles: the restarts of "cosine_with_restarts" (half-cosines of cosine_with_min_lr
    #: and warmup_stable_decay, as kohya passes it)
    lr_scheduler_num_cycles: int = 1
    #: kohya's lr_scheduler_power: the power of "polynomial" (1: linear decay)
    lr_scheduler_power: float = 1.0
    #: warmup steps, or (kohya's float below 1) that share of the run's steps
    lr_warmup_steps: int | float = 0
    #: kohya's lr_decay_steps: warmup_stable_decay's decay, in steps or (below 1) a share of the run's steps
    lr_decay_steps: int | float = 0
    #: kohya's lr_scheduler_min_lr_ratio: the smallest rate of cosine_with_min_lr and warmup_stable_decay, as a
    #: share of the first
    lr_scheduler_min_lr_ratio: float | None = None
    #: kohya's lr_scheduler_timescale: inverse_sqrt's timescale (default: the warm-up steps, or 10000)
    lr_scheduler_timescale: int | None = None
    #: kohya's lr_scheduler_type: a schedule of torch.optim.lr_scheduler by class name (e.g.
    #: "CosineAnnealingWarmRestarts"), instead of lr_scheduler; its arguments in lr_scheduler_args
    lr_scheduler_type: str = ""
    #: kohya's lr_scheduler_args: more keyword arguments of the schedule, e.g. {T_0 = 100} or
    #: {step_rules = "1:10,0.1"}
    lr_scheduler_args: dict = field(default_factory=dict)
    #: kohya's max_grad_norm: clip the gradients' joint norm to this before each step (0: no clipping)
    max_grad_norm: float = 1.0
    #: kohya's gradient_accumulation_steps: a step takes the mean gradient of this many batches (and of an epoch's last
    #: ones)
    gradient_accumulation_steps: int = 1
    #: kohya's --fused_backward_pass, for native fine-tuning: each weight is stepped the moment the backward pass has
    #: its gradient, and the gradient freed, instead of all the model's gradients held until the step (an SDXL
    #: U-Net's: 10 GB in fp32).  Each weight has an optimizer of its own (adamw, adamw8bit, adafactor, lion or sgd:
    #: the same update), max_grad_norm clips each weight's gradient alone (as kohya does); needs
    #: gradient_accumulation_steps = 1, not fp16, one process (lorakit.fused_backward)
    fused_backward_pass: bool = False


@dataclass
class TrainingConfig:
    #: the most epochs the run trains (kohya's max_train_epochs); early stopping may end it sooner
    max_epochs: int = 10
    #: stop after this many optimizer steps even if epochs remain (None: epochs decide)
    max_steps: int | None = None
    #: the seed of everything drawn: the adapters' start, the data's order, noise and timesteps (a run is reproducible,
    #: and a resumed run continues exactly)
    seed: int = 0
    #: kohya's noise_offset: add a per-channel constant to the noise (kohya's guides: 0.05-0.1), for darker darks and
    #: brighter brights
    noise_offset: float = 0.0
    #: kohya's noise_offset_random_strength: each step's offset strength drawn uniformly from [0, noise_offset]
    noise_offset_random_strength: bool = False
    #: kohya's adaptive_noise_scale: the offset grows by this times each channel's |mean latent| (needs
    #: noise_offset)
    adaptive_noise_scale: float | None = None
    #: Min-SNR weighting (kohya's min_snr_gamma; the paper: 5): each timestep's loss weighed by min(SNR, γ)/SNR
    #: (v-prediction: /(SNR + 1)); absent: off
    min_snr_gamma: float | None = None
    #: DreamBooth prior preservation: the regularization images' loss weight (kohya's prior_loss_weight)
    prior_loss_weight: float = 1.0
    #: kohya's save_every_n_epochs: a checkpoint every N epochs (and the last; early stopping needs them to hand back
    #: its turning point)
    save_every_n_epochs: int = 1
    #: kohya's save_last_n_epochs: keep only the last N saved checkpoints, and those early stopping may still
    #: hand back (absent: every one)
    save_last_n_epochs: int | None = None
    #: kohya's save_every_n_steps: also a checkpoint every N steps (``checkpoints/step-NNNNNNNN/``, the adapter
    #: and the training state), which a resume continues from like an epoch's; absent: epoch ends only
    save_every_n_steps: int | None = None
    #: kohya's save_last_n_steps: keep only the step checkpoints of the last N steps (absent: every one)
    save_last_n_steps: int | None = None
    #: an exponential moving average of the trained weights (OneTrainer's EMA, diffusers' --use_ema), updated after
    #: every optimizer step with this decay (e.g. 0.999: about the last 1000 steps; warmed up as diffusers does):
    #: checkpoints, the result, samples and validation use the average; training and CS-Fluctuation the live
    #: weights (lorakit.ema).  Absent: off
    ema_decay: float | None = None
    #: the validation loss of the images data.validation_split holds out (kohya's options): every N epochs (absent:
    #: every epoch), and also every N steps; at most ``max_validation_steps`` batches each time (absent: all)
    validate_every_n_epochs: int | None = None
    #: also the validation loss every this many steps (see validate_every_n_epochs)
    validate_every_n_steps: int | None = None
    #: at most this many validation batches each time (see validate_every_n_epochs)
    max_validation_steps: int | None = None
    #: kohya's --ddp_timeout: minutes the processes of a distributed run wait for each other before giving up (None:
    #: torch's default); a main process that caches latents or draws class images alone for longer needs more (it
    #: applies to the process group train() sets up, not to one a script set up before calling it: the run says so)
    ddp_timeout: int | None = None
    #: kohya's --ddp_gradient_as_bucket_view and --ddp_static_graph: DistributedDataParallel's options of those names
    ddp_gradient_as_bucket_view: bool = False
    #: DistributedDataParallel's static_graph (kohya's --ddp_static_graph; see ddp_gradient_as_bucket_view)
    ddp_static_graph: bool = False
    #: kohya's multi-resolution noise: this many coarser noise layers (kohya's guides: 6-10; 0: off), each weighted
    #: by ``multires_noise_discount`` to the power of its level (lorakit.loss)
    multires_noise_iterations: int = 0
    #: kohya's multires_noise_discount: each coarser level's weight factor (see multires_noise_iterations)
    multires_noise_discount: float = 0.3
    #: input perturbation (kohya's ip_noise_gamma; the paper: 0.1): the U-Net sees a little more noise than the
    #: target says
    ip_noise_gamma: float = 0.0
    #: kohya's ip_noise_gamma_random_strength: each step's γ drawn uniformly from [0, ip_noise_gamma]
    ip_noise_gamma_random_strength: bool = False
    #: weight the loss by 1/√SNR (kohya's debiased_estimation_loss)
    debiased_estimation_loss: bool = False
    #: kohya's min_timestep / max_timestep: train only on timesteps in [min, max) (absent: 0 and the schedule's
    #: length, 1000 for SD); low ones teach detail and texture, high ones composition
    min_timestep: int | None = None
    #: the end of the timesteps trained (see min_timestep)
    max_timestep: int | None = None
    #: kohya's v_pred_like_loss (ε-prediction models): add this share of a v-prediction-like loss, which weighs
    #: noisy timesteps more (kohya's guides: 0.1-0.3; 0: off)
    v_pred_like_loss: float = 0.0
    #: kohya's scale_v_pred_loss_like_noise_pred (v-prediction models): weigh each timestep's loss as an
    #: ε-prediction model's would be (by SNR / (SNR + 1))
    scale_v_pred_loss_like_noise_pred: bool = False
    #: kohya's loss_type: "l2" (the squared error), "huber" or "smooth_l1" (pseudo-Huber: large errors, often
    #: from noisy or mislabelled images, weigh less); its parameter ``huber_c`` follows ``huber_schedule``
    #: ("snr", "exponential" or "constant"; lorakit.loss)
    loss_type: str = "l2"
    #: kohya's huber_schedule: how huber_c changes with the timestep ("snr", "exponential", "constant"; see loss_type)
    huber_schedule: str = "snr"
    #: kohya's huber_c: the pseudo-Huber loss's parameter (see loss_type)
    huber_c: float = 0.1
    #: kohya's huber_scale: the constant and exponential schedules' c multiplied by it (not the snr schedule's)
    huber_scale: float = 1.0


@dataclass
class SampleConfig:
    #: kohya-syntax prompt file ("prompt --n neg --w 64 --h 64 --d seed --l cfg --s steps" per line)
    prompts: str | None = None
    #: draw the sample prompts every this many epochs (kohya's sample_every_n_epochs)
    every_n_epochs: int = 1
    #: also sample every this many steps within an epoch (kohya's sample_every_n_steps; None: epoch ends only)
    every_n_steps: int | None = None
    #: the sampler of prompts that name none (kohya's sample_sampler: ddim, euler_a, dpmsolver++, ...)
    sampler: str = "ddim"
    #: denoising steps of prompts that set none (--s)
    steps: int = 20
    #: classifier-free guidance scale of prompts that set none (--l)
    cfg_scale: float = 7.0
    #: kohya's sample_at_first: also draw the prompts before the first step, from the base model or the adapter
    #: the run starts from (samples/epoch-0000-before-training.png, the first row of the run page)
    at_first: bool = False


@dataclass
class EarlyStopConfig:
    #: "cs-fluctuation" (stop at the turning point), "report" (compute and report, never stop), "off"
    mode: str = "cs-fluctuation"
    #: moving-average window in steps; None: steps per epoch (the paper's choice)
    window: int | None = None
    #: compute CS every this many steps
    interval: int = 1
    #: turning-point rule: "spectral-budget" (the update's spectral size σ1(ΔW)/σ1(W) reaches a budget, read at
    #: epoch ends; beyond the paper; the default: with "budget" within an epoch of the measured overfitting onset
    #: in 8-10 of 16 runs on both shapes-world concepts, and the same for every adapter rank;
    #: docs/early_stopping.md), "budget" (the same on ‖ΔW‖/‖W‖, read every step), "growth-stall" (‖ΔW‖/‖W‖ stops
    #: growing from epoch to epoch, or reaches a cap: 11 and 10 of 16, a margin the page explains it does not
    #: trust), "calm" (CSF stays small for a window) or "second-valley" (the paper's Algorithm 1)
    rule: str = "spectral-budget"
    #: the rule's options, e.g. {prominence = 0.05}, {threshold = 0.1, patience = 1.0}, {budget = 0.1} or
    #: {growth = 0.07, span = 2, cap = 0.175}
    rule_args: dict = field(default_factory=dict)
    #: stop on the samples instead (beyond the paper; lorakit.earlystop.samples): a sample scorer's name, e.g.
    #: "world" (the shapes world's reader) or "clip=PATH" (a local CLIP model: fidelity × prompt-following,
    #: lorakit.evaluate.sample_scorer); "" = off.  At every epoch end the trainer draws ``sample_prompts``
    #: (``sample_seeds`` images each), the scorer turns them into one score, and the run stops once the smoothed
    #: score has not risen for ``sample_patience`` epochs, handing back the first epoch at ``sample_reach`` of its
    #: best.  The weight rule above is still recorded (report only).
    samples: str = ""
    #: the evaluation prompt file the scorer reads (the ``lorakit eval --prompts`` format, with ``expected``
    #: attributes); the built-in job uses its dataset's eval_prompts.toml
    sample_prompts: str | None = None
    #: images per prompt at each scoring (see samples)
    sample_seeds: int = 1
    #: the share of its best smoothed score the handed-back epoch reaches (see samples)
    sample_reach: float = 0.8
    #: epochs without a new best smoothed score before the run stops (see samples)
    sample_patience: int = 4

    def make_rule(self):
        """The configured turning-point rule (raises ValueError/TypeError for an unknown rule or option)."""
        return rule_from_dict({"name": self.rule.replace("-", "_"), **self.rule_args})


@dataclass
class OutputConfig:
    #: the run folder (kohya's output_dir): checkpoints, samples, logs and the result
    dir: str = "output"
    #: the result's file name without .safetensors (kohya's output_name)
    name: str = "lorakit"
    #: "error": refuse a non-empty output folder; "resume": continue the run found there; "overwrite"
    if_exists: str = "error"
    #: the dtype the result is written in: "fp32", "fp16" or "bf16" (kohya's save_precision; checkpoints stay as
    #: trained)
    save_precision: str = "fp32"
    #: the result adapter's key layout: "kohya" (every algorithm; A1111, ComfyUI, LyCORIS, diffusers read it) or
    #: "diffusers" (diffusers/PEFT names as save_lora_weights writes them; plain LoRA/LoCon only).  Checkpoints
    #: inside the run always use kohya names (resume reads them).  Native fine-tuning: "kohya" writes one
    #: single-file checkpoint (A1111, ComfyUI), "diffusers" a diffusers folder (kohya's save_model_as = "diffusers").
    format: str = "kohya"
    #: kohya's --training_comment: a note kept in the result's metadata (ss_training_comment; A1111 shows it)
    comment: str | None = None
    #: kohya's --no_metadata: the files keep only what loading and drawing them needs (the network's kind, rank and
    #: alpha, the base model, clip skip, prediction type) and the ModelSpec; no dataset folders, tags or settings
    no_metadata: bool = False
    #: kohya's --log_with: also write the step records (loss, lr, CS, ...) for "tensorboard", "wandb" (Weights &
    #: Biases; the key from `wandb login` or WANDB_API_KEY, or WANDB_MODE=offline) or "all" (both); each needs its
    #: package (lorakit[tensorboard], lorakit[wandb]); None: log.jsonl and the run page only
    log_with: str | None = None
    #: kohya's --logging_dir: where the tracker writes (None: logs/ in the run folder)
    logging_dir: str | None = None
    #: kohya's --log_tracker_name: the TensorBoard folder / W&B project (None: output.name)
    log_tracker_name: str | None = None
    #: kohya's --wandb_run_name: the W&B run's name (None: the run folder's name)
    wandb_run_name: str | None = None
    #: kohya's --log_tracker_config: a TOML file with each tracker's own settings, passed to it as it starts:
    #: [wandb] entity = "my-team", tags = ["lora"], notes = "..."; [tensorboard] flush_secs = 30, filename_suffix
    log_tracker_config: str | None = None
    #: kohya's --metadata_title / _author / _description / _license / _tags: the result's ModelSpec entries
    #: (modelspec.title etc., which model managers and sites show; the title defaults to output.name)
    metadata_title: str | None = None
    #: kohya's --metadata_author: modelspec.author (see metadata_title)
    metadata_author: str | None = None
    #: kohya's --metadata_description: modelspec.description (see metadata_title)
    metadata_description: str | None = None
    #: kohya's --metadata_license: modelspec.license (see metadata_title)
    metadata_license: str | None = None
    #: kohya's --metadata_tags: modelspec.tags, comma-separated (see metadata_title)
    metadata_tags: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> TrainConfig:
        """Check every value that is wrong whatever the data, before anything is loaded or written (raises
        ConfigError naming the key).  Names are checked against the tables that define them."""
        for ok, key, expected, value in self._value_checks():
            if not ok:
                raise ConfigError(f"{key} must be {expected}, got {value!r}")
        self._validate_combinations()
        return self

    def _value_checks(self) -> list[tuple[bool, str, str, Any]]:
        """Each value on its own against what it may be: (it is, its key, what it must be, the value)."""
        from lorakit.adapters import ALIASES, NETWORK_ALGORITHMS
        from lorakit.data.discovery import MAX_REPEATS
        from lorakit.loss import HUBER_SCHEDULES, LOSS_TYPES, PREDICTION_TYPES
        from lorakit.metadata import TOKEN_LENGTHS
        from lorakit.network import PRESETS
        from lorakit.schedules import SCHEDULES
        from lorakit.trackers import ALL as ALL_TRACKERS
        from lorakit.trackers import TRACKERS

        def one_of(names) -> str:
            return ", ".join(names)

        net, opt, data, train = self.network, self.optimizer, self.data, self.training
        return [
            (self.method.kind in METHODS, "method.kind", f"one of {one_of(METHODS)}", self.method.kind),
            (self.output.log_with in (None, *TRACKERS, ALL_TRACKERS), "output.log_with",
             f"one of {one_of(TRACKERS)} or {ALL_TRACKERS} (or absent: log.jsonl and the run page only)",
             self.output.log_with),
            (self.method.native_targets in ("all", *PRESETS), "method.native_targets",
             f"all or a preset ({one_of(PRESETS)})", self.method.native_targets),
            (_positive_int(self.method.ti_vectors), "method.ti_vectors", "a positive integer", self.method.ti_vectors),
            (self.model.mixed_precision in ("no", "fp16", "bf16"), "model.mixed_precision", "no, fp16 or bf16",
             self.model.mixed_precision),
            (_positive_int(self.model.clip_skip), "model.clip_skip",
             "a positive integer (1: the text encoder's last layer; 2: the one before)", self.model.clip_skip),
            (self.model.max_token_length in TOKEN_LENGTHS, "model.max_token_length",
             f"one of {one_of(map(str, TOKEN_LENGTHS))} (kohya's)", self.model.max_token_length),
            (self.model.compile_mode in COMPILE_MODES, "model.compile_mode", f"one of {one_of(COMPILE_MODES)}",
             self.model.compile_mode),
            # torch is asked only when the option is used: `--print-config` must not wait for it
            (not self.model.compile or self.model.compile_backend in compile_backends(), "model.compile_backend",
             f"one of {one_of(compile_backends()) if self.model.compile else ''}", self.model.compile_backend),
            (self.model.prediction_type in (None, *PREDICTION_TYPES), "model.prediction_type",
             f"one of {one_of(PREDICTION_TYPES)} (or absent: the model's own)", self.model.prediction_type),
            (ALIASES.get(net.algorithm.lower(), net.algorithm.lower()) in NETWORK_ALGORITHMS, "network.algorithm",
             f"one of {one_of(NETWORK_ALGORITHMS)}" + (" (the norm layers' update goes beside one of them: "
                                                     "network.args train_norm = true)"
                                                     if net.algorithm.lower() == "norm" else ""), net.algorithm),
            (_positive_int(net.rank), "network.rank", "a positive integer", net.rank),
            (_at_least(net.alpha, 0), "network.alpha", "0 or more (0: alpha = rank)", net.alpha),
            (net.conv_rank is None or net.conv_rank >= 0, "network.conv_rank",
             "0 or more (0: no k×k conv adapters; absent: the rank)", net.conv_rank),
            (net.conv_alpha is None or _at_least(net.conv_alpha, 0), "network.conv_alpha", "0 or more",
             net.conv_alpha),
            (net.max_norm is None or _at_least(net.max_norm, 0, strict=True), "network.max_norm",
             "a positive number (or absent: off)", net.max_norm),
            *[(0 <= getattr(net, k) <= 1, f"network.{k}", "between 0 and 1", getattr(net, k))
              for k in ("dropout", "rank_dropout", "module_dropout")],
            (_positive_int(data.batch_size), "data.batch_size", "a positive integer", data.batch_size),
            (_resolution_ok(data.resolution), "data.resolution",
             "a positive multiple of 8 (the VAE's factor), or [width, height] of two", data.resolution),
            (1 <= data.repeats <= MAX_REPEATS, "data.repeats", f"between 1 and {MAX_REPEATS}", data.repeats),
            (0 <= data.caption_dropout_rate <= 1, "data.caption_dropout_rate", "between 0 and 1",
             data.caption_dropout_rate),
            (0 <= data.caption_tag_dropout_rate <= 1, "data.caption_tag_dropout_rate", "between 0 and 1",
             data.caption_tag_dropout_rate),
            (data.num_class_images >= 0, "data.num_class_images", "0 or more", data.num_class_images),
            (_positive_int(data.vae_batch_size), "data.vae_batch_size", "a positive integer", data.vae_batch_size),
            (_positive_int(train.max_epochs), "training.max_epochs", "a positive integer", train.max_epochs),
            (train.max_steps is None or _positive_int(train.max_steps), "training.max_steps",
             "a positive integer (or absent: the epochs decide)", train.max_steps),
            (_positive_int(train.save_every_n_epochs), "training.save_every_n_epochs", "a positive integer",
             train.save_every_n_epochs),
            (train.save_last_n_epochs is None or _positive_int(train.save_last_n_epochs),
             "training.save_last_n_epochs", "a positive integer (or absent: every checkpoint is kept)",
             train.save_last_n_epochs),
            *[(getattr(net, k) is None or _at_least(getattr(net, k), 0, strict=True), f"network.{k}",
               "positive (or absent: LoRA+ off)", getattr(net, k))
              for k in LORAPLUS_KEYS],
            (train.ema_decay is None or (_at_least(train.ema_decay, 0) and train.ema_decay < 1),
             "training.ema_decay", "a number in [0, 1) (e.g. 0.999; absent: no average)", train.ema_decay),
            (train.save_every_n_steps is None or _positive_int(train.save_every_n_steps),
             "training.save_every_n_steps", "a positive integer (or absent: checkpoints at epoch ends only)",
             train.save_every_n_steps),
            (train.save_last_n_steps is None or _positive_int(train.save_last_n_steps),
             "training.save_last_n_steps", "a positive integer (or absent: every step checkpoint is kept)",
             train.save_last_n_steps),
            (train.save_last_n_steps is None or train.save_every_n_steps is not None,
             "training.save_last_n_steps", "set together with training.save_every_n_steps (it keeps the last of "
             "those step checkpoints)", train.save_last_n_steps),
            (train.validate_every_n_epochs is None or _positive_int(train.validate_every_n_epochs),
             "training.validate_every_n_epochs", "a positive integer (or absent)", train.validate_every_n_epochs),
            (train.validate_every_n_steps is None or _positive_int(train.validate_every_n_steps),
             "training.validate_every_n_steps", "a positive integer (or absent)", train.validate_every_n_steps),
            (train.max_validation_steps is None or _positive_int(train.max_validation_steps),
             "training.max_validation_steps", "a positive integer (or absent)", train.max_validation_steps),
            (train.ddp_timeout is None or _positive_int(train.ddp_timeout), "training.ddp_timeout",
             "a positive number of minutes (or absent: torch's default)", train.ddp_timeout),
            (_at_least(train.noise_offset, 0), "training.noise_offset", "0 or more", train.noise_offset),
            (train.min_snr_gamma is None or _at_least(train.min_snr_gamma, 0, strict=True),
             "training.min_snr_gamma", "positive (or absent)", train.min_snr_gamma),
            (_at_least(train.prior_loss_weight, 0), "training.prior_loss_weight", "0 or more",
             train.prior_loss_weight),
            (isinstance(train.multires_noise_iterations, int) and not isinstance(train.multires_noise_iterations,
                                                                                 bool)
             and train.multires_noise_iterations >= 0, "training.multires_noise_iterations",
             "0 or more (0: off; kohya's guides use 6-10)", train.multires_noise_iterations),
            (_at_least(train.multires_noise_discount, 0, strict=True) and train.multires_noise_discount <= 1,
             "training.multires_noise_discount", "above 0, at most 1 (kohya's default 0.3)",
             train.multires_noise_discount),
            (train.min_timestep is None or isinstance(train.min_timestep, int) and train.min_timestep >= 0,
             "training.min_timestep", "an integer, 0 or more (or absent: 0)", train.min_timestep),
            (train.max_timestep is None or _positive_int(train.max_timestep), "training.max_timestep",
             "a positive integer (or absent: the schedule's length)", train.max_timestep),
            (train.min_timestep is None or train.max_timestep is None or train.min_timestep < train.max_timestep,
             "training.min_timestep", f"below training.max_timestep ({train.max_timestep}): the range [min, max) "
             "would be empty", train.min_timestep),
            (_at_least(train.v_pred_like_loss, 0), "training.v_pred_like_loss", "0 or more (0: off; kohya's guides "
             "use 0.1-0.3)", train.v_pred_like_loss),
            (_at_least(train.ip_noise_gamma, 0), "training.ip_noise_gamma", "0 or more (0: off; the paper: 0.1)",
             train.ip_noise_gamma),
            (train.loss_type in LOSS_TYPES, "training.loss_type", f"one of {one_of(LOSS_TYPES)}", train.loss_type),
            (train.huber_schedule in HUBER_SCHEDULES, "training.huber_schedule", f"one of {one_of(HUBER_SCHEDULES)}",
             train.huber_schedule),
            (_at_least(train.huber_c, 0, strict=True) and train.huber_c <= 1, "training.huber_c",
             "above 0, at most 1 (kohya's default 0.1)", train.huber_c),
            (_at_least(train.huber_scale, 0, strict=True), "training.huber_scale", "above 0 (kohya's default 1)",
             train.huber_scale),
            *[(value is None or _at_least(value, 0, strict=True) and value <= MAX_LEARNING_RATE
               or (key == "text_encoder_lr" and self.trains_second_text_encoder_only()), f"optimizer.{key}",
               f"a positive number up to {MAX_LEARNING_RATE:g} (typical: 1e-4)" + (
                   "; 0 only in native fine-tuning of SDXL whose second encoder trains (text_encoder_2_lr > 0)"
                   if key == "text_encoder_lr" else ""), value)
              for key, value in (("learning_rate", opt.learning_rate), ("unet_lr", opt.unet_lr),
                                 ("text_encoder_lr", opt.text_encoder_lr), ("ti_lr", opt.ti_lr))],
            (opt.text_encoder_2_lr is None or _at_least(opt.text_encoder_2_lr, 0)
             and opt.text_encoder_2_lr <= MAX_LEARNING_RATE, "optimizer.text_encoder_2_lr",
             f"0 (not trained) or a positive number up to {MAX_LEARNING_RATE:g}", opt.text_encoder_2_lr),
            (opt.lr_scheduler in SCHEDULES, "optimizer.lr_scheduler", f"one of {one_of(SCHEDULES)}",
             opt.lr_scheduler),
            (_positive_int(opt.lr_scheduler_num_cycles), "optimizer.lr_scheduler_num_cycles",
             "a positive integer (the restarts of cosine_with_restarts)", opt.lr_scheduler_num_cycles),
            (_at_least(opt.lr_scheduler_power, 0, strict=True), "optimizer.lr_scheduler_power",
             "above 0 (the power of the polynomial schedule; 1: linear)", opt.lr_scheduler_power),
            (len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas), "optimizer.betas",
             "two numbers in [0, 1), e.g. [0.9, 0.999]", opt.betas),
            (_at_least(opt.weight_decay, 0), "optimizer.weight_decay", "0 or more", opt.weight_decay),
            (_warmup_ok(opt.lr_warmup_steps), "optimizer.lr_warmup_steps",
             "a whole number of steps, or a share of the steps below 1 (0.1: the first 10%)", opt.lr_warmup_steps),
            (_warmup_ok(opt.lr_decay_steps), "optimizer.lr_decay_steps",
             "a whole number of steps, or a share of the steps below 1 (0.1: the last 10%)", opt.lr_decay_steps),
            (opt.lr_scheduler_min_lr_ratio is None or _at_least(opt.lr_scheduler_min_lr_ratio, 0)
             and opt.lr_scheduler_min_lr_ratio <= 1, "optimizer.lr_scheduler_min_lr_ratio",
             "a share of the first rate from 0 to 1 (e.g. 0.1)", opt.lr_scheduler_min_lr_ratio),
            (opt.lr_scheduler_timescale is None or _positive_int(opt.lr_scheduler_timescale),
             "optimizer.lr_scheduler_timescale", "a positive number of steps", opt.lr_scheduler_timescale),
            (isinstance(opt.lr_scheduler_type, str), "optimizer.lr_scheduler_type",
             "a class name of torch.optim.lr_scheduler, or \"\" (none)", opt.lr_scheduler_type),
            (isinstance(opt.lr_scheduler_args, dict), "optimizer.lr_scheduler_args",
             "a table of keyword arguments, e.g. {T_0 = 100}", opt.lr_scheduler_args),
            (_at_least(opt.max_grad_norm, 0), "optimizer.max_grad_norm", "0 or more (0: no clipping)",
             opt.max_grad_norm),
            (_positive_int(opt.gradient_accumulation_steps), "optimizer.gradient_accumulation_steps",
             "a positive integer", opt.gradient_accumulation_steps),
            (_positive_int(self.sample.every_n_epochs), "sample.every_n_epochs",
             "a positive integer (no samples: leave sample.prompts out)", self.sample.every_n_epochs),
            (_positive_int(self.sample.steps), "sample.steps", "a positive integer", self.sample.steps),
            (self.sample.every_n_steps is None or _positive_int(self.sample.every_n_steps), "sample.every_n_steps",
             "a positive integer (or absent: at epoch ends only)", self.sample.every_n_steps),
            (self.early_stop.mode in ("cs-fluctuation", "report", "off"), "early_stop.mode",
             "cs-fluctuation, report or off", self.early_stop.mode),
            (self.early_stop.rule.replace("-", "_") in RULES, "early_stop.rule",  # the config spells it with "-"
             " or ".join(name.replace("_", "-") for name in RULES), self.early_stop.rule),
            (_positive_int(self.early_stop.interval), "early_stop.interval", "a positive integer (steps)",
             self.early_stop.interval),
            (self.early_stop.window is None or self.early_stop.window >= 2, "early_stop.window",
             "at least 2 steps (or absent: steps per epoch, at least 2)", self.early_stop.window),
            (_positive_int(self.early_stop.sample_seeds), "early_stop.sample_seeds", "a positive integer",
             self.early_stop.sample_seeds),
            (not self.early_stop.samples or self.early_stop.mode != "off", "early_stop.samples",
             'empty when early_stop.mode = "off" (stopping on samples is early stopping)', self.early_stop.samples),
            (self.output.if_exists in ("error", "resume", "overwrite"), "output.if_exists",
             "error, resume or overwrite", self.output.if_exists),
            (self.output.save_precision in SAVE_PRECISIONS, "output.save_precision",
             f"one of {one_of(SAVE_PRECISIONS)}", self.output.save_precision),
            (bool(self.output.name) and Path(self.output.name).name == self.output.name, "output.name",
             "a file name without a folder (the result is written into output.dir)", self.output.name),
        ]

    def _validate_combinations(self) -> None:
        """Names checked by what defines them (the optimizer, the stopping rules, the schedule), the sections
        checked by their own methods, and the options that do not go together."""
        from lorakit.fused_backward import fused_backward_refusal
        from lorakit.optimizers import OptimizerNameError, optimizer_builder
        from lorakit.schedules import check_schedule

        net, opt, train = self.network, self.optimizer, self.training
        try:  # a known name, or a class by its full name that imports (kohya's torch.optim.RAdam)
            optimizer_builder(opt.optimizer)
        except OptimizerNameError as e:
            raise ConfigError(f"optimizer.optimizer: {e}") from None
        try:  # the rule's own checks (unknown option, prominence out of range, ...)
            self.early_stop.make_rule()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"early_stop.rule_args: {e}") from e
        try:  # the sample stop's rule checks its own options (sample_reach, sample_patience)
            SamplePlateau(self.early_stop.sample_reach, self.early_stop.sample_patience)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        weights, multipliers = self.model.base_weights, self.model.base_weights_multiplier
        if not (isinstance(weights, list) and all(isinstance(w, str) and w for w in weights)):
            raise ConfigError(f"model.base_weights must be a list of adapter files, got {weights!r}")
        if not (isinstance(multipliers, list) and all(_at_least(m, -math.inf) for m in multipliers)) \
                or len(multipliers) > len(weights):
            raise ConfigError(f"model.base_weights_multiplier must be a list of numbers, one per file of "
                              f"model.base_weights ({len(weights)}), got {multipliers!r}")
        self._validate_blocks()
        self._validate_format()
        check_schedule(self.optimizer)  # a wrong schedule name or argument, said before anything loads
        if train.noise_offset and train.multires_noise_iterations:  # as kohya refuses them together
            raise ConfigError("training.noise_offset and training.multires_noise_iterations both change the noise's "
                              "low frequencies: use one of them")
        for option in ("noise_offset_random_strength", "adaptive_noise_scale"):
            if getattr(train, option) not in (None, False) and not train.noise_offset:
                raise ConfigError(f"training.{option} changes training.noise_offset, which is 0: set noise_offset "
                                  "(kohya's guides: 0.05-0.1)")
        if train.ip_noise_gamma_random_strength and not train.ip_noise_gamma:
            raise ConfigError("training.ip_noise_gamma_random_strength draws training.ip_noise_gamma's strength, "
                              "which is 0: set ip_noise_gamma (the paper: 0.1)")
        if net.dim_from_weights and not net.weights:
            raise ConfigError("network.dim_from_weights takes the ranks from network.weights, which is not set: "
                              "give --network-weights FILE")
        if self.method.kind in ("adapter", "pivotal"):
            self._validate_preset()
            self._validate_network_args()
        if net.args.get("rs_lora") and net.dim_from_weights:  # the file's alphas already hold their scale
            raise ConfigError("network.args rs_lora scales each alpha by √rank, and network.dim_from_weights takes "
                              "the alphas from the file, where that scale is already written: remove rs_lora")
        if net.dim_from_weights and (net.blocks is not None or net.block_dims is not None):
            raise ConfigError("network.dim_from_weights and network.blocks/block_dims both choose the ranks: "
                              "the file's modules decide where adapters go; remove one of them")
        if self.lacks_ti_token():
            raise ConfigError(f"method.kind = {self.method.kind!r} needs the new token: set method.ti_token "
                              "(or data.trigger), e.g. --set method.ti_token=zkz")
        self._validate_fp8()
        if self.optimizer.fused_backward_pass and (why := fused_backward_refusal(
                self.method.kind, self.optimizer.optimizer, self.model.mixed_precision,
                self.optimizer.gradient_accumulation_steps)):
            raise ConfigError(f"optimizer.fused_backward_pass: {why}")
        from lorakit.schedule_free import schedule_free_refusal

        opt = self.optimizer
        if why := schedule_free_refusal(opt.optimizer, opt.lr_scheduler_type or opt.lr_scheduler, opt.lr_warmup_steps,
                                        self.training.ema_decay, opt.fused_backward_pass):
            raise ConfigError(f"optimizer.optimizer: {why}")
        if self.model.full_bf16 and self.model.mixed_precision != "bf16":  # as kohya refuses it
            raise ConfigError("model.full_bf16 trains the weights in bf16, which needs model.mixed_precision = bf16")
        if self.model.full_bf16 and self.method.kind != "native":
            raise ConfigError(f"model.full_bf16 is for native fine-tuning (method.kind = 'native'); with "
                              f"method.kind = {self.method.kind!r} the trained weights are small and stay fp32")
        if self.method.ti_weights and self.method.kind not in ("ti", "pivotal"):
            raise ConfigError(f"method.ti_weights starts a textual-inversion embedding, but method.kind is "
                              f"{self.method.kind!r}: use method.kind = 'ti' or 'pivotal' (an adapter starts from "
                              "network.weights)")
        if self.data.num_class_images > 0 and not self.data.class_prompt:  # before the model loads, not after
            raise ConfigError("data.num_class_images > 0 needs data.class_prompt, the prompt the class images are "
                              "generated from, e.g. --set data.class_prompt=\"a dog\"")
        steps = self.method.native_text_encoder_steps
        if steps is not None and not (_positive_int(steps) and self.method.native_text_encoder):
            raise ConfigError(f"method.native_text_encoder_steps = {steps!r}: a positive number of steps, with "
                              "method.native_text_encoder = true (the text encoder trains for those first steps)")
        block_lr = self.method.native_block_lr
        if block_lr is not None and not (isinstance(block_lr, list) and block_lr
                                         and all(_at_least(v, 0) for v in block_lr)):
            raise ConfigError(f"method.native_block_lr must be a list of learning rates, 0 or more, one per U-Net "
                              f"block (SDXL: 23), got {block_lr!r}")
        if block_lr is not None and self.method.kind != "native":
            raise ConfigError(f"method.native_block_lr sets native fine-tuning's rate per U-Net block, but method.kind "
                              f"is {self.method.kind!r} (an adapter's: network.down_lr_weight/mid_lr_weight/"
                              "up_lr_weight)")
        if self.optimizer.text_encoder_2_lr is not None and not (self.method.kind == "native"
                                                                 and self.method.native_text_encoder):
            raise ConfigError("optimizer.text_encoder_2_lr is the rate of SDXL's second text encoder in native "
                              "fine-tuning: it needs method.kind = 'native' and method.native_text_encoder = true (an "
                              "adapter's text encoders share optimizer.text_encoder_lr)")
        if self.method.native_text_encoder and self.method.kind != "native":
            raise ConfigError(f"method.native_text_encoder fine-tunes the text encoder in native training, but "
                              f"method.kind is {self.method.kind!r}: adapters train it with "
                              "--set network.train_text_encoder=true")
        if self.data.cache_text_encoder_outputs and (trains := self.trained_text_encoder_setting()):
            raise ConfigError(f"data.cache_text_encoder_outputs keeps each caption's encoding, so the text encoders "
                              f"must not train, but {trains}: turn one of them off")
        if self.method.kind in ("ti", "native"):
            # the network section only shapes adapters: set for textual inversion or native training it would be
            # silently ignored
            changed = [f"network.{k} = {v!r}" for k, v in dataclasses.asdict(self.network).items()
                       if v != getattr(NetworkConfig(), k)]
            if changed:
                other = "'pivotal' (textual inversion + an adapter)" if self.method.kind == "ti" else "'adapter'"
                raise ConfigError(f"method.kind = {self.method.kind!r} trains no adapter, so {', '.join(changed)} "
                                  f"would be ignored: remove them, or use method.kind = {other}")

    def _validate_fp8(self) -> None:
        parts = self.model.fp8_parts()
        if not parts:
            return
        option = "model.fp8_base" if self.model.fp8_base else "model.fp8_base_unet"
        if self.model.mixed_precision == "no":  # kohya refuses it too: fp8 is storage, the layers compute in it
            raise ConfigError(f"{option} stores the base weights in fp8 and computes in mixed precision's dtype: set "
                              "model.mixed_precision to bf16 (or fp16 on a GPU)")
        if self.method.kind == "native":
            raise ConfigError(f"{option}: native fine-tuning trains the base model's weights, which fp8 cannot hold; "
                              "use it with an adapter (method.kind = 'adapter')")

    def lacks_ti_token(self) -> bool:
        """Textual inversion (or pivotal tuning) with no token to learn given (method.ti_token, or data.trigger):
        refused, unless the data's folders name it (lorakit train fills it from them first)."""
        return self.method.kind in ("ti", "pivotal") and not (self.method.ti_token or self.data.trigger)

    def trained_text_encoder_setting(self) -> str | None:
        """The setting that makes this run train a text encoder (its embeddings, its weights or an adapter on it),
        or None when the encoders stay frozen."""
        method = self.method
        if method.kind in ("ti", "pivotal"):
            return f"method.kind = {method.kind!r} trains new token embeddings"
        if method.kind == "native" and method.native_text_encoder:
            return "method.native_text_encoder = true"
        if method.kind == "adapter" and self.network.train_text_encoder:
            return "network.train_text_encoder = true"
        return None

    def _validate_format(self) -> None:
        """A diffusers-layout result must be writable, checked now rather than after training."""
        out, net = self.output, self.network
        if out.format not in ("kohya", "diffusers"):
            raise ConfigError(f"output.format must be kohya or diffusers, got {out.format!r}")
        if out.format != "diffusers":
            return
        if self.method.kind == "native":  # the whole model as a diffusers folder instead of one file
            return
        if self.method.kind not in ("adapter", "pivotal"):
            raise ConfigError(f"output.format = \"diffusers\" is for adapters and native fine-tuning; method.kind = "
                              f"{self.method.kind!r} writes an embedding (one file every client reads)")
        tucker, norms = bool(net.args.get("use_tucker")), bool(net.args.get("train_norm"))
        if net.algorithm.lower() not in ("lora", "locon") or tucker or net.use_dora or norms:
            what = "Tucker LoCon" if tucker else ("DoRA" if net.use_dora else (
                "norm-layer updates (train_norm)" if norms else net.algorithm))
            raise ConfigError(f"output.format = \"diffusers\" holds plain LoRA/LoCon only, not {what}: keep the "
                              "kohya format (diffusers reads it too for LoRA), or convert the result afterwards "
                              "with `lorakit resize FILE --to lora`")

    def trains_second_text_encoder_only(self) -> bool:
        """Native fine-tuning of SDXL's second text encoder alone: the first's rate 0, the second's positive (kohya's
        learning_rate_te1 = 0 with learning_rate_te2)."""
        opt = self.optimizer
        return (self.method.kind == "native" and self.method.native_text_encoder and opt.text_encoder_lr == 0
                and isinstance(opt.text_encoder_2_lr, (int, float)) and opt.text_encoder_2_lr > 0)

    def _validate_preset(self) -> None:
        """``network.preset`` names a preset or a LyCORIS preset file that reads, and ``network.include`` /
        ``exclude`` are lists of globs (checked before the model loads)."""
        from lorakit.network import get_preset  # torch: only when validating

        try:
            get_preset(self.network.preset)
        except InvalidValueError as err:
            raise ConfigError(f"network.preset: {err}") from None
        for key in ("include", "exclude"):
            value = getattr(self.network, key)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"network.{key} must be a list of module-path globs, e.g. [\"*.attn1.*\"], "
                                  f"got {value!r}")

    def _validate_network_args(self) -> None:
        """``network.args`` names options of the chosen algorithm (a wrong name would otherwise fail at the first
        adapter, after the model has loaded); ``train_norm`` fits the run."""
        from lorakit.adapters import algorithm_class, check_options  # torch: only when validating

        net = self.network
        try:
            check_options(net.algorithm, net.args)  # the algorithm itself is checked before
        except InvalidValueError as err:
            raise ConfigError(f"network.args {err}") from None
        if "train_norm" not in net.args:
            return
        if net.args["train_norm"] and algorithm_class(net.algorithm).algorithm == "ia3":
            raise ConfigError("network.args train_norm: LyCORIS trains the norm layers beside every algorithm but "
                              "(IA)³, whose few scales are the point; remove train_norm or choose another algorithm")
        if net.args["train_norm"] and not net.train_unet:
            raise ConfigError("network.args train_norm updates the norm layers of the U-Net's blocks, and "
                              "network.train_unet is false")

    def _validate_blocks(self) -> None:
        """Block-wise options parse (coarse block names, lr-weight ramps and lists), and are not combined with
        kohya's explicit block_dims, which would silently win."""
        from lorakit.blocks import KOHYA_SDXL, blocks_block_dims, parse_block_lr_weights  # torch: when validating

        net = self.network
        if net.blocks is not None:
            if net.block_dims is not None:
                raise ConfigError("network.blocks and network.block_dims both choose the blocks: give one of them")
            try:
                blocks_block_dims(net.blocks, 1)
            except (ValueError, KeyError) as e:
                raise ConfigError(f"network.blocks = {net.blocks!r}: {e}") from e
        lr_weights = (net.down_lr_weight, net.mid_lr_weight, net.up_lr_weight, net.block_lr_zero_threshold)
        try:
            parse_block_lr_weights(*lr_weights)
        except (ValueError, KeyError) as e:
            try:  # the model's family is not known yet: kohya's SDXL lists (9 per side, 3 middle) pass here
                parse_block_lr_weights(*lr_weights, block_map=KOHYA_SDXL)
            except (ValueError, KeyError):
                raise ConfigError(f"network.down_lr_weight/mid_lr_weight/up_lr_weight: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _warmup_ok(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 and (float(value).is_integer() or value < 1)


def warmup_steps(value: int | float, total_steps: int) -> int:
    """``optimizer.lr_warmup_steps`` in steps: a share below 1 of ``total_steps`` (kohya reads a float so), else
    the number itself."""
    return int(value * total_steps) if isinstance(value, float) and value < 1 else int(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _at_least(value: Any, low: float, strict: bool = False) -> bool:
    """A finite number >= low (> low when strict); NaN and infinity never pass."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > low if strict else value >= low


def _resolution_ok(value: Any) -> bool:
    if value is None:
        return True
    sides = [value] if isinstance(value, int) else list(value) if isinstance(value, list | tuple) else []
    return len(sides) in (1, 2) and (len(sides) == 2 or isinstance(value, int)) and \
        all(_positive_int(v) and v % 8 == 0 for v in sides)


def compile_backends() -> list[str]:
    """The backends torch.compile accepts here (the debugging ones included: "aot_eager" traces the training
    step without generating code)."""
    import torch

    return torch.compiler.list_backends(exclude_tags=())


# ------------------------------------------------------------------------------------------------- resume
#: settings that may change when a run is resumed: they decide what happens next, not what was trained so far
RESUMABLE = ("training.max_epochs", "training.max_steps", "training.save_every_n_epochs",
             "training.save_last_n_epochs", "training.save_every_n_steps", "training.save_last_n_steps",
             "training.validate_every_n_epochs", "training.validate_every_n_steps",
             "training.max_validation_steps", "training.ddp_timeout", "training.ddp_gradient_as_bucket_view",
             "training.ddp_static_graph", "data.validation_data", "output.name",
             "output.save_precision", "model.gradient_checkpointing", "model.compile", "model.compile_mode",
             "model.compile_backend", "data.cache_latents_to_disk", "data.cache_dir",
             "data.verify_images", "data.upscale_warning_factor", "data.orphan_captions", "sample.prompts",
             "sample.every_n_epochs", "sample.sampler", "sample.steps", "sample.cfg_scale", "sample.at_first",
             # what is logged where, and how the result describes itself: never the training
             "output.log_with", "output.logging_dir", "output.log_tracker_name", "output.wandb_run_name",
             "output.log_tracker_config", "output.comment", "output.metadata_title", "output.metadata_author",
             "output.metadata_description", "output.metadata_license", "output.metadata_tags")
_NOT_COMPARED = ("output.dir", "output.if_exists")
#: the settings that name files or folders (model.base_weights: a list of them)
_PATH_KEYS = ("model.base", "data.train_data", "data.reg_data", "data.validation_data", "data.cache_dir",
              "sample.prompts", "early_stop.sample_prompts", "network.weights", "method.ti_weights",
              "model.base_weights", "output.log_tracker_config", "network.preset")
#: path settings that always name a file or folder (model.base and the prompt files may name a built-in instead)
_ALWAYS_PATHS = ("data.train_data", "data.reg_data", "data.validation_data", "data.cache_dir", "network.weights",
                 "method.ti_weights", "model.base_weights", "output.log_tracker_config")


def pair_base_weights(files: list[str], multipliers: list[float]) -> list[tuple[str, float]]:
    """model.base_weights with model.base_weights_multiplier: each file's multiplier, 1 past the end of the list (as
    kohya reads --base_weights_multiplier)."""
    return [(str(f), float(multipliers[i]) if i < len(multipliers) else 1.0) for i, f in enumerate(files)]


def missing_paths(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(key, value) of every file or folder the config names that does not exist (prior preservation fills, and
    makes, its class-image folder itself)."""
    named = (("model.base", cfg.model.base), ("data.train_data", cfg.data.train_data),
             ("data.reg_data", cfg.data.reg_data if cfg.data.num_class_images <= 0 else None),
             ("data.validation_data", cfg.data.validation_data),
             ("sample.prompts", cfg.sample.prompts),  # network.weights: the trainer, which knows a resumed run
             ("output.log_tracker_config", cfg.output.log_tracker_config),
             *(("model.base_weights", file) for file in cfg.model.base_weights))
    return [(key, value) for key, value in named if value and not Path(value).expanduser().exists()]


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` whose relative paths are made absolute against the current directory: what a run writes
    as its ``config.toml``, so that ``lorakit train --out DIR --resume`` (or the config file run again) works
    from any directory, not only the one the run was started in. A value that is not an existing file or
    folder is kept as it is where it may name something else (a model or prompt file lorakit knows by name)."""
    from copy import deepcopy

    def absolute(value: str, always: bool) -> str:
        path = Path(value).expanduser()
        # abspath, not resolve: a symlink the user named stays the link they chose
        return os.path.abspath(path) if not path.is_absolute() and (always or path.exists()) else value

    out = deepcopy(cfg)
    for key in _PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(out, section), name)
        if not value:
            continue
        always = key in _ALWAYS_PATHS
        made = [absolute(v, always) for v in value] if isinstance(value, list) else absolute(value, always)
        setattr(getattr(out, section), name, made)
    return out


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    out = {}
    for section, table in cfg.to_dict().items():
        for key, value in table.items():
            out[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def resume_changes(previous: TrainConfig, new: TrainConfig) -> tuple[list[str], list[str]]:
    """The settings of ``new`` that differ from the run's ``previous`` ones, as ("key old -> new") texts:
    (those that may change on resume, those that may not)."""
    old, cur = _flat(previous), _flat(new)
    applied, refused = [], []
    for key in sorted(old.keys() | cur.keys()):
        if key in _NOT_COMPARED:
            continue
        a, b = old.get(key), cur.get(key)
        if key in _PATH_KEYS:  # config.toml names them absolutely, the user's config maybe not
            a, b = (_resolved(v) for v in (a, b))
        if a == b:
            continue
        (applied if key in RESUMABLE else refused).append(f"{key} {a!r} -> {b!r}")
    return applied, refused


def _resolved(value: Any) -> Any:
    """A path setting's value (a path, a list of them, or empty) with every path resolved."""
    if isinstance(value, list):
        return [str(Path(v).expanduser().resolve()) for v in value]
    return str(Path(value).expanduser().resolve()) if value else value


# ------------------------------------------------------------------------------------------------- loading
def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts (TOML tables); unknown sections/keys raise ConfigError."""
    cfg = TrainConfig()
    merge_into(cfg, values, source)
    return cfg


def merge_into(cfg: TrainConfig, values: dict[str, Any], source: str) -> None:
    """Set the values of nested dicts (``{section: {key: value}}``) on ``cfg``, checking every name and type."""
    sections = [f.name for f in dataclasses.fields(cfg)]
    keys = {name: {f.name for f in dataclasses.fields(getattr(cfg, name))} for name in sections}
    for section, table in values.items():
        if section not in sections and not isinstance(table, dict):  # ``max_epochs = 5`` above every [section]
            homes = [name for name in sections if section in keys[name]]
            where = f"it is a setting of [{homes[0]}]: move it below a [{homes[0]}] line" if homes else \
                f"settings belong in a section ({', '.join(f'[{name}]' for name in sections)})"
            raise ConfigError(f"{source}: {section} = {table!r} stands outside any [section]; {where}")
        if section not in sections:
            close = difflib.get_close_matches(section, sections, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else f" (known: {', '.join(sections)})"
            raise ConfigError(f"{source}: unknown section [{section}]{hint}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        if section == "output" and "wandb_api_key" in table:  # kohya's option, refused: it would be saved
            raise ConfigError(f"{source} [output]: wandb_api_key is not read from a config (the config is copied "
                              "into the run folder and the adapter's metadata); run `wandb login` or set "
                              "WANDB_API_KEY")
        for key in table:  # in the wrong section (lr_scheduler in [training]): its home, not a near name here
            homes = [name for name in sections if key in keys[name]]
            if key not in keys[section] and homes:
                fix = f"--set {homes[0]}.{key}=..." if source == "--set" else f"move it under [{homes[0]}]"
                raise ConfigError(f"{source} [{section}]: {key!r} is a setting of [{homes[0]}], not of [{section}]: "
                                  f"{fix}")
        set_fields(getattr(cfg, section), table, f"{source} [{section}]", ConfigError)


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML training config; errors name the file and the key."""
    path = Path(path)
    try:
        values = tomllib.loads(read_user_text(path, ConfigError))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(values, str(path))


def set_option(cfg: TrainConfig, dotted: str, raw: str) -> None:
    """Apply one ``section.key=value`` override from the command line (value parsed as TOML if it can be)."""
    section, _, key = dotted.partition(".")
    if not key:
        raise ConfigError(f"--set {dotted}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    table, _, entry = key.partition(".")
    current = getattr(getattr(cfg, section, None), table, None) if entry else None
    if isinstance(current, dict):  # one entry of a table setting (network.args.factor=4), the others kept
        key, value = table, {**current, entry: value}
    try:
        merge_into(cfg, {section: {key: value}}, "--set")
    except ConfigError as err:
        if isinstance(value, str) and "," in value and "expected list" in str(err):  # kohya's "4,4,4" spelling
            raise ConfigError(f"{err}: write a list as TOML does, --set {dotted}=[{value}]") from None
        raise


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML (written next to every run so it can be repeated exactly)."""
    # TOML has no null: a None option is left out, which reads back as its default (None)
    tables = {section: {key: value for key, value in table.items() if value is not None}
              for section, table in cfg.to_dict().items()}
    return tomli_w.dumps(tables)
