"""``lorakit train``: train an adapter (or embedding, or the model) from a folder of images.

With no arguments it runs the built-in default: a LoRA for the shapes world's "zkz" concept on the built-in
base model, with CS-Fluctuation early stopping, on the CPU, offline.  Otherwise give a TOML config and/or
flags; flags win over the file, and ``--set section.key=value`` reaches every option of the config.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lorakit.config import TrainConfig, load_config, set_option

# flag -> (config section.key, type, help)
FLAGS: dict[str, tuple[str, type, str]] = {
    "--data": ("data.train_data", str, "image folder: kohya layout (N_trigger class/), a plain folder, or a TOML"),
    "--reg-data": ("data.reg_data", str, "regularization images (kohya layout)"),
    "--trigger": ("data.trigger", str, "the trigger word (plain folders)"),
    "--model": ("model.base", str, "base model: diffusers folder or single-file .safetensors (default: built-in)"),
    "--method": ("method.kind", str, "adapter (default), native, ti, pivotal"),
    "--algorithm": ("network.algorithm", str, "lora, loha, lokr, ia3, full"),
    "--preset": ("network.preset", str, "attn-only, attn-mlp, full, kohya, lycoris-full"),
    "--rank": ("network.rank", int, "adapter rank (network_dim)"),
    "--alpha": ("network.alpha", float, "adapter alpha (network_alpha)"),
    "--blocks": ("network.blocks", str, "train only these U-Net blocks (block-wise LoRA paper): upper, middle, bottom, "
                 "all, or a comma list (upper,middle)"),
    "--lr": ("optimizer.learning_rate", float, "learning rate"),
    "--epochs": ("training.max_epochs", int, "maximum epochs"),
    "--max-steps": ("training.max_steps", int, "maximum optimizer steps"),
    "--batch-size": ("data.batch_size", int, "batch size"),
    "--resolution": ("data.resolution", int, "training resolution (default: the model's native size)"),
    "--seed": ("training.seed", int, "random seed"),
    "--early-stop": ("early_stop.mode", str, "cs-fluctuation (default), report, off"),
    "--sample-prompts": ("sample.prompts", str, "kohya-syntax prompt file sampled every epoch"),
    "--out": ("output.dir", str, "output folder (default: output/train-<time>)"),
    "--name": ("output.name", str, "file name of the result (default: lorakit)"),
    "--mixed-precision": ("model.mixed_precision", str, "no, fp16, bf16"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a TOML training config (see docs/ or `--print-config`)")
    for flag, (key, kind, help_) in FLAGS.items():
        parser.add_argument(flag, type=kind, help=f"{help_} [{key}]")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in the output folder")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="set any config option, e.g. --set network.conv_rank=4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resulting config as TOML and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# The built-in job's training settings (measured on the shapes world, docs/early_stopping.md): a LoCon, since
# the star's outline needs the conv layers, at a learning rate that learns it within 20 epochs without breaking
# the model (on the built-in model, 4e-3 broke it within 8-12 epochs and the calm rule then stopped on a broken
# checkpoint).  Each applies only where the user left the general default.
# samples every second epoch: sampling 9 prompts costs about as much as training an epoch on the CPU
BUILTIN_SETTINGS = {"network.preset": "full", "optimizer.learning_rate": 2e-3, "data.batch_size": 4,
                    "training.max_epochs": 20, "sample.every_n_epochs": 2}


def builtin_default(cfg: TrainConfig) -> TrainConfig:
    """The built-in job: the shapes world's concept on the built-in model (dataset rendered into the run)."""
    from lorakit.world import concept

    defaults = TrainConfig()
    for dotted, value in BUILTIN_SETTINGS.items():
        section, name = dotted.split(".")
        if getattr(getattr(cfg, section), name) == getattr(getattr(defaults, section), name):
            setattr(getattr(cfg, section), name, value)
    cfg.model.base = None
    out = Path(cfg.output.dir)
    data_dir = out.parent / (out.name + "-data")
    if not data_dir.exists():
        concept.write_concept_dataset(data_dir)
    cfg.data.train_data = str(data_dir)
    prompts = data_dir / "sample_prompts.txt"
    if cfg.sample.prompts is None and prompts.exists():
        cfg.sample.prompts = str(prompts)
    return cfg


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = load_config(args.config) if args.config else TrainConfig()
    for flag, (key, _, _) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    for item in args.set:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item}: expected SECTION.KEY=VALUE")
        set_option(cfg, dotted.strip(), raw.strip())
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other")
    if args.resume:
        if args.out is None and cfg.output.dir == "output":
            raise ValueError("--resume needs the output folder of the run to continue: --out DIR")
        cfg.output.if_exists = "resume"
    elif args.overwrite:
        cfg.output.if_exists = "overwrite"
    if cfg.output.dir == "output" and args.out is None:
        cfg.output.dir = f"output/train-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.data.train_data is None:
        cfg = builtin_default(cfg)
    return cfg.validate()


def run(args: argparse.Namespace) -> int:
    from lorakit.config import to_toml

    cfg = config_from_args(args)
    if args.print_config:
        print(to_toml(cfg))
        return 0
    from lorakit.train import train

    result = train(cfg, progress=not args.no_progress)
    print(result.summary)
    return 0
