"""experiments/validation_onset.py: the online rule on a validation loss, and the table rebuilt from run folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import validation_onset  # noqa: E402


def test_online_rule_waits_for_its_patience_after_the_smoothed_lowest():
    losses = {0: 0.05, 1: 0.04, 2: 0.03, 3: 0.02, 4: 0.03, 5: 0.04, 6: 0.05, 7: 0.06, 8: 0.07, 9: 0.08}
    # smoothed (centred over 3) is lowest at epoch 3; epoch 7's smoothed value is known at epoch 8
    assert validation_onset.online_stop(losses, smooth=3, patience=4) == (3, 8)
    assert validation_onset.online_stop(losses, smooth=1, patience=2) == (3, 6)


def test_online_rule_never_hands_back_the_base_model_and_may_never_stop():
    rising = {e: 0.05 + 0.01 * e for e in range(10)}
    assert validation_onset.online_stop(rising, smooth=1, patience=4) == (1, 6)
    falling = {e: 0.05 - 0.001 * e for e in range(10)}
    assert validation_onset.online_stop(falling) is None


def test_one_noisy_epoch_does_not_stop_the_smoothed_rule_early():
    losses = {e: 0.05 - 0.002 * e for e in range(12)}
    losses[3] = 0.035  # one lucky epoch: unsmoothed it stays the lowest until epoch 8
    assert validation_onset.online_stop(losses, smooth=1, patience=4) == (3, 8)
    assert validation_onset.online_stop(losses, smooth=3, patience=4) is None


def test_table_reads_finished_runs_against_the_archived_grid(tmp_path):
    run = "lora_lr0.008_s1"  # an archived grid run: its onset is measured there
    losses = [0.0475, 0.0422, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]
    for kind, last in (("same", len(losses)), ("new", 3)):
        folder = tmp_path / f"{run}-{kind}"
        folder.mkdir()
        (folder / "log.jsonl").write_text("".join(json.dumps({"step": e * 10, "epoch": e, "val_loss": v}) + "\n"
                                                  for e, v in enumerate(losses[:last])))
        if kind == "same":  # the other is still training: no summary yet, left out
            (folder / "summary.json").write_text("{}")
    (tmp_path / "notes-same").mkdir()  # not a grid run
    text = validation_onset.table(tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| lora")]
    assert rows == ["| lora 8e-3 seed 1 | 1 [1–3] | same | 0.0475 → 0.0422 (1) → 0.1000 | 0 | "
                    "epoch 1, decided at 6 | 0 |"]
    assert "| star, same | 1 | 1/1, 1/1 | 1/1, 1/1 | 1/1, 1/1 |" in text  # lowest, online, default: epoch 1
    assert "star, new" not in text
