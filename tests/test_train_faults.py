"""Real faults in real processes: `lorakit train` killed with SIGKILL (before the first checkpoint, in the middle
of a save), stopped with Ctrl-C (SIGINT) mid-epoch, and out of disk space (a file-size limit) while saving; then
`--resume`, compared step by step (the losses in log.jsonl) and bit by bit (the result file) with a run that was
never interrupted.  Also `--overwrite` in a project folder that holds the user's own files.

All runs: the built-in model, 4 images x 3 repeats at batch 1 (12 steps per epoch), 18 steps, no early stop.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import write_dataset

ROOT = Path(__file__).resolve().parent.parent
STEPS = 18  # 1.5 epochs of 12 steps
ARGS = ["--batch-size", "1", "--early-stop", "off", "--no-progress", "--seed", "3"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_cmd(data: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "lorakit.cli", "train", "--data", str(data), "--out", str(out),
            "--max-steps", str(steps), *ARGS, *extra]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, **kwargs)


def log_steps(out: Path, running: bool = False) -> list[dict]:
    """The run's log records; ``running``: another process is appending, so its last line may be half written
    and is left out."""
    path = out / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in (lines[:-1] if running else lines)]


def _sigint_as_in_a_terminal() -> None:
    # a suite started in the background by a non-interactive shell (`pytest &`) ignores SIGINT, and children
    # inherit that: Python then never raises KeyboardInterrupt, whatever lorakit does
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_signal(cmd: list[str], out: Path, after_steps: int, sig: int) -> subprocess.CompletedProcess:
    """Start ``cmd`` and send ``sig`` once log.jsonl holds ``after_steps`` steps."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len((out / "log.jsonl").read_text().splitlines()) >= after_steps:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before step {after_steps}: {proc.communicate()[1][-2000:]}"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("faults") / "data", n=4, repeats=3)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The uninterrupted run: its losses step by step, and its result."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run(train_cmd(data, out))
    assert done.returncode == 0, done.stderr[-3000:]
    records = log_steps(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records], load_file(str(out / "lorakit.safetensors"))


