"""Names a package exports but imports on first use (PEP 562), so that importing the package stays cheap.

``lorakit.config`` reads ``lorakit.earlystop.rules`` and ``lorakit.data.config``, and `lorakit train --print-config`
must not wait for torch and matplotlib, which other modules of those packages bring. A package lists its names
and the module each lives in, then ``__getattr__, __dir__ = lazy_exports(__name__, EXPORTS, globals())``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's module-level ``__getattr__`` and ``__dir__`` for ``exports`` (name -> module)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # the next access is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
