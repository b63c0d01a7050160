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


def test_replace_table_keeps_the_rest(tmp_path):
    doc = f"intro\n{compat.START}\nold\n{compat.END}\noutro\n"
    assert compat.replace_table(doc, "| new |") == f"intro\n{compat.START}\n| new |\n{compat.END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        compat.replace_table("no table here", "| new |")
