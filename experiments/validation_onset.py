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
at every epoch, the epoch of its minimum, and the run's measured onset from the grid's table.  Writes
``<out>/results.json``.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", default="locon_lr0.002_s0", help="grid run names, comma-separated")
    parser.add_argument("--held-out", default="new", help="new, same, or both: new,same")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_one(args.out, run, kind) for run in args.runs.split(",") for kind in args.held_out.split(",")]
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        losses = " ".join(f"{e}:{v:.4f}" for e, v in sorted(r["val_loss"].items(), key=lambda kv: int(kv[0])))
        print(f"{r['run']} ({r['held_out']}): lowest validation loss at epoch {r['lowest_epoch']}; {losses}")


if __name__ == "__main__":
    main()
