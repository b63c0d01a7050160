"""model.fp8_base (kohya's --fp8_base): what storing the frozen U-Net in fp8 saves, and what it costs per step.

    python benchmarks/fp8_base.py                         # CPU: SD1.5 layout at half width, 16x16 latents, bf16
    python benchmarks/fp8_base.py --quick                 # smoke test: a tiny U-Net, 2 rounds
    python benchmarks/fp8_base.py --family sdxl --width full --rounds 1 --no-step   # SDXL's U-Net: the bytes only
    python benchmarks/fp8_base.py --device cuda --width full --resolution 512      # a GPU: SD1.5 at 512²
    python benchmarks/fp8_base.py --upcast                # the upcast alone: lorakit's against torch's .to()

Two copies of the same U-Net with a lorakit LoRA (rank 8, attention and feed-forward, the trainer's default
preset) on it: one with its frozen weights in ``--dtype`` (bf16), one with them stored in fp8 as the trainer
stores them (``lorakit.fp8.store_frozen_in_fp8``).  For each: the frozen weights' bytes at rest, and a real
training step (forward under autocast, MSE loss, backward, AdamW step) timed over ``--rounds`` interleaved rounds
(median; CPU: process CPU time, CUDA: synchronised wall time) with the step's peak memory above the resting state
(as ``train_step.py`` measures it).  Only ratios within one run mean anything.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (  # noqa: E402  (the benchmark's own helpers, beside this file)
    Clock,
    PeakMemory,
    add_unet_step_arguments,
    build_unet,
    machine,
    make_batch,
    make_step,
    pooled_width,
    settle_unet_step_arguments,
    unet_config,
    write_result,
)

from lorakit.fp8 import FP8, frozen_bytes, store_frozen_in_fp8, upcast  # noqa: E402
from lorakit.network import UniformRanks, create_network  # noqa: E402

RANK = 8


def adapted_unet(config: dict[str, Any], device: str, dtype: torch.dtype, fp8: bool):
    """The U-Net with a LoRA on it, its trained tensors in fp32; with ``fp8`` its frozen weights stored in fp8."""
    unet = build_unet(config, device, dtype)
    network = create_network(unet, preset="attn-mlp", ranks=UniformRanks(RANK, float(RANK)), algorithm="lora")
    params = [p for group in network.trainable_parameters().values() for p in group]
    for p in params:
        p.data = p.data.float()
    before = frozen_bytes(unet)
    if fp8:
        store_frozen_in_fp8(unet)
    return unet, params, before


def time_upcast(device: str, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    """Median seconds to upcast a 1280×1280 fp8 weight (SD1.5's largest attention projection's size) with torch's
    ``.to()`` and with ``lorakit.fp8.upcast``, interleaved; their results are checked equal first."""
    weight = torch.randn(1280, 1280, device=device).to(FP8)
    ways = {"torch .to()": lambda: weight.to(dtype), "lorakit upcast": lambda: upcast(weight, dtype)}
    assert torch.equal(ways["torch .to()"]().float(), ways["lorakit upcast"]().float())
    clock = Clock(device)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            start = clock()
            for _ in range(10):
                way()
            times[name].append((clock() - start) / 10)
    return {name: statistics.median(values) for name, values in times.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_unet_step_arguments(parser)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--no-step", action="store_true", help="the bytes at rest only (no training step)")
    parser.add_argument("--upcast", action="store_true", help="time the upcast of one fp8 weight alone, torch's .to() "
                        "against lorakit's")
    args = settle_unet_step_arguments(parser.parse_args(argv))
    args.rounds = args.rounds or (2 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.upcast:
        medians = time_upcast(args.device, dtype, args.rounds)
        base = medians["torch .to()"]
        for name, seconds in medians.items():
            print(f"{name}: {seconds * 1e3:.2f} ms ({seconds / base:.2f}×)")
        return {"machine": machine(args.device), "upcast_s": medians}
    config = unet_config(args.quick, args.width, args.family)
    device_type = torch.device(args.device).type
    clock, memory = Clock(args.device), PeakMemory(args.device)
    batch = make_batch(args.batch, args.resolution // 8, config["cross_attention_dim"], args.device, dtype,
                       pooled_width(config))
    names = (args.dtype, "fp8")
    rows: dict[str, dict[str, Any]] = {}
    steps = {}
    for name in names:
        unet, params, before = adapted_unet(config, args.device, dtype, fp8=name == "fp8")
        rows[name] = {"frozen_bytes": frozen_bytes(unet), "frozen_bytes_before": before, "times": [], "peak": None}
        if not args.no_step:
            steps[name] = make_step(unet, batch, params, lambda: torch.autocast(device_type, dtype=dtype))
            steps[name]()  # warm-up
        del unet, params
        gc.collect()
    started = time.perf_counter()
    for r in range(0 if args.no_step else args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order: neither always runs first
            start = clock()
            steps[name]()
            rows[name]["times"].append(clock() - start)
            if r == 0:
                rows[name]["peak"] = memory.measure(steps[name])
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    base = rows[args.dtype]
    lines = ["| frozen U-Net | weights at rest | step (median) | step's peak above rest |", "|---|---|---|---|"]
    for name in names:
        row = rows[name]
        row["median_s"] = statistics.median(row["times"]) if row["times"] else None
        size = f"{row['frozen_bytes'] / 2**20:.1f} MiB ({row['frozen_bytes'] / base['frozen_bytes']:.2f}×)"
        step = "—" if row["median_s"] is None else \
            f"{row['median_s']:.3f} s ({row['median_s'] / base['median_s']:.2f}×)"
        peak = "—" if row["peak"] is None else f"{row['peak'] / 2**20:.1f} MiB"
        lines.append(f"| {name} | {size} | {step} | {peak} |")
    print("\n".join(lines))
    return write_result(args, rows, started, rank=RANK)


if __name__ == "__main__":
    main()
