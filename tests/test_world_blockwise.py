"""The block-wise experiment (lorakit world blockwise): its style set, what it reads from an image, its
statistics, and one small run through the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.world import blockwise, style
from lorakit.world.reader import default_reader
from lorakit.world.render import ObjectSpec, Scene, render_array

ROOT = Path(__file__).resolve().parent.parent


def test_style_set_is_the_texture_on_base_shapes_and_deterministic(tmp_path):
    paths = style.write_style_dataset(tmp_path / "a")
    again = style.write_style_dataset(tmp_path / "b")
    assert len(paths) == 16 and paths[0].parent.name == "10_checkered background"
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    captions = [p.with_suffix(".txt").read_text() for p in paths]
    assert all("checkered background" in c for c in captions)
    assert not any("star" in c or "zkz" in c for c in captions)
    readings = default_reader().read_many([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    assert all(r.background == "checkered" for r in readings)
    assert [r.main.shape for r in readings] == [s.objects[0].shape for s in style.style_scenes()]
    assert "star" not in {s.objects[0].shape for s in style.style_scenes()}


def _outcome(shape: str, color: str, position: str, background: str) -> dict[str, bool]:
    image = render_array(Scene((ObjectSpec(shape, color, "large", position),), background, seed=5))
    prompt = blockwise.combined_prompts()[6]  # blue star, top left, checkered
    assert prompt.expected == {"shape": "star", "color": "blue", "position": "top left", "background": "checkered"}
    return blockwise.outcome(default_reader().read(image), prompt)


def test_outcome_checks_each_request_on_the_image():
    assert _outcome("star", "blue", "top left", "checkered") == dict.fromkeys(blockwise.CHECKS, True)
    assert _outcome("star", "blue", "top left", "white") == {"identity": True, "style": False, "color": True,
                                                              "position": True, "all": False}
    assert _outcome("circle", "blue", "top left", "checkered")["identity"] is False
    assert _outcome("star", "red", "bottom", "checkered") == {"identity": True, "style": True, "color": False,
                                                             "position": False, "all": False}


def test_prompts_ask_for_the_texture_and_the_trigger_only_where_meant():
    combined, alone = blockwise.combined_prompts(), blockwise.style_only_prompts()
    assert all("zkz shape" in p.text and p.text.endswith("checkered background") for p in combined)
    assert not any("zkz" in p.text for p in alone) and all("checkered" in p.text for p in alone)
    assert len({p.seed for p in combined + alone}) == len(combined) + len(alone)


def test_bootstrap_difference_of_rates():
    rows_a = [{"prompt": f"p{i}", "identity": i % 4 != 0} for i in range(8) for _ in range(3)]  # 0.75
    rows_b = [{"prompt": f"p{i}", "identity": i % 2 == 0} for i in range(8) for _ in range(3)]  # 0.5
    d, low, high = blockwise.bootstrap_difference(rows_a, rows_b, "identity")
    assert d == pytest.approx(0.25) and low <= 0.25 <= high and low < high
    assert blockwise.bootstrap_difference(rows_a, rows_a, "identity") == (0.0, 0.0, 0.0)


def test_plan_pairs_every_style_with_the_character(tmp_path):
    plan = blockwise.Plan(tmp_path, ("upper", "all"), (0, 1))
    pairings = plan.pairings()
    combined = [p for p in pairings if p.prompts == "combined"]
    assert len(combined) == 2 + 4 and len(pairings) == 2 + 4 + 1 + 4
    assert all(p.adapters[0] == tmp_path / "character" / "lorakit.safetensors" for p in combined[1:])
    assert len({p.slug for p in pairings}) == len(pairings)


# ~100 s of one worker: with pytest -m extended (the block-wise logic it drives is unit-tested in the suite; moved
# out when the suite passed 14.5 minutes on a 2-core machine, 2026-12-06)
@pytest.mark.extended
def test_command_trains_samples_reports_and_resumes(tmp_path):
    out = tmp_path / "bw"
    cmd = [sys.executable, "-m", "lorakit.cli", "world", "blockwise", "--out", str(out), "--blocks", "upper,all",
           "--style-seeds", "0", "--sample-seeds", "1", "--character-epochs", "1", "--style-epochs", "1",
           "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    trained = [line for line in first.stdout.splitlines() if line.startswith("training ")]
    assert trained == ["training character", "training style_upper_s0", "training style_all_s0"]
    report = (out / "blockwise.md").read_text()
    assert "| character + style[upper] |" in report and "| style[all] |" in report and "| upper |" in report
    data = json.loads((out / "blockwise.json").read_text())
    assert len(data["results"]) == len(blockwise.Plan(out, ("upper", "all"), (0,)).pairings())
    assert all(len(r["images"]) == (8 if r["prompts"] == "combined" else 4) for r in data["results"])
    grid = Image.open(out / "blockwise_grid.png")
    assert grid.width > 8 * 64 and grid.height > 4 * 64  # base, character, + upper, + all: 4 rows of 8
    # the upper-blocks style has no module outside IN0/OUT3: its file holds no key of the other blocks
    from safetensors import safe_open
    with safe_open(str(out / "style_upper_s0" / "lorakit.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("down_blocks_0" in k or "up_blocks_3" in k for k in keys)

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "sampling" in again.stdout
    assert not any(line.startswith("training ") for line in again.stdout.splitlines())
    assert (out / "blockwise.md").read_text() == report

    bad = subprocess.run(cmd[:-1] + ["--blocks", "top"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "argument --blocks: 'top' is not one of upper, middle, bottom, all" in bad.stderr


def test_cached_samples_are_reused_only_for_the_same_prompts_and_seeds(tmp_path):
    pairing = blockwise.Pairing("character", (tmp_path / "c.safetensors",), "style-only")
    prompts = blockwise.style_only_prompts()
    rows = [{"prompt": p.text, "seed": p.seed + 10_000 * k, **dict.fromkeys(blockwise.CHECKS, True)}
            for p in prompts for k in range(2)]
    cache = tmp_path / pairing.slug / "scores.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({"pairing": pairing.name, "prompts": "style-only", "blocks": None,
                                 "style_seed": None, "images": rows}))
    assert blockwise.sample_pairing(None, pairing, prompts, 2, tmp_path)["images"] == rows  # no model needed
    from lorakit.formats import AdapterFileNotFoundError

    with pytest.raises(AdapterFileNotFoundError):  # 3 seeds asked: it samples again, and needs the adapter for it
        blockwise.sample_pairing(None, pairing, prompts, 3, tmp_path)
