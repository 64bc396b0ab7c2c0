"""regdial: regularization of neural networks as a dial, not a guess.

The building blocks (penalties, proximal steps, parameter groups, noise layers, mixing,
augmentation, early stopping, weight averaging) and the setting (``Regularization``,
``Applied``) need torch alone and are imported eagerly. The heavier layers (training, the
dial, diagnosis, reports) are imported on first use, so ``from regdial import L1`` never
pulls in Optuna or matplotlib.

Strength schedules live in ``regdial.schedules`` (``regdial.schedules.Linear`` is a
schedule of a strength over training, not a layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from regdial import schedules
from regdial._checks import InputError
from regdial._lazy import lazy
from regdial.applied import Applied
from regdial.blocks.augment import (
    EmbeddingNoise,
    ImageAugment,
    SignalAugment,
    TabularAugment,
    TokenAugment,
    augmentation,
)
from regdial.blocks.averaging import EMA, SWA, recompute_batchnorm
from regdial.blocks.fused_adamw import FusedAdamW
from regdial.blocks.group_lasso import GroupLasso
from regdial.blocks.groups import param_groups
from regdial.blocks.l2sp import L2SP
from regdial.blocks.mixing import CutMix, Mixup, MixupOrCutMix, smooth_targets, soft_cross_entropy
from regdial.blocks.noise import (
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
from regdial.blocks.penalties import L1, L2, ElasticNet, Penalty
from regdial.blocks.proximal import MaxNorm, attach_prox, max_norm_
from regdial.blocks.stopping import EarlyStopping
from regdial.setting import Regularization

if TYPE_CHECKING:
    from regdial.api import tune as tune
    from regdial.diagnosis import Diagnosis as Diagnosis
    from regdial.diagnosis import diagnose as diagnose
    from regdial.dial.budget import Budget as Budget
    from regdial.dial.hypergradient import HypergradientController as HypergradientController
    from regdial.dial.online import OnlineController as OnlineController
    from regdial.dial.result import TuneResult as TuneResult
    from regdial.dial.space import Space as Space
    from regdial.dial.trial import Trial as Trial
    from regdial.reports import report as report
    from regdial.training.data import load_data as load_data
    from regdial.training.fit import fit as fit
    from regdial.training.history import History as History
    from regdial.training.metrics import evaluate as evaluate
    from regdial.training.models import build_model as build_model
    from regdial.training.options import RunOptions as RunOptions
    from regdial.training.tasks import Dataset as Dataset
    from regdial.training.tasks import load_task as load_task

__version__ = "0.2.0"  # the one place: pyproject.toml reads it (hatch's dynamic version)

__getattr__, __dir__, LAZY = lazy(globals())
__all__ = [
    "EMA", "L1", "L2", "L2SP", "SWA", "Applied", "CutMix", "DropBlock1d", "DropBlock2d", "DropConnect",
    "DropPath", "EarlyStopping", "ElasticNet", "EmbeddingNoise", "FusedAdamW", "GaussianDropout", "GaussianNoise",
    "GroupLasso", "ImageAugment", "InputError", "MaxNorm", "Mixup", "MixupOrCutMix", "Penalty", "Regularization",
    "SignalAugment", "TabularAugment", "TokenAugment", "__version__", "attach_prox", "augmentation",
    "drop_block", "drop_path", "drop_path_rates", "max_norm_", "param_groups", "recompute_batchnorm",
    "schedules", "set_drop_path", "set_dropout", "smooth_targets", "soft_cross_entropy",
    *LAZY,
]  # fmt: skip
