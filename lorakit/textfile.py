"""Reading the text files a user writes (training configs, prompt files, presets): UTF-8, with the byte-order mark
Windows Notepad puts in front dropped (``tomllib`` refused such a file as "Invalid statement at line 1"), and any
other encoding refused with the file's name and where its first wrong byte is, not a UnicodeDecodeError."""

from __future__ import annotations

import os
from pathlib import Path


def read_user_text(path: str | os.PathLike, error: type[Exception]) -> str:
    """The file's text; ``error`` (the caller's own error class) when it is not UTF-8.  A missing file raises
    FileNotFoundError, which callers say in their own words."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({first_wrong_byte(err)}); save it as UTF-8") from None


def first_wrong_byte(err: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, in a user's words: "byte 0xe9 on line 3" (Python says the offset)."""
    line = err.object[:err.start].count(b"\n") + 1
    return f"byte 0x{err.object[err.start]:02x} on line {line}"
