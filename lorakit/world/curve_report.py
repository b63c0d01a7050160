"""Tables and plots of overfitting-curve runs (``lorakit.world.experiment``): where each early-stopping rule
puts the turning point compared with the measured overfitting onset.

``lorakit world curve-report RUNS_DIR --update-doc docs/early_stopping.md --plot docs/curve.png``
reads every run folder under ``RUNS_DIR`` that has a ``curve.json``; ``--update-doc`` rewrites the page's generated
blocks (the headline table, the runs' table and lines) and leaves its prose alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorakit.commands.arg_types import comma_list
from lorakit.config import EarlyStopConfig, load_config
from lorakit.doc_blocks import update_doc_blocks
from lorakit.earlystop import samples as sample_stop
from lorakit.earlystop.replay import COMPARED_RULES
from lorakit.earlystop.rules import SIZE_SERIES, GrowthStall
from lorakit.errors import InvalidValueError, LorakitError
from lorakit.world.concept import CONCEPTS
from lorakit.world.experiment import change_success, replayed_turning_points, smooth
from lorakit.world.grid import DONE
from lorakit.world.onset import CHANGES, REACH, Onset, first_reaching, generalisation, measure_onset, prompt_counts
from lorakit.world.update_sizes import (
    budget_epoch,
    checkpoint_spectral_sizes,
    checkpoint_update_sizes,
    size_rule_epoch,
)

#: rule name -> (rule, window in epochs), the same set the language-model experiment replays
RULES = COMPARED_RULES

#: the changes the onset is measured on by default (``onset.CHANGES``).  Runs on the step-8000 model, which placed
#: objects at chance, were read with ``--changes color,background`` ("star AND new position" could not be told
#: apart from luck there).
MEASURABLE_CHANGES = CHANGES
#: the image counts the measurement ceiling is estimated at, as multiples of what each run scored per epoch
CEILING_MULTIPLES = (1, 2, 4)
#: presets that adapt the ResNet k×k convs (lorakit.network.PRESETS)
CONV_PRESETS = ("full", "lycoris-full")


@dataclass
class RunResult:
    name: str
    algorithm: str
    lr: float
    seed: int
    epochs: list[int]
    fidelity: list[float]
    change_success: list[float]  # concept drawn AND the new attribute obeyed, on prompts changing ``changes``
    changes: tuple[str, ...]
    control: list[float]
    color_control: list[float]
    onset_interval: Onset  # the onset with its bootstrap interval and the generalisation score per epoch
    leak: list[float]  # share of agnostic-prompt images showing the concept
    turning: dict[str, int | None]  # rule name -> turning-point epoch (None: never decided)
    found: dict[str, int | None]  # rule name -> epoch at which the rule had decided
    preset: str = "attn-only"
    concept: str = "zkz"  # the world concept it learned (lorakit.world.concept.CONCEPTS)
    images_per_epoch: int = 0  # images scored per epoch (0: rows without per-image outcomes)
    #: images multiple -> share of bootstrap onsets within ±1 epoch of the measured one (``Onset.reproduced``)
    reproduced: dict[int, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The adapter as users name it: a LoRA on a preset with the ResNet convs is a LoCon."""
        return "locon" if self.algorithm == "lora" and self.preset in CONV_PRESETS else self.algorithm

    @property
    def onset(self) -> int:
        return self.onset_interval.epoch

    @property
    def fidelity_peak(self) -> int:
        """The epoch where smoothed fidelity peaks (the concept is learned best; later it degrades)."""
        smoothed = smooth(self.fidelity)
        return self.epochs[max(range(len(self.epochs)), key=lambda i: (smoothed[i], -i))]

    def at(self, epoch: int | None, series: list[float]) -> float | None:
        """The series at the scored epoch nearest ``epoch``."""
        if epoch is None:
            return None
        i = min(range(len(self.epochs)), key=lambda k: (abs(self.epochs[k] - epoch), self.epochs[k]))
        return series[i]


