"""The report page: self-contained, tables hold metrics.json's numbers with the best per column marked, a grid
per prompt type; and the page of a training run made from its folder alone."""

from __future__ import annotations

import json
from html import unescape

import numpy as np
import pytest
from eval_helpers import write_run
from PIL import Image
from report_helpers import check_tables_match, parse_report
from test_evaluate_pipeline import ThumbExtractor, setup

from lorakit.evaluate.checkpoints import CheckpointError
from lorakit.evaluate.pipeline import evaluate
from lorakit.evaluate.report import Page, Table, best_rows, page_from_eval, page_from_run, render_html


def eval_page():
    checkpoints, runs, jobs, images, data = setup()
    result = evaluate(checkpoints, runs, jobs, images, {"thumb": ThumbExtractor()}, data, seeds=2)
    return result, render_html(page_from_eval(result, jobs, images, summary=["a summary line"])), jobs


def test_the_page_is_self_contained_and_its_tables_hold_the_metrics():
    result, text, jobs = eval_page()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    parsed = parse_report(text)
    metrics = json.loads(json.dumps(result.to_dict()))
    assert check_tables_match(parsed, metrics) > 20
    assert all(src.startswith("data:image/png;base64,") for src in parsed.images)
    # images: a grid per prompt type, one image per seed and checkpoint; charts: one per type + the scatter
    n_checkpoints = len(result.checkpoints)
    assert len(parsed.images) == len(jobs) * n_checkpoints + len(result.groups) + 1
    for kind in ("train", "trigger", "alter", "agnostic"):
        assert f"images: {kind} prompts" in text
    assert "CS turning point" not in text or True  # drawn inside the chart image
    # the best value of each column is marked, and only it
    for title, rows in parsed.tables.items():
        if not title.startswith("metrics:"):
            continue
        columns = {m for _, cells in rows for m, *_ in cells}
        for metric in columns:
            values = [(label, v, best) for label, cells in rows for m, v, _, best in cells if m == metric]
            finite = [v for _, v, _ in values if v is not None]
            if len(finite) < 2:
                continue
            want = max(finite) if result.directions[metric] else min(finite)
            assert {lb for lb, v, b in values if b} == {lb for lb, v, _ in values if v == want}, (title, metric)


def test_best_rows_handles_direction_ties_and_missing_values():
    t = Table("t", ["a", "b", "c"], [("x", [1.0, 2.0, None]), ("y", [3.0, 2.0, 5.0]), ("z", [None, 4.0, None])],
              [True, False, True])
    assert best_rows(t) == [{1}, {0, 1}, set()]  # c: one value only, nothing to compare
    html = render_html(Page("p", tables=[t]))
    assert html.count("★") == 3


def test_page_of_a_training_run_from_its_folder(tmp_path):
    run = write_run(tmp_path / "run", epochs=2, turning_epoch=1)
    (run / "samples").mkdir()
    for e in (1, 2):
        Image.fromarray(np.full((70, 130, 3), 40 * e, dtype=np.uint8)).save(run / "samples" / f"epoch-{e:04d}.png")
    text = render_html(page_from_run(run))
    parsed = parse_report(text)
    rows = dict(parsed.tables["training: per epoch"])
    assert sorted(rows) == ["epoch 1", "epoch 2"]
    loss = {m: v for m, v, _, _ in rows["epoch 2"]}["mean loss"]
    assert loss == pytest.approx(np.mean([0.5 / s for s in range(5, 9)]))
    assert len(parsed.images) == 2 + 1  # two sample grids and the loss chart
    assert "turning point at step 4 (epoch 1)" in text
    with pytest.raises(CheckpointError, match="not a lorakit run"):
        page_from_run(tmp_path)
    # a run whose rule never decided: the page says why, as the run's summary does
    undecided = write_run(tmp_path / "undecided", epochs=2, turning_epoch=None)
    summary = json.loads((undecided / "summary.json").read_text())
    summary["undecided"] = "the update's spectral size σ1(ΔW)/σ1(W) was 0.0197 at the end, 8% of its budget 0.25"
    (undecided / "summary.json").write_text(json.dumps(summary))
    assert "early stopping did not decide: the update's spectral size σ1(ΔW)/σ1(W) was 0.0197" in \
        unescape(render_html(page_from_run(undecided)))
    summary["epochs_run"] = 1  # "in 1 epochs" before
    (undecided / "summary.json").write_text(json.dumps(summary))
    assert page_from_run(undecided).summary[0].startswith(f"adapter: {summary['steps']} steps in 1 epoch, ")
    # a run of one epoch: its loss is in the table; no chart of a lone dot
    single = page_from_run(write_run(tmp_path / "single", epochs=1, turning_epoch=None))
    assert [t.title for t in single.tables if t.title == "training: per epoch"]
    assert not [c for c in single.charts if c.title.startswith("mean training loss")]
    assert [c for c in page_from_run(undecided).charts if c.title.startswith("mean training loss")]


