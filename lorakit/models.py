"""Load base models: the built-in tiny model, a diffusers folder, or a single-file SD1.x, SD2.x or SDXL checkpoint.

Everything is offline: nothing is ever fetched from a model hub.  A single-file checkpoint is read here
(safetensors, or a ``.ckpt`` that ``torch.load(weights_only=True)`` accepts; nothing is unpickled), matched to a
config that lorakit ships by the shapes of a few tensors, and converted by diffusers' single-file loader with
that local config.  ``save_single_file_checkpoint`` writes the same layout back (names in ``lorakit.ldm``).
"""

# ruff: noqa: E402  (the environment must be set before the hub client is imported)
from __future__ import annotations

import os

# Before diffusers/transformers import huggingface_hub: the hub client reads this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import logging
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lorakit import ldm
from lorakit.atomic import atomic_folder, atomic_write, give_umask_modes
from lorakit.errors import InvalidValueError, LorakitError
from lorakit.fp8 import compute_dtype
from lorakit.loss import PREDICTION_TYPES
from lorakit.metadata import version_metadata
from lorakit.vocab import build_vocab

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
SD15_CONFIG = CONFIG_DIR / "sd15"
SD2_CONFIG = CONFIG_DIR / "sd2"  # SD2.x at 512 (2.0-base, 2.1-base: ε-prediction)
SD2_V_CONFIG = CONFIG_DIR / "sd2-v"  # SD2.x at 768 (2.0-v, 2.1: v-prediction); the same shapes as SD2_CONFIG
SDXL_CONFIG = CONFIG_DIR / "sdxl"  # SDXL 1.0 base
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ModelLoadError(LorakitError, ValueError):
    """A model file or folder that lorakit cannot (or will not) load; the message names it and says why."""


# ------------------------------------------------------------------------------------------------ dtypes
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "no": torch.float32,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """A torch dtype from a name as configs and flags spell it ("fp32", "fp16", "bf16", ...)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise InvalidValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The short name ("fp32", "fp16", "bf16") of a torch dtype."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


# --------------------------------------------------------------------------------------------- the model
@dataclass
class BaseModel:
    """The components of a Stable Diffusion 1.x, 2.x or XL model, as training and sampling use them (SDXL: a
    second tokenizer and text encoder, whose pooled output and the image size also condition the U-Net)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler  # the training schedule (add_noise, velocity targets)
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction"
    version: str = "sd1"  # "sd1", "sd2" or "sdxl" (model_family)
    source: str = ""
    resolution: int = 512  # native image size
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # the model's own; samplers are built from it
    # tensors of the single file the model was read from that no module holds (SD2.x's last text-encoder layer,
    # which SD2 never uses, and OpenCLIP's contrastive head): written back as they came
    carried_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tokenizer_2: CLIPTokenizer | None = None  # SDXL's second (OpenCLIP bigG's: pads with "!")
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's second encoder

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The text encoder, or SDXL's two (the order of kohya's ``lora_te1_`` / ``lora_te2_``)."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)

    @property
    def networks(self) -> tuple[torch.nn.Module, ...]:
        """Every network of the model: the text encoder(s), the U-Net and the VAE."""
        return (*self.text_encoders, self.unet, self.vae)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE's factor times the U-Net's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the U-Net computes in (with its weights stored in fp8, model.fp8_base, the one they had)."""
        return compute_dtype(self.unet)

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> BaseModel:
        """Move (and optionally cast) the networks in place; returns self."""
        for module in self.networks:
            if device is not None:
                module.to(device=device)
            # only when it changes anything: diffusers warns about every .to(dtype=...)
            if dtype is not None and module.dtype != resolve_dtype(dtype):
                module.to(dtype=resolve_dtype(dtype))
        return self

    def set_schedule(self, prediction_type: str | None = None, zero_terminal_snr: bool = False) -> None:
        """Train and sample as a model that predicts ``prediction_type`` (None: as it is) and, with
        ``zero_terminal_snr``, on kohya's rescaled schedule whose last step is pure noise (Lin et al. 2024),
        sampled from that step ("trailing" spacing).  The samplers' config and the training schedule change
        together.  Raises ModelLoadError for zero terminal SNR on an ε-prediction model, which cannot denoise
        pure noise (its sampling divides by the signal, 0 there)."""
        prediction_type = prediction_type or self.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"{self.source}: unsupported prediction_type {prediction_type!r}")
        config = {**self.scheduler_config, "prediction_type": prediction_type}
        if zero_terminal_snr:
            if prediction_type != "v_prediction":
                raise ModelLoadError(
                    f"{self.source}: zero terminal SNR needs a v-prediction model, and this one predicts "
                    f"{prediction_type}: an ε-prediction model cannot denoise the schedule's last step (pure noise). "
                    "Set model.prediction_type = \"v_prediction\" to train it into one (kohya's "
                    "--v_parameterization), or leave zero_terminal_snr off")
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        self.scheduler_config, self.prediction_type = config, prediction_type
        # SD never clips x0 (DDPMScheduler's default would); only step() uses it, but sampling from it should be
        # right
        self.noise_scheduler = DDPMScheduler.from_config(config, clip_sample=False)

    def pipeline(self, scheduler: Any = None) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """A StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) over these very modules (no copies: adapters
        applied in place show up).

        ``scheduler`` defaults to DDIM built from the model's scheduler config.
        """
        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.scheduler_config, prediction_type=self.prediction_type)
        if self.is_sdxl:
            # no watermark: samples are for the person training, and the package is not installed
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                             text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                                             tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler,
                                             force_zeros_for_empty_prompt=False, add_watermarker=False)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


def tokenize_prompts(tokenizer: CLIPTokenizer, texts: list[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids ``(batch, chunks, 77)``: each chunk is BOS, 75 of the prompt's tokens (padded), EOS, as kohya
    splits a prompt of up to ``max_token_length`` tokens (longer ones are cut there)."""
    width = tokenizer.model_max_length  # 77: BOS + 75 + EOS
    if max_token_length == width - 2:
        return tokenizer(texts, padding="max_length", max_length=width, truncation=True,
                         return_tensors="pt").input_ids[:, None]
    ids = tokenizer(texts, padding="max_length", max_length=max_token_length + 2, truncation=True,
                    return_tensors="pt").input_ids
    body = width - 2
    return torch.stack([torch.cat([ids[:, :1], ids[:, i:i + body], ids[:, -1:]], dim=1)
                        for i in range(1, max_token_length + 1, body)], dim=1)


