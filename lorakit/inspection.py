"""What an adapter file holds, in plain text (``lorakit inspect FILE``, ``lorakit.commands.inspect``).

Algorithm, module counts (U-Net / text encoder), ranks and alphas, size, dtypes, the ``ss_*`` and
``lorakit_*`` metadata and the U-Net blocks it touches, ending with a one-paragraph summary.
Works on files of any tool that writes kohya or LyCORIS keys.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.adapters import KNOWN
from lorakit.blocks import BLOCK_MAPS, BlockMap
from lorakit.diffusers_format import METADATA_KEY, SCALE_SOURCE_KEY
from lorakit.file_kinds import check_adapter_path, pivotal_embedding
from lorakit.formats import (
    AdapterFile,
    ModuleInfo,
    block_map_of,
    describe_modules,
    guess_base_model,
    nonfinite_tensors,
    read_adapter,
)

_COMPONENT_LABELS = {"unet": "U-Net", "text_encoder": "text encoder", "text_encoder_1": "text encoder 1",
                     "text_encoder_2": "text encoder 2", "unknown": "unknown prefix"}
_BASE_MODELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
_ALGORITHM_NAMES = {name: spec.display_name for name, spec in KNOWN.items()}
_LAYOUTS = {"kohya": "kohya/LyCORIS (lora_unet_..., lora_te_...)",
            "diffusers": "diffusers/PEFT (unet.<path>.lora_A/lora_B, or PEFT's <path>.hada_*/lokr_*; read under kohya "
                         "names)"}
_LONG = 120  # metadata values longer than this (tag frequencies, bucket info) are cut


@dataclass
class FileReport:
    path: Path
    size: int
    modules: list[ModuleInfo]
    dtypes: Counter
    metadata: dict[str, str]
    base_model: str | None
    blocks: dict[str, int] = field(default_factory=dict)
    layout: str = "kohya"
    #: tensors holding NaN or infinities: the file is broken (the other commands refuse it)
    nonfinite: list[str] = field(default_factory=list)
    #: the file beside it that gave the modules' scale (PEFT's adapter_config.json); None: the file itself
    scale_source: str | None = None

    def count(self, attr: str) -> Counter:
        return Counter(getattr(m, attr) for m in self.modules)


def inspect_file(path: str | Path, block_map: BlockMap | None = None) -> FileReport:
    """What a file holds; ``block_map``: the blocks its modules are counted in (default: the file's own, SDXL's
    for an SDXL file)."""
    check_adapter_path(path)  # a folder, a model, an embedding: say what it is instead of "an unknown adapter"
    file: AdapterFile = read_adapter(path, allow_nonfinite=True)  # said below, not refused: inspect diagnoses
    block_map = block_map or block_map_of(file)
    modules = describe_modules(file, block_map)
    blocks = Counter(m.block or "other" for m in modules if m.component == "unet")
    order = list(block_map.names) + ["other"]
    scale_source = file.metadata.get(SCALE_SOURCE_KEY)
    return FileReport(
        path=Path(path),
        size=Path(path).stat().st_size,
        modules=modules,
        dtypes=Counter(str(t.dtype).removeprefix("torch.") for t in file.tensors.values()),
        # as the file holds it: what read_adapter added from a PEFT config beside it is said on the alphas line
        metadata={k: v for k, v in file.metadata.items()
                  if not (scale_source and k in (SCALE_SOURCE_KEY, METADATA_KEY))},
        base_model=guess_base_model(file),
        blocks={b: blocks[b] for b in order if b in blocks},
        layout=file.layout,
        nonfinite=nonfinite_tensors(file.tensors),
        scale_source=scale_source,
    )


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _counted(counter: Counter, show=str) -> str:
    items = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return ", ".join(f"{show(k)} ×{n}" for k, n in items) or "none"


def _alpha(value: float | str | None) -> str:
    if value == _RANKLESS:
        return "none (no rank)"
    return "none (= rank)" if value is None else f"{value:g}"


#: the alpha of a module without a rank ((IA)³, full): it has none to scale
_RANKLESS = "no rank"


def _alpha_counts(report: FileReport) -> Counter:
    """The modules' alphas, counted; a module without a rank counts as ``_RANKLESS``."""
    return Counter(_RANKLESS if m.rank is None else m.alpha for m in report.modules)


def _rank(value: int | None) -> str:
    return "none (no rank)" if value is None else str(value)


def _base_model_text(report: FileReport) -> str:
    stated = report.metadata.get("ss_base_model_version")
    guessed = _BASE_MODELS.get(report.base_model or "", None)
    if stated and guessed:
        return f"{stated} (metadata); widths look like {guessed}"
    if stated:
        return f"{stated} (metadata)"
    return f"{guessed} (from widths)" if guessed else "unknown"