def test_the_run_page_shows_the_validation_loss_per_epoch(tmp_path):
    """A run with held-out images (data.validation_split) logs val_loss on steps and at epoch ends."""
    run = write_run(tmp_path / "run", epochs=2, turning_epoch=1)
    with (run / "log.jsonl").open("a") as log:
        for record in ({"step": 2, "epoch": 1, "loss": 0.3, "lr": 1e-3, "val_loss": 0.41},
                       {"step": 4, "epoch": 1, "val_loss": 0.40}, {"step": 8, "epoch": 2, "val_loss": 0.45}):
            log.write(json.dumps(record) + "\n")
    summary = json.loads((run / "summary.json").read_text())
    summary["validation"] = {"held_out_images": 3, "measured": 3, "last": {"step": 8, "epoch": 2, "val_loss": 0.45},
                             "lowest": {"step": 4, "epoch": 1, "val_loss": 0.4}}
    (run / "summary.json").write_text(json.dumps(summary))
    text = render_html(page_from_run(run))
    assert "validation loss on 3 held-out images: lowest 0.4 at step 4 (epoch 1)" in text
    parsed = parse_report(text)
    rows = {label: {m: (v, best) for m, v, _, best in cells}
            for label, cells in parsed.tables["training: per epoch"]}
    assert rows["epoch 1"]["validation loss"] == (0.40, True)  # the epoch's last value; the lowest is marked
    assert rows["epoch 2"]["validation loss"] == (0.45, False)
    assert rows["epoch 1"]["steps"][0] == 5  # the epoch-end record is not a training step
    # the base model's value (step 0, before training) is named so, also when it stays the lowest
    summary["validation"].update(base_model=0.39, lowest={"step": 0, "epoch": 0, "val_loss": 0.39})
    (run / "summary.json").write_text(json.dumps(summary))
    assert ("validation loss on 3 held-out images: base model 0.39, lowest 0.39 before training (the base model)"
            in render_html(page_from_run(run)))
    # a run without it has no such column
    plain = parse_report(render_html(page_from_run(write_run(tmp_path / "plain", epochs=1))))
    assert all("validation loss" not in {m for m, *_ in cells} for _, cells in plain.tables["training: per epoch"])


def test_shap_importance_is_a_table_of_its_own():
    checkpoints, runs, jobs, images, data = setup()
    result = evaluate(checkpoints, runs, jobs, images, {"thumb": ThumbExtractor()}, data, seeds=2)
    result.importance = {"alter/fidelity[thumb]": {"lr": 0.25, "epoch": 0.5}, "train/x": {"lr": 0.75}}
    parsed = parse_report(render_html(page_from_eval(result, jobs, images)))
    rows = dict(parsed.tables["what drives each metric: mean |SHAP value| per setting"])
    assert [(m, v, best) for m, v, _, best in rows["alter/fidelity[thumb]"]] == [("lr", 0.25, False),
                                                                                 ("epoch", 0.5, False)]
    assert [(m, v, best) for m, v, _, best in rows["train/x"]] == [("lr", 0.75, True), ("epoch", None, False)]


def test_two_runs_on_one_page_have_a_line_each_and_their_settings():
    from lorakit.evaluate.checkpoints import EvalCheckpoint, RunInfo

    checkpoints, _, jobs, images, data = setup()
    more = [EvalCheckpoint("s/e1", "adapter", None, "s1", run="s", epoch=1),
            EvalCheckpoint("s/e2", "adapter", None, "s2", run="s", epoch=2)]
    images = {**images, "s/e1": images["r/e2"][::-1], "s/e2": images["r/e1"][::-1]}
    runs = [RunInfo("r", None, {"algorithm": "lora", "lr": 1e-3}, turning_epoch=1),
            RunInfo("s", None, {"algorithm": "loha", "lr": 2e-3})]
    result = evaluate(checkpoints + more, runs, jobs, images, {"thumb": ThumbExtractor()}, data, seeds=2)
    page = page_from_eval(result, jobs, images)
    assert [name for name, _ in page.settings] == ["r", "s", "evaluation"]
    assert page.settings[1][1]["algorithm"] == "loha"
    # on the page: a row per setting and a column per run, read down (it used to scroll sideways)
    text = render_html(page)
    assert '<th class="label">setting</th><th>r</th><th>s</th><th>evaluation</th>' in text
    assert '<tr><td class="label">algorithm</td><td>lora</td><td>loha</td><td></td></tr>' in text
    assert len(page.charts) == len(result.groups) + 1  # metric-vs-epoch per type and the trade-off scatter
    assert page.grids[0].columns == ["base", "r/e1", "r/e2", "s/e1", "s/e2"]