def prompt_token_counts(tokenizer: CLIPTokenizer, texts: list[str]) -> list[int]:
    """How many tokens each text is, BOS and EOS not counted (what ``max_token_length`` limits)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False).input_ids]


def encode_prompt_ids(text_encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """The U-Net's conditioning for token ids ``(batch, 77)`` or chunked ``(batch, chunks, 77)``
    (``tokenize_prompts``).

    Each chunk gives the text encoder's last hidden state, or with ``clip_skip`` N > 1 the output of its N-th
    layer from the end through the final layer norm, as kohya trains and A1111 samples ("clip skip"; SD1.x anime
    models are trained with 2): the model as if its last N - 1 layers were not there.  diffusers' pipelines count
    one less (their ``clip_skip=1`` is this 2), and with transformers 5 their own clip skip fails (it looks for
    ``text_model``), so ``lorakit.sample`` passes these embeddings instead.  Several chunks are joined as kohya
    joins them: the first BOS, every chunk's 75 token states, the last EOS (2 + 75·chunks states)."""
    flat = ids.reshape(-1, ids.shape[-1])
    if clip_skip == 1:
        states = text_encoder(flat)[0]
    else:
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states
        inner = getattr(text_encoder, "module", text_encoder)  # accelerate's wrapper in a distributed run
        text_model = getattr(inner, "text_model", inner)  # transformers 4 nests the layers, 5 does not
        states = text_model.final_layer_norm(hidden[-clip_skip])
    return join_chunk_states(states, ids)


