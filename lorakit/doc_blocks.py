"""Generated blocks inside hand-written Markdown pages: a table between two marker lines is rewritten by the
command that measures or defines it, and the prose around it is kept as a person wrote it.  Used by
``python -m lorakit.commands.kohya_config --update-doc`` and by the experiments' ``--update-doc``."""

from __future__ import annotations

from pathlib import Path

from lorakit.atomic import atomic_write_text
from lorakit.errors import InvalidValueError


def update_doc_blocks(path: Path, blocks: dict[str, str], markers: dict[str, tuple[str, str]]) -> None:
    """Replace what lies between each block's ``(begin, end)`` markers in the Markdown file ``path``; written
    atomically, and not at all when a block's markers are missing, repeated or out of order."""
    text = path.read_text(encoding="utf-8")
    for name, block in blocks.items():
        begin, end = markers[name]
        if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
            raise InvalidValueError(f"{path}: needs one line {begin} and, after it, one line {end} around the "
                                    f"{name} block")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{block.strip()}\n{end}{tail}"
    atomic_write_text(path, text)
