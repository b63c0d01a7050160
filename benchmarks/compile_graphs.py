"""How often ``lorakit train --compile`` compiles: graphs per run with aspect-ratio buckets and ragged batches.

    python benchmarks/compile_graphs.py                         # aot_eager: traces like inductor, no codegen
    python benchmarks/compile_graphs.py --backend inductor --json graphs.json   # on a GPU when there is one

With inductor every compilation costs minutes on a CPU (seconds to a minute on a GPU), so what matters is how
many a run pays and when.  The script builds the built-in architecture with random weights (no pretraining, no
download), writes a dataset whose images fall into several buckets (one of them holding a single image, so
batches change size), trains it compiled for a few epochs with samples between epochs, and prints every graph
torch.compile built: when (seconds after the start), for which latents, and whether it is dynamic (symbolic
sizes: one graph for every later shape that passes its guards).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

#: image sizes: with bucket steps of 16 px they land in 64×64 (2 images), 80×48 (2) and 48×80 (1)
SIZES = [(64, 64), (96, 64), (64, 96), (64, 64), (80, 48)]


def write_dataset(folder: Path) -> Path:
    sub = folder / "1_zkz shape"
    sub.mkdir(parents=True)
    for i, (w, h) in enumerate(SIZES):
        Image.new("RGB", (w, h), (40 * i, 100, 200)).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text("a zkz shape")
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend that compiles each graph")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from torch._dynamo.backends.registry import lookup_backend, register_backend

    from lorakit.config import TrainConfig
    from lorakit.train import train
    from lorakit.world.model import build_components
    from lorakit.world.pretrain import export_pipeline

    graphs: list[dict[str, Any]] = []
    started = time.perf_counter()

    def counting(gm, example_inputs, **kwargs):
        # the U-Net's first 4-D input is its latents
        latents = next((t for t in example_inputs if torch.is_tensor(t) and t.dim() == 4), None)
        graphs.append({"at_s": round(time.perf_counter() - started, 1),
                       "latents": None if latents is None else str(tuple(latents.shape)),
                       # a dynamic graph takes its symbolic sizes as extra integer inputs
                       "dynamic": any(isinstance(x, (int, torch.SymInt)) for x in example_inputs)})
        return lookup_backend(args.backend)(gm, example_inputs, **kwargs)

    register_backend(counting, name="lorakit_bench_counting")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        export_pipeline(build_components(0), root / "model")
        (root / "prompts.txt").write_text("a zkz shape --w 64 --h 64 --d 1 --s 4\n")
        cfg = TrainConfig()
        cfg.model.base = str(root / "model")
        cfg.model.compile = True
        cfg.model.compile_backend = "lorakit_bench_counting"
        cfg.data.train_data = str(write_dataset(root / "data"))
        cfg.data.enable_bucket, cfg.data.bucket_reso_steps, cfg.data.batch_size = True, 16, 2
        cfg.network.rank, cfg.network.alpha = 2, 1.0
        cfg.training.max_epochs = args.epochs
        cfg.early_stop.mode = "report"
        cfg.sample.prompts = str(root / "prompts.txt")
        cfg.output.dir = str(root / "out")
        result = train(cfg, progress=False)
        elapsed = time.perf_counter() - started
    report = {"backend": args.backend, "cuda": torch.cuda.is_available(), "epochs": args.epochs,
              "steps": len(result.losses), "graphs": graphs, "elapsed_s": round(elapsed, 1), "torch": torch.__version__}
    print(f"{len(graphs)} graph(s) compiled in {len(result.losses)} steps ({args.epochs} epochs, "
          f"backend {args.backend}, {elapsed:.0f} s in all):")
    for g in graphs:
        print(f"  at {g['at_s']} s: latents {g['latents']}, {'dynamic' if g['dynamic'] else 'static'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