def join_chunk_states(states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """An encoder's states ``(batch·chunks, 77, dim)`` for ``ids`` ``(batch, 77)`` or ``(batch, chunks, 77)``, as one
    sequence per prompt: the first BOS, every chunk's 75 token states, the last EOS (kohya's joining)."""
    b = ids.shape[0]
    if ids.dim() == 2 or ids.shape[1] == 1:
        return states.reshape(b, ids.shape[-1], -1)
    states = states.reshape(b, ids.shape[1], ids.shape[-1], -1)
    return torch.cat([states[:, 0, :1], *[states[:, k, 1:-1] for k in range(ids.shape[1])], states[:, -1, -1:]],
                     dim=1)


def check_sdxl_clip_skip(clip_skip: int, source: str | Path | None = None) -> None:
    """Refuse a clip skip on SDXL (``source``: the model), which has none to set."""
    if clip_skip != 1:
        raise InvalidValueError(f"clip skip {clip_skip}: SDXL ({source or 'the model'}) reads each text encoder's "
                                "penultimate layer, the layers it was trained on, so there is no clip skip to set "
                                "(kohya's SDXL scripts ignore it); leave clip_skip at 1")


def check_device(name: str, where: str = "device") -> torch.device:
    """The torch device ``name`` names, refused in words when torch does not know it or it is not here (torch
    says an AssertionError "not compiled with CUDA" only once the model is being moved)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidValueError(f"{where} {name!r}: not a device torch knows; use cpu, cuda (or cuda:N) or mps") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValueError(f"{where} {name}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidValueError(f"{where} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                    f"numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidValueError(f"{where} {name}: no Apple GPU (MPS) is available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InvalidValueError(f"{where} {name}: lorakit runs on cpu, cuda or mps")
    return device


def check_clip_skip(model: BaseModel, clip_skip: int) -> None:
    """Refuse a clip skip the model's text encoder has not the layers for (before any work is done)."""
    if model.is_sdxl:
        check_sdxl_clip_skip(clip_skip, model.source)
    layers = model.text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise InvalidValueError(f"clip skip {clip_skip}: the text encoder of {model.source or 'the model'} has "
                                f"{layers} layers (1 = its last layer, the default; 2 = the one before)")


def builtin_model_path() -> Path:
    """Where the pretrained built-in model is shipped (a diffusers folder inside the package)."""
    return Path(__file__).parent / "world" / "base_model"


def base_model_path(spec: str | Path | None) -> Path:
    """The file or folder a base-model spec names: None or "builtin" is the shipped model."""
    return builtin_model_path() if spec is None or str(spec) == "builtin" else Path(spec).expanduser()


def is_builtin_model(spec: str | Path | None) -> bool:
    """Whether ``spec`` names the shipped model, by name or by its path (whose world reader judges its images)."""
    return base_model_path(spec).resolve() == builtin_model_path().resolve()


def _own_memory(module: torch.nn.Module) -> None:
    """Give every CPU tensor that lives in a loader's buffer memory of torch's own (64-byte aligned).

    safetensors hands out tensors at arbitrary offsets, and CPU kernels (oneDNN/MKL) pick code paths by
    alignment: the same weights then give outputs that differ in the last bit from a freshly built model.
    """
    copies: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, tensor in table.items():
                    if tensor is None or tensor.device.type != "cpu" or tensor.data_ptr() % 64 == 0:
                        continue
                    key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
                    if key not in copies:  # tied tensors stay tied
                        copies[key] = tensor.detach().clone()
                    copy = copies[key]
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = copy
                    else:
                        table[name] = copy


def model_family(text_encoder_config: Any) -> str:
    """"sd1" or "sd2", told by the text encoder: SD1.x's CLIP ViT-L uses quick_gelu, SD2.x's OpenCLIP ViT-H gelu
    (which also decides how a single file names its tensors).  Raises ModelLoadError for any other."""
    act = getattr(text_encoder_config, "hidden_act", "quick_gelu")
    if act == "quick_gelu":
        return "sd1"
    if act == "gelu":
        return "sd2"
    raise ModelLoadError(f"a text encoder with hidden_act {act!r} is neither SD1.x's CLIP (quick_gelu) nor SD2.x's "
                         "OpenCLIP (gelu): lorakit trains SD1.x, SD2.x and SDXL models (SDXL's first encoder is "
                         "SD1.x's CLIP)")


def _assemble(tokenizer, text_encoder, unet, vae, scheduler_config: dict, source: str,
              prediction_type: str | None, device, dtype: torch.dtype, second: tuple | None = None) -> BaseModel:
    """The model from its parts; ``second``: SDXL's (tokenizer_2, text_encoder_2)."""
    try:
        version = "sdxl" if second is not None else model_family(text_encoder.config)
    except ModelLoadError as e:
        raise ModelLoadError(f"{source}: {e}") from None
    tokenizer_2, text_encoder_2 = second or (None, None)
    model = BaseModel(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, noise_scheduler=None,
                      source=source, scheduler_config=scheduler_config, version=version,
                      prediction_type=scheduler_config.get("prediction_type") or "epsilon",
                      tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)
    model.set_schedule(prediction_type)
    model.resolution = unet.config.sample_size * model.vae_scale_factor
    for module in model.networks:
        module.eval()
        _own_memory(module)
    return model.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------- public entry
def load_base_model(spec: str | Path | None = None, dtype: str | torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", *, config: str | Path | None = None,
                    tokenizer: str | Path | None = None, prediction_type: str | None = None) -> BaseModel:
    """Load a base model.

    ``spec``: None or "builtin" (the shipped tiny model), a diffusers folder, or a single-file checkpoint
    (``.safetensors``; ``.ckpt``/``.pt`` only if ``torch.load(weights_only=True)`` reads it).
    ``config``: for a single file, a diffusers folder whose configs (and tokenizer) to use instead of the
    detected ones.  ``tokenizer``: a folder with a CLIP tokenizer (vocab.json + merges.txt or tokenizer.json)
    overriding the model's.  ``prediction_type``: override ("v_prediction" for v-models; single files don't say).
    """
    dtype = resolve_dtype(dtype)
    if spec is None or str(spec) == "builtin":
        folder = builtin_model_path()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"the built-in model's weights are not in this installation ({folder} is missing or incomplete). "
                "Pretrain it with `lorakit world pretrain --out DIR` and pass DIR/model as the base model.")
        return _load_folder(folder, dtype, device, tokenizer, prediction_type)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, dtype, device, tokenizer, prediction_type)
    if path.is_file():
        return _load_single_file(path, dtype, device, config, tokenizer, prediction_type)
    raise ModelLoadError(f"{spec}: no such file or folder (lorakit never downloads models: give a local diffusers "
                         "folder or a single-file .safetensors checkpoint)")


@dataclass(frozen=True)
class ModelDescription:
    """What a base model is, read from its configs (and a single file's header) without loading any weights."""

    configs: Path  # the folder whose configs describe it: its own, or the one a single file is matched to
    # an SD2.x single file that does not say whether it predicts noise or v, nor did the user: it loads as the
    # 512 ε model (``_load_single_file`` warns), a 2.1 (768 v) file wrongly
    unsaid_sd2_prediction: bool = False

    @property
    def resolution(self) -> int:
        """The image size the model was made for."""
        return _folder_resolution(self.configs)

    @property
    def family(self) -> str:
        """"SD1.x", "SD2.x" or "SDXL", told as a single file's text-encoder layout is (``_config_layout``)."""
        return {"clip": "SD1.x", "open_clip": "SD2.x", "sdxl": "SDXL"}[_config_layout(self.configs)]

    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        """The model's tokenizer(s) (SDXL: two), read as loading the model reads them: no weights."""
        first = load_clip_tokenizer(self.configs)
        return (first, load_clip_tokenizer(self.configs / "tokenizer_2")) if self.family == "SDXL" else (first,)