def assert_same_run(out: Path, reference) -> None:
    losses, result = reference
    records = log_steps(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "log.jsonl must hold each step once"
    assert [r["loss"] for r in records] == losses  # bit-identical on the CPU
    mine = load_file(str(out / "lorakit.safetensors"))
    assert mine.keys() == result.keys() and all(torch.equal(mine[k], result[k]) for k in mine)


@pytest.mark.extended  # 22 s of a killed run: the suite keeps kill -9 during a save, and the lock (-m extended)
def test_sigkill_before_the_first_checkpoint_then_resume(data, reference, tmp_path):
    out = tmp_path / "run"
    killed = start_and_signal(train_cmd(data, out), out, after_steps=3, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not list((out / "checkpoints").glob("epoch-*")) and len(log_steps(out)) >= 3
    resumed = run(train_cmd(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no checkpoint was saved yet" in resumed.stdout
    assert_same_run(out, reference)


@pytest.mark.extended  # 28 s of a killed run: the suite keeps kill -9 during a save, and the lock (-m extended)
def test_sigkill_after_a_step_checkpoint_resumes_from_it_not_from_the_older_epoch(data, reference, tmp_path):
    """kohya's save_every_n_steps: 12 steps per epoch, a step checkpoint every 7 (only the last kept); killed at
    step 15, the run continues from step 14 (not from epoch 1, whose checkpoint is older) exactly."""
    out = tmp_path / "run"
    every = ("--set", "training.save_every_n_steps=7", "--set", "training.save_last_n_steps=6")
    killed = start_and_signal(train_cmd(data, out, *every), out, after_steps=15, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "step-00000014"]
    resumed = run(train_cmd(data, out, *every, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 steps into epoch 2 (step 14)" in resumed.stdout
    assert_same_run(out, reference)


def test_sigkill_during_a_save_then_resume(data, reference, tmp_path):
    """The process kills itself (a real SIGKILL: no cleanup runs) half-way through writing the second checkpoint."""
    out = tmp_path / "run"
    dying = ("import os, signal, sys, torch\n"
             "real, calls = torch.save, []\n"
             "def save(obj, f, *a, **k):\n"
             "    calls.append(f)\n"
             "    if len(calls) == 2:\n"
             "        open(f, 'wb').write(b'half a state')\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return real(obj, f, *a, **k)\n"
             "torch.save = save\n"
             "from lorakit.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    killed = run([sys.executable, "-c", dying, *train_cmd(data, out)[3:]])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoints" / "epoch-0002.tmp" / "state.pt").read_bytes() == b"half a state"
    assert [p.name for p in (out / "checkpoints").glob("epoch-????")] == ["epoch-0001"]
    resumed = run(train_cmd(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1 (step 12)" in resumed.stdout
    assert not (out / "checkpoints" / "epoch-0002.tmp").exists()
    assert_same_run(out, reference)


def test_ctrl_c_mid_epoch_says_how_to_resume(data, reference, tmp_path):
    out = tmp_path / "run"
    # The interrupted run is set to last far longer than the reference, so that a loaded machine cannot let it
    # finish before the signal lands; the resume then asks for the reference's length (max_steps may change).
    stopped = start_and_signal(train_cmd(data, out, steps=10 * STEPS), out, after_steps=14, sig=signal.SIGINT)
    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stderr
    ours = [line for line in stopped.stderr.splitlines() if line.startswith("lorakit")]  # not library chatter
    assert len(ours) == 1 and stopped.stderr.strip().endswith(ours[0])
    assert ours[0].startswith("lorakit train: interrupted at step 1")
    assert f"--resume --out {out}" in ours[0] and "from epoch-0001" in ours[0]
    resumed = run(train_cmd(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"training.max_steps {10 * STEPS} -> {STEPS}" in resumed.stdout
    assert_same_run(out, reference)


def _limit_file_size(limit: int):
    def preexec() -> None:
        # a write past the limit fails with EFBIG (like a full disk) instead of killing the process (SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_full_disk_during_a_save_keeps_the_mid_epoch_checkpoint(data, reference, tmp_path):
    """max_steps ends run 1 mid-epoch; run 2 resumes there with a higher max_steps and hits a full disk."""
    out = tmp_path / "run"
    first = run(train_cmd(data, out, steps=15))  # stops 3 steps into epoch 2: a mid-epoch checkpoint
    assert first.returncode == 0, first.stderr[-3000:]
    # the step-18 checkpoint (about 1 MB) cannot be written; log lines and config.toml (a few KB) can
    full = run(train_cmd(data, out, "--resume"), preexec_fn=_limit_file_size(300_000))
    assert full.returncode == 2 and "Traceback" not in full.stderr
    assert "could not save the checkpoint of epoch 2" in full.stderr and "Is the disk full?" in full.stderr
    assert "applying changed settings: training.max_steps 15 -> 18" in full.stdout
    assert "resuming" in full.stdout and "3 steps into epoch 2 (step 15)" in full.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    state = torch.load(out / "checkpoints" / "epoch-0002" / "state.pt", weights_only=True)
    assert state["step"] == 15 and state["batches_done"] == 3  # the earlier checkpoint survived whole
    # steps 16-18 were trained (and logged) before the save failed: the mid-epoch resume continued exactly
    assert [r["loss"] for r in log_steps(out)] == reference[0]


@pytest.mark.extended  # 43 s: the suite keeps the full disk during a save (pytest -m extended)
def test_full_disk_while_logging_then_resume(data, reference, tmp_path):
    """The disk fills up in the middle of an epoch, while log.jsonl grows: the step that cannot log goes on
    (in a multi-process run the others would wait for it), the epoch's end stops the run naming the file, the log
    holds whole lines only, and --resume continues from the last checkpoint as if nothing had happened."""
    out = tmp_path / "run"
    report = ("--early-stop", "report")  # CS on every log line: longer lines, the same training
    first = run(train_cmd(data, out, *report, steps=12))  # one epoch: its checkpoint
    assert first.returncode == 0, first.stderr[-3000:]
    line = len((out / "log.jsonl").read_text()) / 12
    # the file-size limit is per file, and a checkpoint is far larger than it: log.jsonl must reach it before
    # epoch 2 ends (step 24); config.toml, rewritten because max_steps changes, must still fit (it grows with
    # every new setting: 18.5 lines stopped fitting it when the config reached ~2.6 kB, 20.5 at ~2.85 kB)
    limit = int(22.5 * line)
    assert (out / "config.toml").stat().st_size < limit
    full = run(train_cmd(data, out, *report, "--resume", steps=36), preexec_fn=_limit_file_size(limit))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert full.stderr.count("warning: cannot write") == 1, full.stderr[-3000:]
    assert "cannot write" in full.stderr.splitlines()[-1] and "log.jsonl" in full.stderr.splitlines()[-1]
    logged = (out / "log.jsonl").read_text()
    assert logged.endswith("\n") and 12 < len(log_steps(out)) < 24  # whole lines only, cut within epoch 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]
    again = run(train_cmd(data, out, *report, "--resume", steps=36))
    assert again.returncode == 0, again.stderr[-3000:]
    records = log_steps(out)
    assert [r["step"] for r in records] == list(range(1, 37)), "log.jsonl must hold each step once"
    assert [r["loss"] for r in records[:STEPS]] == reference[0]  # a constant schedule: the same first steps


def test_a_running_run_locks_its_folder_until_it_ends_even_by_kill_9(data, tmp_path):
    """A second `lorakit train` on the folder of a run that is still training (a --resume in another terminal, an
    --overwrite) is refused and changes nothing; once the first is killed with SIGKILL, --resume works."""
    out = tmp_path / "run"
    first = subprocess.Popen(train_cmd(data, out, "--epochs", "200", steps=2000), env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None and len(log_steps(out, running=True)) < 14:
            time.sleep(0.05)  # past the first epoch's checkpoint (12 steps)
        assert first.poll() is None, first.communicate()[1][-2000:]
        for extra in (("--resume",), ("--overwrite",)):
            second = run(train_cmd(data, out, "--epochs", "200", *extra, steps=2000))
            assert second.returncode == 2 and "is in use by another lorakit run" in second.stderr, second.stderr
        assert first.poll() is None  # the refusals happened while it trained
        assert (out / "checkpoints" / "epoch-0001").is_dir() and (out / "config.toml").exists()
    finally:
        first.kill()
        first.communicate()
    # 12 steps per epoch; a kill during a save leaves epoch-NNNN.tmp/, which is not a checkpoint
    last = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if p.name[6:].isdigit())
    resumed = run(train_cmd(data, out, "--epochs", "200", "--resume", steps=12 * last + 3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out} after epoch {last}" in resumed.stdout
    assert [r["step"] for r in log_steps(out)] == list(range(1, 12 * last + 4))


def test_overwrite_touches_only_lorakit_files(data, tmp_path):
    """A project folder with the user's images, notes and training data: --overwrite never deletes any of it."""
    project = tmp_path / "project"
    mine = write_dataset(project / "photos", n=4)  # the training data, inside the folder used as output
    (project / "notes.txt").write_text("my notes")
    refused = run(train_cmd(mine, project, "--overwrite", steps=2))
    assert refused.returncode == 2 and "which this run reads: refusing to overwrite" in refused.stderr
    assert (project / "notes.txt").read_text() == "my notes" and len(list(mine.rglob("*.png"))) == 4

    out = project / "run"  # given relative to the working directory, as users type it
    assert run(train_cmd(data, Path("run"), steps=2), cwd=project).returncode == 0
    (out / "notes.txt").write_text("notes about run 1")
    (out / "checkpoints" / "keep.txt").write_text("my file among the checkpoints")
    (out / "best").mkdir()
    (out / "best" / "picked.png").write_bytes(b"the user's favourite sample")
    again = run(train_cmd(data, Path("run"), "--overwrite", steps=2), cwd=project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "notes about run 1"
    assert (out / "checkpoints" / "keep.txt").exists() and (out / "best" / "picked.png").exists()
    assert (out / "lorakit.safetensors").exists() and [r["step"] for r in log_steps(out)] == [1, 2]
    manifest = json.loads((out / "lorakit-manifest.json").read_text())
    assert "notes.txt" not in manifest["files"] and "config.toml" in manifest["files"]
    assert (project / "notes.txt").read_text() == "my notes" and len(list(mine.rglob("*.png"))) == 4


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_named_by_the_command_and_leaves_everything_as_it_was(tmp_path):
    """What a user meets in a terminal: a corrupt image and a caption without its image, then an adapter file made
    for another model: exit status 2, each file named, no traceback, no run folder, the user's files unchanged."""
    from safetensors.torch import save_file

    data = write_dataset(tmp_path / "photos", n=3)
    (data / "1_zkz shape" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "1_zkz shape" / "ghost.txt").write_text("a zkz shape")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    out = tmp_path / "run"
    done = run(train_cmd(data, out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "001.png" in done.stderr and "ghost.txt" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before

    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_not_a_layer.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_not_a_layer.lora_up.weight": torch.zeros(8, 4)}, str(other))
    good = write_dataset(tmp_path / "good", n=2)
    done = run(train_cmd(good, out, "--network-weights", str(other)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{other}: cannot start this run's network from it" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and other.stat().st_size > 0
