"""``lorakit eval RUN_OR_FILES... --prompts P --out DIR``: judge checkpoints the way the LyCORIS paper does.

Generates N images per prompt and seed for every checkpoint (a run's epochs, the base model as epoch 0, adapter
files), cached under ``DIR/cache`` so that nothing is generated twice; measures them with the chosen feature
extractors (and the shapes world's exact metrics when its reader is chosen); writes ``metrics.json``,
``metrics.csv`` and ``report.html`` into DIR.  Every input is checked before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.commands.arg_types import finite_float, positive_int
from lorakit.commands.prompt_options import add_prompt_reading_arguments
from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from PIL import Image


class EvalCommandError(LorakitError, ValueError):
    """A command-line value that cannot work; the message names it."""


class EvalInterrupted(LorakitError):
    """Ctrl-C while images are generated: they are cached, so the same command continues."""

    exit_code = 130


HELP = "judge checkpoints: generate, measure, rank; metrics and an HTML report"


def _call_fingerprint(keys: dict[str, list[str]], extractors: list[tuple[str, str | None]], data: Path | None,
                      shap: bool, held_out: str | None = None) -> str:
    """One hash of what an evaluation measures: every image (the cache keys name base model, checkpoint, prompt,
    seed and sampler), the extractors, the dataset and the options that change the numbers."""
    import hashlib
    import json

    fields = {"images": keys, "extractors": sorted(f"{k}={p or ''}" for k, p in extractors),
              "data": str(data) if data else None, "shap": shap}
    if held_out is not None:  # absent, the fingerprint of an evaluation from before the option
        fields["held_out"] = held_out
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _check_out_folder(out: Path, call: str, overwrite: bool) -> None:
    """An evaluation already in ``out`` is replaced only when it is the same call (continued) or when asked."""
    import json

    previous = out / "metrics.json"
    present = [name for name in ("metrics.json", "metrics.csv", "report.html") if (out / name).exists()]
    if overwrite or not present:
        return
    if not previous.is_file():  # someone's own page or table of that name: not an evaluation's to replace
        raise EvalCommandError(f"--out {out}: holds {', '.join(present)}, which no evaluation wrote there (no "
                               "metrics.json); choose another --out, or pass --overwrite to replace them")
    try:
        made_by = json.loads(previous.read_text(encoding="utf-8")).get("setup", {}).get("call")
    except (OSError, ValueError, AttributeError):
        made_by = None
    if made_by != call:
        raise EvalCommandError(f"--out {out}: holds an evaluation of other checkpoints or settings (metrics.json, "
                               "metrics.csv, report.html); choose another --out, or pass --overwrite to replace it")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="RUN_OR_FILE",
                        help="training run folders (every saved epoch: adapter, native, textual inversion or "
                             "pivotal runs) and/or adapter or embedding .safetensors files (a pivotal adapter "
                             "whose embedding is not beside it under the trainer's name: give both files)")
    parser.add_argument("--out", required=True, type=Path, help="folder for metrics.json, metrics.csv, report.html")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="prompt file (.toml, .txt 'type: prompt' lines, or the world's prompts.json); "
                             "default: prompts made from the dataset's captions")
    parser.add_argument("--model", default=None, help="base model (default: the built-in shapes-world model)")
    parser.add_argument("--vae", default=None, help="another VAE for the base model (kohya's --vae: a .safetensors "
                                                    "VAE or a diffusers VAE folder)")
    parser.add_argument("--embedding", action="append", default=[], type=Path, metavar="FILE",
                        help="a textual-inversion embedding added for every checkpoint, the base model too (a "
                             "negative embedding the prompts name, say); its word is the token the file names, "
                             "else its file name; repeatable")
    parser.add_argument("--extractor", action="append", default=[], metavar="KIND[=PATH]",
                        help="feature extractor, repeatable: clip=DIR, dinov2=DIR, vgg19=FILE.safetensors, "
                             "world-reader (default with the built-in model: world-reader)")
    parser.add_argument("--data", type=Path, default=None,
                        help="the concept's training images (default: the run's data.train_data)")
    parser.add_argument("--held-out", type=Path, default=None,
                        help="images of the concept never trained on: fidelity to them and the memorisation gap "
                             "(default: the run's data.validation_data)")
    parser.add_argument("--trigger", default=None, help="fills {trigger} in prompt templates")
    parser.add_argument("--seeds", type=positive_int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--steps", type=positive_int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--cfg", type=finite_float, default=7.0, help="CFG scale (default 7)")
    parser.add_argument("--sampler", default="ddim", help="sampler (default ddim; euler_a, dpm++_2m_karras, ...)")
    add_prompt_reading_arguments(parser, "checkpoints")
    parser.add_argument("--size", type=positive_int, default=None, help="image side (default: the model's native size)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="images generated at once (default 16; lower it when memory runs out)")
    parser.add_argument("--every", type=positive_int, default=1,
                        help="evaluate every k-th saved epoch (the last always)")
    parser.add_argument("--step-checkpoints", action="store_true",
                        help="also the runs' step checkpoints (training.save_every_n_steps), charted between "
                             "their epochs")
    parser.add_argument("--no-base", action="store_true", help="leave the base model (epoch 0) out")
    parser.add_argument("--cache", type=Path, default=None, help="image cache folder (default DIR/cache)")
    parser.add_argument("--shap", action="store_true",
                        help="SHAP analysis of which settings (algorithm, rank, lr, preset, epoch) drive the headline "
                             "metrics (optional extra: pip install 'lorakit[shap]')")
    parser.add_argument("--ocr", action="store_true",
                        help="OCR text check on prompts whose expected attributes have a text (the word the image "
                             "must show; optional extra: pip install 'lorakit[ocr]')")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an evaluation of other checkpoints or settings in --out (the same call again "
                             "continues it without this)")


def parse_extractor(spec: str) -> tuple[str, str | None]:
    kind, eq, path = spec.partition("=")
    kind = kind.strip()
    if not kind:
        raise EvalCommandError(f"--extractor {spec!r}: expected KIND or KIND=PATH")
    return kind, (path.strip() or None) if eq else None


def _prompt_set(args: argparse.Namespace, runs, data: Path | None, pairs: list[tuple[Path, str]]):
    """``--prompts`` (its own trigger first; the runs' or the dataset folder's only when it names none), else a set
    made from the dataset's captions and trigger."""
    from lorakit.data.discovery import kohya_phrase
    from lorakit.evaluate.prompts import PromptSetError, default_prompt_set, load_prompt_set

    # an embedding's token is the word its prompts must hold (a TI run may name it only in method.ti_token)
    trigger = args.trigger or next((r.trigger or r.token for r in runs if r.trigger or r.token), None) \
        or (kohya_phrase(data) if data else None)
    if args.prompts is not None:
        try:
            return load_prompt_set(args.prompts, trigger=args.trigger)
        except PromptSetError:
            if args.trigger is not None or not trigger:
                raise
            return load_prompt_set(args.prompts, trigger=trigger)
    if not pairs or not trigger:
        raise EvalCommandError("no --prompts given and no dataset captions and trigger to make default prompts "
                               "from: pass --prompts FILE (or --data DIR and --trigger WORD)")
    return default_prompt_set([c for _, c in pairs if c], trigger)


