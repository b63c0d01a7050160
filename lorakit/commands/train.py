"""``lorakit train``: train an adapter (or embedding, or the model) from a folder of images.

With no arguments it runs the built-in default: a LoRA for the shapes world's "zkz" concept on the built-in
base model, with CS-Fluctuation early stopping, on the CPU, offline.  Otherwise give a TOML config and/or
flags; flags win over the file, and ``--set section.key=value`` reaches every option of the config.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

from lorakit.commands.arg_types import size_or_pair
from lorakit.config import ConfigError, TrainConfig, load_config, missing_paths, set_option, to_toml

HELP = "train an adapter, embedding or model from a folder of images"

# flag -> (config section.key, type, help)
FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "--data": ("data.train_data", str, "image folder: kohya layout (N_trigger class/), a plain folder, or a TOML"),
    "--reg-data": ("data.reg_data", str, "regularization images (kohya layout)"),
    "--validation-data": ("data.validation_data", str, "held-out images of the concept for the validation loss"),
    "--trigger": ("data.trigger", str, "the trigger word (plain folders)"),
    "--model": ("model.base", str, "base model: diffusers folder or single-file .safetensors (default: built-in)"),
    "--vae": ("model.vae", str, "another VAE for the base model (a .safetensors VAE or a diffusers VAE folder)"),
    "--method": ("method.kind", str, "adapter (default), native, ti, pivotal"),
    "--algorithm": ("network.algorithm", str, "%(algorithms)s"),
    "--preset": ("network.preset", str, "attn-only, attn-mlp, full, kohya, lycoris-full, ia3 (more in "
                                        "docs/settings.md), or a LyCORIS preset .toml"),
    "--rank": ("network.rank", int, "adapter rank (network_dim)"),
    "--alpha": ("network.alpha", float, "adapter alpha (network_alpha)"),
    "--network-weights": ("network.weights", str, "start the adapter from this adapter file (kohya's "
                          "--network_weights; same algorithm, rank and alpha, or --dim-from-weights)"),
    "--scale-weight-norms": ("network.max_norm", float, "max-norm regularisation (kohya's --scale_weight_norms): "
                             "scale back any module whose ‖ΔW‖ exceeds this after each step"),
    "--blocks": ("network.blocks", str, "train only these U-Net blocks (block-wise LoRA paper): upper, middle, bottom, "
                 "all, or a comma list (upper,middle)"),
    "--lr": ("optimizer.learning_rate", float, "learning rate"),
    "--epochs": ("training.max_epochs", int, "maximum epochs"),
    "--max-steps": ("training.max_steps", int, "maximum optimizer steps"),
    "--batch-size": ("data.batch_size", int, "batch size"),
    "--resolution": ("data.resolution", size_or_pair, "training resolution: a size, or width,height as kohya's "
                     "512,768 (default: the model's native size)"),
    "--seed": ("training.seed", int, "random seed"),
    "--early-stop": ("early_stop.mode", str, "cs-fluctuation (default), report, off"),
    "--sample-prompts": ("sample.prompts", str, "kohya-syntax prompt file sampled every epoch"),
    "--out": ("output.dir", str, "output folder (default: output/train-<time>)"),
    "--name": ("output.name", str, "file name of the result (default: lorakit)"),
    "--format": ("output.format", str, "key layout of the result: kohya (default) or diffusers (LoRA/LoCon only; "
                                      "a native run: the model as a diffusers folder)"),
    "--mixed-precision": ("model.mixed_precision", str, "no, fp16, bf16"),
    "--training-comment": ("output.comment", str, "a note kept in the result's metadata (ss_training_comment)"),
    "--clip-skip": ("model.clip_skip", int, "condition on the text encoder's N-th layer from the end (kohya/A1111: "
                    "1 = last, the default; 2 for most SD1.x anime models)"),
}


class _AlgorithmNames:
    """The adapter algorithms for the help text, read from the adapter classes only when help is printed:
    ``lorakit.adapters`` imports torch, which ``--print-config`` must not wait for."""

    def __str__(self) -> str:
        from lorakit.adapters import NETWORK_ALGORITHMS

        return ", ".join(NETWORK_ALGORITHMS)


#: options a user may guess that neither tool has -> what to give instead ("--config" was answered "did you mean
#: --print-config?")
GUESSED_OPTIONS: dict[str, str] = {
    "--config": "(the TOML is the first argument: lorakit train FILE.toml; a kohya config: --from-kohya FILE)",
}

#: kohya sd-scripts' train_network.py options (dashes for underscores) -> how lorakit says it: a kohya user's
#: command line gets the translation in the "unrecognized arguments" error instead of a bare refusal
KOHYA_OPTIONS: dict[str, str] = {
    "--pretrained-model-name-or-path": "--model", "--train-data-dir": "--data", "--reg-data-dir": "--reg-data",
    "--dataset-config": "--data FILE.toml", "--output-dir": "--out", "--output-name": "--name",
    "--network-dim": "--rank", "--network-alpha": "--alpha", "--network-module": "--algorithm",
    "--learning-rate": "--lr", "--max-train-epochs": "--epochs", "--max-train-steps": "--max-steps",
    "--train-batch-size": "--batch-size", "--network-args": "--set 'network.args={KEY = VALUE}'",
    "--optimizer-type": "--set optimizer.optimizer=NAME", "--optimizer-args": "--set 'optimizer.args={KEY = VALUE}'",
    "--lr-scheduler": "--set optimizer.lr_scheduler=NAME",
    "--lr-warmup-steps": "--set optimizer.lr_warmup_steps=N",
    "--save-every-n-epochs": "--set training.save_every_n_epochs=N",
    "--save-last-n-epochs": "--set training.save_last_n_epochs=N",
    "--save-every-n-steps": "--set training.save_every_n_steps=N",
    "--save-last-n-steps": "--set training.save_last_n_steps=N",
    # a checkpoint and its training state are kept together: the state's own count is the checkpoints'
    "--save-last-n-epochs-state": "--set training.save_last_n_epochs=N",
    "--save-last-n-steps-state": "--set training.save_last_n_steps=N",
    "--validation-split": "--set data.validation_split=X", "--validation-seed": "--set data.validation_seed=N",
    "--validate-every-n-epochs": "--set training.validate_every_n_epochs=N",
    "--validate-every-n-steps": "--set training.validate_every_n_steps=N",
    "--max-validation-steps": "--set training.max_validation_steps=N",
    "--gradient-checkpointing": "--set model.gradient_checkpointing=true",
    "--no-half-vae": "--set model.no_half_vae=true",
    "--network-multiplier": "--set data.network_multiplier=X",
    "--gradient-accumulation-steps": "--set optimizer.gradient_accumulation_steps=N",
    "--max-grad-norm": "--set optimizer.max_grad_norm=X", "--noise-offset": "--set training.noise_offset=X",
    "--multires-noise-iterations": "--set training.multires_noise_iterations=N",
    "--multires-noise-discount": "--set training.multires_noise_discount=X",
    "--ip-noise-gamma": "--set training.ip_noise_gamma=X",
    "--ip-noise-gamma-random-strength": "--set training.ip_noise_gamma_random_strength=true",
    "--noise-offset-random-strength": "--set training.noise_offset_random_strength=true",
    "--adaptive-noise-scale": "--set training.adaptive_noise_scale=X",
    "--debiased-estimation-loss": "--set training.debiased_estimation_loss=true",
    "--v-pred-like-loss": "--set training.v_pred_like_loss=X",
    "--scale-v-pred-loss-like-noise-pred": "--set training.scale_v_pred_loss_like_noise_pred=true",
    "--zero-terminal-snr": "--set model.zero_terminal_snr=true",
    "--min-timestep": "--set training.min_timestep=N", "--max-timestep": "--set training.max_timestep=N",
    # speed and memory switches kohya needs and lorakit does by itself
    "--xformers": "(the default: PyTorch's scaled-dot-product attention, no switch needed)",
    "--sdpa": "(the default: PyTorch's scaled-dot-product attention)",
    "--mem-eff-attn": "(the default: PyTorch's scaled-dot-product attention picks a memory-efficient kernel)",
    "--persistent-data-loader-workers": "(the default: lorakit has no loader workers; latents are cached once)",
    "--max-data-loader-n-workers": "(the default: lorakit has no loader workers; latents are cached once)",
    "--v-parameterization": "--set model.prediction_type=v_prediction",
    "--loss-type": "--set training.loss_type=NAME", "--huber-schedule": "--set training.huber_schedule=NAME",
    "--huber-c": "--set training.huber_c=X", "--huber-scale": "--set training.huber_scale=X",
    "--loraplus-lr-ratio": "--set network.loraplus_lr_ratio=X",
    "--loraplus-unet-lr-ratio": "--set network.loraplus_unet_lr_ratio=X",
    "--loraplus-text-encoder-lr-ratio": "--set network.loraplus_text_encoder_lr_ratio=X",
    # train_textual_inversion.py's options (--from-kohya sets --method ti when token_string is given)
    "--token-string": "--method ti --set method.ti_token=NAME",
    "--init-word": "--set method.ti_init_word=NAME",
    "--num-vectors-per-token": "--set method.ti_vectors=N",
    "--weights": "--set method.ti_weights=FILE",
    "--use-object-template": "--set data.caption_templates=object",
    "--use-style-template": "--set data.caption_templates=style",
    "--vae-batch-size": "--set data.vae_batch_size=N",
    "--weighted-captions": "--set data.weighted_captions=true",
    "--cache-text-encoder-outputs": "--set data.cache_text_encoder_outputs=true",
    # kohya turns the cache on with its disk copy; lorakit keeps it in memory (the same outputs)
    "--cache-text-encoder-outputs-to-disk": "--set data.cache_text_encoder_outputs=true",
    "--disable-mmap-load-safetensors": "(the default: a loading switch of kohya's SDXL scripts for WSL; it changes "
                                       "nothing trained)",
    "--lowram": "(the default: no memory mode to switch, the model loads as diffusers loads it; it changes nothing "
                "trained)",
    "--highvram": "(the default: no memory mode to switch, the model loads as diffusers loads it; it changes nothing "
                  "trained)",
    "--config-file": "--from-kohya FILE",
    "--output-config": "--print-config",
    "--network-dropout": "--set network.dropout=X", "--save-precision": "--set output.save_precision=NAME",
    "--network-train-unet-only": "(the default; --set network.train_text_encoder=true to also train it)",
    "--cache-latents": "(the default: data.cache_latents)", "--caption-extension": "--set data.caption_extension=.EXT",
    "--shuffle-caption": "--set data.shuffle_caption=true", "--keep-tokens": "--set data.keep_tokens=N",
    "--keep-tokens-separator": "--set data.keep_tokens_separator=MARK",
    "--token-warmup-min": "--set data.token_warmup_min=N", "--token-warmup-step": "--set data.token_warmup_step=X",
    "--secondary-separator": "--set data.secondary_separator=MARK",
    "--enable-wildcard": "--set data.enable_wildcard=true",
    "--enable-bucket": "--set data.enable_bucket=true",
    "--resize-interpolation": "--set data.resize_interpolation=NAME",
    "--bucket-no-upscale": "--set data.bucket_no_upscale=true",
    "--alpha-mask": "--set data.alpha_mask=true", "--masked-loss": "--set data.alpha_mask=true",
    "--conditioning-data-dir": "--data FILE.toml, with conditioning_data_dir = 'DIR' in a [[datasets.subsets]]",
    "--in-json": "--set data.metadata_file=FILE",
    # fine_tune.py's (--from-kohya: a config with in_json and neither network_module nor token_string)
    "--train-text-encoder": "--method native --set method.native_text_encoder=true",
    "--dataset-repeats": "--set data.repeats=N",
    # train_db.py's options (--from-kohya: a config without network_module or token_string is DreamBooth)
    "--learning-rate-te": "--set optimizer.text_encoder_lr=X",
    "--stop-text-encoder-training": "--method native --set method.native_text_encoder=true "
                                    "--set method.native_text_encoder_steps=N",
    "--no-token-padding": "(not in lorakit: captions are padded to CLIP's 77 tokens, as CLIP was trained)",
    "--flip-aug": "--set data.flip_aug=true",
    "--color-aug": "--set data.color_aug=true",
    "--face-crop-aug-range": "--set 'data.face_crop_aug_range=[2.0, 4.0]'",
    "--log-with": "--set output.log_with=NAME",
    "--logging-dir": "--set output.logging_dir=DIR",
    "--log-tracker-name": "--set output.log_tracker_name=NAME",
    "--wandb-run-name": "--set output.wandb_run_name=NAME",
    "--unet-lr": "--set optimizer.unet_lr=X", "--text-encoder-lr": "--set optimizer.text_encoder_lr=X",
    "--min-snr-gamma": "--set training.min_snr_gamma=X", "--prior-loss-weight": "--set training.prior_loss_weight=X",
    "--sample-sampler": "--set sample.sampler=NAME", "--sample-at-first": "--set sample.at_first=true",
    "--caption-prefix": "--set data.caption_prefix=NAME", "--caption-suffix": "--set data.caption_suffix=NAME",
    "--caption-separator": "--set data.caption_separator=MARK",
    "--caption-dropout-rate": "--set data.caption_dropout_rate=X",
    "--caption-tag-dropout-rate": "--set data.caption_tag_dropout_rate=X",
    "--caption-dropout-every-n-epochs": "--set data.caption_dropout_every_n_epochs=N",
    "--max-token-length": "--set model.max_token_length=225",
    "--random-crop": "--set data.random_crop=true", "--cache-latents-to-disk": "--set data.cache_latents_to_disk=true",
    "--bucket-reso-steps": "--set data.bucket_reso_steps=64", "--min-bucket-reso": "--set data.min_bucket_reso=256",
    "--max-bucket-reso": "--set data.max_bucket_reso=1024",
    # kohya trains the text encoder too unless told not to; lorakit's default is the U-Net only
    "--network-train-text-encoder-only": "--set network.train_text_encoder=true --set network.train_unet=false",
    "--save-state": "(the default: every checkpoint holds the optimizer's state; --resume continues from it)",
    "--save-state-on-train-end": "(the default: the last checkpoint holds the training state)",
    "--debug-dataset": "--dry-run",
    "--save-model-as": "(the default: safetensors, the only format lorakit writes; a native run as a diffusers "
                        "folder: --format diffusers)",
    "--lr-scheduler-type": "--set optimizer.lr_scheduler_type=NAME",
    "--lr-scheduler-args": "--set 'optimizer.lr_scheduler_args={KEY = VALUE}'",
    "--lr-scheduler-num-cycles": "--set optimizer.lr_scheduler_num_cycles=N",
    "--lr-scheduler-power": "--set optimizer.lr_scheduler_power=X",
    # with adapters, full_bf16/full_fp16 are taken over with a note (the adapter's weights stay fp32: small)
    "--full-bf16": "--set model.full_bf16=true",
    "--full-fp16": "(not in lorakit for native fine-tuning: its trained weights stay fp32 under fp16 mixed "
                   "precision; --mixed-precision bf16 --set model.full_bf16=true trains them in bf16, half the memory)",
    "--fp8-base": "--set model.fp8_base=true",
    "--v2": "(the default: lorakit tells an SD2.x model from an SD1.x one by its text encoder; an SD2.x single "
            "file predicting v whose metadata does not say so also needs --v-parameterization, as in kohya)",
    "--block-lr": "--set 'method.native_block_lr=[LR, LR, ...]'",
    "--no-metadata": "--set output.no_metadata=true",
    "--metadata-title": "--set output.metadata_title=NAME",
    "--metadata-author": "--set output.metadata_author=NAME",
    "--metadata-description": "--set output.metadata_description=NAME",
    "--metadata-license": "--set output.metadata_license=NAME",
    "--metadata-tags": "--set output.metadata_tags=NAME",
    "--wandb-api-key": "(the default: W&B's own login, `wandb login` or WANDB_API_KEY; never read from a config)",
    "--sample-every-n-epochs": "--set sample.every_n_epochs=N",
    "--sample-every-n-steps": "--set sample.every_n_steps=N",
    # the rest of sd-scripts' options for SD1.x/2.x/SDXL (train_util's, train_network.py's, the SDXL scripts')
    "--dim-from-weights": "--set network.dim_from_weights=true",
    "--caption-extention": "--set data.caption_extension=.EXT",  # sd-scripts' old spelling, still accepted
    "--torch-compile": "--set model.compile=true",
    "--dynamo-backend": "--set model.compile_backend=NAME",
    "--use-8bit-adam": "--set optimizer.optimizer=adamw8bit",
    "--use-lion-optimizer": "--set optimizer.optimizer=lion",
    # sdxl_train.py's, one per SDXL text encoder (native fine-tuning; an adapter's encoders share one rate)
    "--learning-rate-te1": "--set optimizer.text_encoder_lr=X",
    "--learning-rate-te2": "--set optimizer.text_encoder_2_lr=X",
    "--diffusers-xformers": "(the default: PyTorch's scaled-dot-product attention)",
    "--use-safetensors": "(the default: lorakit writes .safetensors only)",
    "--resume": "(not in lorakit: a kohya state folder; lorakit's --resume continues its own run folder)",
    "--initial-epoch": "(not in lorakit: a run starts at its first epoch, or resumes its own folder with --resume)",
    "--initial-step": "(not in lorakit: a run starts at its first step, or resumes its own folder with --resume)",
    "--skip-until-initial-step": "(not in lorakit: a run resumes its own folder where it stopped, --resume)",
    "--save-n-epoch-ratio": "--set training.save_every_n_epochs=N",  # N = max_train_epochs / the ratio, as kohya
    "--base-weights": "--set 'model.base_weights=[\"FILE\"]'",
    "--base-weights-multiplier": "--set 'model.base_weights_multiplier=[0.8]'",
    "--lr-decay-steps": "--set optimizer.lr_decay_steps=N",
    "--lr-scheduler-min-lr-ratio": "--set optimizer.lr_scheduler_min_lr_ratio=X",
    "--lr-scheduler-timescale": "--set optimizer.lr_scheduler_timescale=N",
    "--text-encoder-batch-size": "(the default: captions are encoded with their training batch, or one at a time "
                                 "when cached)",
    "--cache-info": "(the default: images are listed from their folders at every start; it changes nothing trained)",
    "--skip-cache-check": "(the default: the on-disk latent cache is checked against every image; it changes "
                          "nothing trained)",
    "--dataset-class": "(not in lorakit: datasets are kohya folders, a dataset TOML or a metadata JSON)",
    "--tokenizer-cache-dir": "(the default: nothing is downloaded; the tokenizer comes with the model or lorakit)",
    "--log-config": "(the default: the run's settings go to the trackers, and its folder keeps config.toml)",
    "--log-prefix": "(the default: the log folder is named by --set output.logging_dir=DIR; a prefix changes nothing "
                    "trained)",
    "--log-tracker-config": "--set output.log_tracker_config=FILE",
    **dict.fromkeys(("--async-upload", "--huggingface-repo-id", "--huggingface-repo-type",
                     "--huggingface-path-in-repo", "--huggingface-token", "--huggingface-repo-visibility",
                     "--save-state-to-huggingface"), "(not in lorakit: nothing is uploaded)"),
    "--resume-from-huggingface": "(not in lorakit: nothing is downloaded)",
    "--fp8-base-unet": "--set model.fp8_base_unet=true",
    "--fp16-master-weights-and-gradients": "(not in lorakit: trained weights stay fp32)",
    "--fused-backward-pass": "--set optimizer.fused_backward_pass=true",
    # kohya's N groups, each stepped once its gradients are all in: lorakit steps each weight alone, which frees
    # more memory; the optimizers that need all weights together (Prodigy, D-Adaptation) are refused with it
    "--fused-optimizer-groups": "--set optimizer.fused_backward_pass=true",
    "--blocks-to-swap": "(not in lorakit: the model stays on the device)",
    "--cpu-offload-checkpointing": "(not in lorakit: gradient checkpointing keeps its activations on the device, "
                                   "--set model.gradient_checkpointing=true)",
    "--deepspeed": "(not in lorakit: accelerate's data parallelism, accelerate launch --multi_gpu -m lorakit.cli "
                   "train)",
    **dict.fromkeys(("--zero-stage", "--zero3-init-flag", "--zero3-save-16bit-model", "--offload-optimizer-device",
                     "--offload-optimizer-nvme-path", "--offload-param-device", "--offload-param-nvme-path"),
                    "(not in lorakit: no DeepSpeed)"),
    "--ddp-timeout": "--set training.ddp_timeout=MINUTES",
    "--ddp-gradient-as-bucket-view": "--set training.ddp_gradient_as_bucket_view=true",
    "--ddp-static-graph": "--set training.ddp_static_graph=true",
    # the flow-matching models' timestep sampling (SD3, FLUX): nothing to choose for SD1.x/2.x/SDXL
    "--weighting-scheme": "(not in lorakit: SD3/FLUX timestep sampling; SD1.x/2.x/SDXL sample timesteps uniformly)",
    **dict.fromkeys(("--logit-mean", "--logit-std", "--mode-scale"), "(not in lorakit: SD3/FLUX timestep sampling)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a TOML training config (see docs/ or `--print-config`)")
    for flag, (key, kind, help_) in FLAGS.items():
        action = parser.add_argument(flag, type=kind, help=f"{help_} [{key}]")
        if flag == "--algorithm":
            action.algorithms = _AlgorithmNames()  # argparse fills %(name)s in help from the action's attributes
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training step's U-Net (slow first steps; a GPU gains most) "
                             "[model.compile]")
    parser.add_argument("--dim-from-weights", action="store_true",
                        help="build each module as --network-weights holds it: its algorithm, rank and alpha (kohya's "
                             "--dim_from_weights)"
                             " [network.dim_from_weights]")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in the output folder")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="set any config option, e.g. --set network.conv_rank=4 (repeatable)")
    parser.add_argument("--from-kohya", metavar="FILE",
                        help="start from a kohya sd-scripts training config (its --config_file TOML: LoRA, "
                             "textual inversion, DreamBooth or fine-tuning) or a kohya_ss GUI config (JSON): every "
                             "option translated, and what lorakit lacks listed (with --print-config: a lorakit "
                             "config)")
    parser.add_argument("--print-config", action="store_true", help="print the resulting config as TOML and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the run (settings, model, every image and caption) and say what it would train, "
                             "without loading the model or writing anything")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def builtin_default(cfg: TrainConfig, write: bool = True) -> TrainConfig:
    """The built-in job: the shapes world's concept on the built-in model (dataset rendered beside the run,
    unless ``write`` is false: printing the config writes nothing), with the world's recipe wherever the user
    left the general default."""
    if cfg.model.base is not None:
        raise ConfigError(f"--model {cfg.model.base} needs --data: without data lorakit runs its built-in job (the "
                          "built-in concept on the built-in model); give --data FOLDER to train your model")
    from lorakit.atomic import atomic_folder, file_in_the_way
    from lorakit.world import concept  # the shapes world: only the built-in job needs it
    from lorakit.world.recipe import apply_recipe

    apply_recipe(cfg, only_defaults=True)
    out = Path(cfg.output.dir)
    data_dir = out.parent / (out.name + "-data")
    if (blocking := file_in_the_way(data_dir)) is not None:  # before the data is rendered beside the run
        raise ConfigError(f"{out}: {blocking} is a file, not a folder, so the run cannot be written inside it: "
                          "choose another output folder")
    if write and not data_dir.exists():
        # whole or not at all: a Ctrl-C in the first seconds is common
        with atomic_folder(data_dir, same_if_there=True) as rendering:
            concept.write_concept_dataset(rendering)
    cfg.data.train_data = str(data_dir)
    prompts = data_dir / "sample_prompts.txt"
    if cfg.sample.prompts is None and (prompts.exists() or not write):
        cfg.sample.prompts = str(prompts)
    scored = data_dir / "eval_prompts.toml"  # the prompts the onset is measured on, for early_stop.samples
    if cfg.early_stop.samples and cfg.early_stop.sample_prompts is None and (scored.exists() or not write):
        cfg.early_stop.sample_prompts = str(scored)
    return cfg


def _resumed_run_config(args: argparse.Namespace) -> Path | None:
    """``--resume --out DIR`` without a config file: the run's own settings, ``DIR/config.toml``, are the base,
    so that ``lorakit train --out DIR --resume`` continues any run, not only one started with lorakit's defaults;
    the flags given with it change them as they would change a config file (and are checked like any change)."""
    if args.config or not args.resume or args.out is None:
        return None
    path = Path(args.out) / "config.toml"
    return path if path.is_file() else None


def _check_relative_paths(cfg: TrainConfig, run_config: Path) -> None:
    """A run's config.toml written before its paths were made absolute names them relative to the directory the
    run was started in; from anywhere else they are missing, and the error says where to resume from."""
    for key, value in missing_paths(cfg):
        if not Path(value).is_absolute():
            raise ConfigError(f"{run_config}: {key} = {value!r} is relative to the directory the run was started "
                              f"in, and there is no {value} here ({Path.cwd()}): run `lorakit train --out "
                              f"{run_config.parent.resolve()} --resume` from that directory")


def _settings_from_folders(cfg: TrainConfig) -> None:
    """What a kohya-layout folder (``5_ohwx dog/``) already says, for the settings that need it and were not
    given: textual inversion's token is the folders' trigger (``ohwx``), as for the adapters, and prior
    preservation's class prompt is their class (``dog``), as kohya's class images are named. Said before the run
    starts, on stderr (`--print-config > config.toml` must stay TOML); folders naming several are refused."""
    if not cfg.data.train_data:
        return
    wanted = []
    if cfg.lacks_ti_token():
        wanted.append(("trigger", "method", "ti_token", "learns one token"))
    if cfg.data.num_class_images > 0 and not cfg.data.class_prompt:
        wanted.append(("class", "data", "class_prompt", "generates class images from one class prompt"))
    if not wanted:
        return
    from lorakit.data.discovery import kohya_names  # here: --print-config of any other run must stay light

    for part, section, key, why in wanted:
        names = kohya_names(Path(cfg.data.train_data).expanduser(), part)
        if len(names) == 1:
            (name, folders), = names.items()
            setattr(getattr(cfg, section), key, name)
            print(f"lorakit train: {section}.{key} = {name!r}, the {part} of {', '.join(folders)}", file=sys.stderr)
        elif names:
            named = "; ".join(f"{n!r} ({', '.join(f)})" for n, f in names.items())
            raise ConfigError(f"{section}.{key} is not set, and the run {why} while the folders of "
                              f"{cfg.data.train_data} name several: {named}; choose with --set {section}.{key}=...")


def _builtin_token(cfg: TrainConfig) -> None:
    """Textual inversion on the built-in job learns the built-in concept's trigger, as it would from the
    concept's kohya folder given as --data."""
    if cfg.lacks_ti_token():
        from lorakit.world.concept import FOLDER_NAME, TRIGGER_WORD

        cfg.method.ti_token = TRIGGER_WORD
        print(f"lorakit train: method.ti_token = {TRIGGER_WORD!r}, the trigger of the built-in concept "
              f"({FOLDER_NAME})", file=sys.stderr)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.config and args.from_kohya:
        raise ConfigError("give a lorakit config or --from-kohya FILE, not both")
    if args.from_kohya:
        cfg = _from_kohya(args)
    elif args.config:
        cfg = load_config(args.config)
    elif (run_config := _resumed_run_config(args)) is not None:
        cfg = load_config(run_config)
        cfg.output.dir = args.out  # the folder as given now (the run may have been moved)
        _check_relative_paths(cfg, run_config)
    else:
        cfg = TrainConfig()
    for flag, (key, _, _) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    if args.compile:
        cfg.model.compile = True
    if args.dim_from_weights:
        cfg.network.dim_from_weights = True
    for item in args.set:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected SECTION.KEY=VALUE")
        set_option(cfg, dotted.strip(), raw.strip())
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other")
    if args.resume:
        if args.out is None and cfg.output.dir == "output":
            raise ConfigError("--resume needs the output folder of the run to continue: --out DIR")
        cfg.output.if_exists = "resume"
    elif args.overwrite:
        cfg.output.if_exists = "overwrite"
    if cfg.output.dir == "output" and args.out is None:
        cfg.output.dir = f"output/train-{time.strftime('%Y%m%d-%H%M%S')}"
    _settings_from_folders(cfg)
    if cfg.data.train_data is None:
        _builtin_token(cfg)
        cfg.validate()  # before the built-in concept's images are rendered
        cfg = builtin_default(cfg, write=not (args.print_config or args.dry_run))
    return cfg.validate()


