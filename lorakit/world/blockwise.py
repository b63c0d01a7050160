"""The block-wise LoRA paper's experiment on the shapes world: a character adapter and a style adapter trained
in chosen U-Net blocks, combined at inference.

The paper's claim: a style adapter trained only in some blocks keeps the character's identity better, when the
two are combined, than a style adapter trained in every block.  Here:

- character: the "zkz" star (``lorakit.world.concept``), a LoCon in every block (the built-in job's recipe,
  fixed epochs, no early stop);
- style: the checkered background (``lorakit.world.style``), a LoCon of the same rank trained only in the
  ``upper`` (IN0 + OUT3), ``middle`` (IN1 + OUT2) or ``bottom`` (IN2 + OUT1) blocks, or in ``all`` of them,
  each with several training seeds;
- combined prompts ask for the star in a color and place, on the checkered background ("a blue zkz shape at
  the top, checkered background"); the world reader checks each image: the star drawn (identity), the
  background checkered (style), the color and the place obeyed, and all four at once;
- style-only prompts (a base shape on the checkered background, no trigger) show what each style adapter
  learned alone; the base model and the character alone are the controls.

``lorakit world blockwise --out runs/blockwise`` trains what is missing (resumable: a finished run is kept),
samples every pairing (cached per pairing), and writes ``blockwise.md`` (the table), ``blockwise.json`` and
``blockwise_grid.png`` (one row per pairing).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.atomic import atomic_folder, atomic_write, atomic_write_json, atomic_write_text
from lorakit.commands.arg_types import comma_list, non_negative_int, positive_int
from lorakit.config import TrainConfig
from lorakit.models import BaseModel, load_base_model
from lorakit.sample import SamplePrompt, generate_with_adapters, image_grid
from lorakit.world import concept, style
from lorakit.world.captions import natural_caption
from lorakit.world.metrics import obeyed, read_images
from lorakit.world.recipe import recipe_config
from lorakit.world.render import ObjectSpec, Scene

BLOCK_SETS = ("upper", "middle", "bottom", "all")
ADAPTER_FILE = "lorakit.safetensors"

# the star in colors and places the character's set shows (red/yellow, middle row) and ones it does not
COMBINED = (("red", "center"), ("yellow", "left"), ("blue", "center"), ("green", "right"),
            ("red", "top"), ("yellow", "bottom right"), ("blue", "top left"), ("purple", "bottom"))
# base shapes on the checkered background, in combinations the style set does not show
STYLE_ONLY = (("circle", "yellow", "bottom"), ("square", "red", "center"), ("triangle", "blue", "top right"),
              ("cross", "purple", "left"))
CHECKS = ("identity", "style", "color", "position", "all")


@dataclass(frozen=True)
class Prompt:
    text: str
    expected: dict[str, str]
    seed: int


def _prompt(shape: str, color: str, position: str, noun: str | None, seed: int) -> Prompt:
    scene = Scene((ObjectSpec(shape, color, "large", position),), style.STYLE_BACKGROUND)
    text = natural_caption(scene, omit=("size",), shape_word=noun)
    return Prompt(text, {"shape": shape, "color": color, "position": position,
                         "background": style.STYLE_BACKGROUND}, seed)


def combined_prompts() -> list[Prompt]:
    """The star (by its trigger) in a color and place, on the checkered background."""
    return [_prompt(concept.CONCEPT_SHAPE, c, p, concept.TRIGGER, 5000 + i) for i, (c, p) in enumerate(COMBINED)]


def style_only_prompts() -> list[Prompt]:
    """Base shapes on the checkered background, no trigger."""
    return [_prompt(s, c, p, None, 6000 + i) for i, (s, c, p) in enumerate(STYLE_ONLY)]


@dataclass(frozen=True)
class Pairing:
    """Adapters applied together, sampled on one prompt set."""

    name: str
    adapters: tuple[Path, ...]
    prompts: str  # "combined" or "style-only"
    blocks: str | None = None  # of the style adapter, if any
    style_seed: int | None = None

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() else "_" for ch in f"{self.prompts}_{self.name}").strip("_")


@dataclass
class Plan:
    out: Path
    blocks: tuple[str, ...]
    style_seeds: tuple[int, ...]
    character_epochs: int = 12
    style_epochs: int = 10
    rank: int = 8
    sample_seeds: int = 4
    model: str | None = None

    @property
    def character_dir(self) -> Path:
        return self.out / "character"

    def style_dir(self, blocks: str, seed: int) -> Path:
        return self.out / f"style_{blocks.replace(',', '+')}_s{seed}"

    def pairings(self) -> list[Pairing]:
        char = self.character_dir / ADAPTER_FILE
        out = [Pairing("base model", (), "combined"), Pairing("character", (char,), "combined")]
        for blocks in self.blocks:
            for seed in self.style_seeds:
                sty = self.style_dir(blocks, seed) / ADAPTER_FILE
                out.append(Pairing(f"character + style[{blocks}] s{seed}", (char, sty), "combined", blocks, seed))
        out.append(Pairing("base model", (), "style-only"))
        for blocks in self.blocks:
            for seed in self.style_seeds:
                sty = self.style_dir(blocks, seed) / ADAPTER_FILE
                out.append(Pairing(f"style[{blocks}] s{seed}", (sty,), "style-only", blocks, seed))
        return out


# ------------------------------------------------------------------------------------------------ training
def _config(out: Path, data: Path, *, epochs: int, seed: int, rank: int, model: str | None,
            blocks: str | None) -> TrainConfig:
    cfg = recipe_config()
    cfg.model.base = model
    cfg.data.train_data = str(data)
    cfg.network.algorithm = "lora"
    cfg.network.preset = "full"  # LoCon: the star's outline and the texture both need the convs
    cfg.network.rank = rank
    cfg.network.alpha = float(rank)
    cfg.network.blocks = blocks
    cfg.training.max_epochs = epochs
    cfg.training.seed = seed
    cfg.early_stop.mode = "off"  # fixed length: the experiment compares block sets, not stopping points
    cfg.sample.prompts = None
    cfg.output.dir = str(out)
    cfg.output.if_exists = "resume"
    return cfg


def train_runs(plan: Plan, data: dict[str, Path], progress: bool = True) -> list[Path]:
    """Train the character and every style adapter that is not there yet; returns the adapter files."""
    from lorakit.train import train

    jobs = [(plan.character_dir, _config(plan.character_dir, data["character"], epochs=plan.character_epochs,
                                         seed=0, rank=plan.rank, model=plan.model, blocks=None))]
    for blocks in plan.blocks:
        for seed in plan.style_seeds:
            folder = plan.style_dir(blocks, seed)
            jobs.append((folder, _config(folder, data["style"], epochs=plan.style_epochs, seed=seed,
                                         rank=plan.rank, model=plan.model, blocks=blocks)))
    files = []
    for folder, cfg in jobs:
        if not (folder / ADAPTER_FILE).exists():
            print(f"training {folder.name}", flush=True)
            train(cfg, progress=progress)
        files.append(folder / ADAPTER_FILE)
    return files


# ------------------------------------------------------------------------------------------------ scoring
def outcome(reading, prompt: Prompt) -> dict[str, bool]:
    """What the reader sees in one image, against what the prompt asks."""
    got = obeyed(reading, prompt.expected)
    identity = reading.has_shape(prompt.expected["shape"])
    return {"identity": bool(identity), "style": bool(got["background"]), "color": bool(got["color"]),
            "position": bool(got["position"]),
            "all": bool(identity and got["background"] and got["color"] and got["position"])}


def sample_pairing(model: BaseModel, pairing: Pairing, prompts: Sequence[Prompt], sample_seeds: int,
                   folder: Path) -> dict:
    """Sample and read one pairing's images (cached in ``folder/<slug>/``: scores.json and the PNGs)."""
    where = folder / pairing.slug
    cache = where / "scores.json"
    samples = [SamplePrompt(p.text, seed=p.seed + 10_000 * k, steps=concept.SAMPLE_STEPS,
                            cfg_scale=concept.SAMPLE_CFG, width=concept.SAMPLE_WIDTH, height=concept.SAMPLE_HEIGHT)
               for p in prompts for k in range(sample_seeds)]
    if cache.exists():
        cached = json.loads(cache.read_text())
        if [(r["prompt"], r["seed"]) for r in cached["images"]] == [(s.prompt, s.seed) for s in samples]:
            return cached  # made with the same prompts and seeds; otherwise sample again
    labels = [p for p in prompts for _ in range(sample_seeds)]
    images = generate_with_adapters(model, [f"{a}:1" for a in pairing.adapters], samples, batch_size=16,
                                    progress=False)
    readings, _ = read_images(images)
    rows = [{"prompt": p.text, "seed": s.seed, **outcome(r, p)} for p, s, r in zip(labels, samples, readings,
                                                                                  strict=True)]
    for i, image in enumerate(images):
        atomic_write(where / f"{i:03d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"), suffix=".png")
    result = {"pairing": pairing.name, "prompts": pairing.prompts, "blocks": pairing.blocks,
              "style_seed": pairing.style_seed, "images": rows}
    atomic_write_json(cache, result)
    return result


