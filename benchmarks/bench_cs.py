"""Cost of CS (eq. 2) on the SD1.5 U-Net's LoRA layers, against a LoRA training step.  Run on demand:

    python benchmarks/bench_cs.py                     # CUDA if present, else CPU
    python benchmarks/bench_cs.py --rank 128 --unet   # the paper's rank; also time a whole U-Net step

The layers are kohya's default LoRA targets of SD1.5 (the 192 Linear/1×1 layers inside the Transformer2D
blocks), taken from a U-Net built on the meta device (no weights are downloaded), rebuilt on the device with
random weights and wrapped in lorakit LoRA adapters with a random non-zero up factor.  Timed:

- ``CSMeter()``: the low-rank identities, ``‖W0‖`` cached (what a trainer calls);
- ``cs_value(fast=True)``: the same without the cache;
- ``cs_value(fast=False)``: every ``ΔW`` materialised through ``delta_weight()``;
- a training step of those LoRA layers alone (forward, backward into the inputs and the factors, AdamW)
  with SD1.5 token counts at ``--resolution`` (cross-attention keys/values: 77 tokens of 768);
- with ``--unet``: a whole SD1.5 U-Net training step (random weights, the same adapters injected).

All ratios printed come from this one run, on one device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lorakit.adapters.lora import LoRA
from lorakit.earlystop import CSMeter, cs_value

TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def sd15_unet(device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(cross_attention_dim=768).to(dtype)


def lora_targets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """kohya's default U-Net targets: Linear and 1×1 Conv2d layers inside Transformer2DModel blocks."""
    found = []
    for block_name, block in unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for name, layer in block.named_modules():
            if name.endswith(TARGETS) and isinstance(layer, (nn.Linear, nn.Conv2d)):
                found.append((f"{block_name}.{name}", layer))
    return found


def tokens_for(name: str, resolution: int) -> int:
    """Tokens a layer sees at batch 1: (resolution / 8 / 2^level)², or 77 text tokens for attn2 keys/values."""
    if ".attn2.to_k" in name or ".attn2.to_v" in name:
        return 77
    side = resolution // 8
    if name.startswith("down_blocks."):
        level = int(name.split(".")[1])
    elif name.startswith("up_blocks."):
        level = 3 - int(name.split(".")[1])
    else:  # mid_block
        level = 3
    return (side >> level) ** 2


def build_adapters(rank: int, device: str, dtype: torch.dtype) -> tuple[list[LoRA], list[str]]:
    with torch.device("meta"):
        meta = sd15_unet("meta", torch.float32)
    adapters, names = [], []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, layer in lora_targets(meta):
        if isinstance(layer, nn.Linear):
            base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        else:
            base = nn.Conv2d(layer.in_channels, layer.out_channels, 1, bias=layer.bias is not None)
        base = base.to(device=device, dtype=dtype)
        adapter = LoRA(base, rank=rank, alpha=rank / 2).to(device=device, dtype=dtype)
        with torch.no_grad():
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g) * 1e-3)
        adapters.append(adapter)
        names.append(name)
    return adapters, names


def timed(fn: Callable[[], object], device: str, repeat: int, warmup: int = 1) -> float:
    """Median seconds per call: wall time on CUDA (synchronised), process CPU time on the CPU (so that other
    jobs on a shared machine do not count; with several threads it adds up their time)."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return statistics.median(times)


def lora_layer_step(adapters: list[LoRA], names: list[str], resolution: int, device: str,
                    dtype: torch.dtype) -> Callable[[], None]:
    params = [p for a in adapters for n, p in a.named_parameters() if n.startswith("lora_")]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs = []
    for adapter, name in zip(adapters, names, strict=True):
        t = tokens_for(name, resolution)
        if adapter.kind == "linear":
            x = torch.randn(1, t, adapter.in_features, device=device, dtype=dtype)
        else:
            side = int(t ** 0.5)
            x = torch.randn(1, adapter.in_features, side, side, device=device, dtype=dtype)
        inputs.append(x.requires_grad_(True))  # the real step propagates gradients through every layer

    def step() -> None:
        loss = sum(a(x).float().square().mean() for a, x in zip(adapters, inputs, strict=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None

    return step


def unet_step(rank: int, resolution: int, device: str, dtype: torch.dtype) -> tuple[Callable[[], None], list[LoRA]]:
    unet = sd15_unet(device, dtype).train()
    unet.requires_grad_(False)
    adapters = []
    for name, layer in lora_targets(unet):
        parent = unet.get_submodule(name.rsplit(".", 1)[0])
        adapter = LoRA(layer, rank=rank, alpha=rank / 2).to(device=device, dtype=dtype)
        setattr(parent, name.rsplit(".", 1)[1], adapter)
        adapters.append(adapter)
    params = [p for a in adapters for n, p in a.named_parameters() if n.startswith("lora_")]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    text = torch.randn(1, 77, 768, device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)

    def step() -> None:
        out = unet(latents, timestep, text).sample
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--unet", action="store_true", help="also time a whole SD1.5 U-Net training step")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    adapters, names = build_adapters(args.rank, args.device, dtype)
    meter = CSMeter(adapters)
    assert abs(meter() - cs_value(adapters, fast=False)) < 1e-3  # both paths measure the same thing
    rows = [
        ("CS, low-rank identities, cached ‖W0‖ (CSMeter)", timed(meter, args.device, args.repeat)),
        ("CS, low-rank identities (cs_value)", timed(lambda: cs_value(adapters), args.device, args.repeat)),
        ("CS, delta_weight() path", timed(lambda: cs_value(adapters, fast=False), args.device, args.repeat)),
        (f"train step of the {len(adapters)} LoRA layers alone",
         timed(lora_layer_step(adapters, names, args.resolution, args.device, dtype), args.device, args.repeat)),
    ]
    if args.unet:
        step, _ = unet_step(args.rank, args.resolution, args.device, dtype)
        rows.append(("train step of the whole U-Net with LoRA", timed(step, args.device, max(3, args.repeat // 2))))

    clock = "wall time" if args.device.startswith("cuda") else f"CPU time, {torch.get_num_threads()} threads"
    print(f"device {args.device}, {args.dtype}, rank {args.rank}, {len(adapters)} layers, "
          f"resolution {args.resolution}, batch 1, median of {args.repeat} ({clock})")
    fast = rows[0][1]
    steps = [t for label, t in rows if "train step" in label]
    header = f"{'':<52}{'ms':>10}{'/ CSMeter':>11}" + "".join(f"{'/ step ' + str(i + 1):>10}"
                                                            for i in range(len(steps)))
    print(header)
    for label, seconds in rows:
        ratios = "".join(f"{seconds / s:>10.3f}" for s in steps)
        print(f"{label:<52}{seconds * 1e3:>10.2f}{seconds / fast:>11.2f}{ratios}")


if __name__ == "__main__":
    main()
