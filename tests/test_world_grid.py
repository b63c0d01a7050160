"""``lorakit world grid``: the plan of runs, and running them in parallel processes, resumable, failures named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lorakit.world.grid import DONE, GridRun, plan, run_all


def test_the_default_grid_is_the_issue_grid(tmp_path):
    runs = plan(tmp_path, ["lora", "locon", "loha", "lokr"], [2e-3, 8e-3], [0, 1], epochs=20, seeds_per_prompt=3,
                types="alter,style,agnostic", changes="color,position,background")
    assert len(runs) == 16 and len({r.name for r in runs}) == 16
    lora, locon = runs[0], runs[4]
    assert lora.name == "lora_lr0.002_s0" and lora.folder == tmp_path / "lora_lr0.002_s0"
    args = dict(zip(lora.argv[::2], lora.argv[1::2], strict=True))
    assert args["--algorithm"] == "lora" and args["--preset"] == "kohya" and args["--score-every"] == "1"
    assert args["--types"] == "alter,style,agnostic"
    assert dict(zip(locon.argv[::2], locon.argv[1::2], strict=True))["--preset"] == "full"
    with pytest.raises(ValueError, match="unknown algorithm.*glora"):
        plan(tmp_path, ["glora"], [1e-3], [0], epochs=1, seeds_per_prompt=1, types="alter", changes="color")


def script_command(run: GridRun) -> list[str]:
    """A stand-in for the experiment: appends its name to a shared file, fails for runs named *_s1.  Like the
    trainer, it refuses a run folder holding files it did not write (no config.toml)."""
    code = ("import os, sys, time; from pathlib import Path; name = sys.argv[1]; "
            "assert os.environ['OMP_NUM_THREADS'] == '1'; folder = Path(sys.argv[3]); "
            "assert not folder.exists() or (folder / 'config.toml').exists() or not any(folder.iterdir()), "
            "'not a run folder'; folder.mkdir(exist_ok=True); (folder / 'config.toml').write_text(''); "
            "Path(sys.argv[2]).open('a').write(name + '\\n'); time.sleep(0.3); print('ran', name); "
            "sys.exit(3 if name.endswith('_s1') else 0)")
    return [sys.executable, "-c", code, run.name, str(run.folder.parent / "calls.txt"), str(run.folder)]


def test_runs_in_parallel_processes_skips_finished_ones_and_names_failures(tmp_path):
    runs = plan(tmp_path, ["lora", "loha"], [1e-3], [0, 1], epochs=1, seeds_per_prompt=1, types="alter",
                changes="color")
    messages: list[str] = []
    failed = run_all(runs, jobs=2, command=script_command, report=messages.append)
    assert sorted(r.name for r in failed) == ["loha_lr0.001_s1", "lora_lr0.001_s1"]
    assert sorted(r.name for r in runs if r.done) == ["loha_lr0.001_s0", "lora_lr0.001_s0"]
    assert "ran lora_lr0.001_s0" in (tmp_path / "logs" / "lora_lr0.001_s0.log").read_text()
    assert any(m.startswith("FAILED lora_lr0.001_s1 (exit 3)") for m in messages)
    calls = (tmp_path / "calls.txt").read_text().split()
    assert sorted(calls) == sorted(r.name for r in runs)

    # again: the finished runs are skipped, the failed ones run again (and the log keeps both tries)
    messages.clear()
    run_all(runs, jobs=2, command=script_command, report=messages.append)
    assert messages[0] == "2 of 4 runs already done, skipped"
    again = (tmp_path / "calls.txt").read_text().split()[len(calls):]
    assert sorted(again) == ["loha_lr0.001_s1", "lora_lr0.001_s1"]
    assert (tmp_path / "logs" / "lora_lr0.001_s1.log").read_text().count("ran lora_lr0.001_s1") == 2
    assert (tmp_path / "loha_lr0.001_s0" / DONE).exists()


def test_grid_is_a_world_task():
    from lorakit.commands.world import TASKS

    assert TASKS["grid"][0].__name__ == "lorakit.world.grid"
    assert Path(TASKS["grid"][0].__file__).name == "grid.py"
