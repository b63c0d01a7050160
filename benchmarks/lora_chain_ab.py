"""LoRA's linear layers through plain autograd or as one node (``functional.lora_chain``), in a whole U-Net step.

    OMP_NUM_THREADS=1 python benchmarks/lora_chain_ab.py                                   # half width, 16×16
    OMP_NUM_THREADS=1 python benchmarks/lora_chain_ab.py --width full --resolution 512     # SD1.5 at 512²

``train_step.py``'s U-Net (SD1.5's layout) with lorakit's LoRA on the attention preset and LoCon on the full
preset, rank 8, a real training step each (forward, MSE, backward, AdamW), and the frozen floor; each adapter
runs its linear layers once through ``lora_chain`` (what ``LoRA.forward`` does) and once through plain autograd
(the chain switched off for the benchmark), the three interleaved step by step in a rotating order.  Prints the
median process CPU time of each and the ratios; only ratios within one run mean anything.  glibc's malloc keeps
freed memory, as in ``lorakit train`` (``lorakit.host_memory``), unless ``--default-malloc``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from lorakit.adapters.lora import LoRA

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step


@contextmanager
def chain(enabled: bool):
    """LoRA's one-node chain on (as shipped) or off (the autograd path it replaced)."""
    if enabled:
        yield
        return
    LoRA._chain_applies = lambda self, x, *factors: False
    try:
        yield
    finally:
        del LoRA._chain_applies  # back to the inherited method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", choices=["half", "full"], default="half")
    parser.add_argument("--resolution", type=int, default=128, help="image side; latents are 1/8")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--adapters", default="lora,locon", help="lora (attention preset), locon (full preset)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (default: keep freed memory, as `lorakit train` does)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.default_malloc:
        from lorakit.host_memory import keep_freed_memory

        keep_freed_memory()
    import train_step as ts

    from lorakit.network import UniformRanks, create_network

    config = ts.unet_config(False, args.width)
    batch = ts.make_batch(1, args.resolution // 8, config["cross_attention_dim"], "cpu", torch.float32)
    variants = {"floor": (ts.make_step(ts.build_unet(config, "cpu", torch.float32), batch, [], nullcontext), True)}
    presets = {"lora": "attn-only", "locon": "full"}
    for name in [a for a in args.adapters.split(",") if a]:
        unet = ts.build_unet(config, "cpu", torch.float32)
        network = create_network(unet, preset=presets[name], ranks=UniformRanks(ts.RANK, ts.ALPHA), algorithm="lora")
        params = [p for group in network.trainable_parameters().values() for p in group]
        step = ts.make_step(unet, batch, params, nullcontext)
        variants[f"{name}, autograd"] = (step, False)
        variants[f"{name}, chain"] = (step, True)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.steps + 1):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            step, enabled = variants[name]
            with chain(enabled):
                start = time.process_time()
                step()
                elapsed = time.process_time() - start
            if i:  # the first round warms up
                times[name].append(elapsed)
        print(f"round {i}/{args.steps}", file=sys.stderr, flush=True)
    median = {name: statistics.median(times[name]) for name in names}
    print(f"U-Net at {args.width} width, {args.resolution}² (latents {args.resolution // 8}²), batch 1, rank 8, "
          f"{args.steps} interleaved steps each, malloc {'as is' if args.default_malloc else 'keeping freed memory'},"
          f" process CPU time (median):")
    for name in names:
        print(f"  {name}: {median[name]:.4f} s, {median[name] / median['floor']:.3f}x the floor")
    for name in [n[:-len(", chain")] for n in names if n.endswith(", chain")]:
        print(f"  {name}: chain / autograd = {median[name + ', chain'] / median[name + ', autograd']:.3f}")


if __name__ == "__main__":
    main()
