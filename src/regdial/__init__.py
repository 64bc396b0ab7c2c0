"""regdial: regularization of neural networks as a dial, not a guess.

The building blocks (penalties, proximal steps, parameter groups, schedules) need torch
alone and are imported eagerly. The heavier layers (training, tuning, reports) are
imported on first use, so ``from regdial import L1`` never pulls in Optuna or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

from regdial.applied import Applied
from regdial.augment import (
    EmbeddingNoise,
    ImageAugment,
    SignalAugment,
    TabularAugment,
    TokenAugment,
    augmentation,
)
from regdial.averaging import EMA, SWA, recompute_batchnorm
from regdial.groups import param_groups
from regdial.mixing import CutMix, Mixup, MixupOrCutMix, smooth_targets, soft_cross_entropy
from regdial.noise import (
    DropBlock1d,
    DropBlock2d,
    DropConnect,
    DropPath,
    GaussianDropout,
    GaussianNoise,
    drop_block,
    drop_path,
    drop_path_rates,
    set_drop_path,
    set_dropout,
)
from regdial.penalties import L1, L2, L2SP, ElasticNet, GroupLasso, Penalty
from regdial.proximal import MaxNorm, attach_prox, max_norm_
from regdial.schedules import Constant, Cosine, Early, Linear, Schedule, Step
from regdial.setting import Regularization
from regdial.stopping import EarlyStopping

__version__ = "0.1.0"

# Public names that live in modules with heavier imports, loaded on first access.
_LAZY: dict[str, str] = {
    "fit": "regdial.train",
    "evaluate": "regdial.train",
    "History": "regdial.history",
    "Dataset": "regdial.tasks",
    "load_data": "regdial.tasks",
    "load_task": "regdial.tasks",
    "build_model": "regdial.models",
    "Space": "regdial.space",
    "OnlineController": "regdial.online",
}

__all__ = [  # noqa: RUF022 - the building blocks, then the lazily imported layers
    "EMA",
    "L1",
    "L2",
    "L2SP",
    "SWA",
    "Applied",
    "Constant",
    "Cosine",
    "CutMix",
    "DropBlock1d",
    "DropBlock2d",
    "DropConnect",
    "DropPath",
    "Early",
    "EarlyStopping",
    "ElasticNet",
    "EmbeddingNoise",
    "GaussianDropout",
    "GaussianNoise",
    "GroupLasso",
    "ImageAugment",
    "Linear",
    "MaxNorm",
    "Mixup",
    "MixupOrCutMix",
    "Penalty",
    "Regularization",
    "Schedule",
    "SignalAugment",
    "Step",
    "TabularAugment",
    "TokenAugment",
    "__version__",
    "attach_prox",
    "augmentation",
    "drop_block",
    "drop_path",
    "drop_path_rates",
    "max_norm_",
    "param_groups",
    "recompute_batchnorm",
    "set_drop_path",
    "set_dropout",
    "smooth_targets",
    "soft_cross_entropy",
    "fit",
    "evaluate",
    "History",
    "Dataset",
    "load_data",
    "load_task",
    "build_model",
    "Space",
    "OnlineController",
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
