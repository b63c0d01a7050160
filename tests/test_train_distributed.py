"""Data-parallel training through `accelerate launch`: two CPU processes on the gloo backend."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
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


def launch(tmp_path: Path, job: Path, *script_args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the script under `accelerate launch` with two processes."""
    # --multi_gpu selects accelerate's torchrun launcher; without a GPU each process runs on the CPU with gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(SCRIPT), str(job), str(tmp_path), *script_args]
    # the tests' folder (the script imports test helpers) and this checkout's lorakit, not an installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parent.parent)])}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def launch_two_processes(tmp_path: Path, job: Path, *script_args: str) -> list[dict[str, str]]:
    """Run the script under `accelerate launch` with two processes; each rank's saved metadata."""
    done = launch(tmp_path, job, *script_args)
    assert done.returncode == 0, done.stderr[-3000:]
    metas = []
    for rank in (0, 1):
        with safe_open(str(tmp_path / f"rank{rank}.safetensors"), "pt") as f:
            metas.append(f.metadata())
    return metas


# the plain launch (17 s) runs with pytest -m extended: the suite keeps the harder case, a script that made
# accelerate's PartialState() first, whose two processes must still train one synchronised adapter
@pytest.mark.parametrize("script_args", [pytest.param((), marks=pytest.mark.extended), ("partial-state-first",)],
                         ids=["plain", "partial-state-first"])
def test_two_processes_train_one_synchronised_adapter(tiny_model_dir, tmp_path, script_args):
    """Also when the user's script made accelerate's PartialState() before train(): on a machine without a GPU it
    set itself up for one process, and both processes would have trained alone, each believing it is the main one.
    An odd number of batches: the epoch is evened out with its first batch again (one process went on to the
    epoch's end while the other waited for its gradients: a gloo crash, or a hang)."""
    data = write_dataset(tmp_path / "data", n=6)
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    # one image held out for validation, measured by the main process every step while the other waits; the
    # main process saves a checkpoint every step too (mid-epoch: the other waits at the next step)
    job.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[data]\ntrain_data = "{data}"\nbatch_size = 1\n'
                   f'validation_split = 0.2\n[network]\nrank = 2\n[optimizer]\nlr_scheduler = "linear"\n'
                   f'learning_rate = 1e-3\n[training]\nmax_epochs = 2\nddp_timeout = 7\nddp_static_graph = true\n'
                   f'validate_every_n_steps = 1\nsave_every_n_steps = 1\n[early_stop]\nmode = "off"\n'
                   f'[output]\ndir = "{out}"\n')
    metas = launch_two_processes(tmp_path, job, *script_args)
    assert all(m["world"] == "2" and m["backend"] == "gloo" for m in metas)
    if not script_args:  # kohya's ddp_timeout, in minutes (a group the script set up before train() keeps its own)
        assert [m["timeout"] for m in metas] == ["0:07:00"] * 2
    assert all(m["steps"] == "6" for m in metas)  # 5 images trained (+1 again), batch 1, 2 processes: 3 per epoch
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_loss" in r] == list(range(7))  # the base model's first, then each step
    # the schedule counts optimizer steps, as in one process: linear decay over the run's 6 steps (accelerate
    # steps a prepared schedule once per process; it ended at step 3 of 6)
    assert [r["lr"] for r in log if "loss" in r] == pytest.approx([1e-3 * k / 6 for k in range(5, -1, -1)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch-0001", "epoch-0002", "step-00000001", "step-00000002", "step-00000004", "step-00000005"]  # epoch
    # ends (steps 3 and 6) are the epochs' checkpoints
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    # each process saw different images; only synchronised gradients keep the replicas identical
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = load_file(str(out / "lorakit.safetensors"))
    assert all(torch.equal(final[k], a[k]) for k in final)
    assert any(float(v.abs().max()) > 0 for k, v in final.items() if k.endswith("lora_up.weight"))


def sample_stop_job(tiny_model_dir: Path, tmp_path: Path) -> Path:
    from test_earlystop_samples import PROMPTS

    data = write_dataset(tmp_path / "data", n=4)
    (tmp_path / "p.toml").write_text(PROMPTS)
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[data]\ntrain_data = "{data}"\nbatch_size = 1\n'
                   f'[network]\nrank = 2\n[training]\nmax_epochs = 10\n[sample]\nsteps = 2\n'
                   f'[early_stop]\nmode = "cs-fluctuation"\nsamples = "count-test"\n'
                   f'sample_prompts = "{tmp_path / "p.toml"}"\nsample_patience = 2\n'
                   f'[output]\ndir = "{tmp_path / "out"}"\n')
    return job


@pytest.mark.extended  # 15-20 s of two processes; the suite's budget keeps the plainer ones
def test_two_processes_stop_together_on_the_samples(tiny_model_dir, tmp_path):
    """early_stop.samples with two processes: the main one draws and scores, both record the score, so both
    stop after the same epoch and hand back the same turning point (a process that went on alone would hang)."""
    metas = launch_two_processes(tmp_path, sample_stop_job(tiny_model_dir, tmp_path), "count-scorer")
    # CountingScorer's script stops once epoch 5 is scored and hands back epoch 1 (see test_earlystop_samples)
    assert [m["scorer_calls"] for m in metas] == ["6", "0"]  # epochs 0-5, scored by the main process only
    assert all(m["steps"] == "10" and m["stopped_early"] == "True" and m["final_epoch"] == "1" for m in metas)
    record = json.loads((tmp_path / "out" / "sample_scores.json").read_text())
    assert record["scores"] == {"0": 0.0, "1": 0.5, "2": 1.0, "3": 0.1, "4": 0.1, "5": 0.1}
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)  # both hold the turning point's checkpoint


