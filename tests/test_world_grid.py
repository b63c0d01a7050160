"""``lorakit world grid``: the plan of runs, and running them in parallel processes, resumable, failures named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lorakit.world.grid import DONE, GridRun, plan, rescoring, run_all


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


def test_the_second_concept_doubles_the_grid_under_its_own_names(tmp_path):
    runs = plan(tmp_path, ["lora", "locon", "loha", "lokr"], [2e-3, 8e-3], [0, 1], epochs=20, seeds_per_prompt=3,
                types="alter,style,agnostic", changes="color,position,background", concepts=["zkz", "vlx"])
    assert len(runs) == 32 and len({r.folder for r in runs}) == 32
    concept_of = {r.name: dict(zip(r.argv[::2], r.argv[1::2], strict=True))["--concept"] for r in runs}
    # the first concept's runs keep the names of the runs made before the second concept existed
    assert concept_of["lora_lr0.002_s0"] == "zkz" and concept_of["vlx_lora_lr0.002_s0"] == "vlx"
    assert sum(c == "vlx" for c in concept_of.values()) == 16
    with pytest.raises(ValueError, match="unknown concept 'moon'"):
        plan(tmp_path, ["lora"], [1e-3], [0], epochs=1, seeds_per_prompt=1, types="alter", changes="color",
             concepts=["moon"])


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
    finished: list[tuple[str, bool]] = []
    failed = run_all(runs, jobs=2, command=script_command, report=messages.append,
                     on_done=lambda run: finished.append((run.name, run.done)))
    assert sorted(r.name for r in failed) == ["loha_lr0.001_s1", "lora_lr0.001_s1"]
    # on_done sees each finished run once, already marked done (so archive() takes it), and no failed one
    assert sorted(finished) == [("loha_lr0.001_s0", True), ("lora_lr0.001_s0", True)]
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

    # rescoring: only the finished runs, all of them, with --rescore
    redo = rescoring(runs)
    assert [r.name for r in redo] == ["lora_lr0.001_s0", "loha_lr0.001_s0"] and redo[0].argv[-1] == "--rescore"
    messages.clear()
    assert run_all(redo, jobs=2, command=script_command, report=messages.append, redo_done=True) == []
    assert sorted((tmp_path / "calls.txt").read_text().split()[len(calls) + 2:]) == sorted(r.name for r in redo)


def test_grid_is_a_world_task():
    from lorakit.commands.world import TASKS

    assert TASKS["grid"][0].__name__ == "lorakit.world.grid"
    assert Path(TASKS["grid"][0].__file__).name == "grid.py"


@pytest.mark.extended  # 75 s of one worker: the experiment harness, not the product (pytest -m extended)
def test_an_experiment_on_the_second_concept_trains_and_scores_hearts(tmp_path):
    """``lorakit world experiment --concept vlx`` for one epoch: the heart's training set, its prompts, and
    the concept recorded with every scored epoch (so a later run on the other concept cannot mix in)."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "vlx_run"
    argv = [sys.executable, "-m", "lorakit.world.experiment", "--out", str(out), "--concept", "vlx",
            "--epochs", "1", "--seeds-per-prompt", "1", "--types", "alter,agnostic", "--changes", "color"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "vlx-data" / "10_vlx shape").glob("*.png"))[0] == "000.png"
    rows = json.loads((out / "curve.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1] and {r["concept"] for r in rows} == {"vlx"}
    assert all(("vlx shape" in o["prompt"]) == (o["type"] == "alter") for r in rows for o in r["outcomes"])
    assert all(("kept" in o) == (o["type"] == "agnostic") for r in rows for o in r["outcomes"])
    assert "overfitting onset" in done.stdout

    # scored again from the cached images: the same outcomes, nothing generated anew
    images = sorted(p.name for p in (out / "eval_cache").rglob("*") if p.is_file())
    (out / "curve.json").write_text(json.dumps([{**r, "outcomes": []} for r in rows]))  # as an older scoring
    rescored = subprocess.run([*argv, "--rescore"], capture_output=True, text=True, env=env, timeout=600)
    assert rescored.returncode == 0, rescored.stderr[-2000:]
    assert json.loads((out / "curve.json").read_text()) == rows
    assert sorted(p.name for p in (out / "eval_cache").rglob("*") if p.is_file()) == images

    # the update's size the trainer recorded at the epoch's last step is what its checkpoint says (the replay
    # of the budget rule on runs recorded before the size was kept reads the checkpoints)
    from lorakit.world.update_sizes import budget_epoch, checkpoint_update_sizes

    history = json.loads((out / "cs_history.json").read_text())
    sizes = checkpoint_update_sizes(out)
    assert list(sizes) == [1] and sizes[1] == pytest.approx(history["update"][-1], rel=1e-9)
    assert budget_epoch(sizes, sizes[1]) == 1 and budget_epoch(sizes, sizes[1] * 1.01) is None
    assert json.loads((out / "update_sizes.json").read_text()) == {"1": sizes[1]}  # cached
    # the experiment kept the spectral size of its checkpoint too (a record the grid archives)
    spectral = json.loads((out / "spectral_sizes.json").read_text())
    assert list(spectral) == ["1"] and 0 < spectral["1"] < 1
    again = subprocess.run([*argv[:6], "zkz", *argv[7:]], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode != 0 and "was scored with" in again.stderr


def test_the_grid_rebuilds_its_table_with_every_curve_report_option(tmp_path):
    """At its end the grid rebuilds the table through curve-report; its options come from curve-report's own
    parser, so an option added there has its default here (a hand-made Namespace once lacked one and the grid
    failed after hours of runs)."""
    import shutil

    from lorakit.world import curve_report
    from lorakit.world.grid import report_args

    source = Path(__file__).resolve().parents[1] / "experiments" / "onset_grid" / "vlx_lora_lr0.008_s0"
    shutil.copytree(source, tmp_path / "vlx_lora_lr0.008_s0")
    args = report_args(tmp_path, None, None, "color,position,background")
    assert args.sample_stop is False and args.spectral_sweep is None and not args.finished_only
    assert curve_report.run(args) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| vlx lora lr 0.008 seed 0 |" in table and "[vlx] budget 0.1:" in table
