"""regdial: regularization of neural networks as a dial, not a guess.

The building blocks (penalties, proximal steps, parameter groups, schedules) need torch
alone and are imported eagerly. The heavier layers (training, tuning, reports) are
imported on first use, so ``from regdial import L1`` never pulls in Optuna or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

from regdial.groups import param_groups
from regdial.penalties import L1, L2, L2SP, ElasticNet, GroupLasso, Penalty
from regdial.proximal import MaxNorm, attach_prox, max_norm_
from regdial.schedules import Constant, Cosine, Early, Linear, Schedule, Step

__version__ = "0.1.0"

# Public names that live in modules with heavier imports, loaded on first access.
_LAZY: dict[str, str] = {}

__all__ = [
    "L1",
    "L2",
    "L2SP",
    "Constant",
    "Cosine",
    "Early",
    "ElasticNet",
    "GroupLasso",
    "Linear",
    "MaxNorm",
    "Penalty",
    "Schedule",
    "Step",
    "__version__",
    "attach_prox",
    "max_norm_",
    "param_groups",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'regdial' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
