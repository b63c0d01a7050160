"""What ``lorakit train`` tells a person before, during and after a run, as plain text.

Three moments: an opening line (what is trained on what, and where the results go), a time estimate once the
first steps are measured, and the closing "what next" (how to use the file in the tools people already have).
Kept apart from the training loop so the loop reads top to bottom and the wording can be tested on its own.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from lorakit.config import TrainConfig

#: the algorithms diffusers' ``load_lora_weights`` reads (docs/compatibility.md has the whole table)
DIFFUSERS_LOADS = ("lora",)

#: names the opening line gives otherwise than the adapter classes' display names
_ALGORITHM_NAMES = {"full": "full-ΔW adapter"}
_CONV_PRESETS = ("full", "lycoris-full")


#: said by the run and its dry run when data.cache_text_encoder_outputs is on
TEXT_CACHE_LINE = "text-encoder outputs cached: each caption is encoded once, when first trained on"


def setting_lines(cfg: TrainConfig) -> list[str]:
    """What the settings that change how a run trains or what it hands back do, said before it starts (by the
    trainer and by its dry run alike)."""
    lines = []
    if cfg.data.cache_text_encoder_outputs:
        lines.append(TEXT_CACHE_LINE)
    if cfg.training.ema_decay is not None:
        follow = "training" if cfg.method.kind == "ti" else "training and CS-Fluctuation"  # TI: no CS to read
        lines.append(f"weights averaged (EMA, decay {cfg.training.ema_decay:g}): checkpoints, samples and the result "
                     f"hold the average; {follow} follow the live weights")
    if cfg.optimizer.fused_backward_pass:  # its clipping differs from the whole-model step's
        clip = cfg.optimizer.max_grad_norm
        lines.append("fused backward pass: each weight steps as soon as its gradient is ready, and the gradient is "
                     "freed" + (f"; each weight's gradient clipped to {clip:g} alone" if clip else ""))
    return lines


def count(n: int, noun: str) -> str:
    """'1 epoch', '3 epochs': a count with its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def text_encoder_part(cfg: TrainConfig) -> str:
    """" and the text encoder (its first N steps)" where native fine-tuning trains it too, else ""."""
    if not cfg.method.native_text_encoder:
        return ""
    limit = cfg.method.native_text_encoder_steps
    second = cfg.optimizer.text_encoder_2_lr  # SDXL's second encoder: its own rate, or 0 (not trained)
    if second is None:
        which, whose = " and the text encoder", "its"
    elif second == 0:
        which, whose = " and the first text encoder", "its"
    elif cfg.trains_second_text_encoder_only():
        which, whose = f" and the second text encoder (at {second:g})", "its"
    else:
        which, whose = f" and the text encoders (the second at {second:g})", "their"
    return which + (f" ({whose} first {limit} steps)" if limit else "")


def what_is_trained(cfg: TrainConfig) -> str:
    """'a LoCon (rank 8, preset full)', 'native fine-tuning (DreamBooth)', ... for the opening line."""
    kind = cfg.method.kind
    if kind == "native":
        return f"native fine-tuning of the U-Net{text_encoder_part(cfg)} (DreamBooth)"
    if kind == "ti":
        return f"a Textual Inversion embedding ({cfg.method.ti_vectors} vector(s) per token)"
    from lorakit.adapters import algorithm_class  # torch: only once a run is under way

    net = cfg.network
    cls = algorithm_class(net.algorithm)
    name = _ALGORITHM_NAMES.get(cls.algorithm, cls.display_name)
    if cls.algorithm == "lora" and net.preset in _CONV_PRESETS:
        name = "LoCon"  # LoRA on the conv layers too: the name users know from LyCORIS and kohya
    if net.use_dora:
        name += " with DoRA"
    if net.dim_from_weights:  # the file's modules decide, as LyCORIS builds a network from weights
        what = f"an adapter (algorithms, ranks and layers from {net.weights})"
    else:
        size = rank_words(net.algorithm, net.rank)
        article = "an" if name.startswith(("(I", "O")) else "a"  # an OFT, an (IA)³
        what = f"{article} {name} ({size + ', ' if size else ''}preset {net.preset})"
    return what if kind == "adapter" else f"pivotal tuning: an embedding plus {what}"


def opening_line(cfg: TrainConfig) -> str:
    """The first line of a run: method, data, base model, output folder."""
    model = cfg.model.base or "the built-in shapes-world model (lorakit/world/base_model)"
    return (f"lorakit train: {what_is_trained(cfg)} on {cfg.data.train_data} with {model}, "
            f"up to {count(cfg.training.max_epochs, 'epoch')}; results go to {cfg.output.dir}")