def load_run(run_dir: Path, changes: tuple[str, ...] = MEASURABLE_CHANGES) -> RunResult:
    rows = sorted(json.loads((run_dir / "curve.json").read_text()), key=lambda r: r["epoch"])
    onset = measure_onset(rows, changes)
    reproduced = {} if onset.reproduced is None else {
        k: onset.reproduced if k == 1 else measure_onset(rows, changes, images=k).reproduced for k in CEILING_MULTIPLES}
    cfg = load_config(run_dir / "config.toml")
    turning, found = {}, {}
    for name, tp in replayed_turning_points(run_dir).items():
        turning[name] = None if tp is None else tp["epoch"]
        found[name] = None if tp is None else tp["found_at_epoch"]
    return RunResult(
        name=run_dir.name, algorithm=cfg.network.algorithm, lr=cfg.optimizer.learning_rate,
        seed=cfg.training.seed, epochs=[r["epoch"] for r in rows],
        fidelity=[r["fidelity"] for r in rows],
        change_success=[change_success(r, changes) for r in rows], changes=changes,
        control=[r["controllability"] for r in rows],
        color_control=[r["controllability_by_attribute"].get("color", 0.0) for r in rows],
        onset_interval=onset, leak=[r.get("leak", 0.0) for r in rows],
        turning=turning, found=found, preset=cfg.network.preset, concept=rows[0].get("concept", "zkz"),
        images_per_epoch=len(rows[-1].get("outcomes", [])), reproduced=reproduced)


def find_runs(root: Path, changes: tuple[str, ...] = MEASURABLE_CHANGES,
              finished_only: bool = False) -> list[RunResult]:
    """Every run under ``root`` with at least one scored checkpoint (runs still training are left out); with
    ``finished_only``, only the runs a grid marked finished (``grid_done``: every epoch scored)."""
    scored = [p for p in sorted(root.glob("*/curve.json")) if any(r["epoch"] >= 1 for r in json.loads(p.read_text()))]
    if finished_only:
        scored = [p for p in scored if (p.parent / DONE).exists()]
    return [load_run(p.parent, changes) for p in scored]


def no_runs_reason(root: Path, finished_only: bool) -> str:
    """Why ``find_runs`` found nothing under ``root``, said so that the user can tell a wrong folder from runs that
    are not scored (or not finished) yet."""
    if not root.is_dir():
        return f"{root}: no such folder (give the folder of experiment runs, a grid's --out)"
    curves = sorted(root.glob("*/curve.json"))
    if not curves:
        return (f"{root}: no experiment runs in this folder (none of its folders holds a curve.json; give the folder "
                "of experiment runs, a grid's --out)")
    if finished_only:
        return (f"{root}: none of its {len(curves)} runs is finished (no {DONE} file, which a grid writes once every "
                "epoch is scored): wait for the grid, or leave out --finished-only")
    return f"{root}: none of its {len(curves)} runs has a scored epoch after epoch 0 yet"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(runs: list[RunResult]) -> str:
    changes = " or ".join(runs[0].changes) if runs else "?"
    head = (f"| run | onset [90% interval] = first epoch at {REACH:.0%} of the peak of success on new {changes} × "
            "agnostic kept: epoch (success / fidelity); the peak [90% interval]; share of resampled onsets within "
            "±1 epoch | "
            "fidelity peak: epoch (success / fidelity) | second valley TP: epoch, decided at "
            "(success / fidelity) | calm rule TP: epoch, decided at (success / fidelity) | "
            "budget rule TP: epoch, decided at (success / fidelity) | spectral budget rule (the trainer's default) TP: "
            "epoch, decided at (success / fidelity) | growth-stall rule TP: epoch, decided at (success / fidelity) | "
            "epoch 0 → last: success, fidelity, control |")
    lines = [head, "|" + "---|" * 9]

    def cell(r: RunResult, epoch: int | None, found: int | None = None, interval: Onset | None = None) -> str:
        if epoch is None:
            return "never"
        when = f", {found}" if found is not None else ""
        shown = str(interval) if interval is not None else f"{epoch}"
        peak = f"; peak {interval.peak_text}" if interval is not None and interval.peak is not None else ""
        if interval is not None and interval.reproduced is not None:
            peak += f"; ±1 in {interval.reproduced:.0%}"
        return f"{shown}{when} ({_fmt(r.at(epoch, r.change_success))} / {_fmt(r.at(epoch, r.fidelity))}){peak}"

    for r in runs:
        lines.append(
            f"| {r.concept} {r.label} lr {r.lr:g} seed {r.seed} | {cell(r, r.onset, interval=r.onset_interval)} | "
            f"{cell(r, r.fidelity_peak)} | "
            f"{cell(r, r.turning['second-valley'], r.found['second-valley'])} | "
            f"{cell(r, r.turning['calm'], r.found['calm'])} | "
            f"{cell(r, r.turning['budget'], r.found['budget'])} | "
            f"{cell(r, r.turning['spectral-budget'], r.found['spectral-budget'])} | "
            f"{cell(r, r.turning['growth-stall'], r.found['growth-stall'])} | "
            f"{r.change_success[0]:.2f} → {r.change_success[-1]:.2f}, {r.fidelity[0]:.2f} → {r.fidelity[-1]:.2f}, "
            f"{r.control[0]:.2f} → {r.control[-1]:.2f} |")
    return "\n".join(lines) + "\n"


