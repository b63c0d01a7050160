"""Round trips of the model tools on the built-in model, through the commands, with the numbers docs/blockwise.md
quotes.  Run: ``python benchmarks/bench_tools.py [--out DIR]`` (CPU, about a minute).

1. a random LoRA/LoCon (rank 8, text encoder too) -> ``lorakit merge`` into a single file -> ``lorakit extract`` at
   full rank: the largest |ΔW error| per module against the adapter's own ΔW, in units of float32 eps · max |W|;
2. ``lorakit extract`` at rank 6 -> ``lorakit resize --dynamic sv_fro --param 0.9``: the reported energy against a
   direct SVD of each extracted module;
3. ``lorakit merge a:1:OUTALL``: how many tensors of the IN and MID blocks changed (0 expected, bit for bit);
4. ``lorakit merge a b --to-adapter``: U-Net output of the combined file against both applied one after the other;
5. the low-rank SVD against the dense ones on an SD1.5-sized conv ΔW (1280 x 11520, rank 32).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from lorakit.cli import main
from lorakit.formats import load_network, read_adapter, save_network
from lorakit.models import load_base_model
from lorakit.network import UniformRanks, adaptable_layers, components, create_network
from lorakit.tools.deltas import file_deltas
from lorakit.tools.lowrank import Delta, RankRule, dense_svd, thin_svd


def random_adapter(model, path: Path, rank: int, seed: int, preset: str = "full") -> Path:
    network = create_network(model.unet, model.text_encoder, preset=preset,
                             ranks=UniformRanks(rank, rank / 2, conv_rank=rank // 2, conv_alpha=1.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for key, p in adapter.named_parameters():
                if not key.startswith("base."):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_network(network, path)
    network.remove()
    return path


def unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 6, model.unet.config.cross_attention_dim,
                                                                 generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 700]), ctx).sample


def run(*argv: str) -> None:
    if main(list(argv)) != 0:
        raise SystemExit(f"lorakit {' '.join(argv)} failed")


def bench(out: Path) -> None:
    torch.set_num_threads(1)
    base = load_base_model(None)
    a = random_adapter(base, out / "a.safetensors", 8, 1)
    b = random_adapter(base, out / "b.safetensors", 4, 2, preset="attn-mlp")

    run("merge", f"{a}:1", "--out", str(out / "merged.safetensors"))
    run("extract", str(out / "merged.safetensors"), "--out", str(out / "full.safetensors"), "--rank", "100000",
        "--report", str(out / "full.txt"))
    tuned = load_base_model(out / "merged.safetensors")
    weights = {c.kohya_name(p): layer.weight.detach() for c in components(tuned.unet, tuned.text_encoder)
               for p, layer in adaptable_layers(c)}
    want, got = file_deltas(a, base), file_deltas(out / "full.safetensors")
    eps = torch.finfo(torch.float32).eps
    ratios = [float((got[n].matrix() - d.matrix()).abs().max()) / (eps * float(weights[n].abs().max()))
              for n, d in want.items()]
    print(f"\n[1] merge -> extract at full rank: {len(want)} modules, largest |ΔW error| = {max(ratios):.2f} "
          f"eps·max|W| (median {sorted(ratios)[len(ratios) // 2]:.2f})")

    run("extract", str(out / "merged.safetensors"), "--out", str(out / "x6.safetensors"), "--rank", "6",
        "--conv-rank", "3")
    run("resize", str(out / "x6.safetensors"), "--out", str(out / "r.safetensors"), "--dynamic", "sv_fro",
        "--param", "0.9", "--report", str(out / "r.txt"))
    extracted = file_deltas(out / "x6.safetensors")
    reported = {}
    for line in (out / "r.txt").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6 and parts[0].startswith("lora_"):
            reported[parts[0]] = float(parts[5])
    worst = 0.0
    for name, delta in extracted.items():
        s = torch.linalg.svdvals(delta.matrix())
        k = RankRule(dynamic="sv_fro", param=0.9).choose(s)
        worst = max(worst, abs(float((s[:k] ** 2).sum() / (s**2).sum()) - reported[name]))
    print(f"[2] extract -> resize sv_fro 0.9: {len(reported)} modules; reported energy vs direct SVD: largest "
          f"difference {worst:.1e} (the table prints 6 decimals)")

    run("merge", f"{a}:1:OUTALL", "--out", str(out / "outall.safetensors"))
    lbw = load_base_model(out / "outall.safetensors")
    changed = [k for k, v in lbw.unet.state_dict().items()
               if k.startswith(("down_blocks", "mid_block")) and not torch.equal(v, base.unet.state_dict()[k])]
    print(f"[3] merge with OUTALL: {len(changed)} tensors of the IN/MID blocks differ from the base (bit for bit)")

    run("merge", f"{a}:0.7", f"{b}:-0.4:INALL", "--to-adapter", "--out", str(out / "ab.safetensors"))
    both = copy.deepcopy(base)
    for path, mult, lbw_text in ((a, 0.7, None), (b, -0.4, "INALL")):
        from lorakit.blocks import parse_block_weights

        net, _ = load_network(path, both.unet, both.text_encoder)
        net.set_multiplier(mult, parse_block_weights(lbw_text) if lbw_text else None)
        net.merge()
        net.remove(keep_merged=True)
    combined = copy.deepcopy(base)
    load_network(out / "ab.safetensors", combined.unet, combined.text_encoder)
    diff = float((unet_out(combined) - unet_out(both)).abs().max())
    effect = float((unet_out(both) - unet_out(base)).abs().max())
    ranks = sorted({t["lora_down.weight"].shape[0] for t in read_adapter(out / "ab.safetensors").modules().values()})
    print(f"[4] LoRA + LoRA combined exactly (ranks {ranks}): U-Net output differs from applying both by "
          f"{diff:.1e} (the adapters move it by {effect:.2f})")

    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(1280, 32, generator=g), torch.randn(32, 11520, generator=g)
    t0 = time.perf_counter()
    _, s_low, _ = thin_svd(Delta((1280, 1280, 3, 3), up=up, down=down))
    t1 = time.perf_counter()
    dense = up.double() @ down.double()
    _, s_gram, _ = dense_svd(dense)
    t2 = time.perf_counter()
    s_dense = torch.linalg.svdvals(dense)
    t3 = time.perf_counter()
    print(f"[5] SVD of a 1280 x 11520 rank-32 ΔW (one thread): from the factors {1000 * (t1 - t0):.0f} ms, "
          f"dense through the Gram matrix {t2 - t1:.1f} s, LAPACK svdvals {t3 - t2:.1f} s; singular values agree "
          f"to {float((s_low - s_dense[:32]).abs().max() / s_dense[0]):.1e} of σ1 (factors), "
          f"{float((s_gram[:32] - s_dense[:32]).abs().max() / s_dense[0]):.1e} (Gram; its zero tail comes out at "
          f"{float(s_gram[32:].max() / s_dense[0]):.1e}, below the lossless cut 1e-7)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        bench(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench(Path(tmp))
