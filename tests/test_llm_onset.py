"""experiments/llm_onset.py: the language-model check of the turning-point rules, on a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import llm_onset  # noqa: E402

from lorakit.earlystop.monitor import CSFluctuationMonitor  # noqa: E402


def test_texts_are_offline_disjoint_and_cut_into_windows():
    train, held = llm_onset.finetune_texts()
    assert len(train) > 3 * len(held) > 1000
    assert not set(train.split("\n\n")) & set(held.split("\n\n"))
    corpus = llm_onset.docstring_corpus(("json", "textwrap"))
    assert "JSON" in corpus and len(corpus) > 1000
    w = llm_onset.windows("abcdefghij", block=4)
    assert w.tolist() == [[97, 98, 99, 100], [101, 102, 103, 104]]


def _history(cs: np.ndarray, per_epoch: int) -> dict:
    monitor = CSFluctuationMonitor(per_epoch, 1e-3, report_only=True)
    for k, value in enumerate(cs):  # the update's size grows with the steps, reaching 0.1 at step 51; its
        # spectral size, read at epoch ends, reaches 0.25 at step 80
        spectral = (k + 1) / 320 if (k + 1) % per_epoch == 0 else None
        monitor.update(k + 1, float(value), epoch=k // per_epoch + 1, update=(k + 1) / 510, spectral=spectral)
    return monitor.history.to_dict()


def test_table_compares_each_rule_with_the_held_out_minimum():
    t = np.arange(200, dtype=float)
    cs = 0.1 * (1 - np.exp(-t / 30)) + 0.03 * np.exp(-t / 60) * np.sin(2 * np.pi * t / 25)
    losses = [3.0, 2.5, 2.2, 2.1, 2.15, 2.3] + [2.4] * 14
    # two held-out windows per epoch that agree on the minimum, so the interval is the onset itself
    run = llm_onset.RunResult(seed=0, lr=1e-3, window_losses=[[x - 0.01, x + 0.01] for x in losses],
                              cs_history=_history(cs, 10))
    assert run.eval_loss == pytest.approx(losses) and run.onset == 4 and run.onset_interval() == (4, 4)
    tps = llm_onset.turning_epochs(run)
    assert set(tps) == {"second-valley", "calm", "second-valley-2M", "calm-2M", "budget", "spectral-budget",
                        "growth-stall"}
    assert tps["budget"] == 6  # step 51 is in epoch 6 (10 steps per epoch)
    assert tps["spectral-budget"] == 8  # the end of epoch 8
    assert tps["growth-stall"] == 9  # a steady rise never stalls before its cap: 90 / 510 ≥ 0.175 ends epoch 9
    text = llm_onset.table([run])
    assert "| lr 0.001 seed 0 | 4 [4–4], 2.100 |" in text
    for name, epoch in tps.items():
        within = int(epoch is not None and abs(epoch - 4) <= 1)
        assert f"- {name}: {within}/1 runs within ±1 epoch of the onset ({within}/1 within ±1 of its interval" in text


def test_onset_interval_widens_when_windows_disagree():
    # window A has its minimum at epoch 2, window B at epoch 5: resampling windows moves the onset between them
    a = [2.0, 1.0, 1.5, 1.6, 1.7, 1.8]
    b = [2.0, 1.9, 1.8, 1.7, 1.25, 1.9]
    run = llm_onset.RunResult(seed=0, lr=1e-3, window_losses=[[x, y] for x, y in zip(a, b, strict=True)],
                              cs_history={})
    assert run.onset == 2 and run.onset_interval() == (2, 5)


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "llm"
    assert llm_onset.main(["--out", str(out), "--seeds", "0", "--lrs", "2e-3", "--epochs", "3",
                           "--pretrain-steps", "5"]) == 0
    data = json.loads((out / "results.json").read_text())
    (run,) = data["runs"]
    assert len(run["eval_loss"]) == 3 and len(run["cs_history"]["cs"]) == 3 * 9  # CS at every step
    assert len(run["window_losses"]) == 3 and len(run["window_losses"][0]) == 20  # every held-out window
    assert "| lr 0.002 seed 0 |" in (out / "table.md").read_text()
    # cached: a second call trains nothing and gives the same table
    table = (out / "table.md").read_text()
    assert llm_onset.main(["--out", str(out), "--seeds", "0", "--lrs", "2e-3", "--epochs", "3",
                           "--pretrain-steps", "5"]) == 0
    assert (out / "table.md").read_text() == table


def test_the_page_has_the_markers_the_table_is_written_between(tmp_path):
    from lorakit.world.curve_report import update_doc

    page = Path(__file__).resolve().parent.parent / "docs" / "early_stopping.md"
    copy = tmp_path / "page.md"
    copy.write_text(page.read_text())
    update_doc(copy, {"llm": "| a new | table |\n"}, llm_onset.DOC_MARKERS)
    begin, end = llm_onset.DOC_MARKERS["llm"]
    assert f"{begin}\n| a new | table |\n{end}" in copy.read_text()
    assert copy.read_text().replace("| a new | table |", "") != page.read_text()  # the old table was replaced
