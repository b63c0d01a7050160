"""Measured overfitting on the shapes world: train past the point, score every epoch's checkpoint.

``run`` trains an adapter on a concept of the shapes world (``--concept``: "zkz", the star, or "vlx", the heart)
with CS-Fluctuation in report mode (it records where it would stop, but never stops), then scores the base model
(epoch 0) and every epoch's checkpoint on the concept's evaluation prompts with the exact world metrics. From the
scores:

- ``onset``: the measured overfitting onset, the epoch where success on prompts that ask for something the
  training set never shows (the star drawn *and* the new color, position or background obeyed) peaks —
  after it, the concept keeps being drawn (fidelity holds or rises) while the requested changes are ignored
  more and more;
- the CS-Fluctuation turning point of the same run, replayed from its recorded CS series under any rule.

``lorakit world experiment --help`` runs one curve; ``docs/`` has the tables made with it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from lorakit.atomic import atomic_folder, atomic_write_json
from lorakit.checkpoints import RunFolder
from lorakit.commands.arg_types import comma_list, non_negative_int, positive_float, positive_int
from lorakit.config import TrainConfig
from lorakit.earlystop import History, SecondValley
from lorakit.earlystop.replay import COMPARED_RULES, replay
from lorakit.earlystop.rules import SIZE_SERIES
from lorakit.evaluate.checkpoints import EvalCheckpoint, file_hash, model_hash
from lorakit.evaluate.generate import ImageCache, SamplerSettings, generate_all, load_images, make_jobs
from lorakit.evaluate.prompts import EvalPrompt as Prompt
from lorakit.models import BaseModel, load_base_model
from lorakit.sample import SamplePrompt
from lorakit.train import train
from lorakit.world import concept
from lorakit.world.concept import Concept
from lorakit.world.metrics import image_outcomes, metrics_from_readings, read_images
from lorakit.world.onset import CHANGES, REACH, measure_onset, peak_epoch, smooth_rows
from lorakit.world.recipe import recipe_config
from lorakit.world.update_sizes import checkpoint_spectral_sizes


def curve_config(out: Path, data: Path, algorithm: str = "lora", lr: float = 1e-3, seed: int = 0,
                 epochs: int = 20, rank: int = 8, model: str | None = None, preset: str = "full") -> TrainConfig:
    cfg = recipe_config()
    cfg.model.base = model
    cfg.data.train_data = str(data)
    cfg.network.algorithm = algorithm
    cfg.network.preset = preset
    cfg.network.rank = rank
    cfg.network.alpha = float(rank)
    if algorithm == "lokr":
        cfg.network.args = {"factor": 4}
    cfg.optimizer.learning_rate = lr
    cfg.training.max_epochs = epochs
    cfg.training.seed = seed
    cfg.early_stop.mode = "report"
    cfg.output.dir = str(out)
    cfg.output.if_exists = "resume"  # an interrupted experiment continues
    return cfg


def eval_samples(seeds_per_prompt: int, types: tuple[str, ...] | None = None, the_concept: Concept = concept.ZKZ
                 ) -> tuple[list[SamplePrompt], list[concept.EvalPrompt]]:
    """The concept's evaluation prompts (of ``types`` only, if given), each with ``seeds_per_prompt`` seeds."""
    prompts = [p for p in concept.eval_prompts(the_concept) if types is None or p.type in types]
    if not prompts:
        raise ValueError(f"no evaluation prompts of types {types}; known: {', '.join(concept.PROMPT_TYPES)}")
    samples, labels = [], []
    for p in prompts:
        for k in range(seeds_per_prompt):
            samples.append(SamplePrompt(p.prompt, p.negative, seed=p.seed + 10_000 * k, steps=concept.SAMPLE_STEPS,
                                        cfg_scale=concept.SAMPLE_CFG))
            labels.append(p)
    return samples, labels


def score(model: BaseModel, seeds_per_prompt: int, adapter: Path | None = None,
          types: tuple[str, ...] | None = None, cache: Path | None = None, base_hash: str = "base",
          the_concept: Concept = concept.ZKZ) -> dict:
    """World metrics of the model (with ``adapter`` applied, if given) on the concept's evaluation prompts
    (of ``types`` only, if given).  Images are made by ``lorakit.evaluate``'s generation path; with ``cache`` a
    folder they are kept there under the same keys ``lorakit eval --cache`` uses, so neither makes them twice."""
    _, labels = eval_samples(1, types, the_concept)
    prompts = [Prompt(p.prompt, p.type, seed=p.seed, negative=p.negative, expected=p.expected, changes=p.changes)
               for p in labels]
    jobs = make_jobs(prompts, seeds_per_prompt)  # seeds p.seed + 10_000 k, as eval_samples
    checkpoint = EvalCheckpoint("base", "base", None, "base", epoch=0) if adapter is None else \
        EvalCheckpoint(Path(adapter).stem, "adapter", Path(adapter), file_hash(Path(adapter)))
    settings = SamplerSettings(steps=concept.SAMPLE_STEPS, cfg_scale=concept.SAMPLE_CFG)
    with tempfile.TemporaryDirectory() as tmp:
        paths, _ = generate_all(model, base_hash, [checkpoint], jobs, settings, ImageCache(cache or tmp),
                                batch_size=32, progress=False)
        images = load_images(paths)[checkpoint.label]
    image_prompts = [labels[j.prompt_index] for j in jobs]
    readings, pixels = read_images(images)
    metrics = metrics_from_readings(readings, image_prompts, pixel_features=pixels,
                                    concept_shape=the_concept.shape).as_dict()
    # per image, so the onset's bootstrap can resample prompts (lorakit.world.onset)
    return {**metrics, "outcomes": image_outcomes(readings, image_prompts, concept_shape=the_concept.shape)}


