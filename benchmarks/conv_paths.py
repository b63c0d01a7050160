"""PyTorch's two CPU convolution paths for the adapters' own k×k convs: oneDNN, or its own im2col (``slow_conv2d``).

    OMP_NUM_THREADS=1 python benchmarks/conv_paths.py                 # LoCon's down projection: 8 output channels
    OMP_NUM_THREADS=1 python benchmarks/conv_paths.py --channels 64   # LoHa's rank-r² conv (r = 8)

At batch 1 on one thread PyTorch takes oneDNN for a 3×3 conv only when the input has more than 20,480 elements.
For each 3×3 input shape of the SD1.5 U-Net at half width (16×16 latents) and at its own width (32×32), this
times forward + backward (input and weight gradients) with oneDNN allowed and with it turned off
(``torch.backends.mkldnn.flags``), interleaved, median of ``--repeats``, and names the path PyTorch chose.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

#: (input channels, side) of the U-Net's 3×3 convs: half width at 16×16 latents, SD1.5's width at 32×32
SHAPES = {"half": [(640, 2), (640, 4), (320, 8), (160, 16), (1280, 2), (640, 8), (320, 16)],
          "full": [(1280, 4), (1280, 8), (640, 16), (320, 32), (2560, 4), (1280, 16), (640, 32)]}


def conv_step(channels_in: int, side: int, channels_out: int, onednn: bool):
    x = torch.randn(1, channels_in, side, side, requires_grad=True)
    w = torch.randn(channels_out, channels_in, 3, 3, requires_grad=True)

    def step() -> None:
        with torch.backends.mkldnn.flags(enabled=onednn):
            y = F.conv2d(x, w, None, 1, 1)
            y.backward(torch.ones_like(y))
        x.grad = w.grad = None

    return step


def chosen_path(step) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    keys = {e.key for e in prof.key_averages()}
    return "oneDNN" if "aten::mkldnn_convolution" in keys else "im2col" if "aten::_slow_conv2d_forward" in keys \
        else "other"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=8, help="output channels of the adapter's conv")
    parser.add_argument("--repeats", type=int, default=22)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lorakit.host_memory import keep_freed_memory

    keep_freed_memory()  # as lorakit train runs
    print(f"3×3 conv to {args.channels} channels, batch 1, forward + backward, ms (median of {args.repeats})")
    print(f"{'width':>5} {'input':>16} {'chosen':>7} {'oneDNN':>8} {'im2col':>8}")
    for width, shapes in SHAPES.items():
        total = {True: 0.0, False: 0.0}
        for channels_in, side in shapes:
            steps = {on: conv_step(channels_in, side, args.channels, on) for on in (True, False)}
            chosen = chosen_path(conv_step(channels_in, side, args.channels, True))
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(args.repeats + 3):
                for on in (True, False) if i % 2 else (False, True):
                    start = time.process_time()
                    steps[on]()
                    if i >= 3:  # warm-up
                        times[on].append(time.process_time() - start)
            med = {on: statistics.median(t) * 1e3 for on, t in times.items()}
            for on in total:
                total[on] += med[on]
            print(f"{width:>5} {f'{channels_in}×{side}×{side}':>16} {chosen:>7} {med[True]:8.3f} {med[False]:8.3f}")
        print(f"{width:>5} {'sum':>16} {'':>7} {total[True]:8.3f} {total[False]:8.3f}")


if __name__ == "__main__":
    main()
