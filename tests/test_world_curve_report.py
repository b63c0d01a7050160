"""The overfitting-curve analysis: onset and fidelity peak from scored epochs, turning points replayed from
the recorded CS series, the table and the plot."""

from __future__ import annotations

import json

import numpy as np

from lorakit.config import TrainConfig, to_toml
from lorakit.earlystop import CSFluctuationMonitor
from lorakit.world import curve_report
from lorakit.world.experiment import overfitting_onset


def row(epoch: int, fidelity: float, alter: float, control: float) -> dict:
    return {"epoch": epoch, "fidelity": fidelity, "controllability": control,
            "controllability_by_attribute": {"color": control}, "success_by_type": {"alter": alter}}


def write_run(folder, fidelity, alter, control, cs) -> None:
    folder.mkdir()
    rows = [row(e, f, a, c) for e, (f, a, c) in enumerate(zip(fidelity, alter, control, strict=True))]
    (folder / "curve.json").write_text(json.dumps(rows))
    cfg = TrainConfig()
    cfg.network.algorithm = "loha"
    cfg.optimizer.learning_rate = 2e-3
    cfg.training.seed = 3
    (folder / "config.toml").write_text(to_toml(cfg))
    monitor = CSFluctuationMonitor(10, 2e-3, report_only=True)
    for k, value in enumerate(cs):
        monitor.update(k + 1, float(value), epoch=k // 10 + 1)
    (folder / "cs_history.json").write_text(json.dumps(monitor.history.to_dict()))


def test_onset_is_the_smoothed_alter_peak():
    rows = [row(e, 0, a, 0) for e, a in enumerate([0.0, 0.1, 0.5, 0.6, 0.5, 0.1, 0.0])]
    assert overfitting_onset(rows) == 3


def test_table_and_plot_from_run_folders(tmp_path):
    t = np.arange(120, dtype=float)
    cs = 0.1 * (1 - np.exp(-t / 30)) + 0.03 * np.exp(-t / 60) * np.sin(2 * np.pi * t / 25)
    write_run(tmp_path / "run", fidelity=[0, .1, .3, .6, .8, .7, .5, .4, .3, .3, .3, .3],
              alter=[0, .1, .2, .4, .3, .2, .1, 0, 0, 0, 0, 0],
              control=[.9, .9, .85, .8, .6, .5, .4, .3, .3, .3, .3, .3], cs=cs)
    (tmp_path / "unscored").mkdir()  # runs still training (no curve.json, or only the base scored): left out
    (tmp_path / "base-only").mkdir()
    (tmp_path / "base-only" / "curve.json").write_text(json.dumps([row(0, 0, 0, 0.9)]))
    runs = curve_report.find_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert (run.algorithm, run.lr, run.seed) == ("loha", 2e-3, 3)
    assert run.fidelity_peak == 4 and run.onset == 3
    assert run.turning["second-valley"] is not None
    table = curve_report.markdown_table(runs)
    assert "| loha lr 0.002 seed 3 | 4 (0.80 / 0.60) | 3 (0.40) |" in table
    assert "0.00 → 0.30, 0.90 → 0.30" in table
    lines = curve_report.summary_lines(runs)
    assert lines[0].startswith("second-valley: fired in 1/1 runs")
    png = curve_report.plot_run(run, tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
