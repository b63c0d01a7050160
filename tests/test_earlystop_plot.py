"""The figure is a PNG, written atomically; weight copies are real copies and the nearest is handed back."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lorakit.earlystop import CandidateStore, CSFluctuationMonitor, plot_cs_fluctuation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def monitored(n: int = 300, stop: bool = True) -> CSFluctuationMonitor:
    t = np.arange(n, dtype=np.float64)
    cs = 0.1 * (1 - np.exp(-t / 150)) + 0.02 * np.exp(-t / 250) * np.sin(2 * np.pi * t / 90)
    monitor = CSFluctuationMonitor(20, 1e-4)
    for k in range(n):
        if monitor.update(2 * k, cs[k], epoch=k // 40 + 1).stop and stop:
            break
    return monitor


def test_plot_writes_a_png_with_the_turning_point(tmp_path):
    monitor = monitored()
    assert monitor.turning_point is not None
    path = plot_cs_fluctuation(monitor.history, tmp_path / "sub" / "csf.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    assert [p.name for p in path.parent.iterdir()] == ["csf.png"]  # no temporary file left behind


def test_plot_from_json_by_epoch_and_with_an_explicit_step(tmp_path):
    history = json.loads(json.dumps(monitored(150, stop=False).history.to_dict()))
    a = plot_cs_fluctuation(history, tmp_path / "a.png", x="epoch")
    b = plot_cs_fluctuation(history, tmp_path / "b.png", turning_point=100)
    assert a.read_bytes()[:8] == PNG_MAGIC and b.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        plot_cs_fluctuation(history, tmp_path / "c.png", x="time")


def test_a_run_shorter_than_the_lag_still_plots(tmp_path):
    """One short epoch: CSF exists for fewer samples than its lag (the built-in job with --epochs 1 hit this)."""
    monitor = monitored(20, stop=False)
    assert len(monitor.history.csf) <= monitor.history.lag
    path = plot_cs_fluctuation(monitor.history, tmp_path / "short.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_a_run_without_any_csf_value_says_so_rather_than_draw_an_empty_axis(tmp_path, monkeypatch):
    """A run shorter than CSF's windows drew its right axis with made-up ticks and a legend entry "drawn N samples
    early" for a line that was not there."""
    import lorakit.earlystop.plot as plot

    figures = []
    saved = plot._save_atomic
    monkeypatch.setattr(plot, "_save_atomic", lambda fig, path: figures.append(fig) or saved(fig, path))
    for n in (20, 150):
        plot_cs_fluctuation(monitored(n, stop=False).history, tmp_path / f"{n}.png")
    (short, right_short), (long, right_long) = ((f, f.axes[1]) for f in figures)
    labels = [[t.get_text() for t in f.legends[0].get_texts()] for f in (short, long)]
    assert "CS-Fluctuation: none yet (the run is shorter than its windows)" in labels[0]
    assert list(right_short.get_yticks()) == [] and len(right_long.get_yticks()) > 0
    assert any(t.startswith("CS-Fluctuation (drawn") for t in labels[1])


def test_a_failed_write_leaves_the_old_file_alone(tmp_path, monkeypatch):
    path = tmp_path / "csf.png"
    path.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken)
    with pytest.raises(OSError):
        plot_cs_fluctuation(monitored(100, stop=False).history, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["csf.png"]


def test_candidates_are_copies_not_references():
    weight = torch.nn.Parameter(torch.zeros(3))
    store = CandidateStore()
    for step in (10, 20, 30):
        with torch.no_grad():
            weight.fill_(step)
        store.add(step, [("w", weight)], epoch=step // 10)
    with torch.no_grad():
        weight.fill_(-1)  # training goes on
    assert [float(store.nearest(s).tensors["w"][0]) for s in (10, 20, 30)] == [10, 20, 30]
    assert store.nearest(24).step == 20 and store.nearest(25).step == 20 and store.nearest(26).step == 30
    assert store.nearest(20).epoch == 2


def test_candidates_prune_keeps_what_can_still_be_nearest():
    store = CandidateStore()
    for step in (10, 20, 30, 40):
        store.add(step, [("w", torch.zeros(1))])
    store.prune(25)
    assert store.steps == [20, 30, 40]
    store.prune(100)
    assert store.steps == [40]
    store.add(40, [("w", torch.ones(1))])  # the same step again replaces it
    assert store.steps == [40] and float(store.nearest(40).tensors["w"][0]) == 1.0
    with pytest.raises(ValueError):
        store.add(30, [("w", torch.zeros(1))])
    assert CandidateStore().nearest(5) is None


def test_the_update_size_gets_its_own_panel(tmp_path):
    from lorakit.earlystop import UpdateBudget

    cs = np.linspace(0, 0.1, 200)
    monitor = CSFluctuationMonitor(20, 1e-4, rule=UpdateBudget(0.05), report_only=True)
    for k in range(200):
        monitor.update(k + 1, cs[k], epoch=k // 40 + 1, update=k / 1000)
    plain = plot_cs_fluctuation(monitored().history, tmp_path / "plain.png")
    both = plot_cs_fluctuation(monitor.history, tmp_path / "both.png", budget=0.05)
    from PIL import Image

    # a taller figure with the second panel
    assert Image.open(both).size[1] > Image.open(plain).size[1]


def test_the_spectral_size_is_drawn_where_it_was_read(tmp_path):
    """The default rule reads σ1(ΔW)/σ1(W) at epoch ends: its points and its budget line are in the size panel
    (brown), which the figure without them lacks."""
    from PIL import Image

    from lorakit.earlystop import SpectralBudget

    cs = np.linspace(0, 0.1, 200)
    monitor = CSFluctuationMonitor(20, 1e-4, rule=SpectralBudget(0.25), report_only=True)
    for k in range(200):
        end = (k + 1) % 40 == 0
        monitor.update(k + 1, cs[k], epoch=k // 40 + 1, update=k / 1000, spectral=(k + 1) / 400 if end else None)
    without = plot_cs_fluctuation(monitor.history, tmp_path / "without.png")
    plain = plot_cs_fluctuation({**monitor.history.to_dict(), "spectral": None}, tmp_path / "plain.png")
    drawn = plot_cs_fluctuation(monitor.history, tmp_path / "spectral.png", budget=0.25, budget_series="spectral")

    def brown(path) -> int:  # tab:brown is (140, 86, 75)
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int((np.abs(pixels - [140, 86, 75]).sum(axis=2) < 30).sum())

    assert brown(plain) == 0 < brown(without) < brown(drawn)
