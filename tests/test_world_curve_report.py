"""The overfitting-curve analysis: onset and fidelity peak from scored epochs, turning points replayed from
the recorded CS series, the table and the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorakit.config import TrainConfig, to_toml
from lorakit.earlystop import CSFluctuationMonitor
from lorakit.errors import InvalidValueError
from lorakit.world import curve_report
from lorakit.world.experiment import change_success, overfitting_onset, score_run


def row(epoch: int, fidelity: float, alter: float, control: float) -> dict:
    """A scored epoch: ``alter`` is the success on new colors; new positions always fail (as with a base model
    that cannot place objects), new backgrounds succeed as often as new colors."""
    return {"epoch": epoch, "fidelity": fidelity, "controllability": control,
            "controllability_by_attribute": {"color": control},
            "success_by_change": {"color": alter, "position": 0.0, "background": alter},
            "counts_by_change": {"color": 6, "position": 8, "background": 6}}


def write_run(folder, fidelity, alter, control, cs, algorithm="loha", preset="attn-only", concept=None,
              sizes=None) -> None:
    folder.mkdir()
    rows = [row(e, f, a, c) for e, (f, a, c) in enumerate(zip(fidelity, alter, control, strict=True))]
    if concept:  # rows scored before the second concept existed carry none: they are the first concept's
        rows = [{**r, "concept": concept} for r in rows]
    (folder / "curve.json").write_text(json.dumps(rows))
    cfg = TrainConfig()
    cfg.network.algorithm = algorithm
    cfg.network.preset = preset
    cfg.optimizer.learning_rate = 2e-3
    cfg.training.seed = 3
    (folder / "config.toml").write_text(to_toml(cfg))
    monitor = CSFluctuationMonitor(10, 2e-3, report_only=True)
    for k, value in enumerate(cs):
        monitor.update(k + 1, float(value), epoch=k // 10 + 1, update=None if sizes is None else float(sizes[k]))
    (folder / "cs_history.json").write_text(json.dumps(monitor.history.to_dict()))


def test_onset_is_the_smoothed_peak_of_success_on_changed_prompts():
    rows = [row(e, 0, a, 0) for e, a in enumerate([0.0, 0.1, 0.5, 0.6, 0.5, 0.1, 0.0])]
    assert overfitting_onset(rows, ("color",)) == 3
    assert overfitting_onset(rows, ("color", "background")) == 3
    # pooled by image counts: 6 color images at 0.6 and 8 position images at 0
    assert change_success(rows[3], ("color", "position")) == pytest.approx(0.6 * 6 / 14)
    assert change_success(rows[3], ("size",)) == 0.0  # nothing scored changes it
    # the onset with position pooled in still peaks where color does (position is flat)
    assert overfitting_onset(rows) == 3
    # a late, lower bump does not move the onset; ties go to the earlier epoch
    late = [row(e, 0, a, 0) for e, a in enumerate([0.0, 0.4, 0.4, 0.4, 0.1, 0.0, 0.3, 0.3, 0.3])]
    assert overfitting_onset(late, ("color",)) == 2


def test_a_lora_on_the_convs_is_shown_as_locon(tmp_path):
    cs = np.linspace(0, 0.1, 40)
    for name, algorithm, preset in (("a", "lora", "full"), ("b", "lora", "kohya"), ("c", "loha", "full")):
        write_run(tmp_path / name, [0, .2, .3, .2], [0, .2, .3, .1], [.9, .8, .7, .6], cs, algorithm, preset)
    runs = curve_report.find_runs(tmp_path, ("color",))
    assert [r.label for r in runs] == ["locon", "lora", "loha"]
    assert "| zkz locon lr 0.002 seed 3 |" in curve_report.markdown_table(runs)


def test_the_summary_counts_each_concept_on_its_own(tmp_path):
    cs = np.linspace(0, 0.1, 40)
    write_run(tmp_path / "a", [0, .2, .3, .2], [0, .2, .3, .1], [.9, .8, .7, .6], cs)
    write_run(tmp_path / "b", [0, .2, .3, .2], [0, .2, .3, .1], [.9, .8, .7, .6], cs, concept="vlx")
    write_run(tmp_path / "c", [0, .2, .3, .2], [0, .2, .3, .1], [.9, .8, .7, .6], cs, concept="vlx")
    runs = curve_report.find_runs(tmp_path, ("color",))
    assert [r.concept for r in runs] == ["zkz", "vlx", "vlx"]
    assert "| vlx loha lr 0.002 seed 3 |" in curve_report.markdown_table(runs)
    lines = curve_report.summary_lines(runs)
    assert len(lines) == 2 * (len(curve_report.RULES) + 1)  # each concept's rules and its fixed-epoch baseline
    assert lines[0].startswith("[zkz] second-valley: ") and "/1 runs within ±1 epoch" in lines[0]
    vlx = len(curve_report.RULES) + 1
    assert lines[vlx].startswith("[vlx] second-valley: ") and "/2 runs within ±1 epoch" in lines[vlx]
    assert lines[vlx - 1].startswith("[zkz] fixed epoch") and "1/1 runs within ±1 epoch of the onset at epoch" in \
        lines[vlx - 1]


def test_score_run_refuses_a_cache_scored_differently(tmp_path):
    (tmp_path / "curve.json").write_text(json.dumps([{"epoch": 0, "types": None, "seeds_per_prompt": 1}]))
    with pytest.raises(ValueError, match="scored with"):
        score_run(tmp_path, seeds_per_prompt=1, types=("alter",))


def test_table_and_plot_from_run_folders(tmp_path):
    t = np.arange(120, dtype=float)
    cs = 0.1 * (1 - np.exp(-t / 30)) + 0.03 * np.exp(-t / 60) * np.sin(2 * np.pi * t / 25)
    write_run(tmp_path / "run", fidelity=[0, .1, .3, .6, .8, .7, .5, .4, .3, .3, .3, .3],
              alter=[0, .1, .2, .4, .3, .2, .1, 0, 0, 0, 0, 0],
              control=[.9, .9, .85, .8, .6, .5, .4, .3, .3, .3, .3, .3], cs=cs)
    (tmp_path / "unscored").mkdir()  # runs still training (no curve.json, or only the base scored): left out
    (tmp_path / "base-only").mkdir()
    (tmp_path / "base-only" / "curve.json").write_text(json.dumps([row(0, 0, 0, 0.9)]))
    runs = curve_report.find_runs(tmp_path, ("color", "background"))
    assert len(runs) == 1
    run = runs[0]
    assert (run.algorithm, run.lr, run.seed) == ("loha", 2e-3, 3)
    assert run.fidelity_peak == 4 and run.onset == 3
    assert run.turning["second-valley"] is not None
    table = curve_report.markdown_table(runs)
    assert "| zkz loha lr 0.002 seed 3 | 3 (0.40 / 0.60); peak 3 | 4 (0.30 / 0.80) |" in table
    assert "new color or background" in table
    assert "0.00 → 0.00, 0.00 → 0.30, 0.90 → 0.30" in table
    lines = curve_report.summary_lines(runs)
    assert lines[0].startswith("second-valley: 1/1 runs within ±1 epoch of the onset (1/1 within ±1 of its "
                               "interval); fired in 1/1 runs; TP - onset = [")
    png = curve_report.plot_run(run, tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the plot draws compared rules only, the trainer's default among them
    plotted = {name for name, _ in curve_report.PLOTTED_TURNING_POINTS}
    assert plotted <= set(curve_report.RULES) and TrainConfig().early_stop.rule in plotted


def test_budget_rule_and_its_sweep_from_the_recorded_sizes(tmp_path):
    cs = np.linspace(0, 0.1, 40)
    sizes = np.linspace(0.0, 0.2, 40)  # 10 samples per epoch: 0.1 is reached at sample 20, in epoch 3
    write_run(tmp_path / "a", [0, .2, .3, .2, .1], [0, .2, .5, .1, 0], [.9, .8, .7, .6, .5], cs, sizes=sizes)
    runs = curve_report.find_runs(tmp_path, ("color",))
    # smoothed success .23, .27, .2, .05: the peak at epoch 2, 80% of it (.21) already at epoch 1
    assert (runs[0].onset, runs[0].onset_interval.peak) == (1, 2) and runs[0].turning["budget"] == 3
    lines = curve_report.budget_sweep(runs, [0.05, 0.1, 0.3], {"a": tmp_path / "a"})
    # epoch-end sizes 0.046, 0.097, 0.149, 0.2: 0.05 is reached at epoch 2, 0.1 at 3, 0.3 never
    assert lines == ["budget 0.05: 1/1 runs within ±1 epoch of the onset (1/1 within ±1 of its interval); "
                     "TP - onset = [1]",
                     "budget 0.1: 0/1 runs within ±1 epoch of the onset (0/1 within ±1 of its interval); "
                     "TP - onset = [2]",
                     "budget 0.3: 0/1 runs within ±1 epoch of the onset (0/1 within ±1 of its interval); "
                     "TP - onset = ['never']"]


def test_the_spectral_budget_sweeps_from_the_kept_record(tmp_path):
    """An archived run has no checkpoints: its spectral sizes come from the record the experiment kept."""
    cs = np.linspace(0, 0.1, 40)
    write_run(tmp_path / "a", [0, .2, .3, .2, .1], [0, .2, .5, .1, 0], [.9, .8, .7, .6, .5], cs)
    (tmp_path / "a" / "spectral_sizes.json").write_text(json.dumps({"1": 0.1, "2": 0.22, "3": 0.31, "4": 0.4}))
    runs = curve_report.find_runs(tmp_path, ("color",))
    assert runs[0].onset == 1
    lines = curve_report.budget_sweep(runs, [0.2, 0.3, 0.5], {"a": tmp_path / "a"}, measure="spectral")
    assert lines == ["spectral budget 0.2: 1/1 runs within ±1 epoch of the onset (1/1 within ±1 of its interval); "
                     "TP - onset = [1]",
                     "spectral budget 0.3: 0/1 runs within ±1 epoch of the onset (0/1 within ±1 of its interval); "
                     "TP - onset = [2]",
                     "spectral budget 0.5: 0/1 runs within ±1 epoch of the onset (0/1 within ±1 of its interval); "
                     "TP - onset = ['never']"]


def test_archived_records_rebuild_the_same_table_and_only_finished_runs_count(tmp_path):
    from lorakit.world.grid import DONE, GridRun, archive

    t = np.arange(120, dtype=float)
    cs = 0.1 * (1 - np.exp(-t / 30)) + 0.03 * np.exp(-t / 60) * np.sin(2 * np.pi * t / 25)
    grid = tmp_path / "grid"
    grid.mkdir()
    for name in ("done", "scoring"):
        write_run(grid / name, fidelity=[0, .1, .3, .6, .8, .7, .5, .4, .3, .3, .3, .3],
                  alter=[0, .1, .2, .4, .3, .2, .1, 0, 0, 0, 0, 0],
                  control=[.9, .9, .85, .8, .6, .5, .4, .3, .3, .3, .3, .3], cs=cs, sizes=np.linspace(0, .2, 120))
        (grid / name / "checkpoints").mkdir()  # what the archive leaves behind
        (grid / name / "checkpoints" / "big.safetensors").write_bytes(b"x" * 1000)
    (grid / "done" / DONE).write_text("")
    runs = [GridRun(name, grid / name, ()) for name in ("done", "scoring")]

    assert [r.name for r in curve_report.find_runs(grid, ("color",))] == ["done", "scoring"]
    assert [r.name for r in curve_report.find_runs(grid, ("color",), finished_only=True)] == ["done"]

    archived = archive(runs, tmp_path / "records")
    assert archived == [tmp_path / "records" / "done"]
    assert sorted(p.name for p in archived[0].iterdir()) == sorted(["config.toml", "curve.json", "cs_history.json",
                                                                     DONE])
    original = curve_report.find_runs(grid, ("color",), finished_only=True)
    copied = curve_report.find_runs(tmp_path / "records", ("color",), finished_only=True)
    assert curve_report.markdown_table(copied) == curve_report.markdown_table(original)
    assert curve_report.summary_lines(copied) == curve_report.summary_lines(original)
    assert copied[0].turning == original[0].turning and copied[0].turning["budget"] is not None


def test_the_committed_grid_records_rebuild_the_rows_the_docs_show():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    runs = curve_report.find_runs(root / "experiments" / "onset_grid", finished_only=True)
    assert len(runs) >= 5
    docs = (root / "docs" / "early_stopping.md").read_text()
    table = curve_report.markdown_table(runs).splitlines()
    row = next(line for line in table if line.startswith("| zkz lora lr 0.002 seed 0 |"))
    assert row in docs  # the run at 2e-3 was trained again and reproduces its row exactly
    # the measurement's ceiling, per concept: the sum over runs of the share of resampled onsets within ±1
    star = [r for r in runs if r.concept == "zkz"]
    ceiling = next(line for line in curve_report.summary_lines(runs) if line.startswith("[zkz] ceiling"))
    assert f"≈{sum(r.reproduced[1] for r in star):.1f}/{len(star)} runs at the 81 images" in ceiling
    assert all(r.reproduced[4] >= r.reproduced[1] - 0.05 for r in star)  # more images: no less reproducible
    assert ceiling in docs
    # the sample stop replayed on one seed's images against the other seeds' onset, as the docs show it
    dirs = {r.name: root / "experiments" / "onset_grid" / r.name for r in runs}
    counts = curve_report.sample_stop_counts(runs, dirs)
    replayed = curve_report.sample_stop_lines(counts)
    assert [line[:23] for line in replayed] == ["[zkz] sample stop (uses", "[zkz] sample stop on al",
                                                "[vlx] sample stop (uses", "[vlx] sample stop on al"]
    assert all(line in docs for line in replayed)
    # the headline table at the top of the page: one command rebuilds it (--update-doc) from the same runs
    headline = curve_report.headline_table(runs, counts)
    assert headline in docs
    default = next(line for line in headline.splitlines() if "(the trainer's default)" in line)
    hits = curve_report.rule_count(star, "spectral-budget")[0]
    assert default.startswith("| `spectral-budget` (the trainer's default) |") and f"**{hits}/{len(star)}" in default


def test_update_doc_rewrites_only_between_its_markers(tmp_path):
    doc = tmp_path / "page.md"
    begin, end = curve_report.DOC_MARKERS["headline"]
    doc.write_text(f"# Title\n\nprose a person wrote\n\n{begin}\nold table\n{end}\n\nmore prose\n")
    curve_report.update_doc(doc, {"headline": "| new | table |\n"})
    assert doc.read_text() == f"# Title\n\nprose a person wrote\n\n{begin}\n| new | table |\n{end}\n\nmore prose\n"
    with pytest.raises(InvalidValueError, match="curve-report runs"):
        curve_report.update_doc(doc, {"runs": "x"})  # no markers for that block: nothing is written
    assert "| new | table |" in doc.read_text()


def test_the_growth_stall_on_epoch_sizes_matches_its_replay_on_the_recorded_steps():
    """A run recorded before the trainer kept the update's size is replayed on its checkpoints' sizes, one per
    epoch (``size_rule_epoch``): on the archived grid, whose records keep the size of every step, that gives the
    same epoch as the replay on the steps, for the growth stall and the budget alike."""
    from pathlib import Path

    from lorakit.earlystop import GrowthStall, UpdateBudget
    from lorakit.world.experiment import turning_epoch
    from lorakit.world.update_sizes import budget_epoch, size_rule_epoch

    grid = Path(__file__).resolve().parents[1] / "experiments" / "onset_grid"
    folders = sorted(p for p in grid.iterdir() if (p / "cs_history.json").exists())
    assert len(folders) == 32
    stall_epochs = []
    for folder in folders:
        history = json.loads((folder / "cs_history.json").read_text())
        epochs = np.asarray(history["epochs"])
        sizes = {int(e): float(np.asarray(history["update"])[epochs == e][-1]) for e in sorted(set(epochs))}
        for rule in (GrowthStall(), UpdateBudget()):
            replayed = turning_epoch(folder, rule)
            assert size_rule_epoch(sizes, rule) == (None if replayed is None else replayed["epoch"]), folder.name
        assert size_rule_epoch(sizes, UpdateBudget(0.1)) == budget_epoch(sizes, 0.1)
        stall_epochs.append(size_rule_epoch(sizes, GrowthStall()))
    assert len(set(stall_epochs)) >= 4  # it does not stop every run at one epoch


def test_the_growth_sweep_on_the_page_is_the_grids_and_its_best_star_row_is_the_default():
    """The docs' sweep of the growth stall is rebuilt from the archived runs, and the setting the star ranks first
    is ``GrowthStall()``'s defaults (the rule was designed on the star, the heart held out)."""
    import re
    from pathlib import Path

    from lorakit.earlystop import GrowthStall

    root = Path(__file__).resolve().parents[1]
    grid = root / "experiments" / "onset_grid"
    runs = curve_report.find_runs(grid, finished_only=True)
    sweep = curve_report.growth_sweep(runs, {r.name: grid / r.name for r in runs}, [0.05, 0.07, 0.1, 0.12, 0.15],
                                      [1, 2, 3], [0.15, 0.175, 0.2, 100.0])
    assert sweep in (root / "docs" / "early_stopping.md").read_text()
    (best,) = [line for line in sweep.splitlines() if "(best on zkz)" in line]
    default = GrowthStall()
    assert best.startswith(f"| {default.growth:g} | {default.span} | {default.cap:g} | **")
    hits = [int(m) for m in re.findall(r"\| \**(\d+)/16", "\n".join(sweep.splitlines()[2:]))[0::2]]
    assert len(hits) == 60 and int(re.search(r"\*\*(\d+)/16", best).group(1)) == max(hits)