def summary_lines(runs: list[RunResult]) -> list[str]:
    """Per rule (and per concept, where the runs learned more than one): how often it fired, how far its
    turning point is from the measured onset (and from the fidelity peak), and how much of the onset's success
    the handed-back checkpoint keeps."""
    concepts = concepts_of(runs)
    if len(concepts) > 1:
        return [f"[{c}] {line}" for c in concepts for line in summary_lines([r for r in runs if r.concept == c])]
    out = [ceiling_line(runs)] if any(r.reproduced for r in runs) else []
    for name in RULES:
        fired = [r for r in runs if r.turning[name] is not None]
        if not fired:
            out.append(f"{name}: never fired in {len(runs)} runs")
            continue
        signed = [r.turning[name] - r.onset for r in fired]
        within = sum(abs(d) <= 2 for d in signed)
        within_one, mean = rule_count(runs, name)  # never-fired runs count as misses
        inside = sum(r.onset_interval.contains(r.turning[name], slack=1) for r in fired)
        to_peak = sum(abs(r.turning[name] - r.fidelity_peak) for r in fired) / len(fired)
        kept = success_kept(fired, name)
        out.append(f"{name}: {within_one}/{len(runs)} runs within ±1 epoch of the onset "
                   f"({inside}/{len(runs)} within ±1 of its interval); "
                   f"fired in {len(fired)}/{len(runs)} runs; TP - onset = {signed} epochs "
                   f"(mean |·| {mean:.1f}, {within} within 2 epochs, "
                   f"{sum(d < 0 for d in signed)} early, {sum(d > 0 for d in signed)} late); "
                   f"smoothed success at TP / at onset = {kept:.2f} (mean); "
                   f"mean |TP - fidelity peak| = {to_peak:.1f} epochs")
    out.append(fixed_epoch_baseline(runs))
    return out


def ceiling_line(runs: list[RunResult]) -> str:
    """How many runs a perfect rule (one that stops at each run's true onset) can expect to be counted within ±1
    epoch of the measured onset: the sum over runs of the share of bootstrap onsets within ±1 of the measured
    one; and the same if every epoch were scored on more images.  No rule's "N/M" can be judged above it."""
    measured = [r for r in runs if r.reproduced]
    images = sorted({r.images_per_epoch for r in measured})
    per = "/".join(str(n) for n in images)
    at = [f"≈{sum(r.reproduced[k] for r in measured):.1f}/{len(measured)} with {k}× as many"
          for k in CEILING_MULTIPLES if k > 1]
    return (f"ceiling (the measurement's, not a rule's): a rule stopping at every run's true onset would be counted "
            f"within ±1 epoch of the measured onset in ≈{sum(r.reproduced[1] for r in measured):.1f}/"
            f"{len(measured)} runs at the {per} images scored per epoch (bootstrap), {', '.join(at)}")


def concepts_of(runs: list[RunResult]) -> list[str]:
    """The concepts the runs learned, the star (the one the rules were designed on) first."""
    return sorted({r.concept for r in runs}, key=lambda c: (c != "zkz", c))


def _scores(rows: list[dict], changes: tuple[str, ...]) -> tuple[list[int], np.ndarray]:
    """The scored epochs and g at each, from the rows' per-image outcomes."""
    counts = prompt_counts(rows, changes)
    return list(counts.epochs), generalisation(counts)


def _onset_epoch(epochs: list[int], g: np.ndarray) -> int:
    """The onset's point estimate (``measure_onset(...).epoch`` without its bootstrap)."""
    return int(first_reaching(epochs, g[None], REACH)[0])


