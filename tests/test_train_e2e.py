"""End to end on the shipped model: training on the "zkz" concept makes the reader see the concept.

The base model has never seen the star: on the concept's 17 train and trigger prompts (2 seeds each) the
reader recognises a star in none of its 34 samples, and its mean star probability is 0.025.  After a short run
of each method (150 steps, about 40 s on 2 CPU cores), samples from the same prompts and seeds must show the
star at least as often as a floor and the mean star probability must be at least 2x the base model's.

Measured when the floors were set (the position-aware built-in model, MADE_BY.txt): LoRA 35% / 0.37, LoHa
26% / 0.25, LoKr 15% / 0.20, native 15% / 0.21 (100 steps), pivotal 21% / 0.25 (the step-8000 model gave
21% / 0.28, 9% / 0.15, 21% / 0.20, 6% / 0.17, 29% / 0.28).  The floors are about half the measured values, for
CPU kernels that differ in the last bits between machines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.config import TrainConfig
from lorakit.embeddings import load_embedding
from lorakit.formats import load_network
from lorakit.models import BaseModel, load_base_model
from lorakit.sample import SamplePrompt, generate
from lorakit.world import concept
from lorakit.world.reader import read_images
from lorakit.world.recipe import apply_recipe

pytestmark = pytest.mark.slow

SEEDS = (0, 1)


def concept_prompts() -> list[SamplePrompt]:
    chosen = [p for p in concept.eval_prompts() if p.type in ("train", "trigger")]
    return [SamplePrompt(p.prompt, seed=p.seed + 7919 * k, steps=20, cfg_scale=concept.SAMPLE_CFG)
            for p in chosen for k in SEEDS]


def star_rate(model: BaseModel, expand=lambda prompt: prompt) -> tuple[float, float]:
    """How often the reader recognises the star, and its mean star probability (a smoother view of the same)."""
    prompts = [SamplePrompt(**{**p.__dict__, "prompt": expand(p.prompt)}) for p in concept_prompts()]
    readings = [r.objects[0] if r.objects else None
                for r in read_images(generate(model, prompts, batch_size=34, progress=False))]
    star = concept.CONCEPT_SHAPE
    recognised = sum(o is not None and o.shape == star for o in readings) / len(readings)
    probability = sum(o.shape_probs.get(star, 0.0) for o in readings if o is not None) / len(readings)
    return recognised, probability


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zkz")
    concept.write_concept_dataset(folder)
    return folder


@pytest.fixture(scope="module")
def base_rate() -> tuple[float, float]:
    return star_rate(load_base_model(None))


def train_config(data: Path, out: Path, steps: int, **sections) -> TrainConfig:
    cfg = TrainConfig()
    cfg.method.kind = sections.get("method", {}).get("kind", "adapter")  # the recipe shapes adapters only
    apply_recipe(cfg)  # the built-in job's recipe (a LoCon, batch 4), with each run's own changes below
    cfg.data.train_data = str(data)
    cfg.training.max_steps = steps
    cfg.training.max_epochs = 100
    cfg.training.seed = 0
    cfg.early_stop.mode = "off"
    cfg.sample.prompts = None
    cfg.output.dir = str(out)
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


FULL = {"preset": "full", "rank": 8, "alpha": 8.0}  # LoCon: the star's outline lives in the conv layers too

# method -> (steps, config sections, floors: (recognised, mean star probability))
RUNS = {
    "lora": (150, {"network": {"algorithm": "lora", **FULL}, "optimizer": {"learning_rate": 4e-3}}, (0.17, 0.18)),
    "loha": (150, {"network": {"algorithm": "loha", **FULL}, "optimizer": {"learning_rate": 4e-3}}, (0.12, 0.12)),
    "lokr": (150, {"network": {"algorithm": "lokr", **FULL, "args": {"factor": 4}},
                   "optimizer": {"learning_rate": 4e-3}}, (0.07, 0.10)),
    # the LyCORIS family, floors about half of what one run measured (lorakit i19, 2 seeds × 17 prompts):
    # OFT 6% / 0.14, GLoRA 12% / 0.16, DyLoRA 9% / 0.16 (cut to rank 4: 3% / 0.09).  BOFT learns least and its
    # 150-step result swings with the last bits of the forward (output- vs weight-rotating: 6% / 0.11 vs
    # 0% / 0.05 at rank 8, the same function to 2e-6); at rank 16 it measured 3% / 0.081, so its floor asks only
    # for a mean star probability at twice the base model's
    "oft": (150, {"network": {"algorithm": "oft", **FULL}, "optimizer": {"learning_rate": 4e-3}}, (0.029, 0.075)),
    "boft": (150, {"network": {"algorithm": "boft", **FULL, "rank": 16}, "optimizer": {"learning_rate": 4e-3}},
             (0.0, 0.05)),
    # GLoRA's 150 steps at 4e-3 stopped teaching the star robustly once AdamW took torch's fused kernel (28674ec:
    # the same update to float rounding): 3% / 0.09 fused against 12% / 0.16 before, and with today's six-shape
    # reader 0% / 0.065 fused, 6% / 0.11 with the loop kernel; 8e-3 was worse (0% / 0.03-0.06): that lr sits where
    # the last bits decide.  At 2e-3 over 300 steps (AMD EPYC, 2026-12-05): 12% / 0.21 fused, 21% / 0.23 loop,
    # 12% / 0.19 with seed 1 (150 steps: 0-3% / 0.13); each run: python benchmarks/e2e_recipe.py glora --lr 2e-3
    # --steps 300 [--adamw loop] [--seed 1]
    "glora": (300, {"network": {"algorithm": "glora", **FULL}, "optimizer": {"learning_rate": 2e-3}}, (0.05, 0.10)),
    # DyLoRA on another CPU (Intel Xeon, 2026-12-04; the numbers above were an AMD EPYC's): 3% / 0.117, the same
    # code one star fewer in 34 samples (BLAS rounding); its floor asks for one star and 4x the base probability
    "dylora": (150, {"network": {"algorithm": "dylora", **FULL, "args": {"block_size": 2}},
                     "optimizer": {"learning_rate": 4e-3}}, (0.029, 0.08)),
    "native": (100, {"method": {"kind": "native"}, "optimizer": {"learning_rate": 1e-4}}, (0.07, 0.10)),
    "pivotal": (150, {"method": {"kind": "pivotal", "ti_token": "zkz"}, "network": FULL,
                      "optimizer": {"ti_lr": 5e-2, "unet_lr": 4e-3, "learning_rate": 4e-3}}, (0.10, 0.12)),
}


def trained_star_rate(method: str, out: Path) -> tuple[float, float]:
    if method == "native":
        return star_rate(load_base_model(out / "lorakit.safetensors"))
    model = load_base_model(None)
    network, report = load_network(out / "lorakit.safetensors", model.unet, model.text_encoder)
    assert report.matched and not report.unmatched and not report.mismatched
    expand = lambda prompt: prompt  # noqa: E731
    if method == "pivotal":
        expand = load_embedding(model, out / "lorakit-zkz.safetensors").expand_prompt
    return star_rate(model, expand)


#: run only with ``pytest -m extended`` (not in the default suite, which CI runs): the LyCORIS family's
#: rotations, GLoRA, LoKr, DyLoRA and LoHa, which the unit tests check against LyCORIS itself, and pivotal tuning,
#: whose two halves (textual inversion, LoRA) the suite trains (LoRA and native stay in CI); ~11 minutes of CPU
#: together.  LoKr and DyLoRA moved here when the suite neared CI's 15 minutes (2026-12-06: 820-885 s on 2 cores),
#: LoHa when it passed them on a slower machine (924 s; its run took 80 s of one worker), pivotal (72 s) when new
#: tests took that back, native (38 s) when the suite reached 888 s again (native training stays in test_train.py)
EXTENDED = ("oft", "boft", "glora", "lokr", "dylora", "loha", "pivotal", "native")


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.extended) if m in EXTENDED else m
                                    for m in RUNS])
def test_training_teaches_the_concept(method, data, base_rate, tmp_path):
    from lorakit.train import train

    steps, sections, (min_recognised, min_probability) = RUNS[method]
    train(train_config(data, tmp_path / method, steps, **sections), progress=False)
    recognised, probability = trained_star_rate(method, tmp_path / method)
    base_recognised, base_probability = base_rate
    print(f"{method}: star recognised in {recognised:.0%} of samples, mean star probability {probability:.3f} "
          f"after {steps} steps (base model: {base_recognised:.0%}, {base_probability:.3f})")
    assert base_recognised <= 0.06 and base_probability <= 0.05
    assert recognised >= min_recognised and recognised >= base_recognised
    assert probability >= min_probability and probability >= 2 * base_probability
    if method == "dylora":  # the same run, cut (one training run fewer in the suite)
        check_dylora_cut_to_half_its_rank(tmp_path / method, base_rate, tmp_path)


def check_dylora_cut_to_half_its_rank(out: Path, base_rate: tuple[float, float], tmp_path: Path) -> None:
    """The DyLoRA run, cut to rank 4 of 8 by ``resize``: still more stars than the base model (measured:
    3% recognised, mean star probability 0.09; base 0%, 0.025 on an AMD EPYC; 0%, 0.038; base 0%, 0.018 on an
    Intel Xeon, where the 2× bar has little room)."""
    from lorakit.tools.lowrank import RankRule
    from lorakit.tools.resize import resize_adapter

    cut = tmp_path / "half.safetensors"
    resize_adapter(out / "lorakit.safetensors", RankRule(rank=4)).write(cut, [out / "lorakit.safetensors"])
    model = load_base_model(None)
    network, report = load_network(cut, model.unet, model.text_encoder)
    assert report.matched and not report.unmatched and all(a.rank == 4 for a in network.adapters.values())
    recognised, probability = star_rate(model)
    base_recognised, base_probability = base_rate
    print(f"dylora cut to rank 4: {recognised:.0%}, {probability:.3f} (base {base_recognised:.0%}, "
          f"{base_probability:.3f})")
    assert recognised >= base_recognised and probability >= 2 * base_probability
