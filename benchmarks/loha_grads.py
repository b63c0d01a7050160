"""LoHa's factor gradients on the CPU: a broadcast product and a reduction, or one multiply-add per rank row.

    OMP_NUM_THREADS=1 python benchmarks/loha_grads.py              # both parts, one thread
    OMP_NUM_THREADS=1 python benchmarks/loha_grads.py --no-step    # the per-size table only

``khatri_rao_stack_grads`` turns the gradient of LoHa's rank-r² factor ``(r·r, columns)`` into the gradients of
its two rank-r factors.  Part 1 times the two ways on their own, for rank rows × columns as an SD U-Net has them
(columns: a layer's output width, or its input width × kernel size), median of repeats.  Part 2 times the whole
LoHa training step of ``train_step.py``'s U-Net (SD1.5's layout at half width, latents 16×16, batch 1, rank 8)
under the old rule (always broadcast) and the shipped one (``KR_GRADS_LOOP_FROM``), and the frozen floor,
interleaved step by step, and prints their medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from lorakit.adapters import functional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step, for part 2

#: values of the switch: every size broadcasts, every size loops, the shipped rule
RULES = {"always broadcast": 10**18, "always loop": 0, "KR_GRADS_LOOP_FROM": functional.KR_GRADS_LOOP_FROM}


def grads_with(rule: str, g: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``functional.khatri_rao_stack_grads`` under one of ``RULES``."""
    functional.KR_GRADS_LOOP_FROM = RULES[rule]
    try:
        return functional.khatri_rao_stack_grads(g, p, q)
    finally:
        functional.KR_GRADS_LOOP_FROM = RULES["KR_GRADS_LOOP_FROM"]


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def size_table(repeats: int) -> None:
    print("| rows | columns | broadcast µs | row loop µs | loop / broadcast | the rule picks |")
    print("|---|---|---|---|---|---|")
    for rows in (4, 8, 16):
        for columns in (640, 1440, 2560, 2880, 5120, 5760, 11520):
            gen = torch.Generator().manual_seed(rows * columns)
            p, q = torch.randn(rows, columns, generator=gen), torch.randn(rows, columns, generator=gen)
            g = torch.randn(rows * rows, columns, generator=gen)
            old, new = (grads_with(rule, g, p, q) for rule in ("always broadcast", "always loop"))
            for a, b in zip(old, new, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            t_b, t_l = (median_us(partial(grads_with, rule, g, p, q), repeats)
                        for rule in ("always broadcast", "always loop"))
            pick = "loop" if rows * columns >= RULES["KR_GRADS_LOOP_FROM"] else "broadcast"
            print(f"| {rows} | {columns} | {t_b:.0f} | {t_l:.0f} | {t_l / t_b:.2f} | {pick} |", flush=True)


def whole_step(steps: int) -> None:
    import train_step as ts

    from lorakit.network import UniformRanks, create_network

    config = ts.unet_config(False)
    batch = ts.make_batch(1, 16, config["cross_attention_dim"], "cpu", torch.float32)
    floor = ts.make_step(ts.build_unet(config, "cpu", torch.float32), batch, [], nullcontext)
    unet = ts.build_unet(config, "cpu", torch.float32)
    network = create_network(unet, preset="full", ranks=UniformRanks(ts.RANK, ts.ALPHA), algorithm="loha")
    params = [p for group in network.trainable_parameters().values() for p in group]
    loha = ts.make_step(unet, batch, params, nullcontext)
    steps_by_name = {"floor": (floor, RULES["KR_GRADS_LOOP_FROM"]),
                     "LoHa, always broadcast": (loha, RULES["always broadcast"]),
                     "LoHa, KR_GRADS_LOOP_FROM": (loha, RULES["KR_GRADS_LOOP_FROM"])}
    names = list(steps_by_name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps + 1):
        for name in names[i % 3:] + names[:i % 3]:  # rotate the order
            step, functional.KR_GRADS_LOOP_FROM = steps_by_name[name]
            start = time.process_time()
            step()
            if i:  # the first round warms up
                times[name].append(time.process_time() - start)
    functional.KR_GRADS_LOOP_FROM = RULES["KR_GRADS_LOOP_FROM"]
    median = {name: statistics.median(times[name]) for name in names}
    print(f"whole step, {steps} interleaved steps each (process CPU time, median):")
    for name in names:
        print(f"  {name}: {median[name]:.4f} s, {median[name] / median['floor']:.3f}x the floor")
    print(f"  LoHa with the rule / always broadcast = "
          f"{median['LoHa, KR_GRADS_LOOP_FROM'] / median['LoHa, always broadcast']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50, help="repeats per size (part 1)")
    parser.add_argument("--steps", type=int, default=12, help="interleaved steps per rule (part 2)")
    parser.add_argument("--no-step", action="store_true", help="skip the whole-step A/B")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size_table(args.repeats)
    if not args.no_step:
        whole_step(args.steps)


if __name__ == "__main__":
    main()
