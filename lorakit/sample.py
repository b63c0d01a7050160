"""Sampling during and after training: kohya-style prompt files, deterministic generation, image grids.

A prompt line is kohya's syntax (sd-scripts ``sample_prompts``)::

    a zkz star on a blue background --n blurry --w 64 --h 64 --d 42 --l 7.0 --s 20 --ss euler_a

``--n`` negative prompt, ``--w``/``--h`` size, ``--d`` seed, ``--l`` CFG scale, ``--s`` steps, ``--ss`` sampler.
Lines starting with ``#`` and blank lines are skipped.  ``.toml`` (kohya's ``[prompt]`` + ``[[prompt.subset]]``)
and ``.json`` (a list of lines or of dicts) files work too.

``generate`` runs diffusers' StableDiffusionPipeline over the model's current modules, so adapters applied
in place (and textual-inversion tokens added to the tokenizer) are used as they are.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lorakit.atomic import atomic_write
from lorakit.conditioning import Conditioning, encode_conditioning
from lorakit.errors import InvalidValueError, LorakitError
from lorakit.metadata import TEXT_SETTINGS, trained_text_setting
from lorakit.models import SD2_V_CONFIG, BaseModel, native_resolution, prompt_token_counts
from lorakit.prompt_tags import network_tag_problem
from lorakit.prompt_weights import plain_text, uses_bracket_syntax

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class SamplePrompt:
    """One image to sample.  ``width``/``height`` None: the model's native size; ``seed`` None: see generate()."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg_scale: float = 7.0
    steps: int = 20
    sampler: str = "ddim"


class PromptSyntaxError(LorakitError, ValueError):
    """A prompt file that cannot be parsed; the message names the file and line."""


def _int(value: Any, minimum: int, maximum: int | None = None) -> int:
    try:
        number = int(str(value).strip())  # via str: 64.5 and True are refused, not truncated
    except ValueError:
        raise ValueError(f"expects an integer, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"must be {bounds}, got {number}")
    return number


def _float(value: Any, minimum: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expects a number, got {value!r}") from None
    if not math.isfinite(number) or number < minimum:
        raise ValueError(f"must be a number >= {minimum}, got {value!r}")
    return number


# option -> (SamplePrompt field, converter); the same converters check toml/json values
_OPTIONS = {
    "n": ("negative_prompt", str),
    "w": ("width", lambda v: _int(v, 1)),
    "h": ("height", lambda v: _int(v, 1)),
    "d": ("seed", lambda v: _int(v, 0)),
    "l": ("cfg_scale", lambda v: _float(v, 0.0)),
    "s": ("steps", lambda v: _int(v, 1, 1000)),
    "ss": ("sampler", lambda v: sampler_name(v)),
}
# options kohya knows that mean nothing for SD1.x sampling here: warned about, not errors
_KOHYA_IGNORED = {"g", "cn", "i", "ctr", "rcfg", "fs", "am", "f", "fr"}
# kohya's (and lorakit's own) key names in toml/json prompt dicts
_DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "seed": "seed", "scale": "cfg_scale", "cfg_scale": "cfg_scale", "sample_steps": "steps",
              "steps": "steps", "sample_sampler": "sampler", "sampler": "sampler"}


def parse_prompt_line(line: str, defaults: SamplePrompt | None = None, where: str = "prompt") -> SamplePrompt:
    """One kohya prompt line; fields it does not set come from ``defaults``."""
    defaults = defaults or SamplePrompt("")
    # kohya splits on " --"; the leading space lets a line start with an option (an empty prompt)
    prompt, *options = (" " + line.strip()).split(" --")
    values: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        m = re.fullmatch(r"([A-Za-z]+)(?:\s+(.*))?", option.strip(), flags=re.S)
        if m is None:
            raise PromptSyntaxError(f"{where}: cannot read option '--{option.strip()}'")
        name, value = m[1].lower(), (m[2] or "").strip()
        if name in _KOHYA_IGNORED:
            log.warning("%s: --%s has no meaning for lorakit's SD1.x/SD2.x sampling; ignored", where, name)
            continue
        if name not in _OPTIONS:
            raise PromptSyntaxError(f"{where}: unknown option --{name} (known: "
                                    f"{', '.join('--' + o for o in _OPTIONS)})")
        if not value:
            raise PromptSyntaxError(f"{where}: --{name} needs a value")
        key, convert = _OPTIONS[name]
        try:
            values[key] = convert(value)
        except ValueError as e:
            raise PromptSyntaxError(f"{where}: --{name} {e}") from None
    _refuse_network_tags(values, where)
    return replace(defaults, **values)


def _refuse_network_tags(values: dict[str, Any], where: str) -> None:
    for key in ("prompt", "negative_prompt"):
        if isinstance(values.get(key), str) and (problem := network_tag_problem(values[key])):
            raise PromptSyntaxError(f"{where}: {problem}")


def parse_prompt_dict(entry: dict[str, Any], defaults: SamplePrompt | None = None,
                      where: str = "prompt") -> SamplePrompt:
    """A prompt given as a dict (toml/json), with kohya's key names (``scale``, ``sample_steps``, ...) or ours."""
    defaults = defaults or SamplePrompt("")
    values: dict[str, Any] = {}
    converters = {key: convert for key, convert in _OPTIONS.values()}
    for key, value in entry.items():
        if key in ("enum", "subset"):  # kohya's bookkeeping keys
            continue
        if key not in _DICT_KEYS:
            raise PromptSyntaxError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_DICT_KEYS))})")
        field_name = _DICT_KEYS[key]
        try:
            values[field_name] = converters.get(field_name, str)(value) if value is not None else None
        except ValueError as e:
            raise PromptSyntaxError(f"{where}: {key} {e}") from None
    if not isinstance(values.get("prompt", ""), str):
        raise PromptSyntaxError(f"{where}: prompt must be a string")
    _refuse_network_tags(values, where)
    return replace(defaults, **values)


