"""The shipped built-in model: it loads offline through diffusers and draws what held-out prompts ask for.

The floors are the accuracies measured on this fixed seed set when the model was shipped (README table), less
a margin for CPU kernels that differ in the last bits between machines; they guard against a broken loader,
tokenizer or scheduler config, which drop every attribute to chance (shape 20%, color 17%, position 11%).
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from lorakit.models import builtin_model_path, load_base_model
from lorakit.world import quality

pytestmark = pytest.mark.slow

# measured on quality.evaluate(count=100, seed=0), the README's table, when the position-aware model shipped
# (step-8000 model continued with the text encoder's position and background probes, MADE_BY.txt): shape 87%,
# color 98%, position 100%, size 94%, background 100%; floors are those less 3 images.  About 35 s on one core.
FLOORS = {"shape": 0.84, "color": 0.95, "position": 0.97, "size": 0.91, "background": 0.97}
BAR = 0.8  # issue 3: shape, color and position each right in >= 80% of held-out samples


def test_shipped_files_and_provenance():
    root = builtin_model_path()
    made_by = (root / "MADE_BY.txt").read_text()
    assert "lorakit.world.pretrain" in made_by and "--seed 0" in made_by
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= 40 * 2**20, f"built-in model is {size / 2**20:.1f} MB (limit 40 MB)"
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_loads_offline_in_diffusers():
    pipe = StableDiffusionPipeline.from_pretrained(builtin_model_path(), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    image = pipe("a large red circle in the center, white background", num_inference_steps=4, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)


# drawing 100 held-out prompts takes ~60 s of one worker: the shipped model's quality is checked with
# pytest -m extended (run it when the model or the sampler changes); the suite keeps its loading tests above
@pytest.fixture(scope="module")
def report() -> quality.QualityReport:
    return quality.evaluate(load_base_model(None), count=100, seed=0, progress=False)


@pytest.mark.extended
def test_held_out_prompts_are_drawn_as_asked(report):
    print(report.table())
    for attribute, floor in FLOORS.items():
        assert report.accuracy[attribute] >= floor, (attribute, report.accuracy)


@pytest.mark.extended
def test_quality_bar_of_issue_3(report):
    for attribute in ("shape", "color", "position"):
        assert report.accuracy[attribute] >= BAR, (attribute, report.accuracy)
