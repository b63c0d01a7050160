"""A/B of LoHa's one-node chain (``functional.loha_chain``) against the autograd graph it replaced, in one
interleaved run of ``train_step.py`` (the numbers in docs/performance.md, "What changed on 2026-12-04"):

    OMP_NUM_THREADS=1 python benchmarks/loha_chain_ab.py --rounds 6 --steps 3 --batches 1 --no-memory \\
        --variants floor,lorakit-loha,lorakit-loha-autograd

``lorakit-loha-autograd`` is ``lorakit-loha`` with the chain switched off (``LoHa._plain_chain`` answers no), so
the factorised layers run ``loha_factors`` through autograd; every other argument is ``train_step.py``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402  (beside this file)

from lorakit.adapters.loha import LoHa  # noqa: E402

CHAIN = LoHa._plain_chain
_setup = train_step.setup_lorakit


def setup_lorakit(unet, variant):
    # a class attribute: the switch holds for every adapter of this variant's round, and is restored for the next
    LoHa._plain_chain = (lambda self, x: False) if variant.name.endswith("-autograd") else CHAIN
    return _setup(unet, variant)


train_step.setup_lorakit = setup_lorakit
train_step.VARIANTS = (*train_step.VARIANTS,
                       train_step.Variant("lorakit-loha-autograd", "lorakit", "loha", "full"))

if __name__ == "__main__":
    train_step.main()
