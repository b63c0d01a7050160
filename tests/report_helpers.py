"""Reading the report page back: table cells with their data-value, and the images."""

from __future__ import annotations

import json
from html.parser import HTMLParser


class ReportParser(HTMLParser):
    """Collects, per metrics table, rows of (checkpoint, [(metric, data-value, text, best)]) and every img src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[str, list[tuple[str, float | None, str, bool]]]]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._cell: dict | None = None
        self._row_label: str | None = None
        self._row: list = []
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "metrics" in (a.get("class") or ""):
            self._table = a["data-title"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row_label, self._row = None, []
        elif tag == "td" and self._table is not None:
            if "data-checkpoint" in a:
                self._row_label = a["data-checkpoint"]
            elif "data-value" in a:
                self._cell = {"metric": a["data-metric"], "value": json.loads(a["data-value"]),
                              "best": "best" in (a.get("class") or "")}
                self._text = []
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_data(self, data):
        if self._cell is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            c = self._cell
            self._row.append((c["metric"], c["value"], "".join(self._text).strip(), c["best"]))
            self._cell = None
        elif tag == "tr" and self._table is not None and self._row_label is not None:
            self.tables[self._table].append((self._row_label, self._row))
            self._row_label = None
        elif tag == "table":
            self._table = None


def parse_report(text: str) -> ReportParser:
    p = ReportParser()
    p.feed(text)
    return p


def check_tables_match(parsed: ReportParser, metrics: dict) -> int:
    """Every metric of metrics.json is in its group's table with the same value; returns the cells checked."""
    from lorakit.evaluate.report import format_value

    checked = 0
    for group, rows in metrics["metrics"].items():
        title = f"metrics: {group} prompts" if group != "all" else "metrics: all prompts pooled"
        table = {label: {m: (v, text) for m, v, text, _ in cells} for label, cells in parsed.tables[title]}
        assert set(table) == {c["label"] for c in metrics["checkpoints"]}
        for label, row in rows.items():
            for metric, value in row.items():
                shown, text = table[label][metric]
                assert shown == value, (group, label, metric)
                assert text.replace(" ★", "") == format_value(value)
                checked += 1
    return checked