def format_report(report: FileReport) -> str:
    algorithms = report.count("algorithm")
    components = report.count("component")
    lines = [
        f"file:        {report.path}",
        f"size:        {_size(report.size)} ({report.size} bytes)",
        f"layout:      {_LAYOUTS.get(report.layout, report.layout)}",
        f"algorithm:   {_counted(algorithms)}",
        "modules:     " + (", ".join(f"{_COMPONENT_LABELS.get(c, c)} {n}" for c, n in components.items())
                           or "none") + f" ({len(report.modules)} in all)",
        f"ranks:       {_counted(report.count('rank'), _rank)}",
        f"alphas:      {_counted(_alpha_counts(report), _alpha)}"
        + (f" (from the {report.scale_source} beside the file)" if report.scale_source else ""),
        f"dtype:       {_counted(report.dtypes)} (tensors)",
        f"base model:  {_base_model_text(report)}",
        "blocks:      " + (", ".join(f"{b} {n}" for b, n in report.blocks.items()) or "none (no U-Net modules)"),
        "block ranks: " + (block_ranks(report) or "none (no U-Net modules)"),
    ]
    if report.nonfinite:  # first among the warnings: nothing else about the file matters as much
        names = ", ".join(report.nonfinite[:5]) + (f", ... ({len(report.nonfinite)} in all)"
                                                   if len(report.nonfinite) > 5 else "")
        lines.append(f"BROKEN:      {len(report.nonfinite)} tensor(s) hold NaN or infinite values: {names}; the "
                     "other commands refuse this file (it draws black or noise images)")
    pivotal, embedding = pivotal_embedding(report.path)
    if pivotal:  # the adapter is half of the result: say where the other half is
        lines.append("trained with: an embedding (pivotal tuning): " + (
            f"{embedding}, beside it (lorakit sample and eval add it)" if embedding is not None else
            f"not beside it ({report.path.stem}-TOKEN.safetensors); without it the token is plain text"))
    shown = {k: v for k, v in sorted(report.metadata.items()) if k.startswith(("ss_", "lorakit_", "modelspec."))}
    others = len(report.metadata) - len(shown)
    lines.append(f"metadata:    {len(shown)} ss_*/lorakit_*/modelspec.* entries"
                 + (f", {others} other" if others else ""))
    for key, value in shown.items():
        value = value if len(value) <= _LONG else value[:_LONG] + f"... ({len(value)} chars)"
        lines.append(f"  {key}: {value}")
    lines += ["", "summary: " + summary(report)]
    return "\n".join(lines)


def _block_names(report: FileReport) -> tuple[str, ...]:
    """The blocks of the file's architecture, in order (inspect_file counted its modules in them)."""
    return BLOCK_MAPS["sdxl" if report.base_model == "sdxl" else "sd1"].names


def block_ranks(report: FileReport) -> str:
    """Rank per U-Net block ('IN01 4, IN02 4, MID 2-4'); blocks absent from the file have rank 0 (no module)."""
    ranks: dict[str, set[int]] = {}
    for m in report.modules:
        if m.component == "unet":
            ranks.setdefault(m.block or "other", set()).update([m.rank] if m.rank is not None else [])
    parts = []
    for block in list(_block_names(report)) + ["other"]:
        if block in ranks:
            values = sorted(ranks[block])
            text = "-" if not values else str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
            parts.append(f"{block} {text}")
    return ", ".join(parts)


def summary(report: FileReport) -> str:
    """One paragraph: what it is, for which model, where it acts."""
    if not report.modules:
        return f"{report.path.name} holds no adapter modules ({len(report.dtypes)} dtypes, {_size(report.size)})."
    algos = " + ".join(_ALGORITHM_NAMES.get(a, a) for a, _ in report.count("algorithm").most_common())
    base = _BASE_MODELS.get(report.base_model or "", None) or report.metadata.get("ss_base_model_version")
    comps = report.count("component")
    parts = ", ".join(f"{_COMPONENT_LABELS.get(c, c)} {n}" for c, n in comps.items())
    ranks = report.count("rank")
    alphas = _alpha_counts(report)
    rank_text = (f"rank {_rank(next(iter(ranks)))}" if len(ranks) == 1
                 else f"ranks {min((r for r in ranks if r is not None), default='-')}"
                      f"-{max((r for r in ranks if r is not None), default='-')}")
    alpha_text = f"alpha {_alpha(next(iter(alphas)))}" if len(alphas) == 1 else f"{len(alphas)} alpha values"
    if set(ranks) == {None}:  # (IA)³, full: neither
        rank_text, alpha_text = "no rank", ""
    where = _runs([b for b in report.blocks if b != "other"], list(_block_names(report)))
    text = (f"{report.path.name}: {algos} adapter" + (f" for {base}" if base else "") +
            f", {len(report.modules)} modules ({parts}), {rank_text}, {alpha_text + ', ' if alpha_text else ''}"
            f"{'/'.join(report.dtypes)}, {_size(report.size)}.")
    if where:
        text += f" It touches U-Net blocks {where}."
    if "text_encoder" not in " ".join(comps):
        text += " It leaves the text encoder alone."
    if report.nonfinite:
        text += f" It is broken: {len(report.nonfinite)} tensor(s) hold NaN or infinite values."
    return text


def _runs(names: list[str], order: list[str]) -> str:
    """'IN01, IN02, IN03, MID' -> 'IN01-IN03, MID' (runs of consecutive blocks)."""
    runs: list[list[str]] = []
    for name in names:
        if runs and name in order and runs[-1][-1] in order and order.index(name) == order.index(runs[-1][-1]) + 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    return ", ".join(r[0] if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