def images_of_seeds(rows: list[dict], keep: set[int]) -> list[dict]:
    """The rows with only the images of the ``keep``-th seeds of each prompt (a prompt's images are scored in
    seed order, ``lorakit.evaluate.generate.make_jobs``)."""
    out = []
    for row in rows:
        seen: dict[tuple[str, str], int] = {}
        kept = []
        for o in row["outcomes"]:
            key = (o["type"], o["prompt"])
            if seen.setdefault(key, 0) in keep:
                kept.append(o)
            seen[key] += 1
        out.append({**row, "outcomes": kept})
    return out


@dataclass
class SampleStopCounts:
    """The sample stop replayed on one concept's runs (``sample_stop_counts``)."""

    concept: str
    runs: int
    images: int  # images per epoch of one seed (what ``sample_seeds = 1`` draws)
    every: int  # images per epoch of all seeds
    patience: int
    held_out: list[list[int | str]]  # per seed: TP - held-out onset per run ("never": not decided)
    split_ceiling: list[int]  # per seed: runs whose own-images onset is within ±1 of the held-out one
    on_all: list[int | str]  # TP - onset per run, on every seed's images
    decided_at: list[int | None]

    @staticmethod
    def hits(signed: list[int | str]) -> int:
        return sum(d != "never" and abs(d) <= 1 for d in signed)


def sample_stop_counts(runs: list[RunResult], run_dirs: dict[str, Path],
                       patience: int = sample_stop.PATIENCE) -> list[SampleStopCounts]:
    """The sample stop (``early_stop.samples = "world"``, ``lorakit.earlystop.samples``) replayed on the scored
    images: the trainer's draw is one seed per prompt, so each seed's images in turn play the trainer's samples
    and the onset is measured on the other seeds' (held out, so the rule is not judged on its own images).  Beside
    it, the same split's ceiling (the onset of the rule's images themselves against the held-out onset), and the
    rule on every seed's images (the onset's own images and definition, so only the online cut-off, deciding after
    ``patience`` epochs before the scores end, can move it)."""
    out = []
    for concept in concepts_of(runs):
        chosen = [r for r in runs if r.concept == concept]
        rows = {r.name: sorted(json.loads((run_dirs[r.name] / "curve.json").read_text()), key=lambda x: x["epoch"])
                for r in chosen}
        if not all(all("outcomes" in x for x in rs) for rs in rows.values()):
            continue
        seeds = min(rs[-1].get("seeds_per_prompt", 1) for rs in rows.values())
        if seeds < 2:
            continue
        held_out, ceilings = [], []
        for j in range(seeds):
            signed, ceiling = [], 0
            for r in chosen:
                held = _onset_epoch(*_scores(images_of_seeds(rows[r.name], set(range(seeds)) - {j}), r.changes))
                epochs, g = _scores(images_of_seeds(rows[r.name], {j}), r.changes)
                found = sample_stop.replay(dict(zip(epochs, g, strict=True)), patience=patience)
                signed.append("never" if found is None else found.epoch - held)
                ceiling += abs(_onset_epoch(epochs, g) - held) <= 1
            held_out.append(signed)
            ceilings.append(ceiling)
        online = [sample_stop.replay(dict(zip(r.epochs, r.onset_interval.scores, strict=True)), patience=patience)
                  for r in chosen]
        out.append(SampleStopCounts(
            concept=concept, runs=len(chosen), patience=patience,
            images=len(images_of_seeds(rows[chosen[0].name][-1:], {0})[0]["outcomes"]),
            every=len(rows[chosen[0].name][-1]["outcomes"]), held_out=held_out, split_ceiling=ceilings,
            on_all=["never" if f is None else f.epoch - r.onset for f, r in zip(online, chosen, strict=True)],
            decided_at=[None if f is None else f.decided_at for f in online]))
    return out


def sample_stop_lines(counts: list[SampleStopCounts]) -> list[str]:
    """``sample_stop_counts`` as the summary's lines."""
    out = []
    for c in counts:
        parts = [f"seed {j}: {c.hits(signed)}/{c.runs} (TP - onset = {signed})" for j, signed in enumerate(c.held_out)]
        out.append(f"[{c.concept}] sample stop (uses samples: {c.images} images per epoch, one seed of each prompt, "
                   f"patience {c.patience}; the onset from the other seeds' images) runs within ±1 epoch: "
                   f"{'; '.join(parts)}; the split's ceiling (those {c.images} images' own onset): "
                   f"{', '.join(f'{n}/{c.runs}' for n in c.split_ceiling)}")
        out.append(f"[{c.concept}] sample stop on all {c.every} scored images per epoch (the onset's own images: "
                   f"only its online cut-off can miss): {c.hits(c.on_all)}/{c.runs} runs within ±1 epoch of the "
                   f"onset; TP - onset = {c.on_all}, decided at epochs {c.decided_at}")
    return out


