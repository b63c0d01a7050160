"""Sampling cost with the adapters unmerged (their forward runs at every denoising step) vs merged into the
weights (the base model's own cost), on the built-in model or any base model.

    python benchmarks/sampling.py                                   # LoCon (full preset), built-in model
    python benchmarks/sampling.py --algorithms lora,loha,lokr,ia3 --rounds 3 --steps 20
    python benchmarks/sampling.py --model /path/to/sd15 --device cuda --resolution 512

Each algorithm's adapters get random, non-zero tensors (as after training).  Per round and algorithm it
generates the same prompts twice, unmerged then merged (the order alternates between rounds), and reports the
median seconds per image of each and their ratio; the images of both must agree (the maximum pixel difference
is printed; float rounding only).  The plain base model without adapters is timed too, as the floor.  CPU:
process CPU time; CUDA: wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def timed(fn, cuda: bool) -> tuple[float, Any]:
    if cuda:
        torch.cuda.synchronize()
    clock = time.perf_counter if cuda else time.process_time
    start = clock()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return clock() - start, out


@torch.no_grad()
def randomize(network, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in network.names():
        for pname, p in network[name].named_parameters():
            if pname.startswith("base.") or not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            p.copy_(p * (1 + 0.05 * noise) if pname == "dora_scale" else 0.02 * noise)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lorakit.models import load_base_model
    from lorakit.network import UniformRanks, create_network
    from lorakit.sample import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: the built-in one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--algorithms", default="lora", help="comma-separated (lora on the full preset = LoCon)")
    parser.add_argument("--preset", default="full")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")

    model = load_base_model(args.model, args.dtype, args.device)
    side = args.resolution or model.resolution
    prompts = [f"a photo of a shape --w {side} --h {side} --s {args.steps} --d {i}" for i in range(args.images)]

    def run() -> list:
        return generate(model, prompts, batch_size=args.images, progress=False)

    times: dict[str, list[float]] = {"base": []}
    diffs: dict[str, float] = {}
    algorithms = [a for a in args.algorithms.split(",") if a]
    run()  # warm-up
    for r in range(args.rounds):
        times["base"].append(timed(run, cuda)[0] / args.images)
        for algorithm in algorithms:
            network = create_network(model.unet, model.text_encoder, preset=args.preset, algorithm=algorithm,
                                     ranks=UniformRanks(args.rank, args.rank))
            network.to(args.device)
            randomize(network, seed=r)
            results = {}
            for merged in ([False, True] if r % 2 == 0 else [True, False]):
                network.merge() if merged else network.unmerge()
                seconds, images = timed(run, cuda)
                key = f"{algorithm}-{'merged' if merged else 'unmerged'}"
                times.setdefault(key, []).append(seconds / args.images)
                results[merged] = images
            network.unmerge()
            network.remove()
            diffs[algorithm] = max(diffs.get(algorithm, 0.0), max(
                float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
                for a, b in zip(results[False], results[True], strict=True)))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    base = statistics.median(times["base"])
    rows = []
    print(f"{'variant':<22}{'s/image':>10}{'× base':>9}{'× merged':>10}  max pixel diff (unmerged vs merged)")
    for key, values in times.items():
        s = statistics.median(values)
        merged = statistics.median(times[key.replace("unmerged", "merged")]) if "unmerged" in key else None
        row = {"variant": key, "s_per_image": s, "x_base": s / base, "x_merged": None if merged is None else s / merged}
        rows.append(row)
        extra = f"{row['x_merged']:>10.2f}  {diffs[key.rsplit('-', 1)[0]]:.0f}" if merged else ""
        print(f"{key:<22}{s:>10.3f}{s / base:>9.2f}{extra}")
    result = {"settings": vars(args) | {"json": None, "side": side}, "torch": torch.__version__, "rows": rows,
              "max_pixel_diff": diffs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