def parse_prompt_text(text: str, defaults: SamplePrompt | None = None, source: str = "prompts") -> list[SamplePrompt]:
    """Every prompt of a kohya prompt file's text (one per line, ``#`` comments and blank lines skipped)."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompts.append(parse_prompt_line(line, defaults, where=f"{source} line {number}"))
    return prompts


def load_prompts(path: str | Path, defaults: SamplePrompt | None = None) -> list[SamplePrompt]:
    """Prompts from a ``.txt`` (kohya lines), ``.toml`` (kohya's [prompt] + [[prompt.subset]]) or ``.json`` file;
    a file without any is refused (a wrong file, most likely: there is nothing to draw)."""
    path = Path(path)
    if path.is_dir():
        raise PromptSyntaxError(f"{path}: is a folder; give a prompt file (.txt, .toml or .json)")
    if not path.is_file():
        raise PromptSyntaxError(f"{path}: no such prompt file")
    prompts = _file_prompts(path, defaults)
    if not prompts:
        raise PromptSyntaxError(f"{path}: no prompt in this file (blank lines and # comments only, or an empty list); "
                                "write one prompt per line")
    return prompts


def _file_prompts(path: Path, defaults: SamplePrompt | None) -> list[SamplePrompt]:
    from lorakit.textfile import read_user_text

    text = read_user_text(path, PromptSyntaxError)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptSyntaxError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(entries, list):
            raise PromptSyntaxError(f"{path}: expected a list of prompts")
    elif suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PromptSyntaxError(f"{path}: not valid TOML: {e}") from None
        table = data.get("prompt")
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise PromptSyntaxError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries")
        shared = {k: v for k, v in table.items() if k != "subset"}
        entries = [{**shared, **subset} for subset in table["subset"]]
    else:
        return parse_prompt_text(text, defaults, source=str(path))
    prompts = []
    for number, entry in enumerate(entries, start=1):
        where = f"{path} entry {number}"
        if isinstance(entry, str):
            prompts.append(parse_prompt_line(entry, defaults, where=where))
        elif isinstance(entry, dict):
            prompts.append(parse_prompt_dict(entry, defaults, where=where))
        else:
            raise PromptSyntaxError(f"{where}: expected a string or a table, got {type(entry).__name__}")
    return prompts


# ----------------------------------------------------------------------------------------------- samplers
# name -> (diffusers scheduler class name, options); kohya's names plus the common spellings
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),  # needs scipy
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# kohya's "dpmsolver" (first-order DPM-Solver) is deprecated in diffusers and cannot end at sigma 0: DPM++ 2M here
_SAMPLER_ALIASES = {
    "dpmsolver": "dpmsolver++", "k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "eulera": "euler_a",
    "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a", "dpm++_2m": "dpmsolver++", "dpmpp_2m": "dpmsolver++",
    "dpm++2m": "dpmsolver++", "dpmpp_2m_karras": "dpm++_2m_karras", "dpm++2m_karras": "dpm++_2m_karras",
}


def sampler_name(name: str) -> str:
    """The canonical sampler name ("Euler-a", "k_euler_a" -> "euler_a"; "DPM++ 2M" -> "dpmsolver++")."""
    key = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    key = _SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise InvalidValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    return key


def make_scheduler(name: str, model: BaseModel) -> Any:
    """A fresh diffusers scheduler for sampler ``name``, built from the model's own scheduler config."""
    class_name, options = SAMPLERS[sampler_name(name)]
    cls = getattr(diffusers, class_name)
    if class_name == "LMSDiscreteScheduler":
        try:
            import scipy  # noqa: F401  (an optional dependency: only this sampler needs it)
        except ImportError:
            raise InvalidValueError("sampler 'lms' needs scipy (pip install scipy)") from None
    if model.scheduler_config.get("rescale_betas_zero_snr") and \
            "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        options = {**options, "trained_betas": zero_snr_betas_for_sigma_samplers(model)}
    return cls.from_config(model.scheduler_config, prediction_type=model.prediction_type, **options)


def zero_snr_betas_for_sigma_samplers(model: BaseModel) -> list[float]:
    """The model's zero-terminal-SNR betas, for samplers that cannot rescale betas themselves (PNDM, LMS, Heun,
    DPM2, single-step DPM): the last step's signal is set to 2**-24 instead of 0, as diffusers' Euler does,
    because these samplers start from sigma = sqrt((1 - alpha) / alpha), infinite at alpha = 0."""
    alphas_cumprod = model.noise_scheduler.alphas_cumprod.double().clone()
    alphas_cumprod[-1] = 2.0**-24
    previous = torch.cat([torch.ones(1, dtype=alphas_cumprod.dtype), alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / previous).tolist()


# --------------------------------------------------------------------------------------------- generation
def _resolve(prompt: SamplePrompt, model: BaseModel, seed: int) -> SamplePrompt:
    """Fill the model-dependent defaults and round sizes down to what the model can take."""
    multiple = model.size_multiple
    sizes = {}
    for name in ("width", "height"):
        size = getattr(prompt, name) or model.resolution
        fitted = max(multiple, size - size % multiple)
        if fitted != size:
            log.warning("sample %s %d is not a multiple of %d; using %d", name, size, multiple, fitted)
        sizes[name] = fitted
    return replace(prompt, seed=prompt.seed if prompt.seed is not None else seed,
                   sampler=sampler_name(prompt.sampler), **sizes)


def resolve_prompts(model: BaseModel, prompts: Sequence[SamplePrompt | str], base_seed: int = 0) -> list[SamplePrompt]:
    """The prompts exactly as generate() runs them: sizes, seeds and sampler names filled in."""
    items = [SamplePrompt(p) if isinstance(p, str) else p for p in prompts]
    return [_resolve(p, model, base_seed + i) for i, p in enumerate(items)]


def _batches(indices: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def long_prompts_note(model: BaseModel, texts: Sequence[str], max_token_length: int, *, what: str = "prompts",
                      option: str = "--max-token-length ") -> str | None:
    """What the text encoder does not read of the prompts (negative ones too): each is cut at ``max_token_length``
    tokens, silently in diffusers and kohya; None when every one fits.  Weighted prompts count their words only.
    ``option``: how the caller's user sets the length (a flag, or the trainer's setting)."""
    texts = [t for t in dict.fromkeys(texts) if t]
    if not texts:  # the tokenizer fails on an empty list
        return None
    counts = prompt_token_counts(model.tokenizer, [plain_text(t) if uses_bracket_syntax(t) else t for t in texts])
    long = [(t, n) for t, n in zip(texts, counts, strict=True) if n > max_token_length]
    if not long:
        return None
    text, n = max(long, key=lambda pair: pair[1])
    shown = text if len(text) <= 60 else text[:57] + "..."
    longer = (f"; {option}{150 if max_token_length == 75 else 225} reads more" if max_token_length < 225 else "")
    return (f"note: {len(long)} of {len(texts)} {what} are longer than the {max_token_length} tokens the text encoder "
            f"reads and are cut there (the longest, {n} tokens: {shown!r}){longer}")


def _text_inputs(model: BaseModel, prompts: list[str], negatives: list[str], clip_skip: int,
                 max_token_length: int, device: torch.device) -> dict[str, Any]:
    """What the pipeline is given for the text: the prompts (it encodes them itself), or with a clip skip, longer
    prompts, weighted words (``(word:1.2)``, ``lorakit.prompt_weights``) or an SDXL model the embeddings encoded as
    the trainer encodes them (diffusers' own ``clip_skip`` counts one less and fails with transformers 5; it reads
    75 tokens at most, and no weights)."""
    weighted = any(uses_bracket_syntax(t) for t in [*prompts, *negatives])
    if not model.is_sdxl and clip_skip == 1 and max_token_length == 75 and not weighted:
        return {"prompt": prompts, "negative_prompt": negatives}

    def embed(texts: list[str]) -> Conditioning:
        # A1111's (word:1.2) syntax: the states scaled token by token, as kohya's sample prompts are read
        return encode_conditioning(model, texts, weighted=weighted, clip_skip=clip_skip,
                                   max_token_length=max_token_length, device=device)

    positive, negative = embed(prompts), embed(negatives)
    inputs = {"prompt_embeds": positive.states, "negative_prompt_embeds": negative.states}
    if positive.pooled is not None:  # SDXL: always encoded here, so that samples read prompts as training does
        inputs.update(pooled_prompt_embeds=positive.pooled, negative_pooled_prompt_embeds=negative.pooled)
    return inputs


@torch.no_grad()
def generate(model: BaseModel, prompts: Sequence[SamplePrompt | str], *, device: str | torch.device | None = None,
             batch_size: int = 4, base_seed: int = 0, clip_skip: int = 1, max_token_length: int = 75,
             progress: bool = True, progress_label: str = "sampling") -> list[Image.Image]:
    """One image per prompt, in order; ``clip_skip`` as kohya and A1111 count it (1: the text encoder's last
    layer) and prompts of up to ``max_token_length`` tokens, read as the trainer reads them
    (``lorakit.models.tokenize_prompts``, ``encode_prompt_ids``).

    Deterministic: each image's noise comes from its own CPU generator seeded with the prompt's seed (or
    ``base_seed + index`` when the prompt has none), so an image does not depend on its batch or device.
    Prompts that share size, steps, CFG and sampler run together, ``batch_size`` at a time.  The networks are
    put in eval mode and every module's previous mode is restored afterwards, as is the global RNG state:
    sampling in the middle of training changes nothing for the training run.
    """
    resolved = resolve_prompts(model, prompts, base_seed)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(resolved):
        groups.setdefault((p.width, p.height, p.steps, p.cfg_scale, p.sampler), []).append(i)

    networks = model.networks
    modes = [(m, m.training) for net in networks for m in net.modules()]
    target = torch.device(device) if device is not None else model.device
    homes = [net.device for net in networks]
    rng_devices = [target] if target.type == "cuda" else []
    images: list[Image.Image | None] = [None] * len(resolved)
    bar = tqdm(total=len(resolved), desc=progress_label, unit="img", disable=not progress, leave=False)
    try:
        for net in networks:
            net.to(target).eval()
        pipe = model.pipeline()
        pipe.set_progress_bar_config(disable=True)
        # in half precision the latents are decoded here, in the VAE's dtype: the pipeline would hand the VAE the
        # U-Net's (an fp32 VAE beside a half U-Net, kohya's no_half_vae; fp32 latents from the U-Net accelerate
        # wraps for mixed precision during training)
        decode_here = not model.vae.dtype == model.dtype == torch.float32
        broken = _NonFiniteLatents()
        with torch.random.fork_rng(devices=rng_devices):
            for (width, height, steps, cfg, sampler), indices in groups.items():
                pipe.scheduler = make_scheduler(sampler, model)
                for chunk in _batches(indices, max(1, batch_size)):
                    text = _text_inputs(model, [resolved[i].prompt for i in chunk],
                                        [resolved[i].negative_prompt for i in chunk], clip_skip,
                                        max_token_length, target)
                    out = pipe(**text, height=height, width=width, num_inference_steps=steps, guidance_scale=cfg,
                               generator=[torch.Generator("cpu").manual_seed(resolved[i].seed) for i in chunk],
                               output_type="latent" if decode_here else "pil",
                               callback_on_step_end=broken.check, callback_on_step_end_tensor_inputs=["latents"])
                    decoded = _decoded(pipe, out.images, model.is_sdxl) if decode_here else out.images
                    for i, image in zip(chunk, decoded, strict=True):
                        images[i] = image
                    bar.update(len(chunk))
    finally:
        bar.close()
        for net, home in zip(networks, homes, strict=True):
            net.to(home)
        for module, mode in modes:  # per module, not .train(mode): frozen parts may differ from their parents
            module.training = mode
    if broken.count:  # the pipeline turns NaN into black pixels without a word
        log.warning("%d of %d images came out NaN and are drawn black: the base model or an adapter holds NaN or "
                    "infinite values, or half precision overflowed (lorakit inspect FILE checks an adapter)",
                    broken.count, len(resolved))
    return images  # type: ignore[return-value]


class _NonFiniteLatents:
    """A diffusers step-end callback counting the images whose latents hold NaN or infinities after the last step."""

    def __init__(self) -> None:
        self.count = 0

    def check(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if step == pipe.num_timesteps - 1:
            latents = tensors["latents"]
            self.count += int((~torch.isfinite(latents.flatten(1))).any(dim=1).sum())
        return tensors


def _decoded(pipe: Any, latents: torch.Tensor, is_sdxl: bool) -> list[Image.Image]:
    """The pipeline's latents decoded in the VAE's dtype; an SDXL VAE in fp16 that its config says overflows
    (force_upcast) decodes in fp32 for the while, as the SDXL pipeline decodes it."""
    vae = pipe.vae
    dtype = vae.dtype
    upcast = is_sdxl and dtype == torch.float16 and vae.config.get("force_upcast", False)
    try:
        if upcast:
            vae.to(torch.float32)
        with torch.no_grad():
            pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        vae.to(dtype)
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


# -------------------------------------------------------------------------------------------------- grids
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; overlong words are cut, extra lines dropped with '...'."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
        while font.getlength(current) > width and len(current) > 1:  # a single word wider than the cell
            cut = len(current) - 1
            while cut > 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def image_grid(images: Sequence[Image.Image], cols: int | None = None, labels: Sequence[str] | None = None,
               pad: int = 2, font_size: int | None = None, max_label_lines: int = 3) -> Image.Image:
    """Images in a grid (``cols`` default: about square), each with an optional small text label below it.

    ``font_size`` defaults to about 1/25 of the image width (10 px at least): readable at 64 px and at 512 px.
    """
    if not images:
        raise ValueError("no images to put in a grid")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    font_size = font_size or max(10, cell_w // 25)
    font = _font(font_size)
    wrapped = [_wrap(label, font, cell_w, max_label_lines) for label in labels] if labels else None
    line_h = font_size + 2
    label_h = max(len(w) for w in wrapped) * line_h + pad if wrapped else 0
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x = pad + (i % cols) * (cell_w + pad)
        y = pad + (i // cols) * (cell_h + label_h + pad)
        grid.paste(image.convert("RGB"), (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + cell_h + pad + j * line_h), line, fill="black", font=font)
    return grid


def save_sample_grid(images: Sequence[Image.Image], prompts: Sequence[SamplePrompt | str], path: str | Path,
                     cols: int | None = None) -> Path:
    """A labelled grid of samples written atomically as PNG (a viewer never sees a half-written file)."""
    labels = [p if isinstance(p, str) else p.prompt + (f" (seed {p.seed})" if p.seed is not None else "")
              for p in prompts]
    grid = image_grid(images, cols=cols, labels=labels)
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


# ------------------------------------------------------------------------------------------ with adapters
def generate_with_adapters(model: BaseModel, adapters: Sequence[Any], prompts: Sequence[SamplePrompt | str], *,
                           merged: bool = False, embeddings: Sequence[str | os.PathLike] = (),
                           **options: Any) -> list[Image.Image]:
    """``generate`` with any number of adapters applied, each ``"file[:multiplier[:LBW]]"`` or an ``AdapterSpec``.

    Unmerged by default (a separate update path per layer; ``merged=True`` writes ``W0 + ΣΔW`` for the duration).
    The model's weights are exactly as before afterwards.  ``embeddings``: textual-inversion files, added to the
    tokenizer (that stays) and expanded in the prompts, each under the token its file names or, as in A1111 and
    ComfyUI, its file name (``my_style.safetensors``: ``my_style``).  ``options`` go to ``generate``.
    """
    from lorakit.embeddings import expand_all, load_embedding
    from lorakit.tools.apply import applied

    # the token a file names, else its name without the extension, as A1111 and ComfyUI call an embedding
    loaded = [load_embedding(model, path, default_token=Path(path).stem) for path in embeddings]
    items = []
    for p in prompts:
        p = SamplePrompt(p) if isinstance(p, str) else p
        items.append(replace(p, prompt=expand_all(p.prompt, loaded),
                             negative_prompt=expand_all(p.negative_prompt, loaded)))
    with applied(model, adapters, merged=merged):
        return generate(model, items, **options)


def sample_paths(prompts: Sequence[SamplePrompt], folder: str | Path,
                 columns: Sequence[str] = ()) -> list[Path]:
    """Where ``save_samples`` writes: ``NNN-<prompt words>.png`` per prompt (with ``columns``, one image per prompt
    and column: ``NNN-<prompt words>-<column>.png``), then ``grid.png``."""
    folder = Path(folder)
    words = [re.sub(r"[^A-Za-z0-9]+", "-", p.prompt).strip("-")[:40] or "image" for p in prompts]
    if not columns:
        names = [f"{i:03d}-{w}.png" for i, w in enumerate(words)]
    else:
        names = [f"{i:03d}-{w}-{re.sub(r'[^A-Za-z0-9.]+', '-', c).strip('-')}.png"
                 for i, w in enumerate(words) for c in columns]
    return [folder / name for name in names] + [folder / "grid.png"]


def save_samples(images: Sequence[Image.Image], prompts: Sequence[SamplePrompt], folder: str | Path,
                 title: str = "", cols: int | None = None, columns: Sequence[str] = ()) -> list[Path]:
    """Each image as ``NNN-<prompt words>.png`` and all of them as ``grid.png`` (labels: prompt, seed, ``title``).
    With ``columns``, ``images`` holds each prompt's image for every column in turn (a row per prompt), and each
    is labelled with its column too."""
    paths = sample_paths(prompts, folder, columns)
    written = []
    for image, path in zip(images, paths[:-1], strict=True):
        atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"), suffix=".png")
        written.append(path)
    labels = [f"{p.prompt} (seed {p.seed})" + (f" | {title}" if title else "") for p in prompts]
    if columns:
        labels = [f"{label} {column}" for label in labels for column in columns]
        cols = len(columns)
    grid = image_grid(images, cols=cols, labels=labels)
    written.append(atomic_write(paths[-1], lambda tmp: grid.save(tmp, format="PNG"), suffix=".png"))
    return written


def _adapter_metadata(adapters: Sequence[str | os.PathLike]) -> dict[Path, dict[str, str]]:
    """Each adapter file's metadata, read once; a file that cannot be read is left out (reading it as an adapter
    says what is wrong, later)."""
    found = {}
    for path in map(Path, adapters):
        try:
            with safe_open(str(path), "pt") as f:
                found[path] = f.metadata() or {}
        except (OSError, SafetensorError):
            continue
    return found


def trained_text_settings(adapters: Sequence[str | os.PathLike], clip_skip: int | None = None,
                          max_token_length: int | None = None) -> tuple[dict[str, int], list[str]]:
    """How to read prompts for these adapters: ``clip_skip`` and ``max_token_length`` as given, else as the
    adapters were trained (``ss_clip_skip``, ``ss_max_token_length``; they must agree), else kohya's defaults;
    and a line for each value taken from the files that is not the default."""
    given = {"clip_skip": clip_skip, "max_token_length": max_token_length}
    settings, said = {}, []
    metadata = _adapter_metadata(adapters) if None in given.values() else {}
    for name, (_, default) in TEXT_SETTINGS.items():
        if given[name] is not None:
            settings[name] = given[name]
            continue
        trained = {path: found for path, meta in metadata.items()
                   if (found := trained_text_setting(meta, name)) is not None}
        flag = "--" + name.replace("_", "-")
        if len(set(trained.values())) > 1:
            listed = ", ".join(f"{p}: {v}" for p, v in trained.items())
            raise InvalidValueError(f"the adapters were trained with different {name.replace('_', ' ')}s ({listed}); "
                                    f"choose one with {flag} N")
        settings[name] = next(iter(trained.values()), default)
        if settings[name] != default:
            said.append(f"{name.replace('_', ' ')} {settings[name]}, as the adapters were trained ({flag} to change)")
    return settings, said


def _trained_flags(metadata: dict[Path, dict[str, str]], key: str) -> dict[Path, bool]:
    """What each adapter file says about a kohya yes/no entry (``ss_v_parameterization``: "True"/"False");
    files that do not say are left out."""
    return {path: meta[key] == "True" for path, meta in metadata.items() if meta.get(key) in ("True", "False")}


def adopt_trained_schedule(model: BaseModel, adapters: Sequence[str | os.PathLike]) -> list[str]:
    """Sample ``model`` on the schedule the adapters were trained on (kohya's ``ss_v_parameterization`` and
    ``ss_zero_terminal_snr``) where the model does not already: a single-file SD2 768-v checkpoint does not say it
    predicts v, and its adapter sampled as ε gives noise.  Returns a line for each change.  Adapters that disagree
    are an error; an adapter trained as ε on a model that predicts v is the user's choice of base and left alone."""
    lines = []
    metadata = _adapter_metadata(adapters)
    v_said = _trained_flags(metadata, "ss_v_parameterization")
    snr_said = _trained_flags(metadata, "ss_zero_terminal_snr")
    for what, said in (("v-prediction", v_said), ("zero terminal SNR", snr_said)):
        if len(set(said.values())) > 1:
            listed = ", ".join(f"{p}: {'with' if v else 'without'}" for p, v in said.items())
            raise InvalidValueError(f"the adapters were trained with and without {what} ({listed}); sample them "
                                    "separately")
    v_prediction = any(v_said.values()) or model.prediction_type == "v_prediction"
    rescaled = bool(model.scheduler_config.get("rescale_betas_zero_snr", False))
    zero_snr = any(snr_said.values()) and not rescaled
    if zero_snr and not v_prediction:  # kohya allows it for ε; lorakit's sampler cannot denoise pure noise
        lines.append("the adapters were trained with zero terminal SNR on an ε-prediction model: sampled on the "
                     "model's own schedule")
        zero_snr = False
    if v_prediction and model.prediction_type != "v_prediction":
        lines.append("v-prediction, as the adapters were trained (ss_v_parameterization)")
        if model.version == "sd2":  # SD2.x's v model is the 768 one (2.0-v, 2.1), read as the 512 one until now
            model.resolution = native_resolution(SD2_V_CONFIG)
            lines.append(f"{model.resolution}×{model.resolution} by default: SD2.x's v-prediction model's size")
    if zero_snr:
        lines.append("zero terminal SNR, as the adapters were trained (ss_zero_terminal_snr)")
    if v_prediction != (model.prediction_type == "v_prediction") or zero_snr:
        model.set_schedule("v_prediction" if v_prediction else None, zero_terminal_snr=zero_snr or rescaled)
    return lines


__all__ = ["SamplePrompt", "PromptSyntaxError", "SAMPLERS", "parse_prompt_line", "parse_prompt_dict",
           "parse_prompt_text", "load_prompts", "sampler_name", "make_scheduler", "generate", "image_grid",
           "save_sample_grid", "resolve_prompts", "generate_with_adapters", "sample_paths", "save_samples",
           "trained_text_settings", "adopt_trained_schedule"]

