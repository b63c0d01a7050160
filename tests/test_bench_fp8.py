"""Smoke test of benchmarks/fp8_base.py: a tiny run in a subprocess writes the table and the JSON the docs quote.

It checks fields and the bytes at rest (exact), never timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.extended  # 10 s: the benchmark's harness, not the product (pytest -m extended)
def test_quick_run_writes_the_table_and_every_field(tmp_path: Path) -> None:
    out = tmp_path / "fp8.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_base.py"), "--quick", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| fp8 | " in done.stdout and "| bf16 | " in done.stdout
    rows = json.loads(out.read_text())["results"]
    bf16, fp8 = rows["bf16"], rows["fp8"]
    assert bf16["frozen_bytes"] == bf16["frozen_bytes_before"] == fp8["frozen_bytes_before"]
    assert 0.45 < fp8["frozen_bytes"] / bf16["frozen_bytes"] < 0.6  # one byte a weight but the norms
    assert len(bf16["times"]) == len(fp8["times"]) == 2 and fp8["median_s"] > 0


def run_gpu_script_part(out: Path, part: str, *args: str) -> tuple[dict, str]:
    """``benchmarks/gpu_issue14.sh PART --device cpu --quick --resolution 64 ARGS`` with $OUT = ``out``: the JSON
    and the table it left there (the arguments after the part win over the GPU settings)."""
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_issue14.sh"), part, "--device", "cpu", "--quick",
                           "--resolution", "64", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / f"issue14-{part}.json").read_text()), (out / f"issue14-{part}.txt").read_text()


def test_the_gpu_script_runs_it_with_the_gpu_settings(tmp_path: Path) -> None:
    """benchmarks/gpu_issue14.sh fp8: SD1.5's width at 512² in bf16 on CUDA, the arguments after the part winning
    over them (here: the CPU and a tiny U-Net), the table and JSON in $OUT."""
    result, table = run_gpu_script_part(tmp_path, "fp8", "--rounds", "1")
    assert "--device cuda --resolution 512 --dtype bf16 --width full --rounds 3" in result["command"]
    assert result["settings"]["device"] == "cpu" and result["settings"]["rounds"] == 1
    assert "| fp8 | " in table


def test_the_upcast_timing_names_both_ways(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_base.py"), "--upcast", "--rounds", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch .to(): " in done.stdout and "lorakit upcast: " in done.stdout