@pytest.mark.extended  # 15-20 s of two processes; the suite's budget keeps the plainer ones
def test_a_scorer_failing_in_the_main_process_stops_every_process(tiny_model_dir, tmp_path):
    """The other process waits for the main one's score; when scoring fails it is told and stops too, with the
    reason (torchrun would kill it without one; a launcher that does not watch its workers would leave it
    waiting until the process group times out)."""
    done = launch(tmp_path, sample_stop_job(tiny_model_dir, tmp_path), "failing-scorer", timeout=300)
    assert done.returncode != 0
    assert "the scorer's model is missing" in done.stderr
    assert "the main process failed scoring the samples of epoch 0: RuntimeError" in done.stderr


def test_a_full_disk_in_the_main_process_stops_every_process(tiny_model_dir, tmp_path):
    """Only the main process saves checkpoints and samples; when that fails (here: no space left), the other
    process stops with the reason instead of waiting at the next step for a partner that is gone."""
    # the script fails the main process's checkpoint as a full disk would (OSError ENOSPC)
    data = write_dataset(tmp_path / "data", n=4)
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[data]\ntrain_data = "{data}"\nbatch_size = 1\n'
                   f'[network]\nrank = 2\n[training]\nmax_epochs = 3\n[early_stop]\nmode = "off"\n'
                   f'[output]\ndir = "{tmp_path / "out"}"\n')
    done = launch(tmp_path, job, "full-disk", timeout=300)
    assert done.returncode != 0
    assert "No space left on device" in done.stderr
    assert "the main process failed validating, saving or sampling epoch 1: OSError" in done.stderr


def test_the_ddp_settings_reach_accelerate():
    """kohya's ddp_timeout, ddp_gradient_as_bucket_view and ddp_static_graph become accelerate's handlers (the
    timeout in a process group train() sets up: the extended 2-process test reads it there); none by default."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lorakit.config import TrainingConfig
    from lorakit.train import distributed_settings

    assert distributed_settings(TrainingConfig()) == []
    handlers = distributed_settings(TrainingConfig(ddp_timeout=7, ddp_static_graph=True))
    try:
        accelerator = Accelerator(cpu=True, kwargs_handlers=handlers)
        assert accelerator.init_handler.timeout.total_seconds() == 7 * 60
        assert accelerator.ddp_handler.static_graph and not accelerator.ddp_handler.gradient_as_bucket_view
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def test_a_timeout_that_cannot_apply_to_a_group_made_before_train_is_said(tmp_path):
    """training.ddp_timeout sets the timeout of the group train() makes; a script that made its own first keeps
    that group and its timeout, and the run says so instead of letting the setting pass for applied."""
    import torch.distributed as dist

    from lorakit.config import TrainingConfig
    from lorakit.train import ddp_timeout_note

    assert ddp_timeout_note(TrainingConfig(ddp_timeout=7)) is None  # no group yet: train() makes it with 7 minutes
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        note = ddp_timeout_note(TrainingConfig(ddp_timeout=7))
        assert note is not None and note.startswith("note: training.ddp_timeout = 7 does not apply")
        assert ddp_timeout_note(TrainingConfig()) is None  # not set: nothing to say
    finally:
        dist.destroy_process_group()
