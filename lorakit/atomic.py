"""Atomic writes: every file lorakit writes goes through here, so a crash never leaves half a file.

A file is written to a temporary name in the same folder (same file system, so the rename is atomic) and moved
into place only once it is complete.  With ``overwrite=False`` an existing file is never replaced, not even one
that appeared while we were writing (a hard link fails if the target exists).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class DestinationExistsError(FileExistsError):
    """The target exists and the caller asked not to replace it."""


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path``, on any failure it is removed.

    ``suffix`` lets writers that choose a format from the file name (PIL, matplotlib) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise DestinationExistsError(f"{path} exists; pass overwrite to replace it")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
    except Exception as err:
        disk = disk_error(err, path)
        if disk is not None:
            raise disk from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


#: a full disk, a file-size limit (ulimit -f) and a full quota: the user's to fix, said as such by the CLI
DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def disk_error(err: BaseException, path: str | os.PathLike) -> OSError | None:
    """``err`` as an OSError naming ``path`` when it is a full disk or a size limit reported by a writer that does
    not raise OSError (safetensors' Rust writer says "... (os error 28)"); None for anything else."""
    if isinstance(err, OSError):
        return None
    found = re.search(r"os error (\d+)", str(err))
    code = int(found.group(1)) if found else None
    return OSError(code, os.strerror(code), str(path)) if code in DISK_ERRNOS else None


def _rename_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # fails if the target appeared meanwhile: a concurrent write is never lost
    except FileExistsError:
        raise DestinationExistsError(f"{path} exists; pass overwrite to replace it") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise DestinationExistsError(f"{path} exists; pass overwrite to replace it") from None
        os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, overwrite: bool = True,
                 suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite, suffix=suffix) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n", overwrite=overwrite)