def best_fixed_epoch(runs: list[RunResult]) -> tuple[int, int, float]:
    """What a rule must beat: stopping every run at the same epoch, that epoch chosen afterwards as the one that
    does best on these very runs (an oracle no rule has): (runs within ±1 epoch, the epoch, mean |epoch - onset|)."""
    last = max((max(r.epochs) for r in runs), default=0)
    scored = [(sum(abs(epoch - r.onset) <= 1 for r in runs), -sum(abs(epoch - r.onset) for r in runs), epoch)
              for epoch in range(1, last + 1)]
    if not scored:
        return 0, 0, float("nan")
    hits, neg_dev, epoch = max(scored, key=lambda t: (t[0], t[1], -t[2]))
    return hits, epoch, -neg_dev / len(runs)


def fixed_epoch_baseline(runs: list[RunResult]) -> str:
    hits, epoch, mean = best_fixed_epoch(runs)
    if not epoch:
        return "fixed epoch: no runs"
    return (f"fixed epoch (the best single epoch for every run, chosen on these runs): {hits}/{len(runs)} runs "
            f"within ±1 epoch of the onset at epoch {epoch} (mean |·| {mean:.1f})")


def success_kept(runs: list[RunResult], name: str) -> float:
    """The quality rule ``name`` hands back: the smoothed success at its turning point as a share of that at the
    onset, averaged over the runs where it decided and the onset's success is above 0 (nan: none)."""
    kept = []
    for r in runs:
        if r.turning[name] is None:
            continue
        success = list(smooth(r.change_success))  # single scored epochs are noisy
        if r.at(r.onset, success) > 0:
            kept.append(r.at(r.turning[name], success) / r.at(r.onset, success))
    return sum(kept) / len(kept) if kept else float("nan")


def rule_count(runs: list[RunResult], name: str) -> tuple[int, float | None]:
    """Runs whose turning point under rule ``name`` is within ±1 epoch of the onset (a rule that never decided
    misses), and the mean |TP - onset| over the runs where it decided."""
    signed = [r.turning[name] - r.onset for r in runs if r.turning[name] is not None]
    mean = sum(map(abs, signed)) / len(signed) if signed else None
    return sum(abs(d) <= 1 for d in signed), mean


def headline_table(runs: list[RunResult], samples: list[SampleStopCounts] | None = None) -> str:
    """One row per stopping rule, one column per concept: how many runs each stops within ±1 epoch of the
    measured onset, beside what no rule can beat (the measurement's ceiling) and what needs no rule (one epoch
    for every run, chosen afterwards).  The first concept is the one the rules were designed on."""
    from lorakit.config import EarlyStopConfig

    default = EarlyStopConfig().rule
    concepts = concepts_of(runs)
    by = {c: [r for r in runs if r.concept == c] for c in concepts}
    names = {c: f"{c} ({CONCEPTS[c].shape}{'; the rules were designed on it' if i == 0 else '; held out'})"
             if c in CONCEPTS else c for i, c in enumerate(concepts)}
    lines = ["| stopping rule | reads | " + " | ".join(names[c] for c in concepts) + " |",
             "|---|---|" + "---|" * len(concepts)]

    def row(label: str, reads: str, cells: list[str]) -> None:
        lines.append(f"| {label} | {reads} | " + " | ".join(cells) + " |")

    for name in RULES:
        counts = {c: rule_count(by[c], name) for c in concepts}
        cells = [f"{hits}/{len(by[c])}" + ("" if mean is None else f" ({mean:.1f}; {success_kept(by[c], name):.2f})")
                 for c, (hits, mean) in counts.items()]
        if name == default:
            cells = [f"**{cell}**" for cell in cells]
        rule = RULES[name][0]
        reads = ("ΔW, W: CS-Fluctuation" if rule.series not in SIZE_SERIES else
                 "ΔW, W: the size's growth" if isinstance(rule, GrowthStall) else "ΔW, W: size")
        row(f"`{name}`" + (" (the trainer's default)" if name == default else ""), reads, cells)
    fixed = {c: best_fixed_epoch(by[c]) for c in concepts}
    row("one epoch for every run, chosen afterwards on these runs", "nothing",
        [f"{h}/{len(by[c])} at epoch {e} ({m:.1f})" for c, (h, e, m) in fixed.items()])
    counted = {c.concept: c for c in samples or []}
    if counted and all(c in counted for c in concepts):
        first = counted[concepts[0]]
        row(f"sample stop, {first.images} images per epoch (one seed of each prompt; the onset measured on the "
            f"other seeds'), per seed", "samples",
            [", ".join(f"{counted[c].hits(s)}/{len(by[c])}" for s in counted[c].held_out) for c in concepts])
        row(f"sample stop on all {first.every} images per epoch (the onset's own images)", "samples",
            [f"{counted[c].hits(counted[c].on_all)}/{len(by[c])}" for c in concepts])
    ceiling = {c: [r for r in by[c] if r.reproduced] for c in concepts}
    row("ceiling: a rule stopping every run at its true onset (the measurement's noise)", "—",
        [f"≈{sum(r.reproduced[1] for r in ceiling[c]):.1f}/{len(ceiling[c])}" if ceiling[c] else "—"
         for c in concepts])
    return "\n".join(lines) + "\n"