def rank_words(algorithm: str, rank: int, alpha: float | None = None) -> str:
    """How the network's size reads for ``algorithm``: 'rank 8' (and 'alpha 4' when given), 'block size 8' for
    OFT and BOFT (their rank is a block size), '' for (IA)³ and full, which have none."""
    from lorakit.adapters import algorithm_class  # torch: only once a run is under way

    cls = algorithm_class(algorithm)
    if getattr(cls, "takes_rank", False):
        return f"block size {rank}"
    if not cls.rank_keys:
        return ""
    return f"rank {rank}" + (f" alpha {alpha:g}" if alpha is not None else "")


def ia3_preset_note(cfg: TrainConfig) -> str | None:
    """A note when (IA)³ is trained on another preset than its own layers (LyCORIS warns the same)."""
    net = cfg.network
    if cfg.method.kind not in ("adapter", "pivotal") or net.dim_from_weights or net.preset == "ia3":
        return None
    from lorakit.adapters import algorithm_class  # torch: only once a run is under way

    if algorithm_class(net.algorithm).algorithm != "ia3":
        return None
    return (f"note: (IA)³ on preset {net.preset} scales the output of every layer it names; the (IA)³ paper and "
            "LyCORIS's ia3 preset scale the attention keys and values and the feed-forward's inner activations "
            "(--preset ia3), and A1111 loads (IA)³ on linear layers only (docs/compatibility.md)")


def early_stop_text(cfg: TrainConfig, watches_weights: bool) -> str:
    """What may stop the run early, for the plan line of ``lorakit train`` and ``--dry-run``: the rule, or off;
    textual inversion has no adapter weights for a rule to read, only samples (``early_stop.samples``)."""
    if cfg.early_stop.mode == "off":
        return "off"
    if cfg.early_stop.samples:  # the weight rule, where there are weights, is recorded beside it (report only)
        recorded = f"; {cfg.early_stop.mode} recorded, not stopping" if watches_weights else ""
        return f"on the samples ({cfg.early_stop.samples}){recorded}"
    if not watches_weights:
        return "off (textual inversion has no adapter weights to watch; early_stop.samples stops on the samples)"
    return cfg.early_stop.mode


def estimate_line(seconds_per_step: float, steps_left: int, early_stop: bool) -> str:
    """The time estimate printed once the first steps are measured."""
    total = seconds_per_step * steps_left
    when = f"about {total / 60:.0f} min" if total >= 90 else f"about {total:.0f} s"
    tail = " (early stopping may end it sooner)" if early_stop else ""
    return f"{seconds_per_step:.2f} s/step: {when} for the remaining {steps_left} steps, plus sampling{tail}"


def _model_option(cfg: TrainConfig) -> str:
    """`` --model BASE`` for a command run on the run's base model (nothing for the built-in model)."""
    return f" --model {shlex.quote(cfg.model.base)}" if cfg.model.base else ""


def _native_next_steps(run_dir: Path, files: Sequence[Path], cfg: TrainConfig) -> list[str]:
    """A native run's model (one file, or a diffusers folder) and how to make any kept epoch a model."""
    merge = (f"lorakit merge {shlex.quote(str(run_dir / 'checkpoints' / 'epoch-NNNN' / 'trained.safetensors'))}"
             f"{_model_option(cfg)} --out MODEL.safetensors")
    folder = next((f for f in files if (f / "model_index.json").is_file()), None)
    if folder is not None:  # output.format = "diffusers"
        return [f"  use {folder}: a diffusers folder; diffusers: DiffusionPipeline.from_pretrained("
                f"\"{folder}\"); lorakit: --model {shlex.quote(str(folder))}",
                f"  as one file for A1111/ComfyUI: {merge} (the epoch handed back, or any other the run kept)"]
    single = next((f for f in files if f.suffix == ".safetensors"), None)
    lines = [f"  use {single}: a full model; A1111/ComfyUI: put it in models/Stable-diffusion (ComfyUI: "
             "models/checkpoints); diffusers: StableDiffusionPipeline.from_single_file(...) "
             "(an SDXL model: StableDiffusionXLPipeline)"] if single else []
    return lines + [f"  an epoch checkpoint the run kept, as a model: {merge}"]


def base_weight_specs(cfg: TrainConfig) -> list[str]:
    """model.base_weights as ``FILE:MULT`` arguments of lorakit sample and merge, shell-quoted."""
    return [shlex.quote(f"{f}:{multiplier:g}") for f, multiplier in cfg.model.base_weight_pairs()]


def _embedding_token(path: Path, cfg: TrainConfig) -> str:
    """The token of the run's embedding file ``<output.name>-<token>.safetensors``."""
    return path.stem.removeprefix(f"{cfg.output.name}-")


