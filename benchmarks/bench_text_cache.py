"""What ``data.cache_text_encoder_outputs`` saves per training step: the text encoders' forward pass for a batch of
captions (what the trainer runs every step without the cache) against a cache hit (the batch's rows joined).
Run on demand:

    python benchmarks/bench_text_cache.py                       # SD1.5's and SDXL's encoders, batch 1 and 4
    python benchmarks/bench_text_cache.py --family sd15 --unet  # also an SD1.5 U-Net step, for the share

The encoders are built from the configs lorakit ships (``lorakit/configs/sd15``: CLIP ViT-L/14's text model;
``lorakit/configs/sdxl``: CLIP-L and OpenCLIP bigG with its projection) with random weights, on the CPU in float32,
and run as the trainer runs them (all hidden states kept, 77 tokens).  ``--unet``: an SD1.5 U-Net (its shipped
config) forward and backward at
``--resolution`` (random weights, the input's gradient only), the floor the encoding adds to.  Every number printed
comes from this one run; the variants are interleaved so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lorakit.conditioning import Conditioning, ConditioningCache

CONFIGS = Path(__file__).resolve().parents[1] / "lorakit" / "configs"


def config_file(family: str, part: str) -> Path:
    """A shipped component config: ``lorakit/configs/<family>/<part>/config.json``."""
    return CONFIGS / family / part / "config.json"


def encoders(family: str) -> list[torch.nn.Module]:
    first = CLIPTextModel(CLIPTextConfig.from_json_file(config_file(family, "text_encoder")))
    if family == "sd15":
        return [first]
    return [first, CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(config_file(family, "text_encoder_2")))]


def encode(modules: list[torch.nn.Module], ids: torch.Tensor) -> Conditioning:
    """The trainer's SDXL/SD1.x encoding, minus tokenizing: hidden states of every encoder, joined."""
    states, pooled = [], None
    for module in modules:
        out = module(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2] if len(modules) > 1 else out.last_hidden_state)
        pooled = getattr(out, "text_embeds", pooled)
    return Conditioning(torch.cat(states, dim=-1), pooled)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["sd15", "sdxl", "both"], default="both")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--unet", action="store_true", help="also time an SD1.5 U-Net step (the floor)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    families = ["sd15", "sdxl"] if args.family == "both" else [args.family]
    models = {f: [m.eval() for m in encoders(f)] for f in families}
    variants: dict[str, Callable[[], object]] = {}
    for family, modules in models.items():
        for batch in args.batch:
            ids = torch.randint(0, 49407, (batch, 77))
            cache = ConditioningCache()
            texts = [f"caption {i}" for i in range(batch)]
            rows = {t: encode(modules, ids[i:i + 1]) for i, t in enumerate(texts)}
            cache.conditioning(texts, rows.__getitem__)  # filled: the steps after the first see only hits
            variants[f"{family} encode, batch {batch}"] = lambda m=modules, x=ids: encode(m, x)
            variants[f"{family} cached, batch {batch}"] = \
                lambda c=cache, t=texts, r=rows: c.conditioning(t, r.__getitem__)
    if args.unet:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(json.loads(config_file("sd15", "unet").read_text()))
        unet.requires_grad_(False)
        side = args.resolution // 8
        latents = torch.randn(1, 4, side, side, requires_grad=True)
        text = torch.randn(1, 77, 768)

        def unet_step() -> None:
            unet(latents, torch.tensor([500]), text).sample.square().mean().backward()

        variants["sd15 U-Net forward+backward, batch 1"] = unet_step
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up
            if "U-Net" not in name:
                fn()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            if "U-Net" in name:
                times[name].append(timed(fn))
            else:
                with torch.no_grad():
                    times[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32, {args.rounds} rounds "
          "(median s per step)")
    for family in families:
        for batch in args.batch:
            plain, hit = median[f"{family} encode, batch {batch}"], median[f"{family} cached, batch {batch}"]
            print(f"{family} batch {batch}: encode {plain:.4f} s, cached {hit:.6f} s ({plain / hit:.0f}x less)")
    if args.unet:
        floor = median["sd15 U-Net forward+backward, batch 1"]
        plain = median.get("sd15 encode, batch 1")
        print(f"sd15 U-Net step at {args.resolution}²: {floor:.3f} s"
              + (f"; the encoding is {plain / floor:.1%} of it" if plain is not None else ""))
    if args.json:
        args.json.write_text(json.dumps({"median_s": median, "rounds": args.rounds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
