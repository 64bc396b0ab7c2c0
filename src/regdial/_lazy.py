"""Lazy re-exports, each name written once: in the package's ``if TYPE_CHECKING:`` block.

A package names its heavier public objects without importing their modules::

    if TYPE_CHECKING:
        from regdial.training.fit import fit as fit   # `as` re-exports it to type checkers

    __getattr__, __dir__, LAZY = lazy(globals())
    __all__ = ["L1", ..., *LAZY]

``lazy`` reads that block from the package's own source, so the names, their modules,
the lazy table and ``__all__`` cannot drift apart: ``package.fit`` imports
``regdial.training.fit`` on first access (PEP 562), type checkers see the real imports,
and importing the package costs nothing until a name is used.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["lazy"]


def lazy(namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]], tuple[str, ...]]:
    """``(__getattr__, __dir__, names)`` for the package whose globals are ``namespace``:
    every ``from module import name`` of its ``if TYPE_CHECKING:`` block loads on first use."""
    package = namespace["__name__"]
    table = type_checking_imports(Path(namespace["__file__"]))

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module-level hook's own name
        found = table.get(name)
        if found is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, original = found
        value = getattr(importlib.import_module(module), original)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__, tuple(table)


def type_checking_imports(source: Path) -> dict[str, tuple[str, str]]:
    """``{name: (module, name in module)}`` for each ``from module import name [as name]``
    under ``if TYPE_CHECKING:`` at the top level of ``source``, in the order written."""
    table: dict[str, tuple[str, str]] = {}
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
                    for alias in statement.names:
                        table[alias.asname or alias.name] = (statement.module, alias.name)
    return table
