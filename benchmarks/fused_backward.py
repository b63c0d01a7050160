"""optimizer.fused_backward_pass (kohya's --fused_backward_pass): the memory a native fine-tuning step saves when
each weight is stepped as its gradient is ready, and what it costs in time.

    python benchmarks/fused_backward.py                       # CPU: SD1.5 layout at half width, 16x16 latents, bf16
    python benchmarks/fused_backward.py --quick               # smoke test: a tiny U-Net, 2 steps
    python benchmarks/fused_backward.py --width full --steps 2  # SD1.5's own U-Net (860M weights, ~15 GB here)
    python benchmarks/fused_backward.py --device cuda --width full --resolution 512   # a GPU
    python benchmarks/fused_backward.py --family sdxl --device cuda --width full --optimizer adafactor  # kohya's case

The same U-Net, every weight trained in fp32 under bf16 autocast (native fine-tuning as the trainer runs it),
one variant after the other (a full-width U-Net with its optimizer state is too big to keep two): the
whole-model optimizer, stepped after the backward pass, and ``lorakit.fused_backward.FusedBackwardOptimizer``.
For each: the step's peak memory above the resting state (weights and optimizer state, after warm-up steps;
CPU: peak resident size, CUDA: peak allocated) and the median step time (CPU: process CPU time, CUDA:
synchronised wall time).  The gradients' bytes are what the fused pass can save at most.  Only ratios within one
run mean anything.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (  # noqa: E402  (the benchmark's own helpers, beside this file)
    Clock,
    PeakMemory,
    add_unet_step_arguments,
    build_unet,
    make_batch,
    pooled_width,
    settle_unet_step_arguments,
    unet_config,
    write_result,
)

from lorakit.config import OptimizerConfig  # noqa: E402
from lorakit.fused_backward import FusedBackwardOptimizer  # noqa: E402
from lorakit.optimizers import OPTIMIZERS  # noqa: E402

VARIANTS = ("whole-model step", "fused backward pass")


def native_step(unet: torch.nn.Module, batch, dtype: torch.dtype, optimizer_name: str, fused: bool):
    """One native fine-tuning step of ``unet`` (all its weights trained, in fp32) and its optimizer."""
    settings = OptimizerConfig()
    settings.learning_rate = 1e-6
    for p in unet.parameters():
        p.data = p.data.float()
        p.requires_grad_(True)
    groups = [{"params": list(unet.parameters()), "lr": settings.learning_rate}]
    if fused:
        optimizer = FusedBackwardOptimizer(groups, lambda part: OPTIMIZERS[optimizer_name](part, settings))
    else:
        optimizer = OPTIMIZERS[optimizer_name](groups, settings)
    device_type = batch.latents.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=dtype):
            out = unet(batch.latents, batch.timesteps, batch.text, **batch.extra).sample
        F.mse_loss(out.float(), batch.target.float()).backward()
        optimizer.step()  # fused: nothing left to do
        optimizer.zero_grad(set_to_none=True)

    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_unet_step_arguments(parser)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor", "sgd", "lion"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 4; quick 2)")
    args = settle_unet_step_arguments(parser.parse_args(argv))
    args.steps = args.steps or (2 if args.quick else 4)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = unet_config(args.quick, args.width, args.family)
    clock, memory = Clock(args.device), PeakMemory(args.device)
    batch = make_batch(args.batch, args.resolution // 8, config["cross_attention_dim"], args.device, dtype,
                       pooled_width(config))
    rows: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name in VARIANTS:
        unet = build_unet(config, args.device, torch.float32)
        step = native_step(unet, batch, dtype, args.optimizer, fused=name == VARIANTS[1])
        step()  # warm-up: the optimizer's state exists from here on, in both variants
        times = []
        for _ in range(args.steps):
            start = clock()
            step()
            times.append(clock() - start)
        rows[name] = {"times": times, "median_s": statistics.median(times), "peak": memory.measure(step),
                      "gradient_bytes": sum(p.numel() * p.element_size() for p in unet.parameters()),
                      "weights": sum(p.numel() for p in unet.parameters())}
        print(f"{name}: done", file=sys.stderr, flush=True)
        del unet, step
        gc.collect()
    base = rows[VARIANTS[0]]
    lines = [f"{base['weights'] / 1e6:.0f}M weights trained; their gradients: {base['gradient_bytes'] / 2**20:.0f} MiB",
             "| native step | step (median) | step's peak above rest |", "|---|---|---|"]
    for name in VARIANTS:
        row = rows[name]
        peak = "—" if row["peak"] is None or base["peak"] is None else \
            f"{row['peak'] / 2**20:.0f} MiB ({row['peak'] / base['peak']:.2f}×)"
        lines.append(f"| {name} | {row['median_s']:.3f} s ({row['median_s'] / base['median_s']:.2f}×) | {peak} |")
    print("\n".join(lines))
    return write_result(args, rows, started)


if __name__ == "__main__":
    main()