def _from_kohya(args: argparse.Namespace) -> TrainConfig:
    """The config a kohya config file translates to; what it cannot translate is said, and refused for a run
    (``--print-config`` and ``--dry-run`` go on, so that the user can see and edit the rest)."""
    from lorakit.commands.kohya_config import config_from_kohya

    cfg, translation = config_from_kohya(args.from_kohya)
    if translation.untranslated:
        listed = "\n".join(f"  - {line}" for line in translation.untranslated)
        if not (args.print_config or args.dry_run):
            raise ConfigError(f"{args.from_kohya}: {len(translation.untranslated)} kohya option(s) lorakit cannot "
                              f"take over:\n{listed}\nRemove them from the file, or write a lorakit config to edit "
                              "with --print-config")
        print(f"{args.from_kohya}: not taken over:\n{listed}", file=sys.stderr)
    for note in translation.notes:
        print(f"{args.from_kohya}: {note}", file=sys.stderr)
    return cfg


#: ``early_stop.samples`` naming the shapes world's scorer (lorakit.world.evaluation registers it)
WORLD_SCORER = "world"

def builtin_introduction(cfg: TrainConfig) -> str:
    """Said before the built-in job starts, so a first-time user knows what they are watching (and what stops it)."""
    if cfg.early_stop.mode == "off":
        stop = " (early stopping is off: every epoch runs)"
    elif cfg.early_stop.samples:
        stop = f" and stops before it overfits, by scoring the samples it draws ({cfg.early_stop.samples})"
    elif cfg.method.kind == "ti":
        stop = " (textual inversion has no adapter weights for the early stop to watch: every epoch runs)"
    else:
        weights = "the trained weights" if cfg.method.kind == "native" else "the adapter's weights"
        stop = f" and stops before it overfits, by watching {weights} (CS-Fluctuation and the size of the update)"
    return ("The built-in job: lorakit's shapes world is a tiny Stable Diffusion 1.x model that draws circles, "
            "squares, triangles and crosses; it has never seen a star. The 'zkz' concept is 15 rendered stars in "
            f"kohya layout. lorakit teaches the model the star as 'zkz shape'{stop}.")


