"""The base model's quality bar: does it draw what a held-out prompt asks for?

Prompts name every attribute of one object from a (shape, color, position) triple the model never saw in
pretraining (``splits.held_out_scenes``); the reader scores each generated image attribute by attribute.
Run ``lorakit world quality --model DIR`` for the table in the README.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from lorakit.commands.arg_types import positive_int
from lorakit.models import BaseModel, load_base_model
from lorakit.sample import SamplePrompt, generate
from lorakit.world.captions import natural_caption
from lorakit.world.reader import read_images
from lorakit.world.render import Scene
from lorakit.world.splits import held_out_scenes

ATTRIBUTES = ("shape", "color", "position", "size", "background")

# the sampler settings the quality bar is stated for
SAMPLER, STEPS, CFG = "ddim", 20, 6.0


@dataclass
class QualityReport:
    n: int
    accuracy: dict[str, float]
    sampler: str = SAMPLER
    steps: int = STEPS
    cfg_scale: float = CFG
    failures: list[dict] = field(default_factory=list)

    def table(self) -> str:
        head = " | ".join(f"{a:>10}" for a in ATTRIBUTES)
        row = " | ".join(f"{100 * self.accuracy[a]:9.1f}%" for a in ATTRIBUTES)
        return (f"{self.n} held-out prompts, sampler {self.sampler}, {self.steps} steps, CFG {self.cfg_scale}\n"
                f"{head}\n{row}")


def quality_prompts(count: int, seed: int = 0) -> list[tuple[SamplePrompt, Scene]]:
    scenes = held_out_scenes(count, seed=seed)
    return [(SamplePrompt(natural_caption(s), seed=seed + i, steps=STEPS, cfg_scale=CFG, sampler=SAMPLER), s)
            for i, s in enumerate(scenes)]


def score_images(images, scenes: list[Scene]) -> QualityReport:
    hits = {a: 0 for a in ATTRIBUTES}
    failures = []
    for scene, reading in zip(scenes, read_images(list(images)), strict=True):
        want = scene.objects[0]
        got = reading.objects[0] if reading.objects else None
        found = {
            "shape": got is not None and got.shape == want.shape,
            "color": got is not None and got.color == want.color,
            "position": got is not None and got.position == want.position,
            "size": got is not None and got.size == want.size,
            "background": reading.background == scene.background,
        }
        for a, ok in found.items():
            hits[a] += ok
        if not all(found.values()):
            failures.append({"prompt": natural_caption(scene),
                             "read": None if got is None else f"{got.size} {got.color} {got.shape} {got.position}",
                             "background": reading.background})
    n = len(scenes)
    return QualityReport(n, {a: hits[a] / n for a in ATTRIBUTES}, failures=failures)


def evaluate(model: BaseModel, count: int = 100, seed: int = 0, batch_size: int = 25,
             progress: bool = True) -> QualityReport:
    pairs = quality_prompts(count, seed)
    images = generate(model, [p for p, _ in pairs], batch_size=batch_size, progress=progress)
    return score_images(images, [s for _, s in pairs])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="diffusers folder or single file (default: the built-in model)")
    ap.add_argument("--count", type=positive_int, default=200, help="held-out prompts scored (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and the images")


def run(args: argparse.Namespace) -> int:
    report = evaluate(load_base_model(args.model), args.count, args.seed)
    print(report.table())
    for f in report.failures[:10]:
        print("  miss:", f)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.world.quality``: ``lorakit world quality`` itself (its messages, exit code)."""
    from lorakit.commands.world import run_as_script

    return run_as_script("quality", argv)


if __name__ == "__main__":
    raise SystemExit(main())