def score_run(run_dir: Path, model_spec: str | None = None, seeds_per_prompt: int = 2,
              every: int = 1, types: tuple[str, ...] | None = None, the_concept: Concept = concept.ZKZ,
              rescore: bool = False) -> list[dict]:
    """Scores of epoch 0 (the base model) and of every ``every``-th saved epoch, cached in ``run_dir/curve.json``
    (a cache scored on other prompts or seeds is an error, not something to mix in).  ``rescore`` scores every
    epoch again: the images come back from ``run_dir/eval_cache`` (only missing ones are generated), so a new
    reader or outcome reads the same pictures."""
    cache = run_dir / "curve.json"
    rows = json.loads(cache.read_text()) if cache.exists() and not rescore else []
    scoring = {"types": sorted(types) if types else None, "seeds_per_prompt": seeds_per_prompt,
               "concept": the_concept.name}
    for r in rows:
        was = {"types": r.get("types"), "seeds_per_prompt": r.get("seeds_per_prompt", seeds_per_prompt),
               "concept": r.get("concept", concept.ZKZ.name)}  # rows from before the second concept: zkz
        if was != scoring:
            raise ValueError(f"{cache}: epoch {r['epoch']} was scored with {was}, not {scoring}; "
                             "move the file away to score again")
    done = {r["epoch"] for r in rows}

    model = load_base_model(model_spec)
    base_hash = model_hash(model_spec)
    checkpoints = [(0, None)] + [(c.epoch, c.tensors_path) for c in RunFolder(run_dir, "resume").checkpoints()]
    last = checkpoints[-1][0]
    for epoch, path in checkpoints:
        if epoch in done or (epoch % every and epoch != last):
            continue
        rows.append({"epoch": epoch, **scoring, **score(model, seeds_per_prompt, path, types,
                                                        cache=run_dir / "eval_cache", base_hash=base_hash,
                                                        the_concept=the_concept)})
        rows.sort(key=lambda r: r["epoch"])
        atomic_write_json(cache, rows)
    return rows


def smooth(values: list[float], width: int = 3) -> np.ndarray:
    """Centred moving average (shorter at the ends): the scores of neighbouring epochs are noisy."""
    return smooth_rows(np.asarray(values, dtype=float), width)[0]


#: the attributes whose change defines the issue's overfitting onset (alter prompts: new color or position)
ALTER_CHANGES = ("color", "position")


def change_success(row: dict, changes: tuple[str, ...] = ALTER_CHANGES) -> float:
    """Success (concept drawn AND the change obeyed) pooled over the prompts that change any of ``changes``,
    each attribute weighted by its number of images; 0 where no scored prompt changes them."""
    pairs = [(row.get("success_by_change", {}).get(a), row.get("counts_by_change", {}).get(a, 0))
             for a in changes]
    pairs = [(v, n) for v, n in pairs if v is not None and n > 0 and not np.isnan(v)]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else 0.0


def overfitting_onset(rows: list[dict], changes: tuple[str, ...] = ALTER_CHANGES) -> int:
    """The epoch (≥ 1) where smoothed success on prompts changing ``changes`` peaks."""
    success = np.array([change_success(r, changes) for r in rows])
    return int(peak_epoch([r["epoch"] for r in rows], success[None])[0])


def _recorded_history(run_dir: Path) -> History | None:
    path = run_dir / "cs_history.json"
    return History.from_dict(json.loads(path.read_text())) if path.exists() else None