#: heads the built-in job's printed config (`lorakit train --print-config`), which can be run as it is
BUILTIN_CONFIG_HEADER = """\
# lorakit train's built-in job (no --data). Run as it is (`lorakit train config.toml`), it renders the shapes
# world's concept beside its output folder and trains on it, as `lorakit train` does. To train on your own
# images, add data.train_data = "FOLDER" (kohya layout) and model.base; the values below are the built-in job's
# recipe where it differs from lorakit's general defaults (`lorakit train --data FOLDER --print-config` prints
# those).
"""


def printable_config(cfg: TrainConfig, args: argparse.Namespace) -> str:
    """The config as TOML, its output folder as given (``output`` when none was: every run of the printed file
    then gets its own time-stamped folder, as without a config); for the built-in job without the paths it makes
    up when it runs (its dataset, its prompt files), so that the printed file runs as the built-in job again
    instead of naming a dataset that was never rendered."""
    shown = deepcopy(cfg)
    if args.out is None and cfg.output.dir.startswith("output/train-"):  # the time stamp config_from_args made:
        shown.output.dir = "output"  # not this printing's, each run of the file gets its own folder
    if not _is_builtin_job(args):
        return to_toml(shown)
    rendered = Path(cfg.data.train_data)  # what builtin_default points the job at
    shown.data.train_data = None
    if shown.sample.prompts == str(rendered / "sample_prompts.txt"):
        shown.sample.prompts = None
    if shown.early_stop.sample_prompts == str(rendered / "eval_prompts.toml"):
        shown.early_stop.sample_prompts = None
    return BUILTIN_CONFIG_HEADER + to_toml(shown)