def describe_base_model(spec: str | Path | None = None, prediction_type: str | None = None) -> ModelDescription:
    """A base model described without loading any weights: a folder by its own configs, a single file by the
    config lorakit matches it to from its tensor shapes and metadata (its header read once).  Raises
    ModelLoadError for a model lorakit cannot load (an SDXL refiner, a missing path).  ``prediction_type`` as the load
    is told it (an SD2.x single file predicting v is the 768 model)."""
    if spec is None or str(spec) == "builtin":
        return ModelDescription(builtin_model_path())
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_folder(path, ("unet", "vae", "text_encoder"))  # the configs read from it
        return ModelDescription(path)
    header = _single_file_header(spec)
    if header is None:
        return ModelDescription(SD15_CONFIG)  # an old-format .ckpt: assumed SD1.x here, told apart when it loads
    shapes, metadata = header
    found = detect_architecture(shapes, path)
    stated = _file_prediction_type(shapes, metadata, prediction_type)
    return ModelDescription(_config_folder(found, stated), unsaid_sd2_prediction=found == "sd2" and stated is None)


def _single_file_header(spec: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """A single file's tensors as shapes (meta tensors, or a .ckpt's mapped from the file, not read) and its
    metadata; None for an old-format .ckpt, which cannot be mapped."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{spec}: no such file or folder (lorakit never downloads models: give a local diffusers "
                             "folder or a single-file .safetensors checkpoint)")
    if path.suffix.lower() != ".safetensors":
        try:
            return read_checkpoint(path, mmap=True)
        except ModelLoadError as e:
            if "mmap" not in str(e):
                raise
            return None
    with safe_open(str(path), "pt") as f:  # shapes only: tensors on the meta device hold no data
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}, f.metadata() or {}


def native_resolution(spec: str | Path | None = None, prediction_type: str | None = None) -> int:
    """The image size a base model was made for, read as ``describe_base_model`` reads it (no weights loaded)."""
    return describe_base_model(spec, prediction_type).resolution


def _folder_resolution(folder: Path) -> int:
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


# ----------------------------------------------------------------------------------------- diffusers folder
def load_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer from a folder (or its ``tokenizer/`` subfolder).

    Besides the usual files (tokenizer.json, or vocab.json + merges.txt) a folder with only CLIP's merges.txt
    works: CLIP's vocabulary follows from its merges (this is how lorakit ships SD1.5's tokenizer).  A folder with
    only a ``tokenizer_config.json`` is CLIP's merges with that file's padding token (how lorakit ships SD2.x's:
    OpenCLIP's tokenizer is CLIP's, padded with "!").
    """
    folder = Path(folder)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    merges_file = folder / "merges.txt"
    settings_file = folder / "tokenizer_config.json"
    if not merges_file.is_file() and settings_file.is_file():
        merges_file = SD15_CONFIG / "tokenizer" / "merges.txt"
    if not merges_file.is_file():
        raise ModelLoadError(f"{folder}: no CLIP tokenizer here (tokenizer.json, vocab.json or merges.txt)")
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    tok = CLIPTokenizer(vocab=build_vocab(merges), merges=merges,
                        **{k: settings[k] for k in ("pad_token",) if k in settings})
    tok.model_max_length = 77
    return tok


def _check_folder(folder: Path, needed: tuple[str, ...]) -> None:
    missing = [p for p in needed if not (folder / p).is_dir()]
    if missing:
        said = f"{folder}: not a Stable Diffusion diffusers folder (missing {', '.join(missing)})"
        raise ModelLoadError(said + _run_folder_hint(folder))


def _run_folder_hint(folder: Path) -> str:
    """What a lorakit run folder given as a model holds instead: a model it wrote, or an adapter."""
    from lorakit.file_kinds import is_full_model
    from lorakit.run_manifest import is_lorakit_run

    if not is_lorakit_run(folder):
        return ""
    # native fine-tuning writes a model (a single file, or a diffusers folder); the other methods an adapter
    models = sorted(p for p in folder.iterdir() if (p.suffix == ".safetensors" or p.is_dir()) and is_full_model(p))
    if models:
        return f"; it is a lorakit run, and the model it trained is {models[0]}"
    return ("; it is a lorakit run, whose results are adapters (or embeddings): give them beside the base model, "
            "not as it")


def _load_folder(folder: Path, dtype: torch.dtype, device, tokenizer: str | Path | None,
                 prediction_type: str | None) -> BaseModel:
    _check_folder(folder, ("unet", "vae", "text_encoder", "scheduler") + (() if tokenizer else ("tokenizer",)))
    try:
        # loaded straight into dtype: casting afterwards would hold two copies (and diffusers warns about it)
        unet = _from_folder(UNet2DConditionModel, folder, "unet", torch_dtype=dtype)
        vae = _from_folder(AutoencoderKL, folder, "vae", torch_dtype=dtype)
        text_encoder = _from_folder(CLIPTextModel, folder, "text_encoder")
        scheduler_config = dict(DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True))
        second = _load_second_encoder(folder)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}: cannot load the diffusers folder: {e}") from e
    tok = load_clip_tokenizer(tokenizer or folder)
    return _assemble(tok, text_encoder, unet, vae, scheduler_config, str(folder), prediction_type, device, dtype,
                     second)


def _load_second_encoder(folder: Path) -> tuple[CLIPTokenizer, CLIPTextModelWithProjection] | None:
    """SDXL's second tokenizer and text encoder (``tokenizer_2/``, ``text_encoder_2/``); None for SD1.x/2.x."""
    if not (folder / "text_encoder_2").is_dir():
        return None
    _check_folder(folder, ("tokenizer_2",))
    encoder = _from_folder(CLIPTextModelWithProjection, folder, "text_encoder_2")
    return load_clip_tokenizer(folder / "tokenizer_2"), encoder