def turning_epoch(run_dir: Path, rule=None, alignment: str | int = "centre", window_epochs: int = 1,
                  history: History | None = None) -> dict | None:
    """Replay CS-Fluctuation on the run's recorded CS series under ``rule``, with a window of ``window_epochs``
    times the recorded one (one epoch by default); the turning point's epoch.  ``history``: the run's record,
    when the caller has read it already."""
    h = history if history is not None else _recorded_history(run_dir)
    if h is None:
        return None
    # None for a size rule on a run recorded before the size was kept (lorakit.world.update_sizes replays it)
    tp = replay(h, rule or SecondValley(), window_epochs, alignment)
    if tp is None:
        return None
    steps_per_epoch = h.window  # the trainer's default window is one epoch of CS samples
    return {"step": tp.step, "epoch": tp.epoch, "found_at_step": tp.found_at_step,
            "found_at_epoch": -(-tp.found_at_step // steps_per_epoch)}


def replayed_turning_points(run_dir: Path) -> dict[str, dict | None]:
    """Every compared rule's turning point on the run (``turning_epoch``); a size rule from the checkpoints'
    sizes (or their record) where the trainer did not keep that size (the trainer keeps ‖ΔW‖/‖W‖ with every
    sample since it could, the spectral size only when its rule ran), replayed at epoch ends."""
    from lorakit.world.update_sizes import checkpoint_spectral_sizes, checkpoint_update_sizes, size_rule_epoch

    history = _recorded_history(run_dir)  # read once for every rule
    out = {}
    for name, (rule, window_epochs) in COMPARED_RULES.items():
        tp = None if history is None else turning_epoch(run_dir, rule, window_epochs=window_epochs, history=history)
        kept = history is not None and history.size(rule.series) is not None
        if tp is None and rule.series in SIZE_SERIES and not kept:
            sizes = (checkpoint_update_sizes if rule.series == "update" else checkpoint_spectral_sizes)(run_dir)
            epoch = size_rule_epoch(sizes, rule)
            tp = None if epoch is None else {"epoch": epoch, "found_at_epoch": epoch}
        out[name] = tp
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, required=True, help="the run folder (resumable)")
    ap.add_argument("--concept", default=concept.ZKZ.name, choices=list(concept.CONCEPTS),
                    help="zkz: the star every rule was designed on; vlx: the heart, kept for judging")
    ap.add_argument("--algorithm", default="lora", help="lora, locon, loha, lokr, ...")
    ap.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate")
    ap.add_argument("--seed", type=non_negative_int, default=0, help="training seed")
    ap.add_argument("--epochs", type=positive_int, default=20, help="epochs, all trained (no early stop)")
    ap.add_argument("--rank", type=positive_int, default=8, help="adapter rank")
    ap.add_argument("--preset", default="full", help="where adapters go (full: attention, MLP and convs = LoCon)")
    ap.add_argument("--model", default=None, help="base model (default: the built-in one)")
    ap.add_argument("--seeds-per-prompt", type=positive_int, default=2, help="images per prompt and epoch")
    ap.add_argument("--score-every", type=positive_int, default=1, help="score every k-th epoch's checkpoint")
    ap.add_argument("--types", default=None, type=comma_list(choices=concept.PROMPT_TYPES),
                    help="score only these prompt types, comma-separated (e.g. alter,style: the onset's prompts)")
    ap.add_argument("--rescore", action="store_true",
                    help="score every epoch again from the cached images (after a change to the reader or metrics)")
    ap.add_argument("--changes", default=",".join(ALTER_CHANGES), type=comma_list(choices=CHANGES),
                    help="attributes whose changed-prompt success defines the onset (color,position,background)")


def run(args: argparse.Namespace) -> int:
    the_concept = concept.get_concept(args.concept)
    data = args.out.parent / f"{the_concept.name}-data"
    if not data.exists():  # whole or not at all: a grid's runs share it, and one may be stopped while it renders
        with atomic_folder(data, same_if_there=True) as rendering:
            concept.write_concept_dataset(rendering, the_concept)
    cfg = curve_config(args.out, data, args.algorithm, args.lr, args.seed, args.epochs, args.rank, args.model,
                       args.preset)
    if not (args.out / "summary.json").exists():
        train(replace(cfg), progress=False)
    types = tuple(t.strip() for t in args.types.split(",")) if args.types else None
    changes = tuple(c.strip() for c in args.changes.split(","))
    rows = score_run(args.out, args.model, args.seeds_per_prompt, args.score_every, types, the_concept,
                     rescore=args.rescore)
    # a record beside the scores (the grid archives it; the checkpoints it is read from are not kept)
    checkpoint_spectral_sizes(args.out)
    for r in rows:
        print(f"epoch {r['epoch']:3d}  fidelity {r['fidelity']:.2f}  "
              f"success on changes ({args.changes}) {change_success(r, changes):.2f}  "
              f"control {r['controllability']:.2f}  leak {r['leak']:.2f}")
    onset = measure_onset(rows, changes)
    print(f"overfitting onset (first epoch at {REACH:.0%} of the peak of success on {args.changes} changes × "
          f"agnostic kept), 90% interval: epoch {onset}; the peak itself: epoch {onset.peak_text}")
    print("turning points replayed on this run (epoch of the turning point, epoch decided at): " + ", ".join(
        f"{name} {tp['epoch']}, {tp['found_at_epoch']}" if tp else f"{name} never"
        for name, tp in replayed_turning_points(args.out).items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.world.experiment``: ``lorakit world experiment`` itself (its messages, exit code)."""
    from lorakit.commands.world import run_as_script

    return run_as_script("experiment", argv)


if __name__ == "__main__":
    raise SystemExit(main())
