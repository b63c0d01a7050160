"""What ``lorakit eval`` compares: checkpoints found in run folders or given as files, plus the base model.

A source is one of
- a training run folder (``config.toml`` + ``checkpoints/epoch-NNNN/trained.safetensors``): every saved epoch,
  with the run's settings (algorithm, rank, lr, preset, ...) from its ``config.toml`` and its CS-Fluctuation
  turning point from ``summary.json``; with ``step_checkpoints`` also its ``checkpoints/step-NNNNNNNN/``, placed
  between the epochs at ``step / steps per epoch`` (the steps per epoch counted in its ``log.jsonl``);
- an adapter file (``.safetensors``): one checkpoint, settings from its ``ss_*`` metadata;
- a textual-inversion embedding file: one checkpoint, its token the one the file names, else its file name (as
  A1111 and ComfyUI call an embedding).

Textual-inversion and pivotal runs' checkpoints carry their token: prompts are read with it added to the model
(``zkz`` standing for all of the embedding's vectors), the base model reads the same prompts without it.

The base model itself is "epoch 0" (once, however many runs are compared).  Each checkpoint carries a content
hash, so cached images are never reused for a file that changed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.checkpoint_names import EPOCH_DIR, STEP_DIR
from lorakit.errors import LorakitError
from lorakit.file_kinds import is_full_model

if TYPE_CHECKING:
    from lorakit.data import DataConfig

#: run settings shown in the report and used as SHAP features: (label, config section, key)
SETTING_KEYS = (("method", "method", "kind"), ("algorithm", "network", "algorithm"), ("preset", "network", "preset"),
                ("rank", "network", "rank"), ("alpha", "network", "alpha"), ("conv_rank", "network", "conv_rank"),
                ("lr", "optimizer", "learning_rate"), ("optimizer", "optimizer", "optimizer"),
                ("batch_size", "data", "batch_size"), ("max_epochs", "training", "max_epochs"),
                ("seed", "training", "seed"), ("early_stop", "early_stop", "mode"), ("base", "model", "base"),
                ("vae", "model", "vae"))


class CheckpointError(LorakitError, ValueError):
    """A source that is not a run folder or an adapter file, an empty run, or a checkpoint that does not fit."""


@dataclass(frozen=True)
class EvalCheckpoint:
    """One thing to generate with: the base model (``path`` None, ``epoch`` 0) or an adapter/weights file."""

    label: str  # unique among the checkpoints compared: "base", "<run>/e3", "<file stem>"
    kind: str  # "base", "adapter", "native", "embedding" (textual inversion), "pivotal" (an embedding + an adapter),
    # "model" (a whole fine-tuned model, a single file or a diffusers folder)
    path: Path | None
    hash: str  # content hash of the file ("base" for the base model: the base model's hash is keyed separately)
    run: str | None = None  # the run's name (folder name), None for the base model and loose files
    epoch: float | None = None  # a step checkpoint's is fractional (step 6 of 4 per epoch: 1.5); None: unknown
    step: int | None = None  # a step checkpoint's step (None for epoch checkpoints, files and the base model)
    token: str | None = None  # an embedding's token ("embedding" and "pivotal" checkpoints)
    embedding: Path | None = None  # a pivotal adapter file's embedding file (a run's checkpoint holds both)


@dataclass
class RunInfo:
    """A training run folder and what it already holds."""

    name: str
    path: Path
    settings: dict[str, Any]
    summary: dict[str, Any] | None = None
    turning_epoch: int | None = None  # CS-Fluctuation turning point (stopped there, or found in report mode)
    turning_step: int | None = None
    data: str | None = None  # the training images' folder, from config.toml
    held_out: str | None = None  # its folder of held-out images (data.validation_data)
    trigger: str | None = None
    class_word: str | None = None
    caption_templates: str | None = None  # data.caption_templates: it trained on templates, not the captions
    token: str | None = None  # a textual-inversion or pivotal run's token (method.ti_token, else data.trigger)
    checkpoints: list[EvalCheckpoint] = field(default_factory=list)
    step_checkpoints_left_out: int = 0  # step checkpoints the run holds that were not asked for
    #: model.base_weights: (file, multiplier) of the adapters merged into the model before it trained (kohya's
    #: --base_weights); its checkpoints are judged on that model too
    base_weights: tuple[tuple[str, float], ...] = ()

    @property
    def plain_caption(self) -> str | None:
        """What the trainer captioned an image of a plain (not kohya-layout) folder with when it had no caption
        file: the trigger and class word (``--trigger``, ``--class``); None when the run set neither."""
        return " ".join(w for w in (self.trigger, self.class_word) if w) or None


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (first 16 hex digits: a cache key, not a signature)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def model_hash(spec: str | Path | None) -> str:
    """A hash of a base model's files (a diffusers folder's weights and configs, or a single file)."""
    from lorakit.models import base_model_path

    path = base_model_path(spec)
    if path.is_file():
        return file_hash(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: the base model is neither a folder nor a file")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt")):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_hash(f).encode())
    return h.hexdigest()[:16]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the run's configuration: {err}") from None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    return data if isinstance(data, dict) else None


def summary_turning_point(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run's turning point from its summary.json: where it stopped, or, in report mode (or when it did not
    stop), where the rule found it; None when there is none."""
    tp = (summary or {}).get("turning_point") or (summary or {}).get("turning_point_found")
    return tp if isinstance(tp, dict) else None


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that tell runs apart, from a parsed config.toml (missing keys: the trainer's defaults)."""
    from lorakit.config import TrainConfig

    defaults = TrainConfig()
    out: dict[str, Any] = {}
    for label, section, key in SETTING_KEYS:
        value = config.get(section, {}).get(key, getattr(getattr(defaults, section), key, None))
        if value is not None:
            out[label] = value
    return out


#: a run's method (config.toml's method.kind) -> the kind of its checkpoints
_CHECKPOINT_KINDS = {"adapter": "adapter", "native": "native", "ti": "embedding", "pivotal": "pivotal"}


def _kind(config: dict[str, Any], where: Path) -> tuple[str, str | None]:
    """The kind of a run's checkpoints and, for an embedding, its token (as the trainer chose it)."""
    method = config.get("method", {})
    kind = _CHECKPOINT_KINDS.get(method.get("kind", "adapter"))
    if kind is None:
        raise CheckpointError(f"{where}: unknown method {method.get('kind')!r} (one of {', '.join(_CHECKPOINT_KINDS)})")
    if kind not in ("embedding", "pivotal"):
        return kind, None
    token = method.get("ti_token") or config.get("data", {}).get("trigger")
    if not token:
        raise CheckpointError(f"{where}: a textual-inversion run that names no token (method.ti_token or data.trigger)")
    return kind, token


def checkpoint_hash(file: Path, token: str | None = None, embedding: Path | None = None) -> str:
    """The content hash that keys a checkpoint's images; an embedding's token is part of it (the same vectors
    under another word read other prompts), and so is a pivotal adapter's separate embedding file."""
    digest = file_hash(file)
    if embedding is not None:
        digest += ":" + file_hash(embedding)
    return digest if token is None else hashlib.sha256(f"{digest}:{token}".encode()).hexdigest()[:16]


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.toml").is_file()


def not_a_run(path: Path, command: str) -> str:
    """Why ``path`` is not a run to ``lorakit <command>``, and what to give instead where that can be told: the run
    a file or folder of a run is in, the page of an evaluation's folder, the run trained on a data folder."""
    from lorakit.data.discovery import kohya_phrase
    from lorakit.run_manifest import enclosing_run

    said = f"{path}: not a lorakit run folder (no config.toml)"
    rest = " ..." if command == "eval" else ""  # eval's other options are the user's own
    if (holder := enclosing_run(path)) is not None:  # its checkpoints folder, its result file, a sample folder
        return f"{said}; it is inside the run {holder}: lorakit {command} {holder}{rest}"
    if path.is_dir() and (path / "metrics.json").is_file():
        return (f"{said}; it holds an evaluation, whose page lorakit eval wrote there ({path / 'report.html'}); "
                f"to show it on a run's page: lorakit report RUN --eval {path}")
    if command == "eval" and path.is_dir() and kohya_phrase(path) is not None:
        return (f"{said}; it holds training images (kohya layout): give the run trained on them, or adapter files "
                f"with --data {path} to measure them against these images")
    return said


def read_run(path: str | Path, every: int = 1, step_checkpoints: bool = False) -> RunInfo:
    """A run folder's settings, summary, turning point and saved checkpoints (every ``every``-th epoch, the last
    one always; with ``step_checkpoints`` its step checkpoints too, all of them, in order of training).
    CheckpointError for a folder that is not a run, or a run with no saved checkpoint."""
    path = Path(path)
    if not is_run_folder(path):
        from lorakit.file_kinds import model_folder_refusal

        if refusal := model_folder_refusal(path):
            raise CheckpointError(refusal)
        raise CheckpointError(not_a_run(path, "eval"))
    config = _read_toml(path / "config.toml")
    kind, token = _kind(config, path / "config.toml")
    summary = _read_json(path / "summary.json")
    from lorakit.config import pair_base_weights

    data, model = config.get("data", {}), config.get("model", {})
    base_weights = tuple(pair_base_weights(model.get("base_weights", []), model.get("base_weights_multiplier", [])))
    info = RunInfo(name=path.resolve().name, path=path, settings=run_settings(config), summary=summary,
                   data=data.get("train_data"), held_out=data.get("validation_data"), trigger=data.get("trigger"),
                   class_word=data.get("class_word"), caption_templates=data.get("caption_templates"), token=token,
                   base_weights=base_weights)
    if (tp := summary_turning_point(summary)) is not None:
        info.turning_epoch, info.turning_step = tp.get("epoch"), tp.get("step")
    found, steps = _saved(path / "checkpoints", EPOCH_DIR), _saved(path / "checkpoints", STEP_DIR)
    if not found and not (step_checkpoints and steps):
        raise CheckpointError(f"{path}: the run has no saved checkpoint (checkpoints/epoch-NNNN/trained.safetensors)"
                              "; train it first, or pass its adapter file")
    last = found[-1][0] if found else None
    for epoch, file in found:
        if epoch % max(1, every) and epoch != last:
            continue
        info.checkpoints.append(EvalCheckpoint(label=f"{info.name}/e{epoch}", kind=kind, path=file,
                                               hash=checkpoint_hash(file, token), run=info.name, epoch=epoch,
                                               token=token))
    if not step_checkpoints:
        info.step_checkpoints_left_out = len(steps)
        return info
    per_epoch = steps_per_epoch(path / "log.jsonl")
    for step, file in steps:
        info.checkpoints.append(EvalCheckpoint(label=f"{info.name}/s{step}", kind=kind, path=file,
                                               hash=checkpoint_hash(file, token), run=info.name, step=step,
                                               epoch=round(step / per_epoch, 3) if per_epoch else None,
                                               token=token))
    # in order of training; a step checkpoint whose place is unknown comes last
    info.checkpoints.sort(key=lambda c: (c.epoch is None, c.epoch or 0.0))
    return info


def _saved(folder: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    """(number, tensors file) of the complete checkpoints in ``folder`` whose names match ``pattern``, in order."""
    found = []
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = pattern.match(child.name)
        if m and (child / "trained.safetensors").is_file():
            found.append((int(m.group(1)), child / "trained.safetensors"))
    return found


def steps_per_epoch(log: Path) -> int | None:
    """The run's optimizer steps per epoch: the most any epoch logged (every whole epoch has as many; the last may
    have stopped early), each step once (validation and sample-score lines repeat theirs).  None without a
    readable log."""
    counts: dict[int, set[int]] = {}
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the rest still counts
            continue
        if isinstance(record, dict) and "step" in record and isinstance(record.get("epoch"), int):
            counts.setdefault(record["epoch"], set()).add(record["step"])
    return max(len(steps) for steps in counts.values()) if counts else None


def read_file_checkpoint(path: str | Path, partner: Path | None = None) -> EvalCheckpoint:
    """One file as a checkpoint: an adapter file, an embedding file, or a run's own checkpoint file (read as its
    run's ``config.toml`` says: an embedding under the run's token, native weights).  ``partner``: a pivotal
    adapter's embedding given beside it on the command line (``loose_partners``), for one not under the trainer's
    name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or run folder")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors adapter file (lorakit never unpickles .pt/.ckpt files)")
    from lorakit.file_kinds import embedding_header, embedding_token, pivotal_embedding

    label = _file_label(path)
    if (run := _owning_run(path)) is not None:
        kind, token = _kind(_read_toml(run / "config.toml"), run / "config.toml")
        if kind != "adapter":
            return EvalCheckpoint(label=label, kind=kind, path=path, hash=checkpoint_hash(path, token),
                                  epoch=_metadata_epoch(_header_metadata(path)), token=token)
    if (embedding := embedding_header(path)) is not None:
        token = embedding_token(path, embedding[1])
        return EvalCheckpoint(label=label, kind="embedding", path=path, hash=checkpoint_hash(path, token),
                              epoch=_metadata_epoch(embedding[1]), token=token)
    try:
        from lorakit.formats import read_adapter

        meta = read_adapter(path).metadata
    except (ValueError, OSError) as err:  # the reader's messages name the file already
        said = str(err) if str(err).startswith(str(path)) else f"{path}: cannot read it as an adapter file: {err}"
        raise CheckpointError(said) from None
    pivotal, beside = pivotal_embedding(path)
    if not pivotal:
        return EvalCheckpoint(label=label, kind="adapter", path=path, hash=file_hash(path),
                              epoch=_metadata_epoch(meta))
    beside = beside or partner
    if beside is None:  # judged without its token, the adapter would be judged on prompts it was not trained for
        raise CheckpointError(f"{path}: a pivotal-tuning adapter, trained with an embedding that is not beside it "
                              f"({path.stem}-TOKEN.safetensors, as the trainer wrote them): put it there, give "
                              "its embedding file too (lorakit eval ADAPTER EMBEDDING), or evaluate the run folder")
    token = embedding_token(beside, embedding_header(beside)[1])
    return EvalCheckpoint(label=label, kind="pivotal", path=path, hash=checkpoint_hash(path, token, beside),
                          epoch=_metadata_epoch(meta), token=token, embedding=beside)


def _metadata_epoch(metadata: dict[str, str]) -> int | None:
    return int(metadata["ss_epoch"]) if str(metadata.get("ss_epoch", "")).isdigit() else None


def _header_metadata(path: Path) -> dict[str, str]:
    from lorakit.file_kinds import read_header

    try:
        return read_header(path)[1]
    except Exception as err:  # safetensors' own error types for a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _checkpoint_folder(path: Path) -> Path | None:
    """The folder of a run's checkpoint file (``RUN/checkpoints/epoch-NNNN/trained.safetensors``, or a step
    checkpoint's), or None for any other file."""
    folder = path.resolve().parent
    if path.name == "trained.safetensors" and folder.parent.name == "checkpoints" and \
            (EPOCH_DIR.match(folder.name) or STEP_DIR.match(folder.name)):
        return folder
    return None


def _owning_run(path: Path) -> Path | None:
    """The run folder whose checkpoint ``path`` is, or None."""
    folder = _checkpoint_folder(path)
    return folder.parent.parent if folder is not None and is_run_folder(folder.parent.parent) else None


def _file_label(path: Path) -> str:
    """A file's label: its name, or for a run's checkpoint the run and the checkpoint, which say more than every
    checkpoint's own name, "trained"."""
    folder = _checkpoint_folder(path)
    return f"{folder.parent.parent.name}/{folder.name}" if folder is not None else path.stem


def _unique_labels(checkpoints: list[EvalCheckpoint]) -> list[EvalCheckpoint]:
    seen: dict[str, int] = {}
    out = []
    for c in checkpoints:
        n = seen.get(c.label, 0)
        seen[c.label] = n + 1
        out.append(c if n == 0 else replace(c, label=f"{c.label}~{n + 1}"))
    return out


def loose_partners(files: Sequence[Path]) -> dict[Path, Path]:
    """Pivotal adapters among ``files`` whose embedding is not beside them under the trainer's name, each paired
    with the one embedding among ``files`` called by the token the adapter names (a renamed pair given together)."""
    from lorakit.file_kinds import TI_TOKEN_KEY, embedding_header, embedding_token, pivotal_embedding, read_header

    tokens = {}
    for file in files:
        if (header := embedding_header(file)) is not None:
            tokens[file] = embedding_token(file, header[1])
    pairs = {}
    for file in files:
        if pivotal_embedding(file) != (True, None):
            continue
        token = read_header(file)[1].get(TI_TOKEN_KEY)
        called = [e for e, t in tokens.items() if token and t == token]
        if len(called) == 1:
            pairs[file] = called[0]
    return pairs


def discover(sources: Sequence[str | Path], include_base: bool = True, every: int = 1,
             step_checkpoints: bool = False) -> tuple[list[EvalCheckpoint], list[RunInfo]]:
    """The checkpoints to compare (the base model first, as epoch 0) and the runs they came from.  A pivotal
    adapter given with its embedding file (``loose_partners``) is one checkpoint: the embedding is not judged
    alone."""
    if not sources:
        raise CheckpointError("nothing to evaluate: give run folders or adapter files")
    runs: list[RunInfo] = []
    checkpoints: list[EvalCheckpoint] = []
    if include_base:
        checkpoints.append(EvalCheckpoint(label="base", kind="base", path=None, hash="base", epoch=0))
    partners = loose_partners([Path(s) for s in sources if Path(s).is_file()])
    for source in sources:
        path = Path(source)
        if is_full_model(path):  # a fine-tuned model (kohya's DreamBooth writes one): judged as a whole
            checkpoints.append(EvalCheckpoint(label=path.stem if path.is_file() else path.name, kind="model",
                                              path=path, hash=model_hash(path)))
        elif path.is_dir():
            info = read_run(path, every, step_checkpoints)
            runs.append(info)
            checkpoints.extend(info.checkpoints)
        elif path not in partners.values():
            checkpoints.append(read_file_checkpoint(path, partners.get(path)))
    return _unique_labels(checkpoints), runs


def _as_trained(config: DataConfig, seed: int = 0) -> list[tuple[Path, str]]:
    """The training images of a data config, each with the caption the trainer reads (before shuffling and
    dropout; caption templates and a wildcard file's lines one line in turn), regularization images left out.
    Raises what reading the data raises (DatasetError, OSError)."""
    import warnings

    from lorakit.data import DatasetWarning, TrainingData

    with warnings.catch_warnings():  # the trainer said them when it read the data
        warnings.simplefilter("ignore", DatasetWarning)
        data = TrainingData(replace(config, verify_images=False), seed=seed,
                            default_resolution=config.resolution or 512)
    pairs: list[tuple[Path, str]] = []
    for record in data.records:
        if not record.is_reg:
            lines = record.caption.split("\n")
            pairs.append((record.path, lines[len(pairs) % len(lines)]))
    return pairs


def _toml_dataset_images(path: Path) -> list[tuple[Path, str]]:
    """The images of a kohya dataset TOML with their captions as the trainer reads them (its subsets' folders,
    caption files or metadata JSON, class tokens)."""
    from lorakit.data import DataConfig, DatasetError

    try:
        pairs = _as_trained(DataConfig(train_data=str(path)))
    except (DatasetError, OSError) as err:
        raise CheckpointError(f"{path}: the dataset cannot be read: {err}") from None
    if not pairs:
        raise CheckpointError(f"{path}: no images in the dataset")
    return pairs


def split_held_out(run: RunInfo) -> set[Path]:
    """The images the run's ``validation_split`` held out of its training folders (resolved paths; the split is
    drawn again as the trainer drew it, from the run's config.toml); empty when it held none out that way.
    CheckpointError when the run's data can no longer be read as it was."""
    from lorakit.config import ConfigError, load_config
    from lorakit.data import DatasetError, TrainingData

    try:
        cfg = load_config(run.path / "config.toml")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    source = cfg.data.train_data or ""
    if not cfg.data.validation_split and not source.endswith(".toml"):  # a dataset TOML may set it per dataset
        return set()
    cfg.data.validation_data, cfg.data.verify_images = None, False  # the split's own images only; sizes suffice
    try:
        data = TrainingData(cfg.data, seed=cfg.training.seed, default_resolution=cfg.data.resolution or 512)
    except (DatasetError, OSError) as err:
        raise CheckpointError(f"{run.path}: its validation split cannot be drawn again from {source}: {err}") from None
    return {data.records[i].path.resolve() for i in data.held_out}


def run_dataset_images(run: RunInfo) -> list[tuple[Path, str]] | None:
    """The images ``run`` trained on, each with the caption its trainer read (before shuffling and dropout), read
    from its config.toml as the trainer reads them: its caption_extension, a metadata JSON, a dataset TOML, the
    folders' or the run's trigger and class; caption templates (and a wildcard file's lines) one line in turn, as
    ``dataset_images`` gives them.  A validation split's images are included (``split_held_out`` names them).
    None when the run names no data or its data cannot be read any more."""
    from lorakit.config import ConfigError, load_config
    from lorakit.data import DatasetError

    try:
        cfg = load_config(run.path / "config.toml")
    except ConfigError:
        return None
    if not cfg.data.train_data:
        return None
    try:  # its own images only: no reg folder, no held-out folder, no class images to draw
        pairs = _as_trained(replace(cfg.data, validation_data=None, reg_data=None, num_class_images=0),
                            cfg.training.seed)
    except (DatasetError, OSError, ValueError):
        return None
    return pairs or None


def dataset_images(folder: str | Path, plain_caption: str | None = None, templates: str | None = None,
                   trigger: str | None = None) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a training folder (kohya layout or plain), captioned as the trainer captions
    them: the sibling ``.txt``; without one, the ``<trigger> <class>`` of the image's ``N_trigger class`` folder,
    or ``plain_caption`` for an image in any other folder ("" when it is None).  A run that trained on caption
    ``templates`` (data.caption_templates) gets them, in turn, filled with ``trigger`` (default: the folder's
    trigger word, as the trainer fills them).  Files and folders whose name starts with a dot are skipped, as the
    trainer skips them (macOS's ``._x.png``, ``.ipynb_checkpoints``); a caption file is read as the trainer reads
    it (a BOM, its first non-empty line; an empty one: the folder's words)."""
    from lorakit.data.captions import CAPTION_TEMPLATES, read_caption_file
    from lorakit.data.discovery import folder_phrase
    from lorakit.data.images import is_image

    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() == ".toml":
        return _toml_dataset_images(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: the dataset folder does not exist")
    pairs = []
    found = (p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for image in sorted(p for p in found if is_image(p)):
        caption_file = image.with_suffix(".txt")
        words = (trigger or folder_phrase(image.parent) or plain_caption or "").split()
        caption = ""
        if templates in CAPTION_TEMPLATES and words:
            lines = CAPTION_TEMPLATES[templates]
            caption = lines[len(pairs) % len(lines)].format(words[0])
        elif caption_file.is_file():
            try:
                caption = next(iter(read_caption_file(caption_file)), "")
            except UnicodeDecodeError as err:
                from lorakit.textfile import first_wrong_byte

                raise CheckpointError(f"{caption_file}: caption file is not UTF-8 text ({first_wrong_byte(err)}); "
                                      "save it as UTF-8") from None
        if not caption:
            caption = (folder_phrase(image.parent) if image.parent != folder else "") or plain_caption or ""
        pairs.append((image, caption))
    if not pairs:
        raise CheckpointError(f"{folder}: no images in the dataset folder")
    return pairs