def next_steps(run_dir: Path, files: Sequence[Path], cfg: TrainConfig) -> list[str]:
    """How to use what the run made: A1111/ComfyUI, diffusers, ``lorakit sample``, the plot, the report."""
    from lorakit.embedding_inspection import diffusers_loading_code

    files = [Path(f) for f in files]
    weights = [f for f in files if f.suffix == ".safetensors"]
    lines: list[str] = []
    if cfg.method.kind == "native":
        lines += _native_next_steps(run_dir, files, cfg)
    elif weights:
        result = weights[0]
        quoted = shlex.quote(str(result))
        if cfg.method.kind == "ti":
            token = _embedding_token(result, cfg)
            # A1111 names an embedding after its file: the prompt word is the file's stem, not the token
            lines += [f"  use {result}: A1111: models/embeddings, then write '{result.stem}' in a prompt (or rename "
                      f"the file {token}.safetensors and write '{token}'); ComfyUI: models/embeddings, "
                      f"'embedding:{result.stem}'",
                      f"  diffusers: {diffusers_loading_code(result, token)}",
                      f"  lorakit sample --embedding {quoted}{_model_option(cfg)} --prompt \"a {token} ...\" "
                      "--out samples/"]
        else:
            # pivotal tuning writes the adapter and the embedding as two files: both are needed
            embedding = next((f for f in weights if f.stem.startswith(f"{cfg.output.name}-")), None) \
                if cfg.method.kind == "pivotal" else None
            result = next(f for f in weights if f != embedding)
            quoted = shlex.quote(str(result))
            lines += [f"  A1111/ComfyUI: copy {result.name} into models/Lora (ComfyUI: models/loras), then "
                      f"<lora:{result.stem}:1> in the prompt (ComfyUI: a LoraLoader node)"]
            if embedding is not None:
                lines.append(f"  and the token's embedding {embedding.name} into models/embeddings; its prompt word "
                             f"is the file's name: '{embedding.stem}' in A1111, 'embedding:{embedding.stem}' in "
                             "ComfyUI")
            if cfg.network.algorithm in DIFFUSERS_LOADS and not cfg.network.use_dora:
                loads = f"pipe.load_lora_weights({str(result)!r})"
                if embedding is not None:
                    loads += f"; {diffusers_loading_code(embedding, _embedding_token(embedding, cfg))}"
                lines.append(f"  diffusers: {loads}")
            else:
                lines.append(f"  diffusers cannot read this algorithm: `lorakit resize {quoted} --to lora"
                             f"{_model_option(cfg)} --out plain.safetensors` makes a plain LoRA it reads "
                             "(docs/compatibility.md)")
            with_embedding = f" --embedding {shlex.quote(str(embedding))}" if embedding is not None else ""
            base = base_weight_specs(cfg)
            lines.append(f"  lorakit sample {''.join(f'{b} ' for b in base)}{quoted}{with_embedding}"
                         f"{_model_option(cfg)} --prompt \"...\" --out samples/")
            if base:  # the result is an update of the model with them merged: alone it is another adapter
                lines.append(f"  it learned on top of the base weights {', '.join(base)} (model.base_weights): "
                             "load them beside it everywhere (A1111/ComfyUI: their <lora:...> too)")
    if lines:
        skip = cfg.model.clip_skip
        if skip > 1:  # sampled without it, the result looks undertrained or off: say it where people sample
            lines.append(f"  trained with clip skip {skip}: sample with it too (A1111: Settings > Clip skip {skip}; "
                         f"ComfyUI: a CLIP Set Last Layer node at -{skip}; diffusers: clip_skip={skip - 1}; "
                         "lorakit sample and eval read it from the file)")
    plots = [f for f in files if f.suffix == ".png" and "cs_fluctuation" in f.name]
    if plots:
        lines.append(f"  CS-Fluctuation curve: {plots[0]}")
    from lorakit.models import is_builtin_model

    # the built-in model's images are judged by the world reader, eval's default; others need an extractor
    extractor = "" if is_builtin_model(cfg.model.base) else " --extractor clip=DIR (a local CLIP model)"
    lines.append(f"  which epoch is best, measured: lorakit eval {shlex.quote(str(run_dir))}{extractor} "
                 f"--out {shlex.quote(str(run_dir) + '-eval')}")
    report = f"lorakit report {shlex.quote(str(run_dir))}"
    ranked = ", and after the eval its ranking"  # report reads the eval folder suggested above when it is there
    if cfg.sample.prompts or any((run_dir / "samples").glob("*.png")):
        lines.append(f"  a page with the samples, the curve and the settings{ranked}: {report}")
    else:  # kohya's way: samples only when asked for; say so rather than promise a page of them
        lines.append(f"  a page with the curve and the settings{ranked}: {report} (no samples were drawn during "
                     "training: --sample-prompts FILE, kohya's prompt syntax, draws them at every epoch end)")
    return ["next:", *lines]
