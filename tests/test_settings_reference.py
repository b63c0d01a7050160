"""docs/settings.md: every setting of a lorakit config, with its default and what it does, generated from the
config's code; it is current, and no setting is left without a line saying what it does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lorakit.config import TrainConfig
from lorakit.settings_reference import DOC_MARKERS, reference_markdown, settings

ROOT = Path(__file__).resolve().parents[1]


def test_the_settings_page_is_current():
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    begin, end = DOC_MARKERS
    assert page.split(begin, 1)[1].split(end, 1)[0].strip() == reference_markdown().strip(), \
        "docs/settings.md is out of date: python -m lorakit.settings_reference --update-doc docs/settings.md"


def test_every_setting_is_listed_with_what_it_does():
    cfg = TrainConfig()
    expected = {f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}
    listed = {f"{s.section}.{s.key}": s for s in settings()}
    assert set(listed) == expected
    undocumented = sorted(key for key, s in listed.items() if not s.doc)
    assert not undocumented, f"write a #: comment above these fields in lorakit/config.py: {undocumented}"
    # a comment of several lines is read whole, and only the lines right above its own field
    ema = listed["training.ema_decay"].doc
    assert ema.startswith("an exponential moving average") and ema.endswith("Absent: off")
    assert "| `training.ema_decay` | absent | an exponential moving average" in reference_markdown()
    assert "| `optimizer.fused_backward_pass` | `false` |" in reference_markdown()


def test_the_readme_links_it():
    assert "docs/settings.md" in (ROOT / "README.md").read_text(encoding="utf-8")
