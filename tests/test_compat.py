"""docs/compatibility.md's measured columns are what `python -m lorakit.compat` measures with the installed
diffusers, peft and lycoris-lora (cells compared without their error figures, which depend on round-off)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorakit import compat

DOC = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"


def _verdict(cell: str) -> str:
    return re.sub(r"\s*\((?:\d[^)]*|\d)\)$", "", cell)


@pytest.fixture(scope="module")
def documented():
    return compat.table_rows(DOC.read_text(encoding="utf-8"))


def test_table_lists_every_row_and_the_installed_versions(documented):
    assert list(documented) == [row.label for row in compat.ROWS]
    header = DOC.read_text(encoding="utf-8").split(compat.START, 1)[1].splitlines()[1]
    for client, version in compat.versions().items():
        assert f"{client} {version} (measured)" in header


@pytest.mark.parametrize("row", compat.ROWS, ids=[r.label for r in compat.ROWS])
def test_measured_cells_match_the_document(tmp_path, documented, row):
    measured = compat.measure(row, tmp_path)
    cells = dict(zip(compat.MEASURED, documented[row.label], strict=False))
    assert {c: _verdict(v) for c, v in measured.items()} == {c: _verdict(v) for c, v in cells.items()}


_SD2_ROWS = [r for r in compat.ROWS if r.label in ("LoCon", "LoHa", "LoCon, diffusers layout")]


@pytest.mark.parametrize("row", _SD2_ROWS, ids=[r.label for r in _SD2_ROWS])
def test_on_an_sd2_kind_unet_the_clients_do_what_the_table_says(tmp_path, documented, row):
    """SD2.x's transformers project with Linear layers where SD1.x's have 1×1 convs: the clients read a file made
    on such a U-Net as the table (measured on SD1.x's kind) says (every row was measured so on 2026-12-06; these
    three stand for the layouts and for the full preset, which reaches proj_in/proj_out)."""
    measured = compat.measure(row, tmp_path, linear_projection=True)
    cells = dict(zip(compat.MEASURED, documented[row.label], strict=False))
    assert {c: _verdict(v) for c, v in measured.items()} == {c: _verdict(v) for c, v in cells.items()}


def test_replace_table_keeps_the_rest(tmp_path):
    doc = f"intro\n{compat.START}\nold\n{compat.END}\noutro\n"
    assert compat.replace_table(doc, "| new |") == f"intro\n{compat.START}\n| new |\n{compat.END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        compat.replace_table("no table here", "| new |")
