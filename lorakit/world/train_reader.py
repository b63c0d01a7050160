"""Train (and measure) the attribute reader's shape classifier: ``lorakit world train-reader``.

The data are renders of every shape (the concepts' star and heart included) with random colors, sizes, positions
and backgrounds, plus "other" blobs that are none of the world's shapes (long ellipses, rings, bars, stars with 6-8
points, two shapes run together). Most pass through ``degrade`` and, when a VAE is given (``--vae
runs/pretrain/vae_checkpoint.pt`` or a diffusers ``model/vae`` folder), a share of them through a VAE round trip
first, since every generated image comes out of a VAE decoder. Each image goes through the reader's own pixel
stages, so the classifier learns on exactly the crops it will see. Deterministic for a seed (single-threaded
torch); a few minutes on one CPU core.

Training scenes use render seeds below ``EVAL_SEED_BASE``; the evaluation uses seeds from it upwards.
The shipped weights were made by ``lorakit world train-reader --vae lorakit/world/base_model/vae``
(defaults: seed 0, 12,000 images, 10 epochs) with the built-in model's VAE (the pretraining's step 3000, seed 0):
about 4 CPU-minutes on one core (200 s measured beside two other jobs), most of it rendering and degrading the
images.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from lorakit.atomic import atomic_write, atomic_write_text
from lorakit.commands.arg_types import non_negative_int, positive_int, share
from lorakit.errors import LorakitError
from lorakit.world.degrade import degrade, load_vae, vae_roundtrip
from lorakit.world.reader import (
    SHAPE_CLASSES,
    WEIGHTS_PATH,
    Reader,
    ShapeNet,
    chroma_map,
    find_objects,
    shape_crops,
    to_array,
)
from lorakit.world.render import (
    ALL_SHAPES,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SIZES,
    SUPERSAMPLE,
    ObjectSpec,
    Scene,
    cell_center,
    render,
    render_array,
    shape_polygon,
)

EVAL_SEED_BASE = 1_000_000_000
ACCURACY_PATH = WEIGHTS_PATH.with_name("reader_accuracy.json")


def random_scenes(count: int, seed: int, seed_base: int = 0,
                  backgrounds: tuple[str, ...] = BACKGROUNDS) -> list[Scene]:
    """``count`` one-object scenes with every attribute uniform (shapes include the concept's star; backgrounds
    from ``backgrounds``)."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        obj = ObjectSpec(str(rng.choice(ALL_SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(list(SIZES))),
                         str(rng.choice(list(POSITIONS))))
        scenes.append(Scene((obj,), str(rng.choice(backgrounds)), seed=seed_base + int(rng.integers(0, 10**8))))
    return scenes


Polygon = list[tuple[float, float]]