def _from_folder(cls, folder: Path, subfolder: str, **options):
    """A part of a diffusers folder, refused when its weights file does not hold what its config describes (both
    libraries would leave the missing weights unloaded or random, and say so only in a log line)."""
    part, info = cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True, output_loading_info=True,
                                     **options)
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing:
        foreign = f"; {len(unexpected)} it does not expect (e.g. {unexpected[0]})" if unexpected else ""
        raise ModelLoadError(f"{folder / subfolder}: its weights file lacks {len(missing)} of the weights its config "
                             f"describes (e.g. {missing[0]}){foreign}: the folder is damaged, or another file was "
                             "put in place of its weights")
    return part


# ------------------------------------------------------------------------------------------- single file
def read_checkpoint(path: str | Path, *, mmap: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a single-file checkpoint, refusing anything that would need unpickling.  ``mmap``: a
    ``.ckpt``'s tensors mapped from the file, not read (only the zip format torch writes since 1.6 can be)."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:  # an interrupted copy or download: say so plainly
        raise ModelLoadError(f"{path}: an empty file (0 bytes), not a checkpoint; copy it again")
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as e:  # SafetensorError for truncated/corrupt files; its type is not public API
            raise ModelLoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        return tensors, metadata
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise ModelLoadError(
                f"{path}: refusing to unpickle it: the file holds Python objects besides tensors, and loading "
                f"those can run arbitrary code. Convert it to .safetensors with a tool you trust. ({e})") from e
        except Exception as e:
            raise ModelLoadError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                                 f"{type(e).__name__}: {e}") from e
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # Lightning-style files nest the weights
        if not isinstance(obj, dict):
            raise ModelLoadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    raise ModelLoadError(f"{path}: unknown checkpoint format {path.suffix!r} (expected .safetensors or .ckpt)")


def _known_configs() -> dict[str, Path]:
    """Config folders a single-file checkpoint is matched against (the built-in model's when it is installed).
    SD2.x's 768 v-prediction config has the shapes of its 512 one ("sd2"): ``_config_folder`` tells them apart."""
    configs = {"sd15": SD15_CONFIG, "sd2": SD2_CONFIG, "sdxl": SDXL_CONFIG}
    if (builtin_model_path() / "model_index.json").is_file():
        configs["builtin"] = builtin_model_path()
    return configs


def _te_key(checkpoint: dict, inner: str) -> str:
    """The checkpoint's name for a text-encoder tensor, with or without the ``text_model.`` level."""
    with_level = ldm.TEXT_ENCODER_PREFIX + "text_model." + inner
    return with_level if with_level in checkpoint else ldm.TEXT_ENCODER_PREFIX + inner


