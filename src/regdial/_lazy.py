"""Lazy re-exports: a package names its public objects without importing heavy modules.

``__getattr__, __dir__ = lazy(globals(), {"fit": "regdial.training.fit", ...})`` makes
``package.fit`` import ``regdial.training.fit`` on first access (PEP 562), so importing
the package costs nothing until a name is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy"]


def lazy(
    namespace: dict[str, Any], table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a module whose names in ``table`` load on first use."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module-level hook's own name
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