def _check_optional_extras(args: argparse.Namespace) -> None:
    """--shap and --ocr need optional packages: said before anything is generated."""
    if args.shap:
        try:
            import catboost  # noqa: F401
            import shap  # noqa: F401
        except ImportError:
            raise EvalCommandError("--shap needs the optional extra 'shap' (catboost and shap): "
                                   "pip install 'lorakit[shap]'") from None
    if args.ocr:
        try:
            import rapidocr_onnxruntime  # noqa: F401
        except ImportError:
            raise EvalCommandError("--ocr needs the optional extra 'ocr' (rapidocr-onnxruntime 1.x): "
                                   "pip install 'lorakit[ocr]'") from None


def _extractor_specs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The --extractor choices; the world reader by default, on the built-in model only."""
    from lorakit.models import is_builtin_model

    specs = [parse_extractor(s) for s in args.extractor]
    if specs:
        return specs
    if not is_builtin_model(args.model):
        raise EvalCommandError("choose a feature extractor: --extractor clip=DIR, dinov2=DIR, vgg19=FILE "
                               "(world-reader is the default only for the built-in model)")
    return [("world-reader", None)]


def _load_measures(args: argparse.Namespace, specs: list[tuple[str, str | None]]) -> tuple[dict, list]:
    """The loaded extractors (a kind chosen twice gets a numbered name) and the metric providers (the world's
    exact metrics with its reader, OCR when asked)."""
    from lorakit.evaluate.extractors import load_extractor
    from lorakit.evaluate.pipeline import load_metric_provider

    extractors = {}
    for kind, path in specs:
        extractors[kind if kind not in extractors else f"{kind}-{len(extractors)}"] = load_extractor(kind, path)
    providers = [load_metric_provider("world")] if any(k == "world-reader" for k, _ in specs) else []
    if args.ocr:
        providers.append(load_metric_provider("ocr"))
    return extractors, providers


def _held_out_folder(args: argparse.Namespace, runs) -> Path | None:
    """``--held-out``, else the runs' validation folder (data.validation_data) where one exists."""
    if args.held_out is not None:
        if not args.held_out.is_dir():
            raise EvalCommandError(f"--held-out {args.held_out}: no such folder")
        return args.held_out
    return next((Path(r.held_out) for r in runs if r.held_out and Path(r.held_out).is_dir()), None)