def budget_sweep(runs: list[RunResult], budgets: list[float], run_dirs: dict[str, Path],
                 measure: str = "frobenius") -> list[str]:
    """How the budget rule does at each of ``budgets`` on ``runs`` (how its default was chosen, on the first
    concept's runs): per budget, the runs within ±1 epoch of the onset and the turning point − onset of each.
    ``measure``: the size the budget is on, ``frobenius`` (‖ΔW‖/‖W‖, the trainer's) or ``spectral``
    (σ1(ΔW)/σ1(W), replayed at epoch ends from the checkpoints or their cached record)."""
    read = _sizes if measure == "frobenius" else checkpoint_spectral_sizes
    sizes = {r.name: read(run_dirs[r.name]) for r in runs}
    label = "budget" if measure == "frobenius" else "spectral budget"
    out = []
    for budget in budgets:
        tps = {r.name: budget_epoch(sizes[r.name], budget) for r in runs}
        signed = [None if tps[r.name] is None else tps[r.name] - r.onset for r in runs]
        hits = sum(d is not None and abs(d) <= 1 for d in signed)
        inside = sum(tps[r.name] is not None and r.onset_interval.contains(tps[r.name], slack=1) for r in runs)
        out.append(f"{label} {budget:g}: {hits}/{len(runs)} runs within ±1 epoch of the onset ({inside}/{len(runs)} "
                   f"within ±1 of its interval); TP - onset = {['never' if d is None else d for d in signed]}")
    return out