def test_a_malformed_growth_sweep_is_named():
    import argparse
    from pathlib import Path

    grid = Path(__file__).resolve().parents[1] / "experiments" / "onset_grid"
    ap = argparse.ArgumentParser()
    curve_report.add_arguments(ap)
    for bad in ("0.07;2", "0.07;two;0.175", "0.07;0;0.175"):
        with pytest.raises(InvalidValueError, match="--growth-sweep"):
            curve_report.run(ap.parse_args([str(grid), "--finished-only", "--growth-sweep", bad]))


def test_a_folder_without_runs_is_refused_and_the_page_is_left_alone(tmp_path):
    """It printed empty tables and, with --update-doc, wrote them over the page's; run as the docs and the grid's
    older commands did (``python -m``), it now exits 2 with the CLI's message, as ``lorakit world`` does."""
    import subprocess
    import sys

    page = tmp_path / "page.md"
    page.write_text("<!-- curve-report headline -->\n| my table |\n<!-- /curve-report headline -->\n")
    (tmp_path / "runs").mkdir()
    done = subprocess.run([sys.executable, "-m", "lorakit.world.curve_report", str(tmp_path / "runs"),
                           "--update-doc", str(page)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"{tmp_path / 'runs'}: no experiment runs in this folder" in done.stderr and "Traceback" not in done.stderr
    assert "| my table |" in page.read_text()


def test_why_no_runs_were_found_is_said(tmp_path):
    from lorakit.world.grid import DONE

    assert "no such folder" in curve_report.no_runs_reason(tmp_path / "typo", False)
    write_run(tmp_path / "a", fidelity=[0, .1], alter=[0, .1], control=[.9, .9], cs=np.zeros(10),
              sizes=np.zeros(10))
    assert "none of its 1 runs is finished" in curve_report.no_runs_reason(tmp_path, True)
    (tmp_path / "a" / DONE).write_text("")
    assert curve_report.find_runs(tmp_path, ("color",), finished_only=True)
