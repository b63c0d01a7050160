"""Smoke test of benchmarks/fused_backward.py: a tiny run in a subprocess writes the table and the JSON the docs
quote. It checks fields and the gradients' bytes (exact), never timings or peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.extended  # 6 s: the benchmark's harness, not the product (pytest -m extended)
def test_quick_run_writes_the_table_and_every_field(tmp_path: Path) -> None:
    out = tmp_path / "fused.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused_backward.py"), "--quick", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| whole-model step | " in done.stdout and "| fused backward pass | " in done.stdout
    rows = json.loads(out.read_text())["results"]
    plain, fused = rows["whole-model step"], rows["fused backward pass"]
    assert plain["gradient_bytes"] == fused["gradient_bytes"] == 4 * plain["weights"]  # fp32 weights, all trained
    assert len(plain["times"]) == len(fused["times"]) == 2 and fused["median_s"] > 0


def test_the_gpu_script_runs_it_with_the_gpu_settings(tmp_path: Path) -> None:
    """benchmarks/gpu_issue14.sh fused: SD1.5's width at 512² in bf16 on CUDA, the arguments after the part winning
    over them (here: the CPU and a tiny U-Net), the table and JSON in $OUT."""
    from test_bench_fp8 import run_gpu_script_part

    result, table = run_gpu_script_part(tmp_path, "fused", "--steps", "1")
    assert "--device cuda --resolution 512 --dtype bf16 --width full --steps 3" in result["command"]
    assert result["settings"]["device"] == "cpu" and result["settings"]["steps"] == 1
    assert "| fused backward pass | " in table