def growth_sweep(runs: list[RunResult], run_dirs: dict[str, Path], growths: list[float], spans: list[int],
                 caps: list[float]) -> str:
    """How the growth-stall rule does at every combination of its options, per concept, as a Markdown table:
    the runs within ±1 epoch of the onset (the mean |TP − onset| over the runs where it decided).  Replayed on
    the update's size at epoch ends, which gives the trainer's epoch (a test checks it on the archived grid).
    The row the first concept ranks best (most runs, then the nearest mean) is marked: how the default was
    chosen, with the other concepts held out."""
    concepts = concepts_of(runs)
    sizes = {r.name: _sizes(run_dirs[r.name]) for r in runs}
    rows = []
    for growth, span, cap in itertools.product(growths, spans, caps):
        rule = GrowthStall(growth=growth, span=span, cap=cap)
        cells = []
        for c in concepts:
            signed = [None if (e := size_rule_epoch(sizes[r.name], rule)) is None else e - r.onset
                      for r in runs if r.concept == c]
            decided = [abs(d) for d in signed if d is not None]
            cells.append((sum(d <= 1 for d in decided), len(signed),
                          sum(decided) / len(decided) if decided else float("inf")))
        rows.append((rule, cells))
    best = max(range(len(rows)), key=lambda i: (rows[i][1][0][0], -rows[i][1][0][2], -i))
    lines = ["| growth per epoch | span (epochs) | cap | " + " | ".join(concepts) + " |",
             "|---|---|---|" + "---|" * len(concepts)]
    for i, (rule, cells) in enumerate(rows):
        shown = [f"{hits}/{n} ({mean:.1f})" for hits, n, mean in cells]
        if i == best:
            shown[0] = f"**{shown[0]}** (best on {concepts[0]})"
        lines.append(f"| {rule.growth:g} | {rule.span} | {rule.cap:g} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def _sizes(run_dir: Path) -> dict[int, float]:
    """The update's size per epoch: from the recorded history at epoch ends where the run kept it, else from
    its checkpoints."""
    history = json.loads((run_dir / "cs_history.json").read_text()) if (run_dir / "cs_history.json").exists() \
        else {}
    if history.get("update"):
        last = {}
        for epoch, size in zip(history["epochs"], history["update"], strict=True):
            if epoch is not None and size is not None:
                last[int(epoch)] = float(size)
        return last
    return checkpoint_update_sizes(run_dir)


#: the turning points ``plot_run`` draws, with their colours: the paper's rule, the calm, the size rules
PLOTTED_TURNING_POINTS = (("second-valley", "C3"), ("calm", "C4"), ("budget", "C9"), ("spectral-budget", "C6"),
                          ("growth-stall", "C7"))


def plot_run(run: RunResult, path: Path) -> Path:
    import matplotlib  # here, not at the top: slow to import, and the backend must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.plot(run.epochs, run.fidelity, "o-", label="fidelity (concept drawn)")
    changes = " or ".join(run.changes)
    ax.plot(run.epochs, run.change_success, "s-", label=f"concept + new {changes} obeyed")
    ax.plot(run.epochs, smooth(run.change_success), ":", color="C1", label="the same, smoothed")
    ax.plot(run.epochs, run.leak, "x-", color="C5", label="leak (concept on agnostic prompts)")
    ax.plot(run.epochs, run.onset_interval.scores, "d-", color="C8", label="onset score (success × agnostic kept)")
    ax.axvline(run.onset, color="C1", linestyle="--", label=f"measured onset (epoch {run.onset_interval})")
    if run.onset_interval.low is not None:
        ax.axvspan(run.onset_interval.low - 0.5, run.onset_interval.high + 0.5, color="C1", alpha=0.12,
                   label="onset's 90% bootstrap interval")
    ax.plot(run.epochs, run.control, "^-", label="controllability (scored prompts)")
    ax.plot(run.epochs, run.color_control, "v-", label="color obeyed (scored prompts)")
    ax.axvline(run.fidelity_peak, color="k", linestyle="--", label=f"fidelity peak (epoch {run.fidelity_peak})")
    for name, style in PLOTTED_TURNING_POINTS:
        if run.turning.get(name) is not None:
            default = " (the trainer's default)" if name == EarlyStopConfig().rule else ""
            ax.axvline(run.turning[name], color=style, linestyle="-.",
                       label=f"{name}{default} TP (epoch {run.turning[name]})")
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{run.concept}: {run.label}, lr {run.lr:g}, seed {run.seed}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("runs", type=Path, help="the folder of experiment runs (a grid's --out)")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this Markdown file")
    ap.add_argument("--plot", type=Path, help="plot of the first run (or --plot-run NAME)")
    ap.add_argument("--plot-run", help="the run --plot draws (its folder name)")
    ap.add_argument("--budget-sweep", help="comma-separated budgets: how the budget rule does at each, per concept "
                                           "(e.g. 0.05,0.075,0.1,0.15,0.2)")
    ap.add_argument("--spectral-sweep", help="the same with the budget on σ1(ΔW)/σ1(W) (a candidate, read from the "
                                             "checkpoints or their spectral_sizes.json), e.g. 0.2,0.25,0.3,0.4")
    ap.add_argument("--growth-sweep", metavar="GROWTHS;SPANS;CAPS",
                    help="the growth-stall rule at every combination of these options, per concept, e.g. "
                         "'0.05,0.07,0.1;1,2,3;0.15,0.175,0.2' (written between the page's growth-sweep markers)")
    ap.add_argument("--sample-stop", action="store_true",
                    help="also replay the sample stop (early_stop.samples = \"world\") on one seed's images, "
                         "against the onset of the other seeds'")
    ap.add_argument("--changes", default=",".join(MEASURABLE_CHANGES), type=comma_list(choices=CHANGES),
                    help="attributes whose changed-prompt success defines the onset (default: color,position,"
                         "background; runs on a base model that ignores position words: color,background)")
    ap.add_argument("--update-doc", type=Path,
                    help="write the headline table and the runs' table and lines into this Markdown file, between "
                         f"its {DOC_MARKERS['headline'][0]} / {DOC_MARKERS['headline'][1]} and "
                         f"{DOC_MARKERS['runs'][0]} / {DOC_MARKERS['runs'][1]} lines")
    ap.add_argument("--finished-only", action="store_true",
                    help="only runs a grid marked finished (grid_done), not those still being scored")


def parse_growth_sweep(text: str) -> tuple[list[float], list[int], list[float]]:
    """``--growth-sweep``'s "GROWTHS;SPANS;CAPS" as three lists, each setting checked by the rule itself."""
    try:
        growths, spans, caps = (part.split(",") for part in text.split(";"))
        options = [float(g) for g in growths], [int(k) for k in spans], [float(c) for c in caps]
        for growth, span, cap in itertools.product(*options):
            GrowthStall(growth=growth, span=span, cap=cap)
    except ValueError as e:
        raise InvalidValueError(f"--growth-sweep {text!r}: want GROWTHS;SPANS;CAPS, each a comma-separated list of "
                                f"numbers ({e})") from e
    return options


def run(args: argparse.Namespace) -> int:
    growth_options = parse_growth_sweep(args.growth_sweep) if getattr(args, "growth_sweep", None) else None
    runs = find_runs(args.runs, tuple(c.strip() for c in args.changes.split(",")),
                     finished_only=args.finished_only)
    if not runs:  # empty tables would replace the ones --update-doc and --markdown point at
        raise LorakitError(no_runs_reason(args.runs, args.finished_only))
    table = markdown_table(runs)
    print(table)
    for line in summary_lines(runs):
        print(line)
    sweep = []
    dirs = {r.name: args.runs / r.name for r in runs}
    for measure, option in (("frobenius", "budget_sweep"), ("spectral", "spectral_sweep")):
        if not getattr(args, option, None):
            continue
        budgets = [float(b) for b in getattr(args, option).split(",")]
        for concept in concepts_of(runs):
            sweep += [f"[{concept}] {line}" for line in budget_sweep([r for r in runs if r.concept == concept],
                                                                     budgets, dirs, measure)]
    growth = None
    if growth_options:
        growth = growth_sweep(runs, dirs, *growth_options)
        print(growth)
    samples = sample_stop_counts(runs, dirs) if args.sample_stop else None
    if samples:
        sweep += sample_stop_lines(samples)
    if sweep:
        print("\n".join(sweep))
    headline = headline_table(runs, samples)
    print(headline)
    runs_block = table + "\n" + "\n".join(f"- {s}" for s in summary_lines(runs) + sweep) + "\n"
    if args.markdown:
        args.markdown.write_text(headline + "\n" + runs_block)
    if args.update_doc:
        update_doc(args.update_doc, {"headline": headline, "runs": runs_block,
                                     **({"growth-sweep": growth} if growth else {})})
        print("updated", args.update_doc)
    if args.plot and runs:
        chosen = next((r for r in runs if r.name == args.plot_run), runs[0])
        print("wrote", plot_run(chosen, args.plot))
    return 0


#: the lines between which ``update_doc`` writes each generated block
DOC_MARKERS = {name: (f"<!-- curve-report {name} -->", f"<!-- /curve-report {name} -->")
               for name in ("headline", "runs", "growth-sweep")}


def update_doc(path: Path, blocks: dict[str, str], markers: dict[str, tuple[str, str]] | None = None) -> None:
    """Replace what lies between each block's markers (``DOC_MARKERS`` unless given) in the Markdown file
    ``path`` (the rest of the page is prose a person wrote, kept as it is); the file is written atomically."""
    update_doc_blocks(path, blocks, DOC_MARKERS if markers is None else markers)


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.world.curve_report``: ``lorakit world curve-report`` itself (its messages, exit code)."""
    from lorakit.commands.world import run_as_script

    return run_as_script("curve-report", argv)


if __name__ == "__main__":
    raise SystemExit(main())