def _other_polygons(rng: np.random.Generator, cx: float, cy: float, r: float) -> tuple[list[Polygon], Polygon | None]:
    """(polygons to fill, a hole to cut out or None) of a blob that is none of the world's shapes."""
    kind = int(rng.integers(0, 5))
    a0 = rng.uniform(0, math.pi)
    if kind == 0:  # long ellipse
        ratio = rng.uniform(0.25, 0.55)
        pts = [(r * math.cos(t), r * ratio * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    elif kind == 1:  # bar
        ratio = rng.uniform(0.12, 0.35)
        pts = [(-r, -r * ratio), (r, -r * ratio), (r, r * ratio), (-r, r * ratio)]
    elif kind == 2:  # star with 6..8 points
        n = int(rng.integers(6, 9))
        inner = rng.uniform(0.4, 0.55)
        pts = [((r if k % 2 == 0 else r * inner) * math.cos(k * math.pi / n),
                (r if k % 2 == 0 else r * inner) * math.sin(k * math.pi / n)) for k in range(2 * n)]
    elif kind == 3:  # ring
        circle = np.linspace(0, 2 * math.pi, 40)
        return ([[(cx + r * math.cos(t), cy + r * math.sin(t)) for t in circle]],
                [(cx + r * 0.55 * math.cos(t), cy + r * 0.55 * math.sin(t)) for t in circle])
    else:  # two world shapes run together
        s1, s2 = rng.choice(ALL_SHAPES, size=2)
        d = r * rng.uniform(0.35, 0.55)  # centres 0.7..1.1 r apart: the two always overlap
        polys = []
        for s, sign in ((s1, -1), (s2, 1)):
            px, py = cx + sign * d * math.cos(a0), cy + sign * d * math.sin(a0)
            if s == "circle":
                polys.append([(px + r * 0.7 * math.cos(t), py + r * 0.7 * math.sin(t))
                              for t in np.linspace(0, 2 * math.pi, 32)])
            else:
                polys.append(shape_polygon(str(s), px, py, r * 0.75, rng.uniform(-0.2, 0.2)))
        return polys, None
    ca, sa = math.cos(a0), math.sin(a0)
    return [[(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]], None


def render_other(rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """A world background with one "other" blob of a world color, anti-aliased like ``render``."""
    bg = str(rng.choice(BACKGROUNDS))
    base = render(Scene((), bg, seed=int(rng.integers(0, 10**8))), resolution)
    big = resolution * SUPERSAMPLE
    img = base.resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    cx, cy = cell_center(str(rng.choice(list(POSITIONS))))
    r = SIZES[str(rng.choice(list(SIZES)))] * rng.uniform(0.9, 1.2) * big
    rgb = np.clip(np.array(COLORS[str(rng.choice(list(COLORS)))]) + rng.integers(-12, 13, size=3), 0, 255)
    polys, hole = _other_polygons(rng, cx * big, cy * big, r)
    for poly in polys:
        draw.polygon(poly, fill=tuple(int(v) for v in rgb))
    if hole is not None:  # the background shows through again
        cut = Image.new("L", (big, big), 0)
        ImageDraw.Draw(cut).polygon(hole, fill=255)
        img.paste(base.resize((big, big), Image.Resampling.NEAREST), (0, 0), cut)
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.BOX), dtype=np.uint8)


def crop_of_main_object(image: np.ndarray) -> torch.Tensor | None:
    """The classifier input for the largest object the reader's pixel stages find (None if none)."""
    img = to_array(image)
    chroma, tint = chroma_map(img)
    comps, _ = find_objects(img, chroma, tint)
    if not comps:
        return None
    return shape_crops([comps[0].soft], [comps[0].centroid])[0]


def make_dataset(count: int, other_fraction: float, seed: int, vae=None, vae_fraction: float = 0.3,
                 clean_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    n_other = int(count * other_fraction)
    scenes = random_scenes(count - n_other, seed + 1)
    images = [render_array(s) for s in scenes] + [render_other(rng) for _ in range(n_other)]
    labels = [SHAPE_CLASSES.index(s.objects[0].shape) for s in scenes] + [SHAPE_CLASSES.index("other")] * n_other
    if vae is not None:
        chosen = np.nonzero(rng.random(len(images)) < vae_fraction)[0]
        for i, rec in zip(chosen, vae_roundtrip([images[i] for i in chosen], vae, seed=seed), strict=True):
            images[i] = rec
    crops, kept = [], []
    for img, lab in zip(images, labels, strict=True):
        if rng.random() >= clean_fraction:
            img = degrade(img, rng, strength=rng.uniform(0.3, 1.4))
        crop = crop_of_main_object(img)
        if crop is not None:
            crops.append(crop)
            kept.append(lab)
    return torch.stack(crops), torch.tensor(kept)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (every world shape is mirror-symmetric) and rotations of up to ±12°."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros(n)], 1),
                         torch.stack([sin * flip, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, lr: float = 3e-3,
          batch: int = 128) -> ShapeNet:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        total, correct = 0.0, 0
        for s in range(0, len(x), batch):
            idx = order[s:s + batch]
            logits = net(augment(x[idx], gen))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}, train accuracy {correct / len(x):.4f}")
    return net.eval()


# ------------------------------------------------------------------------------------------- evaluation
def attribute_accuracy(reader: Reader, scenes: list[Scene], images: list[np.ndarray]) -> dict[str, float]:
    """Per-attribute accuracy of the reader's main object (and the background) against the scenes, and the shape's
    accuracy per true shape (``"shape heart"``: the share of hearts read as hearts)."""
    readings = reader.read_many(images)
    hits = dict.fromkeys(("shape", "color", "position", "size", "background"), 0)
    per_shape: dict[str, list[bool]] = {}  # "shape <name>": the shape read right, per true shape
    for scene, reading in zip(scenes, readings, strict=True):
        truth = scene.objects[0]
        hits["background"] += reading.background == scene.background
        right = reading.main is not None and reading.main.shape == truth.shape
        per_shape.setdefault(f"shape {truth.shape}", []).append(right)
        if reading.main is None:
            continue
        for key, value in reading.main.attributes().items():
            hits[key] += value == getattr(truth, key)
    return {**{k: v / len(scenes) for k, v in hits.items()},
            **{k: sum(v) / len(v) for k, v in sorted(per_shape.items())}}


def held_out_images(count: int, mode: str, seed: int = 7, vae=None,
                    backgrounds: tuple[str, ...] = BACKGROUNDS) -> tuple[list[Scene], list[np.ndarray]]:
    """Renders with seeds never used in training; ``mode`` is clean, degraded, vae or vae+degraded."""
    scenes = random_scenes(count, seed, seed_base=EVAL_SEED_BASE, backgrounds=backgrounds)
    images = [render_array(s) for s in scenes]
    if mode.startswith("vae"):
        images = vae_roundtrip(images, vae, seed=seed)
    if mode.endswith("degraded"):
        rng = np.random.default_rng(seed + 1)
        images = [degrade(img, rng, strength=1.0) for img in images]
    return scenes, images


def evaluate(reader: Reader, count: int, vae=None) -> dict[str, dict[str, float]]:
    modes = ["clean", "degraded"] + (["vae", "vae+degraded"] if vae is not None else [])
    return {mode: attribute_accuracy(reader, *held_out_images(count, mode, vae=vae)) for mode in modes}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--vae", type=Path, default=None, help="VAE checkpoint or diffusers vae folder (optional)")
    ap.add_argument("--count", type=positive_int, default=12000, help="training images")
    ap.add_argument("--other-fraction", type=share, default=0.15,
                    help="share of training crops of shapes outside the world's (the reader learns to say 'other')")
    ap.add_argument("--epochs", type=positive_int, default=10, help="training epochs")
    ap.add_argument("--seed", type=non_negative_int, default=0, help="seed of the rendered images and the weights")
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="the weights file (default: the shipped one)")
    ap.add_argument("--eval-count", type=positive_int, default=1000, help="held-out images the accuracy is measured on")
    ap.add_argument("--evaluate-only", action="store_true", help="measure the weights at --out, train nothing")


def run(args: argparse.Namespace) -> int:
    if args.vae is not None and not args.vae.exists():  # it went on without round trips: another reader
        raise LorakitError(f"--vae {args.vae}: no such file or folder (a pretraining vae_checkpoint.pt or a diffusers "
                           "vae folder); leave --vae out to train without VAE round trips")
    if args.evaluate_only and not args.out.is_file():
        raise LorakitError(f"--evaluate-only: no reader weights at {args.out} to measure: give --out the weights "
                           "file, or leave out --evaluate-only to train them")
    torch.set_num_threads(1)  # deterministic, and leaves the other core to whatever else runs
    vae = load_vae(args.vae) if args.vae is not None else None
    if not args.evaluate_only:
        t0 = time.time()
        x, y = make_dataset(args.count, args.other_fraction, args.seed, vae=vae)
        print(f"{len(x)} crops in {time.time() - t0:.0f} s; classes {torch.bincount(y).tolist()}")
        net = train(x, y, args.epochs, args.seed)
        meta = {"seed": str(args.seed), "count": str(args.count), "epochs": str(args.epochs),
                "vae": str(args.vae) if vae is not None else "none", "classes": ",".join(SHAPE_CLASSES)}
        tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
        atomic_write(args.out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        print(f"weights written to {args.out} ({time.time() - t0:.0f} s in all)")
    results = evaluate(Reader(args.out), args.eval_count, vae=vae)
    for mode, acc in results.items():
        print(f"{mode:>14}: " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    if args.out == WEIGHTS_PATH:
        atomic_write_text(ACCURACY_PATH, json.dumps({"eval_count": args.eval_count, "vae": str(args.vae), **results},
                                                    indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.world.train_reader``: ``lorakit world train-reader`` itself (its messages, exit code)."""
    from lorakit.commands.world import run_as_script

    return run_as_script("train-reader", argv)


if __name__ == "__main__":
    raise SystemExit(main())