def _data_folder(args: argparse.Namespace, runs) -> Path | None:
    if args.data is not None:
        return args.data
    for r in runs:
        if r.data:
            for candidate in (Path(r.data), r.path / r.data):
                if candidate.is_dir() or (candidate.is_file() and candidate.suffix.lower() == ".toml"):
                    return candidate  # a folder, or a kohya dataset TOML (read as the trainer reads it)
    return None


#: what the runs' config.toml says about the model their images come from: setting -> (flag, how it is said:
#: "trained on|with", the thing, the things)
_TRAINED_WITH = {"base": ("--model", "on", "base model", "base models"), "vae": ("--vae", "with", "VAE", "VAEs")}


def _trained_with(given: str | None, runs, setting: str) -> str | None:
    """``given`` (the flag's value); else the base model (``setting`` "base") or VAE ("vae") the runs were
    trained with (their config.toml), when they agree: an adapter is judged on the model it was trained for, not
    on the built-in one; else None (the built-in model, or the model's own VAE)."""
    if given is not None:
        return given
    flag, preposition, thing, things = _TRAINED_WITH[setting]
    values = {r.settings.get(setting) for r in runs}
    if not runs or values == {None}:
        return None
    if len(values) > 1:
        default = "the built-in model" if setting == "base" else "the model's own VAE"
        named = ", ".join(sorted(f"{r.name}: {r.settings.get(setting) or default}" for r in runs))
        raise EvalCommandError(f"the runs were trained {preposition} different {things} ({named}); evaluate them "
                               f"separately, or choose one with {flag}")
    value = values.pop()
    if not Path(value).expanduser().exists():
        raise EvalCommandError(f"the runs were trained {preposition} {value}, which is not there (moved?); pass "
                               f"{flag} PATH")
    print(f"lorakit eval: {thing} {value}, the one the runs were trained {preposition} ({flag} chooses another)")
    return value


def _base_weights(runs) -> tuple[tuple[str, float], ...]:
    """The adapters the runs' model had merged in before they trained (model.base_weights), when they agree: their
    checkpoints are judged on that model; () when none had any."""
    found = {r.base_weights for r in runs}
    if len(found) > 1:
        named = "; ".join(sorted(f"{r.name}: {', '.join(f'{f}:{m:g}' for f, m in r.base_weights) or 'none'}"
                                 for r in runs))
        raise EvalCommandError(f"the runs were trained on top of different base weights ({named}); evaluate them "
                               "separately")
    weights = found.pop() if found else ()
    for file, _ in weights:
        if not Path(file).expanduser().is_file():
            raise EvalCommandError(f"the runs were trained on top of {file} (model.base_weights), which is not there "
                                   "(moved?)")
    return weights


def _schedule(model) -> str:
    """What of the model's schedule changes its images that its file's hash does not say."""
    return f"{model.prediction_type} zero-snr={bool(model.scheduler_config.get('rescale_betas_zero_snr', False))}"