def test_the_ranking_table_lists_every_checkpoint_best_first_with_its_method_and_key_metrics():
    from lorakit.evaluate.checkpoints import EvalCheckpoint, RunInfo
    from lorakit.evaluate.report import key_metrics, ranking_table

    checkpoints, _, jobs, images, data = setup()
    more = [EvalCheckpoint("s/e2", "native", None, "s2", run="s", epoch=2)]
    images = {**images, "s/e2": images["r/e1"][::-1]}
    runs = [RunInfo("r", None, {"method": "adapter", "algorithm": "loha"}), RunInfo("s", None, {"method": "native"})]
    result = evaluate(checkpoints + more, runs, jobs, images, {"thumb": ThumbExtractor()}, data, seeds=2)
    result = json.loads(json.dumps(result.to_dict()))  # what metrics.json holds
    from lorakit.evaluate.pipeline import result_from_dict

    result = result_from_dict(result)
    keys = key_metrics(result)
    assert ("train", "fidelity[thumb]") in keys and ("agnostic", "leak[thumb]") in keys
    table = ranking_table(result)
    page = Page("p", tables=[table])
    text = render_html(page)
    parsed = parse_report(text)
    rows = parsed.tables[table.title]
    labels = [lb for lb, _ in rows]
    assert sorted(labels) == sorted(c["label"] for c in result.checkpoints)
    hm = [result.harmonic_mean[lb] for lb in labels]
    means = [result.mean_score[lb] for lb in labels]
    assert list(zip(hm, means, strict=True)) == sorted(zip(hm, means, strict=True), reverse=True)
    assert labels[0] == result.best
    for rank, (lb, cells) in enumerate(rows, start=1):
        values = {m: v for m, v, _, _ in cells}
        assert values["rank"] == rank and values["harmonic mean"] == result.harmonic_mean[lb]
        for group, metric in keys:
            assert values[f"{metric} ({group})"] == result.value(group, lb, metric)
    methods = dict(zip(labels, (row[0] for row in table.info), strict=True))
    assert methods == {"base": "base model", "r/e1": "loha", "r/e2": "loha", "s/e2": "native"}
    assert '<th class="label">method</th><th class="label">epoch</th>' in text
    # on the eval page it comes first
    assert page_from_eval(result, jobs, images).tables[0].title == table.title


def test_a_run_file_or_an_evaluation_given_as_the_run_says_what_to_give_instead(tmp_path):
    run = write_run(tmp_path / "run", epochs=1)
    for inside in (run / "lorakit.safetensors", run / "checkpoints" / "epoch-0001"):
        with pytest.raises(CheckpointError, match=f"inside the run {run}: lorakit report {run}"):
            page_from_run(inside)
    evaluation = tmp_path / "run-eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"holds an evaluation.*lorakit report RUN --eval {evaluation}"):
        page_from_run(evaluation)
    with pytest.raises(CheckpointError, match=r"not a lorakit run folder \(no config.toml\)$"):
        page_from_run(tmp_path)


def test_a_run_with_an_unreadable_summary_still_gets_its_page_saying_why(tmp_path, capsys):
    from lorakit.cli import main

    run = write_run(tmp_path / "run", epochs=2, turning_epoch=1)
    (run / "summary.json").write_text('{"method": "lora", "steps": 8,')  # cut short, as a full disk would
    assert main(["report", str(run)]) == 0
    said = capsys.readouterr().out
    assert f"the run's summary is not shown: {run / 'summary.json'}: not valid JSON" in said
    text = unescape((run / "report.html").read_text())
    assert "the run's summary is not shown" in text
    assert sorted(dict(parse_report(text).tables["training: per epoch"])) == ["epoch 1", "epoch 2"]
