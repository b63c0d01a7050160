"""LoCon's k×k down projection, four ways, per 3×3 layer of the SD1.5 U-Net (issue 14's CPU gap).

    OMP_NUM_THREADS=1 python benchmarks/locon_down_ab.py                          # half width, 16×16 latents
    OMP_NUM_THREADS=1 python benchmarks/locon_down_ab.py --width full --batches 1 # SD1.5's width, 32×32 (256²)

The frozen 3×3 conv is the floor; each variant adds a rank-r LoCon update (down k×k, up 1×1) and is timed
forward + backward (input and adapter gradients), median of interleaved repeats, as the extra milliseconds over
the frozen conv alone:

- ``stock``: what ``lorakit.adapters.lora`` runs: a second conv with r output channels (its own im2col);
- ``concat``: the down kernel appended to the frozen kernel's output channels, one conv for both, a custom
  autograd function that computes the input gradient once and only the down kernel's weight gradient (the
  concatenated weight is kept and only its r rows are refreshed per step, so W0 is not copied);
- ``shift``: the down conv as a 1×1 conv to 9r channels followed by a fixed one-hot grouped 3×3 conv that sums
  the shifted planes (no im2col of the wide input);
- ``unfold``: the down conv as an explicit im2col (``F.unfold``) and one matrix product.

Outputs and gradients of every variant are checked against ``stock`` before timing.  None beat ``stock`` by more
than the noise at half width, batch 1 and 4, or at SD1.5's width, batch 1 (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

#: (out, in, side) of the U-Net's 3×3 convs at half width, latents 16×16
SHAPES = [(640, 640, 2), (640, 640, 4), (320, 320, 8), (160, 160, 16), (640, 1280, 2), (320, 640, 8), (160, 320, 16)]
#: the same at SD1.5's own width, latents 32×32 (256²)
SHAPES_FULL = [(1280, 1280, 4), (1280, 1280, 8), (640, 640, 16), (320, 320, 32), (1280, 2560, 4), (640, 1280, 16),
               (320, 640, 32)]


class ConcatDown(torch.autograd.Function):
    """``conv(x, [W0; A])`` split into the frozen output and the down projection ``h``."""

    @staticmethod
    def forward(ctx, x, wcat, bias, down, n_out):
        ctx.save_for_backward(x, wcat)
        ctx.n_out = n_out
        out = F.conv2d(x, wcat, bias, 1, 1)
        return out[:, :n_out], out[:, n_out:]

    @staticmethod
    def backward(ctx, gy, gh):
        x, wcat = ctx.saved_tensors
        conv_backward = torch.ops.aten.convolution_backward
        gx = None
        if ctx.needs_input_grad[0]:
            gx = conv_backward(torch.cat([gy, gh], 1), x, wcat, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                               [True, False, False])[0]
        gdown = conv_backward(gh, x, wcat[ctx.n_out:], None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                              [False, True, False])[1]
        return gx, None, None, gdown, None


def one_hot_shifts(rank: int) -> torch.Tensor:
    """Grouped 3×3 kernel (rank, 9, 3, 3): group o sums its 9 channels, channel k shifted by tap k."""
    kernel = torch.zeros(rank, 9, 3, 3)
    for k in range(9):
        kernel[:, k, k // 3, k % 3] = 1
    return kernel


def layer_variants(out: int, inp: int, side: int, batch: int, rank: int):
    g = torch.Generator().manual_seed(out + inp + side)
    w0 = torch.randn(out, inp, 3, 3, generator=g) * 0.02
    b0 = torch.randn(out, generator=g) * 0.02
    x = torch.randn(batch, inp, side, side, generator=g).requires_grad_()
    down = (torch.randn(rank, inp, 3, 3, generator=g) * 0.02).requires_grad_()
    up = (torch.randn(out, rank, 1, 1, generator=g) * 0.02).requires_grad_()
    wcat = torch.cat([w0, down.detach()])
    bcat = torch.cat([b0, torch.zeros(rank)])
    shifts = one_hot_shifts(rank)

    def frozen():
        return F.conv2d(x, w0, b0, 1, 1)

    def stock():
        return F.conv2d(x, w0, b0, 1, 1) + F.conv2d(F.conv2d(x, down, None, 1, 1), up)

    def concat():
        wcat[out:].copy_(down.detach())
        y, h = ConcatDown.apply(x, wcat, bcat, down, out)
        return y + F.conv2d(h, up)

    def shift():
        z = F.conv2d(x, down.permute(0, 2, 3, 1).reshape(rank * 9, inp, 1, 1))
        return F.conv2d(x, w0, b0, 1, 1) + F.conv2d(F.conv2d(z, shifts, None, 1, 1, 1, rank), up)

    def unfold():
        cols = F.unfold(x, 3, padding=1)  # (batch, in·9, positions)
        h = (down.reshape(rank, inp * 9) @ cols).reshape(batch, rank, side, side)
        return F.conv2d(x, w0, b0, 1, 1) + F.conv2d(h, up)

    return x, (down, up), {"frozen": frozen, "stock": stock, "concat": concat, "shift": shift, "unfold": unfold}


def fwd_bwd(fn, x, params) -> list[torch.Tensor]:
    y = fn()
    y.backward(torch.ones_like(y))
    grads = [t.grad for t in (x, *params) if t.grad is not None]
    for t in (x, *params):
        t.grad = None
    return [y.detach(), *grads]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--width", choices=["half", "full"], default="half")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lorakit.host_memory import keep_freed_memory

    keep_freed_memory()  # as lorakit train runs: no page faults for the same buffers every repeat
    names = ["stock", "concat", "shift", "unfold"]
    shapes = SHAPES if args.width == "half" else SHAPES_FULL
    for batch in (int(b) for b in args.batches.split(",")):
        totals = dict.fromkeys(names, 0.0)
        print(f"batch {batch}: extra ms over the frozen 3×3 conv (forward + backward)")
        print(f"{'layer':>24} {'frozen':>8} " + " ".join(f"{n:>8}" for n in names))
        for out, inp, side in shapes:
            x, params, variants = layer_variants(out, inp, side, batch, args.rank)
            reference = fwd_bwd(variants["stock"], x, params)
            for name in names[1:]:
                got = fwd_bwd(variants[name], x, params)
                pairs = zip(reference, got, strict=True)
                assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in pairs), name
            times: dict[str, list[float]] = {n: [] for n in variants}
            order = list(variants)
            for i in range(args.repeats + 3):
                for name in order[i % len(order):] + order[:i % len(order)]:  # rotated: noise hits all alike
                    start = time.process_time()
                    fwd_bwd(variants[name], x, params if name != "frozen" else ())
                    if i >= 3:
                        times[name].append(time.process_time() - start)
            med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
            extra = {n: med[n] - med["frozen"] for n in names}
            for n in names:
                totals[n] += extra[n]
            print(f"{f'{out}×{inp} at {side}×{side}':>24} {med['frozen']:8.3f} "
                  + " ".join(f"{extra[n]:+8.3f}" for n in names))
        print(f"{'sum':>24} {'':>8} " + " ".join(f"{totals[n]:+8.3f}" for n in names))


if __name__ == "__main__":
    main()