def _dataset_rgb(found: list[tuple[Path, str]]) -> list[Image.Image]:
    """The dataset's images as the trainer saw them (upright by their EXIF orientation, transparency on white)."""
    from lorakit.data.images import load_rgb, unreadable_image

    out = []
    for path, _ in found:
        try:
            out.append(load_rgb(path))
        except (OSError, SyntaxError, ValueError) as err:  # Pillow's errors for a file it cannot decode
            raise EvalCommandError(unreadable_image(path, err)) from None
    return out


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import lorakit.world.evaluation  # noqa: F401  (registers the world reader and the world's exact metrics)
    from lorakit.embeddings import expand_all
    from lorakit.evaluate.generate import (
        ImageCache,
        SamplerSettings,
        generate_all,
        image_keys,
        load_images,
        make_jobs,
    )
    from lorakit.evaluate.pipeline import add_importance, evaluate
    from lorakit.host_memory import keep_freed_memory
    from lorakit.sample import long_prompts_note, trained_text_settings

    # everything is checked before anything is written
    checkpoints, runs = _judged_sources(args)
    base_weights = _base_weights(runs)
    refs = _reference_images(args, runs)
    _check_optional_extras(args)
    specs = _extractor_specs(args)
    keep_freed_memory()  # each denoising step frees and takes back the same buffers (SD1.5 on the CPU: 6-17 % faster)
    extractors, providers = _load_measures(args, specs)
    text, said = trained_text_settings([c.path for c in checkpoints if c.path], args.clip_skip,
                                       args.max_token_length)
    settings = SamplerSettings(steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler, width=args.size,
                               height=args.size, **text)
    for line in said:
        print(f"lorakit eval: {line}")
    jobs = make_jobs(refs.prompt_set.prompts, args.seeds)
    model, embeddings, base_hash = _judging_model(args, checkpoints, base_weights, settings.clip_skip)
    if args.size is not None and args.size % model.size_multiple:  # sampling would round it, the record would not
        fits = sorted({max(model.size_multiple, args.size - args.size % model.size_multiple),
                       args.size - args.size % model.size_multiple + model.size_multiple})
        raise EvalCommandError(f"--size {args.size}: this model draws sides that are multiples of "
                               f"{model.size_multiple}; give {' or '.join(map(str, fits))}")
    if note := long_prompts_note(model, [t for p in refs.prompt_set.prompts for t in (p.text, p.negative)],
                                 settings.max_token_length):
        print(f"lorakit eval: {note}")

    # what this call measures; the same call again continues it, another one does not replace it unasked
    call = _call_fingerprint(image_keys(base_hash, checkpoints, jobs, settings), specs, refs.data, args.shap,
                             refs.held_what or None)
    with _out_folder_held(args.out):
        _check_out_folder(args.out, call, args.overwrite)  # once held: another call may have written it meanwhile
        cache = ImageCache(args.cache or args.out / "cache")
        try:
            paths, stats = generate_all(model, base_hash, checkpoints, jobs, settings, cache,
                                        batch_size=args.batch_size, progress=not args.quiet,
                                        words=lambda text: expand_all(text, embeddings))
        except KeyboardInterrupt:
            raise EvalInterrupted(f"interrupted; the images made so far are kept in {cache.folder}: the same command "
                                  "continues from them (no image is made twice)") from None
        images = load_images(paths)
        setup = _setup_table(args, refs, settings, specs, embeddings, model.resolution, len(jobs) * len(checkpoints),
                             stats, call)
        result = evaluate(checkpoints, runs, jobs, images, extractors, refs.data_images, providers, args.seeds, setup,
                          refs.held_out_images)
        if args.shap:
            add_importance(result)
        result.setup["seconds total"] = round(time.perf_counter() - started, 2)
        lines, written = _write_results(args, result, jobs, images, refs.prompt_set)
        spi = stats.seconds_per_image
        print(f"lorakit eval: {len(checkpoints)} checkpoints × {len(refs.prompt_set.prompts)} prompts × {args.seeds} "
              f"seed(s) = {len(jobs) * len(checkpoints)} images ({stats.made} generated"
              + (f", {spi:.3f} s each" if spi else "") + f"; {stats.cached} from the cache {cache.folder})")
        for line in lines:
            print("  " + line)
        for path in written:
            print(f"  wrote {path}")
        for line in _report_hints(runs, args.out):
            print(line)
        return 0


@contextmanager
def _out_folder_held(out: Path) -> Iterator[None]:
    """--out locked for the call: two calls writing one folder at once would leave the metrics of one beside the
    page of the other.  A folder made for a call that wrote nothing into it is removed again."""
    from lorakit.checkpoints import FolderLock, folder_for_call

    with folder_for_call(out):
        lock = FolderLock(out, "is in use by another lorakit command (an eval writing its results there, or a run): "
                               "wait for it to end, or choose another --out")
        try:
            yield
        finally:
            lock.release()