def rates(rows: Sequence[dict]) -> dict[str, float]:
    return {c: float(np.mean([r[c] for r in rows])) for c in CHECKS}


def bootstrap_difference(a: Sequence[dict], b: Sequence[dict], check: str, draws: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Rate of ``check`` in ``a`` minus in ``b``, and its 90% interval by resampling prompts (both sides drawn
    with the same prompts: the prompt is the unit that varies most)."""
    by_a: dict[str, list[float]] = {}
    by_b: dict[str, list[float]] = {}
    for r in a:
        by_a.setdefault(r["prompt"], []).append(float(r[check]))
    for r in b:
        by_b.setdefault(r["prompt"], []).append(float(r[check]))
    keys = sorted(set(by_a) & set(by_b))
    ma = np.array([np.mean(by_a[k]) for k in keys])
    mb = np.array([np.mean(by_b[k]) for k in keys])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(draws, len(keys)))
    diffs = ma[idx].mean(axis=1) - mb[idx].mean(axis=1)
    low, high = np.percentile(diffs, [5, 95])
    return float(ma.mean() - mb.mean()), float(low), float(high)


# ------------------------------------------------------------------------------------------------ report
def _fmt(values: Sequence[float]) -> str:
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def table(results: Sequence[dict], plan: Plan) -> str:
    """The markdown tables: combined prompts per block set, style-only prompts, and the paper's comparison."""
    def of(prompts: str, name: str | None = None, blocks: str | None = None) -> list[dict]:
        return [r for r in results if r["prompts"] == prompts and (name is None or r["pairing"] == name)
                and (blocks is None or r["blocks"] == blocks)]

    n_comb = len(combined_prompts()) * plan.sample_seeds
    lines = [f"Combined prompts (the star in a color and place, checkered background): {len(combined_prompts())} "
             f"prompts × {plan.sample_seeds} seeds = {n_comb} images per row and style seed; rates per style seed in "
             "brackets.", "",
             "| adapters | identity (star) | style (checkered) | color | position | all four |",
             "|---|---|---|---|---|---|"]
    for name in ("base model", "character"):
        for r in of("combined", name):
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in rates(r["images"]).values()) + " |")
    for blocks in plan.blocks:
        per_seed = [rates(r["images"]) for r in of("combined", blocks=blocks)]
        if per_seed:
            lines.append(f"| character + style[{blocks}] | "
                         + " | ".join(_fmt([s[c] for s in per_seed]) for c in CHECKS) + " |")
    lines += ["", f"Style-only prompts (a base shape on the checkered background, no trigger): "
              f"{len(style_only_prompts())} prompts × {plan.sample_seeds} seeds per row and style seed.", "",
              "| adapters | shape right | style (checkered) | color | position | all four |",
              "|---|---|---|---|---|---|"]
    for r in of("style-only", "base model"):
        lines.append("| base model | " + " | ".join(f"{v:.2f}" for v in rates(r["images"]).values()) + " |")
    for blocks in plan.blocks:
        per_seed = [rates(r["images"]) for r in of("style-only", blocks=blocks)]
        if per_seed:
            lines.append(f"| style[{blocks}] | " + " | ".join(_fmt([s[c] for s in per_seed]) for c in CHECKS) + " |")
    if "all" in plan.blocks and len(plan.blocks) > 1:
        full = [row for r in of("combined", blocks="all") for row in r["images"]]
        lines += ["", "The paper's comparison: each block-wise style against the all-blocks style, combined with "
                  "the character (difference of rates, 90% interval by resampling prompts, style seeds pooled).", "",
                  "| style in | identity − all-blocks | style − all-blocks | all four − all-blocks |",
                  "|---|---|---|---|"]
        for blocks in plan.blocks:
            if blocks == "all":
                continue
            mine = [row for r in of("combined", blocks=blocks) for row in r["images"]]
            if mine and full:
                cells = []
                for check in ("identity", "style", "all"):
                    d, low, high = bootstrap_difference(mine, full, check)
                    cells.append(f"{d:+.2f} [{low:+.2f}, {high:+.2f}]")
                lines.append(f"| {blocks} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def overview_grid(plan: Plan, results: Sequence[dict]) -> Image.Image:
    """One row per combined-prompt pairing (first style seed only), one column per prompt (first sample seed)."""
    images, labels = [], []
    first = plan.style_seeds[0]
    for r in results:
        if r["prompts"] != "combined" or r["style_seed"] not in (None, first):
            continue
        folder = plan.out / "samples" / Pairing(r["pairing"], (), r["prompts"]).slug
        for j in range(len(combined_prompts())):
            images.append(Image.open(folder / f"{j * plan.sample_seeds:03d}.png").convert("RGB"))
            labels.append(r["pairing"].replace(f" s{first}", "") if j == 0 else COMBINED[j][0] + ", "
                          + COMBINED[j][1])
    return image_grid(images, cols=len(combined_prompts()), labels=labels, font_size=10)


def run_experiment(plan: Plan, progress: bool = True) -> str:
    """Train what is missing, sample every pairing, write the report; returns the table."""
    data_root = plan.out / "data"
    data = {"character": data_root / "zkz", "style": data_root / "checkered"}
    if not data["character"].exists():  # whole or not at all: an experiment stopped while rendering resumes
        with atomic_folder(data["character"], same_if_there=True) as rendering:
            concept.write_concept_dataset(rendering)
    if not data["style"].exists():
        with atomic_folder(data["style"], same_if_there=True) as rendering:
            style.write_style_dataset(rendering)
    train_runs(plan, data, progress=progress)
    model = load_base_model(plan.model)
    results = []
    for pairing in plan.pairings():
        prompts = combined_prompts() if pairing.prompts == "combined" else style_only_prompts()
        print(f"sampling {pairing.prompts}: {pairing.name}", flush=True)
        results.append(sample_pairing(model, pairing, prompts, plan.sample_seeds, plan.out / "samples"))
    text = table(results, plan)
    settings = {"blocks": list(plan.blocks), "style_seeds": list(plan.style_seeds), "rank": plan.rank,
                "character_epochs": plan.character_epochs, "style_epochs": plan.style_epochs,
                "sample_seeds": plan.sample_seeds, "model": plan.model or "built-in"}
    atomic_write_json(plan.out / "blockwise.json", {"settings": settings, "results": results})
    atomic_write_text(plan.out / "blockwise.md", text)
    grid = overview_grid(plan, results)
    atomic_write(plan.out / "blockwise_grid.png", lambda tmp: grid.save(tmp, format="PNG"), suffix=".png")
    return text


# ------------------------------------------------------------------------------------------------ command
def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, default=Path("runs/blockwise"), help="experiment folder (resumable)")
    ap.add_argument("--blocks", default=",".join(BLOCK_SETS), type=comma_list(choices=BLOCK_SETS),
                    help="style adapters' block sets, comma-separated (default: upper,middle,bottom,all)")
    ap.add_argument("--style-seeds", default="0,1", type=comma_list(non_negative_int),
                    help="training seeds of each style adapter (default: 0,1)")
    ap.add_argument("--sample-seeds", type=positive_int, default=4, help="images per prompt (default: 4)")
    ap.add_argument("--character-epochs", type=positive_int, default=12, help="epochs of the character adapter")
    ap.add_argument("--style-epochs", type=positive_int, default=10, help="epochs of each style adapter")
    ap.add_argument("--rank", type=positive_int, default=8, help="rank of every adapter")
    ap.add_argument("--model", default=None, help="base model (default: the built-in one)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    blocks = tuple(args.blocks.split(","))  # each checked by its argument type
    seeds = tuple(int(s) for s in args.style_seeds.split(","))
    plan = Plan(args.out, blocks, seeds, character_epochs=args.character_epochs, style_epochs=args.style_epochs,
                rank=args.rank, sample_seeds=args.sample_seeds, model=args.model)
    text = run_experiment(plan, progress=not args.no_progress)
    print(text)
    print(f"wrote {args.out / 'blockwise.md'}, blockwise.json and blockwise_grid.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.world.blockwise``: ``lorakit world blockwise`` itself (its messages, exit code)."""
    from lorakit.commands.world import run_as_script

    return run_as_script("blockwise", argv)


if __name__ == "__main__":
    raise SystemExit(main())
