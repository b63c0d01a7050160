"""The report page in headless Chromium (Debian's ``chromium``): it loads with no console message, every image
decodes (naturalWidth > 0), and the tables the browser built hold the numbers of metrics.json.

A copy of the page gets a small probe script (the page itself has none) that records each image's naturalWidth
on load; ``--dump-dom`` returns the DOM after load, and ``--enable-logging=stderr`` prints every console message
as an ``INFO:CONSOLE`` line.  No driver, no websocket client.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from report_helpers import check_tables_match, parse_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (Debian: apt-get install "
                                                             "chromium; .ci/run installs it where apt-get exists)")

PROBE = """<script>window.addEventListener("load", () => {
  document.body.setAttribute("data-probe", JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth])));
});</script>"""


def chromium(tmp: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
            "--enable-logging=stderr", "--v=0", *extra, page.resolve().as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def load_in_browser(tmp: Path, html_text: str) -> tuple[str, list[str]]:
    """The DOM after load (with the probe's data) and the console lines."""
    page = tmp / "probed.html"
    page.write_text(html_text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = chromium(tmp, page, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def probe(dom: str) -> list[list]:
    start = dom.index('data-probe="') + len('data-probe="')
    return json.loads(dom[start:dom.index('"', start)].replace("&quot;", '"'))


def test_eval_report_in_chromium(tmp_path):
    from test_evaluate_pipeline import ThumbExtractor, setup

    from lorakit.evaluate.pipeline import evaluate, write_results
    from lorakit.evaluate.report import page_from_eval, render_html

    checkpoints, runs, jobs, images, data = setup()
    result = evaluate(checkpoints, runs, jobs, images, {"thumb": ThumbExtractor()}, data, seeds=2)
    write_results(result, tmp_path)
    text = render_html(page_from_eval(result, jobs, images))
    dom, console = load_in_browser(tmp_path, text)
    assert console == []
    images_seen = probe(dom)
    assert len(images_seen) == len(jobs) * len(checkpoints) + len(result.groups) + 1
    assert all(complete and width > 0 for complete, width in images_seen)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert check_tables_match(parse_report(dom), metrics) > 20


def test_run_report_in_chromium(tmp_path):
    import numpy as np
    from eval_helpers import write_run
    from PIL import Image

    from lorakit.evaluate.report import page_from_run, render_html

    run = write_run(tmp_path / "run", epochs=2)
    (run / "samples").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(run / "samples" / "epoch-0001.png")
    dom, console = load_in_browser(tmp_path, render_html(page_from_run(run)))
    assert console == []
    seen = probe(dom)
    assert len(seen) == 2 and all(c and w > 0 for c, w in seen)


def test_run_report_with_an_eval_in_chromium(tmp_path):
    """A run's page with an eval's ranking and charts added: no console message, every chart decodes, and the
    ranking table the browser built holds the eval's harmonic means in the eval's order."""
    from eval_helpers import write_run
    from test_evaluate_pipeline import ThumbExtractor, setup

    from lorakit.evaluate.pipeline import evaluate
    from lorakit.evaluate.report import add_eval_result, page_from_run, render_html

    checkpoints, runs, jobs, images, data = setup()
    result = evaluate(checkpoints, runs, jobs, images, {"thumb": ThumbExtractor()}, data, seeds=2)
    run = write_run(tmp_path / "r", epochs=2)
    page = page_from_run(run)
    charts_before = len(page.charts)
    add_eval_result(page, result, "r-eval", "r", 1)
    dom, console = load_in_browser(tmp_path, render_html(page))
    assert console == []
    seen = probe(dom)
    assert len(seen) == len(page.charts) > charts_before and all(c and w > 0 for c, w in seen)
    ranking = parse_report(dom).tables["ranking: the checkpoints compared, best first"]
    assert [label for label, _ in ranking] == result.ranking()
    for label, cells in ranking:
        assert {m: v for m, v, _, _ in cells}["harmonic mean"] == result.harmonic_mean[label]
    rank = result.ranking().index("r/e1") + 1
    assert f"the turning point's checkpoint (epoch 1) ranks {rank} of 3 there" in dom


def test_run_report_with_two_evals_in_chromium(tmp_path):
    """Two evals on one run's page (`lorakit report RUN --eval A --eval B`): each ranking table under its folder's
    name, in order, both holding their eval's numbers; every chart decodes."""
    from eval_helpers import write_run
    from test_evaluate_pipeline import ThumbExtractor, setup

    from lorakit.evaluate.pipeline import evaluate
    from lorakit.evaluate.report import add_eval_result, page_from_run, render_html

    checkpoints, runs, jobs, images, data = setup()
    first = evaluate(checkpoints, runs, jobs, images, {"thumb": ThumbExtractor()}, data, seeds=2)
    second = evaluate(checkpoints, runs, jobs, images, {"thumb": ThumbExtractor()}, data, seeds=1)
    page = page_from_run(write_run(tmp_path / "r", epochs=2))
    add_eval_result(page, first, "r-eval", "r", 1, label="r-eval", position=0)
    add_eval_result(page, second, "r-eval-1seed", "r", 1, label="r-eval-1seed", position=1)
    dom, console = load_in_browser(tmp_path, render_html(page))
    assert console == []
    assert all(c and w > 0 for c, w in probe(dom))
    tables = parse_report(dom).tables
    titles = list(tables)
    a, b = (f"{name}: ranking: the checkpoints compared, best first" for name in ("r-eval", "r-eval-1seed"))
    assert titles.index(a) == 0 and titles.index(b) == 1
    for title, result in ((a, first), (b, second)):
        assert [label for label, _ in tables[title]] == result.ranking()
        for label, cells in tables[title]:
            assert {m: v for m, v, _, _ in cells}["harmonic mean"] == result.harmonic_mean[label]


def test_a_broken_image_or_a_console_error_is_caught(tmp_path):
    """The check itself can fail: a page with an undecodable image and a console error."""
    dom, console = load_in_browser(tmp_path, '<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                                             '<script>console.error("boom")</script></body></html>')
    assert any("boom" in line for line in console)
    assert probe(dom) == [[True, 0]]


def test_screenshot_is_written(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<!DOCTYPE html><html><body><h1>lorakit</h1></body></html>")
    done = chromium(tmp_path, page, f"--screenshot={tmp_path / 'shot.png'}", "--window-size=400,300")
    assert done.returncode == 0 and (tmp_path / "shot.png").stat().st_size > 0
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
