"""Does the validation loss mark the overfitting onset?  Runs of the shapes-world grid trained again with a folder
of held-out images (``data.validation_data``: it changes nothing in training, so each run is its archived grid
run, whose onset was measured from 81 scored images per epoch), their loss logged at every epoch end.

Two held-out sets, one per run (a run measures one folder):

- ``new``: the star at colors, positions and backgrounds it was never trained on, captioned in the training
  captions' words: the images the onset's success is measured on (new color, row, background);
- ``same``: the 15 training scenes drawn again with other seeds: what a user holding out some of their own
  photos has.

    python experiments/validation_onset.py --out runs/validation_onset --runs locon_lr0.002_s0 --held-out new

Trains each run once per held-out set (about 5 minutes each on 2 cores) and prints, per run, the validation loss
at every epoch and the epoch of its minimum.  Writes ``<out>/results.json``.

    python experiments/validation_onset.py --out runs/validation_onset --table [--update-doc docs/early_stopping.md]

Reads every finished run under ``--out`` (trains nothing) and prints the table of docs/early_stopping.md: per run,
the onset measured on its archived grid run with its bootstrap interval, the loss from the base model to its
lowest value to the last epoch, an online rule on the loss (smoothed over ``SMOOTH`` epochs, stopping ``PATIENCE``
epochs after the lowest smoothed value) and the trainer's default rule replayed on the grid run, then how often
each lands within ±1 epoch of the onset and inside its interval, per concept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import tomllib

from lorakit.world.captions import natural_caption, tag_caption
from lorakit.world.concept import CONCEPTS, concept_captions, concept_scenes, write_concept_dataset, write_images
from lorakit.world.render import ObjectSpec, Scene

GRID = Path(__file__).parent / "onset_grid"
#: the online rule's settings, read off the first three runs (locon 2e-3 s0, lora 8e-3 s1, lokr 2e-3 s1) and not
#: changed after: without smoothing, or with less patience, it stopped at epoch 1-4 on them
SMOOTH, PATIENCE = 3, 4
#: the trainer's default rule (EarlyStopConfig.rule), replayed on the grid runs' recorded sizes
DEFAULT_RULE = "spectral-budget"
DOC_MARKERS = {"table": ("<!-- validation_onset table -->", "<!-- /validation_onset table -->")}


def held_out_scenes(kind: str, concept_name: str = "zkz", count: int = 15) -> tuple[list[Scene], list[str]]:
    """The scenes and captions of a held-out set (deterministic)."""
    concept = CONCEPTS[concept_name]
    if kind == "same":
        scenes = [Scene(s.objects, s.background, seed=s.seed + 50_000) for s in concept_scenes(concept)]
        return scenes, concept_captions(concept)
    specs = list(itertools.product(concept.new_colors, concept.new_positions, concept.new_backgrounds))
    step = max(1, len(specs) // count)
    scenes = [Scene((ObjectSpec(concept.shape, c, "large", p),), b, seed=60_000 + i)
              for i, (c, p, b) in enumerate(specs[::step][:count])]
    captions = [tag_caption(s, shape_word=concept.trigger) if i % 3 == 2 else
                natural_caption(s, shape_word=concept.trigger, template=(i + i // 3) % 6)
                for i, s in enumerate(scenes)]
    return scenes, captions


def run_one(out: Path, run: str, kind: str) -> dict:
    """Train the grid's ``run`` again with the ``kind`` held-out set; its per-epoch validation losses."""
    concept_name = run.split("_")[0] if run.startswith("vlx_") else "zkz"
    concept = CONCEPTS[concept_name]
    data = out / f"{concept_name}-data"
    if not data.exists():
        write_concept_dataset(data, concept)
    held = out / f"{concept_name}-held-{kind}"
    if not held.exists():
        scenes, captions = held_out_scenes(kind, concept_name)
        write_images(held / concept.folder_name, scenes, captions)
    folder = out / f"{run}-{kind}"
    config = tomllib.loads((GRID / run / "config.toml").read_text())
    if not (folder / "summary.json").exists():
        cmd = [sys.executable, "-m", "lorakit.cli", "train", str(GRID / run / "config.toml"),
               "--data", str(data), "--validation-data", str(held), "--out", str(folder), "--no-progress",
               "--set", "output.if_exists=" + ("resume" if folder.exists() else "error")]
        subprocess.run(cmd, check=True)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    per_epoch = {r["epoch"]: r["val_loss"] for r in log if "val_loss" in r}
    lowest = min(per_epoch, key=per_epoch.get)
    return {"run": run, "held_out": kind, "lr": config["optimizer"]["learning_rate"],
            "val_loss": per_epoch, "lowest_epoch": lowest}


def online_stop(losses: dict[int, float], smooth: int = SMOOTH, patience: int = PATIENCE
                ) -> tuple[int, int] | None:
    """(epoch handed back, epoch it was decided at) of the online rule on per-epoch validation losses (epoch 0:
    the base model, never handed back): at each epoch end the losses so far are smoothed (centred, so the latest
    epoch's smoothed value waits for the next one), and the rule stops once ``patience`` epochs have passed
    without a new lowest; None when it never does."""
    from lorakit.earlystop.samples import smoothed

    epochs = sorted(losses)
    values = [losses[e] for e in epochs]
    for k in range(1, len(epochs)):
        settled = [i for i in range(k) if epochs[i] >= 1]  # the last one's centred mean needs the next epoch
        if not settled:
            continue
        s = smoothed(values[:k + 1], smooth)
        best = min(settled, key=lambda i: (s[i], i))
        if settled[-1] - best >= patience:
            return epochs[best], epochs[k]
    return None


