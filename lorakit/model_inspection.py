"""What a whole model holds, in plain text (``lorakit inspect`` on a single-file checkpoint or a diffusers folder):
its kind as lorakit loads it (family, image size, what it predicts), each part's parameters, the tensors' dtypes,
the size on disk and the file's metadata.  Read from the headers and configs alone: no weight is loaded.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from lorakit.file_kinds import checkpoint_family
from lorakit.models import ModelLoadError, describe_base_model

#: a single file's key prefixes -> the part they belong to (SD1.x/2.x and SDXL layouts)
_FILE_PARTS = (("model.diffusion_model.", "U-Net"), ("first_stage_model.", "VAE"),
               ("cond_stage_model.", "text encoder"), ("conditioner.embedders.0.", "text encoder 1"),
               ("conditioner.embedders.1.", "text encoder 2"))
#: a diffusers folder's subfolders -> the part they hold
_FOLDER_PARTS = {"unet": "U-Net", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2", "vae": "VAE"}


@dataclass(frozen=True)
class ModelReport:
    path: Path
    family: str | None  # None: lorakit does not load it (``refusal`` says why)
    resolution: int | None
    prediction_type: str | None
    parameters: dict[str, int]  # per part
    dtypes: dict[str, int]  # tensors per dtype
    size: int  # bytes on disk
    metadata: dict[str, str]
    refusal: str | None = None
    #: the family its key names suggest, for a model lorakit does not load
    guessed_family: str = "Stable Diffusion"


def _headers(files: list[Path]) -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype) of every tensor of the given safetensors files, from their headers."""
    found = []
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                found.append((key, list(part.get_shape()), str(part.get_dtype())))
    return found


def inspect_model(path: str | Path) -> ModelReport:
    """Describe a whole model (see the module doc)."""
    path = Path(path)
    try:
        described = describe_base_model(path)
    except ModelLoadError as err:  # still worth describing: its parts, sizes, metadata; and why it does not load
        described, refusal = None, str(err).splitlines()[0].removeprefix(f"{path}: ").rstrip(":")
    else:
        refusal = None
    parameters: Counter[str] | dict[str, int] = Counter()
    dtypes: Counter[str] = Counter()
    metadata: dict[str, str] = {}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.safetensors") if p.parent.name in _FOLDER_PARTS)
        for file in files:
            for _, shape, dtype in _headers([file]):
                if dtype.startswith(("F", "BF")):
                    parameters[_FOLDER_PARTS[file.parent.name]] += math.prod(shape)
                dtypes[dtype] += 1
        guessed = "Stable Diffusion"
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    else:
        found = _headers([path])
        for key, shape, dtype in found:
            part = next((name for prefix, name in _FILE_PARTS if key.startswith(prefix)), "other")
            if dtype.startswith(("F", "BF")):  # weights; not the integer position ids some files carry
                parameters[part] += math.prod(shape)
            dtypes[dtype] += 1
        guessed = checkpoint_family({key for key, _, _ in found})
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        size = path.stat().st_size
    order = [name for _, name in _FILE_PARTS] + ["other"]  # the U-Net first, as the files hold them
    parameters = dict(sorted(parameters.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    if described is None:
        return ModelReport(path, None, None, None, parameters, dict(dtypes), size, metadata, refusal, guessed)
    scheduler = json.loads((described.configs / "scheduler" / "scheduler_config.json").read_text())
    return ModelReport(path, described.family, described.resolution, scheduler.get("prediction_type", "epsilon"),
                       parameters, dict(dtypes), size, metadata)


def format_model_report(report: ModelReport) -> str:
    total = sum(report.parameters.values())
    kind = (f"a whole {report.family} model ({report.resolution}×{report.resolution}, predicts "
            f"{report.prediction_type}), not an adapter: give it as --model, or blend it with lorakit merge "
            f"{report.path}:0.5") if report.family else \
        f"a whole {report.guessed_family} model lorakit does not load: {report.refusal}"
    lines = [f"model:       {report.path}",
             f"kind:        {kind}",
             f"size:        {report.size / 2**30:.2f} GiB ({report.size} bytes)",
             "parameters:  " + ", ".join(f"{name} {n:,}" for name, n in report.parameters.items())
             + f" ({total:,} in all)",
             "dtype:       " + ", ".join(f"{d} ×{n}" for d, n in sorted(report.dtypes.items(), key=lambda x: -x[1]))]
    if report.metadata:
        lines.append(f"metadata:    {len(report.metadata)} entries")
        lines += [f"  {k}: {v if len(v) <= 120 else v[:117] + '...'}" for k, v in sorted(report.metadata.items())]
    what = f"an {report.family} model" if report.family else \
        f"a {report.guessed_family} model lorakit does not load"
    lines.append(f"\nsummary: {report.path.name}: {what}, {total:,} parameters, {report.size / 2**30:.2f} GiB.")
    return "\n".join(lines)
