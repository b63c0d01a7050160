"""Argument types for the commands' numbers, so a value that cannot work is refused by argparse with the option's
name ("argument --steps: must be a whole number of 1 or more, got '0'") instead of failing deep in a library
(``--steps 0`` divided by zero in the scheduler; ``--batch-size 0`` failed on a cache file; ``--cfg nan`` drew
NaN images)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of {least} or more, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be a whole number of {least} or more, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count or size: 1 or more."""
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    """0 or more (``--conv-rank 0``: leave k x k convs out)."""
    return _whole(text, 0)


def finite_float(text: str) -> float:
    """A number, not nan or inf (float() takes both)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A rate or scale: more than 0 and finite."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def share(text: str) -> float:
    """A fraction of a whole: 0 to 1."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share from 0 to 1, got {text!r}")
    return value


def comma_list(item: Callable[[str], object] = str, choices: Sequence[str] | None = None) -> Callable[[str], str]:
    """A comma-separated list (``--lrs 2e-3,8e-3``) whose every item ``item`` accepts and, with ``choices``, is one
    of them; the text is handed on as given (stripped), for the code that splits it.  A list checked item by item
    where it is used came out as a ValueError traceback, or as runs that each failed or measured nothing."""
    def parse(text: str) -> str:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"want a comma-separated list with no empty item, got {text!r}")
        for part in parts:
            if choices is not None and part not in choices:
                raise argparse.ArgumentTypeError(f"{part!r} is not one of {', '.join(choices)}")
            item(part)  # its refusal names the item ("must be a number, got 'abc'")
        return ",".join(parts)

    parse.__name__ = "comma-separated list"  # argparse names the type in its own messages
    return parse


def size_or_pair(text: str) -> int | tuple[int, int]:
    """A training resolution as kohya's ``--resolution`` takes it: ``512``, or ``512,768`` (width, height); a pair
    of equal sides is the one size."""
    parts = [part.strip() for part in text.split(",")]
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a size or width,height (512 or 512,768), got {text!r}") from None
    if len(sizes) > 2 or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"want a size or width,height of 1 or more (512 or 512,768), got {text!r}")
    return sizes[0] if len(sizes) == 1 or sizes[0] == sizes[1] else (sizes[0], sizes[1])
