"""One end-to-end recipe of tests/test_train_e2e.py, with its knobs exposed: how often the reader sees the star.

    python benchmarks/e2e_recipe.py glora --lr 2e-3 --steps 300                  # the GLoRA test's recipe
    python benchmarks/e2e_recipe.py glora --lr 2e-3 --steps 300 --adamw loop     # AdamW's for-loop kernel
    python benchmarks/e2e_recipe.py glora --lr 2e-3 --steps 300 --seed 1

Trains the built-in model on the "zkz" concept as the e2e test does (the built-in job's recipe, the full preset at
rank 8, early stopping off) and prints the share of the test's 34 samples in which the reader recognises the star
and its mean star probability, the two numbers the test's floors are set from.  ``--adamw loop`` turns off torch's
fused AdamW kernel (the same update to float rounding) to show how much a recipe's result rests on the last bits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("algorithm", help="network.algorithm: lora, loha, lokr, oft, boft, glora, dylora, ...")
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adamw", choices=["fused", "loop"], default="fused")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    import test_train_e2e as e2e

    import lorakit.optimizers
    from lorakit.train import train
    from lorakit.world import concept

    if args.adamw == "loop":
        lorakit.optimizers.can_fuse = lambda groups: False
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "zkz", Path(tmp) / "out"
        data.mkdir()
        concept.write_concept_dataset(data)
        cfg = e2e.train_config(data, out, args.steps, network={"algorithm": args.algorithm, **e2e.FULL},
                               optimizer={"learning_rate": args.lr})
        cfg.training.seed = args.seed
        train(cfg, progress=False)
        recognised, probability = e2e.trained_star_rate(args.algorithm, out)
    print(f"{args.algorithm}, lr {args.lr:g}, {args.steps} steps, seed {args.seed}, AdamW {args.adamw}: star "
          f"recognised in {recognised:.0%} of samples, mean star probability {probability:.3f}")


if __name__ == "__main__":
    main()