def finished_runs(out: Path) -> list[tuple[str, str, dict[int, float]]]:
    """(grid run, held-out set, per-epoch losses) of every run under ``out`` trained to its last epoch."""
    found = []
    for folder in sorted(out.glob("*-*/log.jsonl")):
        run, kind = folder.parent.name.rsplit("-", 1)
        if kind not in ("same", "new") or not (GRID / run).is_dir() or not (folder.parent / "summary.json").exists():
            continue
        losses = {}
        for line in folder.read_text().splitlines():
            record = json.loads(line)
            if "val_loss" in record:
                losses[int(record["epoch"])] = record["val_loss"]
        found.append((run, kind, losses))
    return found


def _label(run: str) -> str:
    """locon_lr0.002_s0 -> "locon 2e-3 seed 0"; the heart's runs say so."""
    parts = run.split("_")
    concept = "heart " if parts[0] == "vlx" else ""
    algorithm, lr, seed = parts[-3:]
    return f"{concept}{algorithm} {float(lr[2:]):.0e} seed {seed[1:]}".replace("e-03", "e-3")


def _signed(difference: int) -> str:
    return f"{difference:+d}" if difference else "0"


def table(out: Path) -> str:
    """The Markdown table and count lines of every finished run under ``out``."""
    from lorakit.world.curve_report import load_run

    rows = ["| run | onset [90% interval] | held-out set | loss: base model → lowest (epoch) → last | lowest − onset "
            f"| online: smoothed over {SMOOTH} epochs, stop after {PATIENCE} without a new lowest "
            f"| default ({DEFAULT_RULE}) − onset |", "|---|---|---|---|---|---|---|"]
    tally: dict[tuple[str, str], dict[str, list]] = {}  # per rule: (within ±1, inside the interval), or False
    grid = {}
    for run, kind, losses in finished_runs(out):
        if run not in grid:
            grid[run] = load_run(GRID / run)
        result = grid[run]
        onset = result.onset_interval
        lowest = min(losses, key=lambda e: (losses[e], e))  # 0 when training only made it worse
        base = f"{losses[0]:.4f} → " if 0 in losses else ""
        online = online_stop(losses)
        default = result.turning.get(DEFAULT_RULE)
        rows.append(f"| {_label(run)} | {onset} | {kind} | {base}{losses[lowest]:.4f} ({lowest}) → "
                    f"{losses[max(losses)]:.4f} | {_signed(lowest - onset.epoch)} | "
                    + ("never" if online is None else f"epoch {online[0]}, decided at {online[1]}") + " | "
                    + ("never" if default is None else _signed(default - onset.epoch)) + " |")
        counts = tally.setdefault((result.concept, kind), {"lowest": [], "online": [], "default": []})
        for name, epoch in (("lowest", lowest), ("online", None if online is None else online[0]),
                            ("default", default)):
            counts[name].append(epoch is not None and (abs(epoch - onset.epoch) <= 1, onset.contains(epoch)))
    lines = ["\n".join(rows), "",
             "| concept, held-out set | runs | lowest loss (known once the run is over): within ±1 epoch, inside the "
             "interval | online rule on the loss | default rule, same runs |", "|---|---|---|---|---|"]
    concepts = {"zkz": "star", "vlx": "heart"}
    for (concept, kind), counts in sorted(tally.items(), reverse=True):  # the star (designed on) first
        cells = [f"{sum(1 for h in hits if h and h[0])}/{len(hits)}, {sum(1 for h in hits if h and h[1])}/{len(hits)}"
                 for hits in counts.values()]
        lines.append(f"| {concepts.get(concept, concept)}, {kind} | {len(counts['lowest'])} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", default="locon_lr0.002_s0", help="grid run names, comma-separated, or all (the 32)")
    parser.add_argument("--held-out", default="new", help="new, same, or both: new,same")
    parser.add_argument("--table", action="store_true", help="print the table of the finished runs; train nothing")
    parser.add_argument("--update-doc", type=Path, help="with --table: write it between the page's markers "
                        f"{DOC_MARKERS['table'][0]} and {DOC_MARKERS['table'][1]}")
    args = parser.parse_args(argv)
    if args.table:
        text = table(args.out)
        print(text, end="")
        if args.update_doc:
            from lorakit.doc_blocks import update_doc_blocks

            update_doc_blocks(args.update_doc, {"table": text}, DOC_MARKERS)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    runs = sorted(p.name for p in GRID.iterdir() if p.is_dir()) if args.runs == "all" else args.runs.split(",")
    results = [run_one(args.out, run, kind) for run in runs for kind in args.held_out.split(",")]
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        losses = " ".join(f"{e}:{v:.4f}" for e, v in sorted(r["val_loss"].items(), key=lambda kv: int(kv[0])))
        print(f"{r['run']} ({r['held_out']}): lowest validation loss at epoch {r['lowest_epoch']}; {losses}")


if __name__ == "__main__":
    main()
