"""``lorakit report RUN``: one HTML page for a training run from what its folder already holds (sample grids,
loss and CS per epoch, the CS-Fluctuation chart, settings, summary).  Generates nothing."""

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


def run(args: argparse.Namespace) -> int:
    from lorakit.atomic import atomic_write_text
    from lorakit.evaluate.report import page_from_run, render_html, written_by_lorakit

    out = args.out or args.run / "report.html"
    if out.exists() and not args.overwrite and not (out.is_file() and written_by_lorakit(out)):
        raise ReportCommandError(f"{out} exists and is not a page lorakit wrote; choose another --out, or pass "
                                 "--overwrite to replace it")
    page = page_from_run(args.run)
    atomic_write_text(out, render_html(page))
    print(f"lorakit report: {page.title[len('lorakit report: '):]}: {len(page.grids[0].rows) if page.grids else 0} "
          f"sample grids, {len(page.tables)} tables, {len(page.charts)} charts")
    for line in page.summary:
        print("  " + line)
    print(f"  wrote {out}")
    return 0
