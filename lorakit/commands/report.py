"""``lorakit report RUN``: one HTML page for a training run from what its folder already holds (sample grids,
loss and CS per epoch, the CS-Fluctuation chart, settings, summary), and what ``lorakit eval`` measured on its
checkpoints when there is an eval folder (``--eval``, repeatable, by default ``RUN-eval`` beside it: the folder
the trainer's summary suggests).  Generates nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.errors import LorakitError

HELP = "one HTML page for a training run from what its folder holds"


class ReportCommandError(LorakitError):
    """The page would replace a file lorakit did not write."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="a training run folder (with config.toml)")
    parser.add_argument("--out", type=Path, default=None, help="the HTML file (default RUN/report.html)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if lorakit did not write it")
    parser.add_argument("--eval", type=Path, action="append", default=None, metavar="DIR",
                        help="a `lorakit eval` output folder (metrics.json) whose ranking and charts join the page; "
                             "repeat for several (other prompts, other seeds), each under its folder's name "
                             "(default: RUN-eval beside the run, when it holds one)")


def eval_folders(args: argparse.Namespace) -> list[Path]:
    """The ``--eval`` folders, checked; else ``RUN-eval`` beside the run when it holds a metrics.json; else none."""
    if args.eval:
        for folder in args.eval:
            if not (folder / "metrics.json").is_file():
                raise ReportCommandError(f"--eval {folder}: no metrics.json there (a `lorakit eval --out` folder "
                                         "holds one)")
        return list(dict.fromkeys(args.eval))  # a folder given twice is shown once
    beside = args.run.parent / f"{args.run.resolve().name}-eval"
    return [beside] if (beside / "metrics.json").is_file() else []


def _join_eval(page, run: Path, measured: Path, label: str = "", position: int = 0) -> None:
    """The eval's ranking, charts and verdict on the run's page; only a line saying why when the run's checkpoints
    changed since the eval measured them."""
    from lorakit.evaluate.checkpoints import CheckpointError, _read_json, summary_turning_point
    from lorakit.evaluate.pipeline import result_from_dict
    from lorakit.evaluate.report import add_eval_result, changed_since_eval

    try:
        result = result_from_dict(_read_json(measured / "metrics.json") or {})
    except KeyError as e:
        raise CheckpointError(f"{measured / 'metrics.json'}: not a lorakit eval result (no {e})") from None
    run_name = run.resolve().name
    if changed := changed_since_eval(result, run, run_name):
        page.summary.append(f"not shown: the eval in {measured} measured checkpoints that have changed since "
                            f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}: the run was trained "
                            "again); run lorakit eval again for this run's ranking")
        return
    try:
        tp = summary_turning_point(_read_json(run / "summary.json"))
    except CheckpointError:  # the run's page said so already; the ranking is shown without its turning point
        tp = None
    add_eval_result(page, result, str(measured), run_name, tp.get("epoch") if tp else None, label, position)


def run(args: argparse.Namespace) -> int:
    from lorakit.atomic import atomic_write_text, file_in_the_way
    from lorakit.evaluate.report import page_from_run, render_html, written_by_lorakit

    out = args.out or args.run / "report.html"
    if (blocking := file_in_the_way(out)) is not None:
        raise ReportCommandError(f"--out {out}: {blocking} is a file, not a folder; give another path")
    if out.exists() and not args.overwrite and not (out.is_file() and written_by_lorakit(out)):
        raise ReportCommandError(f"{out} exists and is not a page lorakit wrote; choose another --out, or pass "
                                 "--overwrite to replace it")
    measured = eval_folders(args)
    page = page_from_run(args.run)
    tables = len(page.tables)
    names = [f.name for f in measured]
    labels = [""] if len(measured) == 1 else names if len(set(names)) == len(names) else [str(f) for f in measured]
    for folder, label in zip(measured, labels, strict=True):  # each eval's ranking after the one before, all first
        _join_eval(page, args.run, folder, label, position=len(page.tables) - tables)
    atomic_write_text(out, render_html(page))
    from lorakit.run_messages import count

    grids = len(page.grids[0].rows) if page.grids else 0
    print(f"lorakit report: {page.title[len('lorakit report: '):]}: {count(grids, 'sample grid')}, "
          f"{count(len(page.tables), 'table')}, {count(len(page.charts), 'chart')}")
    for line in page.summary:
        print("  " + line)
    print(f"  wrote {out}")
    return 0