def _signature(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of a few tensors that tell SD1.x-, SD2.x- and SDXL-family configs apart, computed from a config
    folder.

    "text:" keys are SD1.x text-encoder tensors, looked up with or without the ``text_model.`` level; an SD2.x
    config names OpenCLIP's position table instead, an SDXL one its second encoder's.
    """
    u = json.loads((folder / "unet" / "config.json").read_text())
    v = json.loads((folder / "vae" / "config.json").read_text())
    second = folder / "text_encoder_2" / "config.json"
    t = json.loads((second if second.is_file() else folder / "text_encoder" / "config.json").read_text())
    if second.is_file():
        positions = ldm.SDXL_OPEN_CLIP_PREFIX + "positional_embedding"
    elif t.get("hidden_act", "quick_gelu") == "quick_gelu":
        positions = "text:embeddings.position_embedding.weight"
    else:
        positions = ldm.OPEN_CLIP_PREFIX + "positional_embedding"
    # the first level with cross-attention (SD1.x/2.x: the first; SDXL: the second), under its original name
    level = next(i for i, kind in enumerate(u["down_block_types"]) if "CrossAttn" in kind)
    attention = ldm.unet_module_map(u)[f"down_blocks.{level}.attentions.0"]
    return {
        ldm.UNET_PREFIX + "input_blocks.0.0.weight": (u["block_out_channels"][0], u.get("in_channels", 4), 3, 3),
        f"{ldm.UNET_PREFIX}{attention}.transformer_blocks.0.attn2.to_k.weight": (u["block_out_channels"][level],
                                                                                u["cross_attention_dim"]),
        ldm.VAE_PREFIX + "encoder.conv_in.weight": (v["block_out_channels"][0], v.get("in_channels", 3), 3, 3),
        positions: (t["max_position_embeddings"], t["hidden_size"]),
    }


def _shape_of(checkpoint: dict, key: str) -> tuple[int, ...] | None:
    if key.startswith("text:"):
        key = _te_key(checkpoint, key[len("text:"):])
    tensor = checkpoint.get(key)
    return None if tensor is None else tuple(tensor.shape)


def detect_architecture(checkpoint: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> str:
    """Which known config ("sd15", "sd2", "sdxl", "builtin") fits an original-layout checkpoint; a clear refusal
    otherwise."""
    keys = list(checkpoint)
    if any(k.startswith("conditioner.embedders.") for k in keys) and ldm.text_encoder_layout(checkpoint) != "sdxl":
        raise ModelLoadError(f"{path}: its text conditioning (conditioner.embedders.*) is not SDXL base's two "
                             f"encoders ({ldm.SDXL_CLIP_PREFIX}*, {ldm.SDXL_OPEN_CLIP_PREFIX}*): an SDXL refiner "
                             "or another model, which lorakit does not train")
    if not any(k.startswith(ldm.UNET_PREFIX) for k in keys):
        hint = ""
        if any(k.startswith(("lora_", "lycoris_")) for k in keys):
            hint = " It looks like an adapter (LoRA) file: load it as an adapter, not as a base model."
        elif any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
            hint = " It looks like a single diffusers component; use a diffusers folder instead."
        raise ModelLoadError(f"{path}: unsupported checkpoint: no {ldm.UNET_PREFIX}* tensors, so not an SD1.x, "
                             f"SD2.x or SDXL single-file checkpoint.{hint}")
    if not any(k.startswith(ldm.VAE_PREFIX) for k in keys):
        raise ModelLoadError(f"{path}: the checkpoint has no VAE ({ldm.VAE_PREFIX}*); lorakit needs a full checkpoint")
    if ldm.text_encoder_layout(checkpoint) is None:
        raise ModelLoadError(f"{path}: the checkpoint has no text encoder ({ldm.TEXT_ENCODER_PREFIX}* for SD1.x, "
                             f"{ldm.OPEN_CLIP_PREFIX}* for SD2.x); lorakit needs a full checkpoint")
    candidates = {name: _signature(folder) for name, folder in _known_configs().items()}
    for name, expected in candidates.items():
        if all(_shape_of(checkpoint, key) == shape for key, shape in expected.items()):
            return name
    lines = []
    for key in dict.fromkeys(k for sig in candidates.values() for k in sig):
        wants = ", ".join(f"{name} {tuple(sig[key])}" for name, sig in candidates.items() if key in sig)
        lines.append(f"  {key.removeprefix('text:')}: found {_shape_of(checkpoint, key)}; {wants}")
    hint = ""
    if (_shape_of(checkpoint, ldm.UNET_PREFIX + "input_blocks.0.0.weight") or (0, 4))[1] != 4:
        hint = " (U-Net input channels are not 4: an inpainting or other special model?)"
    raise ModelLoadError(f"{path}: unsupported architecture{hint}: its shapes fit no config lorakit knows "
                         "(SD1.x, SD2.x, SDXL 1.0 base and the built-in model):\n"
                         + "\n".join(lines))


#: ModelSpec's ``modelspec.prediction_type`` (kohya writes it in the models it saves) as diffusers names it
_MODELSPEC_PREDICTIONS = {"v": "v_prediction", "epsilon": "epsilon"}


def _file_prediction_type(checkpoint: dict, metadata: dict[str, str], given: str | None) -> str | None:
    """What a single file predicts: as the user says, else as lorakit's metadata, its ModelSpec entries
    (``modelspec.prediction_type``, or an architecture ``stable-diffusion-v2-768-v``) or the community's marker
    tensor says (see ``_SCHEDULE_MARKERS``); None when nothing says."""
    spec = _MODELSPEC_PREDICTIONS.get(metadata.get("modelspec.prediction_type", "").strip().lower())
    if spec is None and metadata.get("modelspec.architecture", "").startswith("stable-diffusion-v2-768-v"):
        spec = "v_prediction"
    marked = "v_prediction" if _SCHEDULE_MARKERS["v_prediction"] in checkpoint else None
    return given or metadata.get("lorakit_prediction_type") or spec or marked


def _config_folder(found: str, prediction_type: str | None) -> Path:
    """The config folder for a detected architecture: an SD2.x file predicting v is the 768 model (2.0-v, 2.1)."""
    if found == "sd2" and prediction_type == "v_prediction":
        return SD2_V_CONFIG
    return _known_configs()[found]


def _load_single_file(path: Path, dtype: torch.dtype, device, config: str | Path | None,
                      tokenizer: str | Path | None, prediction_type: str | None) -> BaseModel:
    checkpoint, metadata = read_checkpoint(path)
    prediction_type = _file_prediction_type(checkpoint, metadata, prediction_type)
    if config is not None:
        folder = Path(config)
    else:
        found = detect_architecture(checkpoint, path)
        folder = _config_folder(found, prediction_type)
        if found == "sd2" and prediction_type is None:
            log.warning("%s: an SD2.x file does not say whether it predicts noise (2.0-base, 2.1-base: 512) or v "
                        "(2.0-v, 2.1: 768); read as the 512 ε-prediction model. For a v model set "
                        "model.prediction_type = \"v_prediction\" (kohya's --v_parameterization)", path)
    wanted = _config_layout(folder)
    layout = ldm.text_encoder_layout(checkpoint)
    if layout != wanted:
        raise ModelLoadError(f"{path}: its text encoder is {_LAYOUT_NAMES[layout]}, and the config in {folder} is "
                             f"for {_LAYOUT_NAMES[wanted]}")
    try:
        unet = UNet2DConditionModel.from_single_file(checkpoint, config=str(folder), subfolder="unet",
                                                     local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_single_file(checkpoint, config=str(folder), subfolder="vae", local_files_only=True,
                                             torch_dtype=dtype)
    except Exception as e:  # shape mismatches and missing keys surface as assorted errors deep in diffusers
        raise ModelLoadError(f"{path}: cannot convert it with the config in {folder}: {e}") from e
    text_encoder, second, carried = _text_encoders_from_file(checkpoint, layout, folder, path)
    for name, module in (("U-Net", unet), ("VAE", vae)):
        # diffusers builds on the meta device and leaves tensors the file lacks there, without a word
        empty = [k for k, t in module.state_dict().items() if t.is_meta]
        if empty:
            raise ModelLoadError(f"{path}: the {name} is incomplete: {len(empty)} tensors missing, e.g. {empty[0]}")
    if "lorakit_vae_scaling_factor" in metadata:  # written by save_single_file_checkpoint
        vae.register_to_config(scaling_factor=float(metadata["lorakit_vae_scaling_factor"]))
    scheduler_config = dict(DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True))
    tok = load_clip_tokenizer(tokenizer or folder)
    model = _assemble(tok, text_encoder, unet, vae, scheduler_config, str(path), prediction_type, device, dtype,
                      second)
    model.carried_tensors = carried
    if _SCHEDULE_MARKERS["zero_terminal_snr"] in checkpoint:
        model.set_schedule(zero_terminal_snr=True)
    return model


_LAYOUT_NAMES = {"clip": f"SD1.x's CLIP ({ldm.TEXT_ENCODER_PREFIX}*)",
                 "open_clip": f"SD2.x's OpenCLIP ({ldm.OPEN_CLIP_PREFIX}*)",
                 "sdxl": f"SDXL's CLIP and OpenCLIP ({ldm.SDXL_CLIP_PREFIX}*, {ldm.SDXL_OPEN_CLIP_PREFIX}*)"}


def _config_layout(folder: Path) -> str:
    """How a single file holds the text encoder(s) of the model a config folder describes (``_LAYOUT_NAMES``)."""
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    te_config = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    try:
        return "open_clip" if model_family(te_config) == "sd2" else "clip"
    except ModelLoadError as e:
        raise ModelLoadError(f"{folder / 'text_encoder'}: {e}") from None


def _text_encoders_from_file(checkpoint: dict[str, torch.Tensor], layout: str, folder: Path, path: Path
                             ) -> tuple[CLIPTextModel, tuple | None, dict[str, torch.Tensor]]:
    """A single file's text encoder, SDXL's second one with its tokenizer (else None), and the file's tensors
    that no module holds but a file written back should (``BaseModel.carried_tensors``)."""
    text_encoder, second, carried = text_encoder_on_meta(CLIPTextModel, folder / "text_encoder"), None, {}
    encoders: list[tuple[torch.nn.Module, dict, str]] = []
    if layout == "open_clip":
        state, carried = ldm.text_encoder_from_open_clip(checkpoint, text_encoder)
        encoders.append((text_encoder, state, "text_encoder"))
    elif layout == "sdxl":
        encoders.append((text_encoder, ldm.text_encoder_from_ldm(checkpoint, set(text_encoder.state_dict()),
                                                                 ldm.SDXL_CLIP_PREFIX), "text_encoder"))
        encoder_2 = text_encoder_on_meta(CLIPTextModelWithProjection, folder / "text_encoder_2")
        state, carried = ldm.text_encoder_from_open_clip(checkpoint, encoder_2, ldm.SDXL_OPEN_CLIP_PREFIX)
        encoders.append((encoder_2, state, "text_encoder_2"))
        second = (load_clip_tokenizer(folder / "tokenizer_2"), encoder_2)
    else:
        encoders.append((text_encoder, ldm.text_encoder_from_ldm(checkpoint, set(text_encoder.state_dict())),
                         "text_encoder"))
    for module, state, sub in encoders:
        try:
            _fill(module, state)
        except RuntimeError as e:
            raise ModelLoadError(f"{path}: its text encoder does not fit {folder / sub}: {e}") from e
    return text_encoder, second, carried


def text_encoder_on_meta(cls: type, config_folder: Path) -> torch.nn.Module:
    """A text encoder of ``config_folder``'s config built on the meta device: no memory, no random weights that
    the file's would replace (SDXL's second encoder has 695M parameters)."""
    config = CLIPTextConfig.from_pretrained(config_folder, local_files_only=True)
    with torch.device("meta"):
        return cls(config)


def _fill(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a module built on the meta device the tensors of ``state`` (all of them, no others: RuntimeError
    otherwise); the position ids, a buffer no file holds, are made again."""
    module.load_state_dict(state, strict=True, assign=True)
    for sub in module.modules():
        ids = getattr(sub, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            sub.position_ids = torch.arange(ids.shape[-1]).expand((1, -1))
    empty = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if empty:
        raise RuntimeError(f"{len(empty)} tensors were not filled, e.g. {empty[0]}")
    module.float()  # one dtype throughout, as a module built in fp32 and copied into would have (a file may mix)


# ------------------------------------------------------------------------------------------------- saving
#: empty tensors a single-file checkpoint carries to say how it samples, as v-prediction and zero-terminal-SNR
#: releases do (ComfyUI and A1111/Forge read them; an original-layout file has no scheduler config)
_SCHEDULE_MARKERS = {"v_prediction": "v_pred", "zero_terminal_snr": "ztsnr"}


def _plain_keys(module: torch.nn.Module, fresh) -> None:
    """Refuse modules with tensors a plain model of their config lacks (e.g. adapters still applied)."""
    with torch.device("meta"):
        expected = set(fresh().state_dict())
    extra = sorted(set(module.state_dict()) - expected)
    if extra:
        raise InvalidValueError(f"{type(module).__name__} has tensors a plain model does not ({len(extra)}, e.g. "
                         f"{extra[0]}): merge or remove adapters before saving a base checkpoint")


def save_single_file_checkpoint(model: BaseModel, path: str | Path, dtype: str | torch.dtype | None = None, *,
                                overwrite: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as one original-layout ``.safetensors`` file (what A1111, ComfyUI and kohya load): SD1.x's
    layout, SD2.x's (OpenCLIP's names for the text encoder) for an SD2.x model, SDXL's (its two encoders under
    ``conditioner.embedders.``) for an SDXL model.

    ``dtype``: cast on the way out (e.g. "fp16" halves the file); None keeps each tensor's dtype.  The write
    is atomic (temporary file, then rename) and an existing file is kept unless ``overwrite``.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidValueError(f"{path}: single-file checkpoints are written as .safetensors only")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    unet, vae, te = model.unet, model.vae, model.text_encoder
    _plain_keys(unet, lambda: UNet2DConditionModel.from_config(unet.config))
    _plain_keys(vae, lambda: AutoencoderKL.from_config(vae.config))
    _plain_keys(te, lambda: CLIPTextModel(te.config))
    if model.is_sdxl:
        _plain_keys(model.text_encoder_2, lambda: CLIPTextModelWithProjection(model.text_encoder_2.config))
        text = ldm.sdxl_text_encoders_to_ldm(te.state_dict(), model.text_encoder_2.state_dict(),
                                             model.carried_tensors)
    elif model.version == "sd2":
        text = ldm.text_encoder_to_open_clip(te.state_dict(), model.carried_tensors)
    else:
        text = ldm.text_encoder_to_ldm(te.state_dict())
    tensors = {**ldm.unet_to_ldm(unet.state_dict(), unet.config), **ldm.vae_to_ldm(vae.state_dict(), vae.config),
               **text}
    cast = resolve_dtype(dtype) if dtype is not None else None
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        # SD2's carried tensors and stand-ins are as the source file held them, or fp32: in the encoder's dtype
        target = cast or (te.dtype if key in text else None)
        if target is not None and tensor.is_floating_point():
            tensor = tensor.to(target)
        out[key] = tensor.contiguous()
    if model.prediction_type == "v_prediction":
        out[_SCHEDULE_MARKERS["v_prediction"]] = torch.zeros(0)
    if model.scheduler_config.get("rescale_betas_zero_snr"):
        out[_SCHEDULE_MARKERS["zero_terminal_snr"]] = torch.zeros(0)
    info = {"lorakit_vae_scaling_factor": repr(float(vae.config.scaling_factor)),
            "lorakit_prediction_type": model.prediction_type, "lorakit_architecture": model.version,
            **version_metadata(),
            **(metadata or {})}
    return atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata=info), overwrite=overwrite)