def _judged_sources(args: argparse.Namespace) -> tuple[list, list]:
    """The checkpoints and runs the sources name, with --out checked against them; --model and --vae filled in
    from the runs' own settings when not given."""
    from lorakit.evaluate.checkpoints import discover

    if args.out.exists() and not args.out.is_dir():
        raise EvalCommandError(f"--out {args.out}: exists and is not a folder")
    checkpoints, runs = discover(args.sources, include_base=not args.no_base, every=args.every,
                                 step_checkpoints=args.step_checkpoints)
    out = args.out.resolve()
    for run in runs:  # its report.html, its manifest's files: an evaluation is kept beside a run, not in it
        if run.path.resolve() == out or run.path.resolve() in out.parents:
            raise EvalCommandError(f"--out {args.out}: inside the run {run.path} being judged (its own report.html "
                                   f"and files are there); write the evaluation beside it: --out {run.path}-eval")
    for run in runs:
        if run.step_checkpoints_left_out:
            print(f"lorakit eval: {run.name} also holds {run.step_checkpoints_left_out} step checkpoint(s), not "
                  "compared (--step-checkpoints to compare them too)")
    args.model = _trained_with(args.model, runs, "base")
    args.vae = _trained_with(args.vae, runs, "vae")
    return checkpoints, runs


@dataclass
class _References:
    """What the samples are measured against: the training images, the held-out ones, and the prompts."""
    data: Path | None
    prompt_set: Any
    data_images: list[Image.Image]
    held_out_images: list[Image.Image]
    held_what: str  # where the held-out images come from, for the report ("" when there are none)


def _reference_images(args: argparse.Namespace, runs) -> _References:
    """The runs' training images as their trainer read them (captions included), the held-out images, and the
    prompt set; every image read now, so that one that cannot be read stops the call before any is made."""
    from lorakit.evaluate.checkpoints import dataset_images, run_dataset_images, split_held_out

    data = _data_folder(args, runs)
    # an image with no caption file was trained on its run's --trigger/--class words: the default prompts too
    plain_caption = next((r.plain_caption for r in runs if r.plain_caption), None) or args.trigger
    # a run that trained on caption templates (textual inversion without captions): its images captioned so
    templated = next((r for r in runs if r.caption_templates), None)
    captioning = {"templates": templated.caption_templates, "trigger": templated.trigger} if templated else {}
    # a run's images as its trainer read them (its caption settings, a metadata JSON); --data, or a run whose data
    # no longer reads as it did: the folder as the trainer reads a kohya folder
    pairs = next((found for r in runs if args.data is None and (found := run_dataset_images(r)) is not None), None)
    if pairs is None:
        pairs = dataset_images(data, plain_caption, **captioning) if data is not None else []
    held_out = _held_out_folder(args, runs)
    held_out_pairs = dataset_images(held_out, plain_caption, **captioning) if held_out is not None else []
    # images a validation_split held out are not the data the runs learned from: they join the held-out ones
    split = set().union(*(split_held_out(r) for r in runs)) if pairs else set()
    held_out_pairs += [(p, c) for p, c in pairs if p.resolve() in split]
    pairs = [(p, c) for p, c in pairs if p.resolve() not in split]
    held_what = ", ".join(([str(held_out)] if held_out is not None else [])
                          + ([f"{len(split)} by validation_split"] if split else []))
    prompt_set = _prompt_set(args, runs, data, pairs)
    return _References(data, prompt_set, _dataset_rgb(pairs), _dataset_rgb(held_out_pairs), held_what)


