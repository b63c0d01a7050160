"""The reference of every setting a lorakit config has (``docs/settings.md``): each ``[section]`` key with its
default and the ``#:`` comment written above it in the config's dataclasses, generated from them so that the
page never drifts from the code.

    python -m lorakit.settings_reference                            # print the tables
    python -m lorakit.settings_reference --update-doc docs/settings.md
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.config import TrainConfig
from lorakit.doc_blocks import update_doc_blocks

#: the lines around the generated tables in docs/settings.md
DOC_MARKERS = ("<!-- settings reference -->", "<!-- /settings reference -->")


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: Any
    doc: str  # the field's own ``#:`` comment, joined; "" when it has none


def field_docs(cls: type) -> dict[str, str]:
    """Each field of dataclass ``cls`` and the ``#:`` comment lines right above it in its source."""
    lines, _ = inspect.getsourcelines(cls)
    docs = {}
    for node in ast.parse("".join(lines)).body[0].body:  # the config's dataclasses are top-level classes
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                above.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            docs[node.target.id] = " ".join(above)
    return docs


def settings() -> list[Setting]:
    """Every setting of a ``TrainConfig``, section by section, in the order the dataclasses declare them."""
    cfg = TrainConfig()
    found = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        docs = field_docs(type(values))
        found += [Setting(section.name, f.name, getattr(values, f.name), docs.get(f.name, ""))
                  for f in dataclasses.fields(values)]
    return found


def _default(value: Any) -> str:
    """A default as a config file writes it (TOML-like); an unset one as "absent"."""
    if value is None:
        return "absent"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def reference_markdown() -> str:
    """A table per section: setting, default, what it does."""
    out, section = [], None
    for s in settings():
        if s.section != section:
            section = s.section
            out += ["", f"### `[{section}]`", "", "| setting | default | what it does |", "|---|---|---|"]
        doc = s.doc.replace("|", "\\|")
        out.append(f"| `{s.section}.{s.key}` | {_default(s.default)} | {doc} |")
    return "\n".join(out).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the reference of every lorakit setting, from the config's code")
    parser.add_argument("--update-doc", type=Path, help="write the tables between the page's markers")
    args = parser.parse_args(argv)
    tables = reference_markdown()
    if args.update_doc:
        update_doc_blocks(args.update_doc, {"settings": tables}, {"settings": DOC_MARKERS})
        print(f"updated {args.update_doc}")
    else:
        print(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
