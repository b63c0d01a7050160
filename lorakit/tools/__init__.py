"""Model tools: low-rank factorisation (``lowrank``), adapters from two models (``extract``), rank reduction and
conversion to plain LoRA (``resize``), baking and combining adapters (``merge``).

They share ``deltas`` (an adapter file as per-module ``ΔW``, dense or as a low-rank product) and ``result``
(what a tool wrote: tensors, metadata and a per-module report).  Errors derive from ``ToolError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lorakit.atomic import cannot_write_beside, file_in_the_way
from lorakit.errors import LorakitError, WrongBaseModelError


class ToolError(LorakitError, ValueError):
    """A tool cannot do what was asked; the message names the file or module and says why."""


class MismatchError(ToolError):
    """Inputs that do not fit each other: an adapter for another architecture, models of different shapes."""


class WrongModelError(MismatchError, WrongBaseModelError):
    """An adapter file made for another base model than the one the tool was given."""


def not_loaded(err: Exception) -> MismatchError:
    """The tools' error for an adapter file that does not load into the model (``load_network``'s
    ``AdapterFileError``): a ``WrongModelError`` where the file was made for another model."""
    return (WrongModelError if isinstance(err, WrongBaseModelError) else MismatchError)(str(err))


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                 overwrite: bool = False, suffix: str | None = None) -> Path:
    """Refuse to write ``out`` over one of the ``inputs`` (always: the input itself, a folder holding one, a file
    of an input folder) or over an existing file (unless ``overwrite``); ``suffix``: the file kind it must be
    (".safetensors" for an adapter), so a wrong name is said before the work, not after."""
    out = Path(out)
    if (blocking := file_in_the_way(out)) is not None:
        raise ToolError(f"{out}: {blocking} is a file, not a folder, so nothing can be written inside it; give "
                        "another path")
    if suffix is not None and (out.is_dir() or out.suffix.lower() != suffix):
        what = "is a folder" if out.is_dir() else f"does not end in {suffix}"
        raise ToolError(f"{out}: {what}; give the path of the {suffix} file to write")
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(given)
        source = path.resolve()
        if source == target or (out.exists() and path.exists() and os.path.samefile(out, path)):
            raise ToolError(f"{out}: this is an input ({given}); write the result to another path")
        if target in source.parents:  # a folder written there would replace it, input and all
            raise ToolError(f"{out}: holds an input ({given}), which writing the result there would remove; write "
                            "it to another path")
        if out.exists() and path.is_dir() and source in target.parents:
            raise ToolError(f"{out}: part of the input {given} (a model's own file); write the result to another "
                            "path")
    if out.exists() and not overwrite:
        raise ToolError(f"{out} exists; choose another path or pass --overwrite")
    if (err := cannot_write_beside(out)) is not None:
        raise ToolError(f"{out}: cannot be written there ({err.strerror or err}); choose another path")
    return out