def _judging_model(args: argparse.Namespace, checkpoints: list, base_weights: tuple[tuple[str, float], ...],
                   clip_skip: int) -> tuple[Any, list, str]:
    """The base model as the runs trained on it (their VAE, base weights, schedule), the --embedding files added,
    every checkpoint checked to fit it; with the hash that names its images in the cache."""
    from lorakit.embeddings import load_embedding
    from lorakit.evaluate.checkpoints import file_hash, model_hash
    from lorakit.evaluate.generate import check_checkpoints
    from lorakit.models import check_clip_skip, load_base_model
    from lorakit.sample import adopt_trained_schedule
    from lorakit.tools.merge import merge_base_weights
    from lorakit.vae import use_vae

    model = load_base_model(args.model)
    use_vae(model, args.vae)
    for line in merge_base_weights(model, base_weights):
        print(f"lorakit eval: base weights, as the runs were trained: {line}")
    check_clip_skip(model, clip_skip)
    own_schedule = _schedule(model)
    for line in adopt_trained_schedule(model, [c.path for c in checkpoints if c.path]):
        print(f"lorakit eval: {line}")
    embeddings = [load_embedding(model, path, default_token=path.stem) for path in args.embedding]
    for path, loaded in zip(args.embedding, embeddings, strict=True):  # one word cannot stand for two embeddings
        same = next((c.label for c in checkpoints if c.token == loaded.token), None)
        if same is not None:
            raise EvalCommandError(f"--embedding {path}: it is called {loaded.token!r}, as {same}'s embedding is; "
                                   "compare it as a checkpoint instead (give the file without --embedding)")
    check_checkpoints(model, checkpoints)  # a file that does not fit fails here, before any image is made

    def rehashed(base: str, what: str) -> str:
        return hashlib.sha256(f"{base} {what}".encode()).hexdigest()[:16]

    base_hash = model_hash(args.model)
    if args.vae:  # another VAE decodes other images (the key is unchanged without one: old caches stay valid)
        base_hash = rehashed(base_hash, f"vae {model_hash(args.vae)}")
    for file, multiplier in base_weights:  # merged into the model: every image changes
        base_hash = rehashed(base_hash, f"base weights {file_hash(Path(file))}:{multiplier}")
    if _schedule(model) != own_schedule:  # the base model's own images change with its schedule too
        base_hash = rehashed(base_hash, f"schedule {_schedule(model)}")
    for path, loaded in zip(args.embedding, embeddings, strict=True):  # they change every checkpoint's images
        base_hash = rehashed(base_hash, f"embedding {loaded.token} {file_hash(path)}")
    return model, embeddings, base_hash


def _setup_table(args: argparse.Namespace, refs: _References, settings, specs: list[tuple[str, str | None]],
                 embeddings: list, resolution: int, images: int, stats, call: str) -> dict[str, Any]:
    """How the evaluation was made, as the report's settings table shows it."""
    prompt_set = refs.prompt_set
    return {"prompts": prompt_set.source, "concept": prompt_set.concept, "trigger": prompt_set.trigger,
            "prompt count": len(prompt_set.prompts), "seeds": args.seeds, "steps": settings.steps,
            "cfg": settings.cfg_scale, "sampler": settings.sampler, "clip skip": settings.clip_skip,
            "max token length": settings.max_token_length,
            "size": args.size or resolution,
            "base model": args.model or "builtin", "data": str(refs.data) if refs.data else None,
            **({"embeddings": ", ".join(f"{p} ({e.token})" for p, e in zip(args.embedding, embeddings, strict=True))}
               if embeddings else {}),
            "data images": len(refs.data_images),
            **({"held-out images": len(refs.held_out_images), "held out": refs.held_what} if refs.held_what else {}),
            "extractors": ", ".join(f"{k}={p or ''}".rstrip("=") for k, p in specs),
            "images": images, "generated": stats.made, "cached": stats.cached,
            "seconds generating": round(stats.seconds, 2),
            "seconds per generated image": None if stats.seconds_per_image is None
            else round(stats.seconds_per_image, 4), "call": call}


def _write_results(args: argparse.Namespace, result, jobs: list, images: dict,
                   prompt_set) -> tuple[list[str], list[Path]]:
    """metrics.json, metrics.csv and report.html in --out, each written whole or not at all; returns the summary
    lines (the page shows them too) and the files written."""
    from lorakit.atomic import atomic_write_json, atomic_write_text
    from lorakit.evaluate.pipeline import headline_metrics, metrics_csv, summary_lines
    from lorakit.evaluate.report import page_from_eval, render_html

    lines = summary_lines(result, headline_metrics(result))
    html_text = render_html(page_from_eval(result, jobs, images, title=f"lorakit eval: {prompt_set.concept}",
                                           summary=lines))
    args.out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_json(args.out / "metrics.json", result.to_dict()),
               atomic_write_text(args.out / "metrics.csv", metrics_csv(result)),
               atomic_write_text(args.out / "report.html", html_text)]
    return lines, written


def _report_hints(runs, out: Path) -> list[str]:
    """How to see this ranking on each evaluated run's own page (``lorakit report`` finds ``RUN-eval`` itself)."""
    import shlex

    hints = []
    for r in runs:
        beside = r.path.parent / f"{r.path.resolve().name}-eval"
        found = beside.resolve() == out.resolve()
        command = f"lorakit report {shlex.quote(str(r.path))}" + ("" if found else f" --eval {shlex.quote(str(out))}")
        hints.append(f"  on the run's page, with where its turning point ranks: {command}")
    return ["next:", *hints] if hints else []
