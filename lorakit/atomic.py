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
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class DestinationExistsError(FileExistsError):
    """The target exists and the caller asked not to replace it."""


@contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it, through the handler that was set, when
    the block ends.  Python raises KeyboardInterrupt between any two steps of the main thread, so without this
    one landing between "the temporary file exists" and "its name is assigned" would leave the file behind.  A
    signal mask cannot do it: a terminal's Ctrl-C goes to the whole process, and any other thread (torch's) takes
    it.  Only the main thread handles signals, so elsewhere there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # None: a handler set outside Python, which could not be put back
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def new_temp_path(path: Path, suffix: str, make: Callable[[Path], None]) -> Path:
    """Create a hidden temporary file or folder beside ``path`` (``.NAME.<8 hex>SUFFIX``) with ``make(candidate)``,
    which must fail with FileExistsError when the name is taken.  ``make`` creates it with the mode the umask
    gives (``0o666``/``0o777`` minus it), as a plain ``open`` would: ``tempfile``'s owner-only 0600/0700 would stay
    on the renamed result, and a model or adapter file that other users (a ComfyUI service, a container with
    another uid) cannot read is a file that does not load."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(path))


def give_umask_modes(folder: Path) -> None:
    """Every file under ``folder`` (made by ``new_temp_path``, so its mode is 0o777 minus the umask) gets the mode
    the umask gives a new file: a writer such as safetensors' (and so diffusers' ``save_pretrained``) makes its
    files 0600 whatever the umask."""
    mode = stat.S_IMODE(folder.stat().st_mode) & 0o666
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink() and stat.S_IMODE(file.stat().st_mode) != mode:
            os.chmod(file, mode)


def _make_file(candidate: Path) -> None:
    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path``, on any failure it is removed.

    ``suffix`` lets writers that choose a format from the file name (PIL, matplotlib) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise DestinationExistsError(f"{path} exists; pass overwrite to replace it")
    tmp: Path | None = None
    try:
        with _ctrl_c_deferred():  # a Ctrl-C is raised once the name is known, so the finally removes the file
            try:
                tmp = new_temp_path(path, suffix, _make_file)
            except OSError as err:  # said of the file asked for, not of a hidden name the user never gave
                if err.errno is None or err.errno in DISK_ERRNOS:
                    raise
                raise OSError(err.errno, f"cannot be written there ({err.strerror})", str(path)) from err
        mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask gives a new file
        yield tmp
        if stat.S_IMODE(tmp.stat().st_mode) != mode:  # safetensors' writer makes its file 0600 whatever the umask
            os.chmod(tmp, mode)
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
        with _ctrl_c_deferred():
            if tmp is not None:
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


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The first of ``path``'s parents that exists as a file, not a folder: nothing can be written below it (the OS
    says "[Errno 17] File exists" or "Not a directory", naming neither path nor why); None when there is none."""
    return next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)


def cannot_write_beside(path: str | os.PathLike) -> OSError | None:
    """Why nothing can be written at ``path`` (a read-only disk, a folder the user may not write, /proc), found by
    making and removing a hidden file in the nearest folder that exists; None when that works.  A tool checks it
    before its work: the write itself comes last, after minutes of merging."""
    folder = next((p for p in Path(path).parents if p.is_dir()), Path("."))
    try:
        probe = new_temp_path(folder / Path(path).name, ".probe", _make_file)
    except OSError as err:
        return err
    probe.unlink(missing_ok=True)
    return None


@contextmanager
def atomic_folder(path: str | os.PathLike, *, same_if_there: bool = False) -> Iterator[Path]:
    """Yield a new hidden folder beside ``path`` to fill; on success it becomes ``path`` (which must not exist, or be
    an empty folder), on any failure, Ctrl-C included, it is removed.  A folder rendered in place and cut off
    half-way (the built-in job's images, killed in its first seconds) would be read whole by the next run.

    ``same_if_there``: what is filled is the same whoever fills it (a rendered dataset), so a ``path`` another process
    made meanwhile (a grid's two runs starting at once) is kept, and this one dropped, instead of an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        with _ctrl_c_deferred():
            tmp = new_temp_path(path, ".tmp", os.mkdir)
        yield tmp
        try:
            os.rename(tmp, path)  # replaces an empty folder; a folder with files in it raises, and is left as it is
        except OSError as err:
            if not (same_if_there and err.errno in (errno.ENOTEMPTY, errno.EEXIST) and path.is_dir()):
                raise
        else:
            tmp = None
    finally:
        if tmp is not None:
            with _ctrl_c_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
