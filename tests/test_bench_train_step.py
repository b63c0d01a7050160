"""Smoke test of benchmarks/train_step.py: a tiny run in a subprocess writes the JSON the docs rely on.

It checks fields and consistency only, never timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.extended  # 15 s: the benchmark's own harness, not the product (pytest -m extended)
@pytest.mark.slow
def test_quick_run_writes_every_field(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    variants = ["floor", "lorakit-lora", "lorakit-loha", "lorakit-native"]
    for library, name in (("peft", "peft-lora"), ("lycoris", "lycoris-loha")):
        try:
            __import__(library)
            variants.append(name)
        except ImportError:
            pass
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--rounds", "1",
           "--batches", "1,2", "--warmup", "0", "--variants", ",".join(variants), "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())

    assert {"platform", "torch", "cpu_count", "torch_threads"} <= set(result["machine"])
    settings = result["settings"]
    assert settings["quick"] and settings["batches"] == [1, 2] and settings["rounds"] == 1
    assert settings["width"] == "half"
    rows = result["results"]
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for b in (1, 2) for v in variants]
    for row in rows:
        assert row["s_per_step"] > 0 and len(row["times"]) == 1 and len(row["wall_times"]) == 1
        assert row["trained_state_mib"] >= 0
        assert "peak_step_mib" in row
    by = {(r["variant"], r["batch"]): r for r in rows}
    for b in (1, 2):
        floor = by[("floor", b)]
        assert floor["x_floor"] == 1.0 and floor["trained_params"] == 0 and floor["modules"] == 0
        lora = by[("lorakit-lora", b)]
        assert lora["x_floor"] == pytest.approx(lora["s_per_step"] / floor["s_per_step"], rel=1e-2)
        assert lora["modules"] > 0 and lora["trained_params"] > 0
        # trained tensors + AdamW's two moments, float32
        assert lora["trained_state_mib"] == pytest.approx(3 * 4 * lora["trained_params"] / 2**20, abs=0.02)
        if "peft-lora" in variants:
            peft = by[("peft-lora", b)]
            # the same layers at the same rank: the same number of trained values
            assert (peft["modules"], peft["trained_params"]) == (lora["modules"], lora["trained_params"])
            assert lora["x_peers"]["peft-lora"] == pytest.approx(lora["s_per_step"] / peft["s_per_step"],
                                                                 rel=1e-2)
        if "lycoris-loha" in variants:
            ours, theirs = by[("lorakit-loha", b)], by[("lycoris-loha", b)]
            assert (ours["modules"], ours["trained_params"]) == (theirs["modules"], theirs["trained_params"])
            assert set(ours["x_peers"]) == {"lycoris-loha"}
        native = by[("lorakit-native", b)]
        assert native["trained_params"] > 10 * lora["trained_params"]


@pytest.mark.extended  # 10 s: the benchmark's own harness, not the product (pytest -m extended)
def test_channels_last_runs_every_variant_in_that_layout(tmp_path: Path) -> None:
    """``--channels-last``: the U-Net, the adapters set up on it and the latents in channels-last layout."""
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--rounds", "1", "--batches", "1",
           "--warmup", "0", "--no-memory", "--variants", "floor,lorakit-lora", "--channels-last", "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["channels_last"] is True
    assert [r["variant"] for r in result["results"]] == ["floor", "lorakit-lora"]
    assert all(r["s_per_step"] > 0 for r in result["results"])


def test_width_is_sd15s_own_on_a_gpu_and_half_on_the_cpu() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert train_step.parse_args([]).width == "half"
    assert train_step.parse_args(["--device", "cuda"]).width == "full"
    assert train_step.parse_args(["--device", "cuda", "--width", "half"]).width == "half"
    assert train_step.unet_config(False, "full")["block_out_channels"] == (320, 640, 1280, 1280)  # SD1.5's
    assert train_step.unet_config(False)["block_out_channels"] == (160, 320, 640, 640)


def test_the_sdxl_family_is_sdxl_bases_unet_with_its_size_conditioning() -> None:
    """``--family sdxl``: SDXL 1.0 base's U-Net config as lorakit ships it (at half width on the CPU), and batches
    that carry the pooled text embedding and six size numbers it is conditioned on; a tiny one runs a step."""
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    full, half = train_step.unet_config(False, "full", "sdxl"), train_step.unet_config(False, "half", "sdxl")
    assert (full["block_out_channels"], full["cross_attention_dim"]) == ((320, 640, 1280), 2048)
    assert full["transformer_layers_per_block"] == [1, 2, 10] and half["block_out_channels"] == (160, 320, 640)
    assert train_step.pooled_width(full) == 1280 and train_step.pooled_width(train_step.unet_config(False)) is None
    assert train_step.parse_args(["--family", "sdxl"]).family == "sdxl"
    tiny = train_step.unet_config(True, family="sdxl")
    batch = train_step.make_batch(2, 8, tiny["cross_attention_dim"], "cpu", torch.float32,
                                  train_step.pooled_width(tiny))
    assert batch.extra["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    unet = UNet2DConditionModel(**tiny)
    out = unet(batch.latents, batch.timesteps, batch.text, **batch.extra).sample
    assert out.shape == batch.target.shape


def test_the_gpu_script_runs_the_benchmark_with_the_issues_settings(tmp_path: Path) -> None:
    """benchmarks/gpu_issue14.sh: the GPU settings (512², bf16, SD1.5's width) go to train_step.py, the arguments
    after the part win over them (here: the CPU and a tiny U-Net), and the log and JSON land in $OUT."""
    pytest.importorskip("diffusers")
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_issue14.sh"), "eager", "--device", "cpu", "--dtype", "fp32",
           "--quick", "--resolution", "64", "--rounds", "1", "--batches", "1", "--warmup", "0", "--no-memory",
           "--variants", "floor,lorakit-lora"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "issue14-eager.json").read_text())
    command = result["settings"]["command"]
    assert "--device cuda --resolution 512 --dtype bf16 --width full --batches 1,4 --rounds 3" in command
    assert result["settings"]["device"] == "cpu" and result["settings"]["batches"] == [1]
    assert [r["variant"] for r in result["results"]] == ["floor", "lorakit-lora"]
    log = (tmp_path / "issue14-eager.txt").read_text()
    assert log.startswith("# benchmarks/gpu_issue14.sh eager --device cpu") and "| lorakit-lora | 1 |" in log
    wrong = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_issue14.sh"), "fast"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown part 'fast'" in wrong.stderr