def _dry_run(cfg: TrainConfig, args: argparse.Namespace) -> str:
    """``--dry-run``; the built-in job's images, when no run has rendered them yet, are rendered for the check in a
    temporary folder (the run renders them beside its output folder), so that the check writes nothing."""
    from lorakit.dry_run import dry_run

    data = Path(cfg.data.train_data)
    if not (_is_builtin_job(args) and not data.exists()):
        return dry_run(cfg, config_file=args.config)
    from lorakit.world import concept

    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / data.name
        concept.write_concept_dataset(rendered)
        checked = deepcopy(cfg)
        checked.data.train_data = str(rendered)
        for section, key in (("sample", "prompts"), ("early_stop", "sample_prompts")):
            value = getattr(getattr(checked, section), key)
            if value and Path(value).parent == data:
                setattr(getattr(checked, section), key, str(rendered / Path(value).name))
        report = dry_run(checked, config_file=args.config).replace(str(rendered), str(data))
    return report + f"\n(the built-in concept's images were rendered for this check in a temporary folder; the run " \
                    f"renders them in {data})"


def _is_builtin_job(args: argparse.Namespace) -> bool:
    return args.config is None and args.from_kohya is None and args.data is None and _resumed_run_config(args) is None


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(printable_config(cfg, args))
        return 0
    if cfg.early_stop.samples.partition("=")[0] == WORLD_SCORER:
        import lorakit.world.evaluation  # noqa: F401  (registers the world's sample scorer; the core never imports it)
    if args.dry_run:
        print(_dry_run(cfg, args))
        return 0
    from lorakit.host_memory import keep_freed_memory
    from lorakit.train import train  # here, not at the top: --print-config must not wait for torch

    keep_freed_memory()  # every step frees and takes back the same buffers: keep them (an SD1.5 CPU step ~20 % faster)

    if args.data is None and cfg.data.train_data and Path(cfg.data.train_data).name.endswith("-data") \
            and args.config is None:
        print(textwrap.fill(builtin_introduction(cfg), width=110))
    result = train(cfg, progress=not args.no_progress, config_file=args.config)
    print(result.summary)
    return 0