def check_replaceable_model_folder(path: str | Path) -> None:
    """Refuse a path a diffusers folder may not replace: a file, or a folder of other files than a model's (replacing
    a model folder, when asked, is fine; a folder of someone's photos never is)."""
    path = Path(path)
    if path.is_file() or path.is_symlink():
        raise FileExistsError(f"{path}: a file, not a model folder; write the model to another path")
    if path.is_dir() and any(path.iterdir()) and not (path / "model_index.json").is_file():
        some = ", ".join(sorted(p.name for p in path.iterdir())[:3])
        raise FileExistsError(f"{path}: a folder that is not a diffusers model (it holds {some}, ...); the model "
                              "replaces only a model folder: write it to another path")


def save_diffusers_folder(model: BaseModel, path: str | Path, dtype: str | torch.dtype | None = None, *,
                          overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers folder (``from_pretrained`` loads it; so do ComfyUI's diffusers loader and
    lorakit ``--model``).  Atomic: written beside ``path``, then renamed (an existing folder is replaced only with
    ``overwrite``).  ``dtype`` casts on the way out; the model keeps its own tensors, exactly as they were."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    check_replaceable_model_folder(path)
    with atomic_folder(path) as tmp:  # a folder appears whole or not at all (mode 0o777 minus the umask)
        with _cast_for_writing(model.networks, dtype):
            model.pipeline().save_pretrained(tmp, safe_serialization=True)
        give_umask_modes(tmp)  # its safetensors files would be 0600: unreadable to another user's client
        if path.exists():  # the old model goes only once the new one is written (overwrite, checked above)
            shutil.rmtree(path)
    return path


@contextmanager
def _cast_for_writing(modules: tuple[torch.nn.Module, ...], dtype: str | torch.dtype | None) -> Iterator[None]:
    """The modules cast to ``dtype`` (None: as they are) while the block runs, then given back their own tensors:
    cast back instead, a model written at lower precision would go on rounded to it (a native run's final
    samples drawn from the rounded weights).  The cast copies cost what the written precision does."""
    if dtype is None:
        yield
        return
    kept = [(table, name, tensor, tensor.data) for module in modules for sub in module.modules()
            for table in (sub._parameters, sub._buffers) for name, tensor in table.items() if tensor is not None]
    try:
        for module in modules:
            module.to(dtype=resolve_dtype(dtype))
        yield
    finally:
        # .to() swaps a parameter's data in place and replaces a buffer: both put back as they were
        for table, name, tensor, data in kept:
            tensor.data = data
            table[name] = tensor
