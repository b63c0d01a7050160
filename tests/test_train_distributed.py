"""Data-parallel training through `accelerate launch`: two CPU processes on the gloo backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import write_dataset

SCRIPT = Path(__file__).parent / "scripts" / "distributed_train.py"


def free_port() -> int:
    """A port nobody listens on now (a fixed one fails when another run, or another test session, holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_synchronised_adapter(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", n=4)
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[data]\ntrain_data = "{data}"\nbatch_size = 1\n'
                   f'[network]\nrank = 2\n[training]\nmax_epochs = 2\n[early_stop]\nmode = "off"\n'
                   f'[output]\ndir = "{out}"\n')
    # --multi_gpu selects accelerate's torchrun launcher; without a GPU each process runs on the CPU with gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(SCRIPT), str(job), str(tmp_path)]
    # the tests' folder (the script imports test helpers) and this checkout's lorakit, not an installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parent.parent)])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    metas = []
    for rank in (0, 1):
        with safe_open(str(tmp_path / f"rank{rank}.safetensors"), "pt") as f:
            metas.append(f.metadata())
    assert all(m["world"] == "2" and m["backend"] == "gloo" for m in metas)
    assert all(m["steps"] == "4" for m in metas)  # 4 images, batch 1, 2 processes: 2 steps per epoch
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    # each process saw different images; only synchronised gradients keep the replicas identical
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = load_file(str(out / "lorakit.safetensors"))
    assert all(torch.equal(final[k], a[k]) for k in final)
    assert any(float(v.abs().max()) > 0 for k, v in final.items() if k.endswith("lora_up.weight"))
