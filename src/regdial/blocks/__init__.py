"""The building blocks: every technique as a small piece of plain PyTorch.

Each module here imports torch (and, for image augmentation, Kornia when a preset runs)
and nothing else of regdial's upper layers, so each drops into any training loop, with
any optimizer:

============  ==============================================================================
module        what it holds
============  ==============================================================================
schedules     ``Schedule``: a strength as a function of training progress in [0, 1]
penalties     ``L1``, ``L2``, ``ElasticNet``, ``GroupLasso``, ``L2SP``: ``value`` and ``prox_``
proximal      ``attach_prox`` (the prox after every ``optimizer.step()``)
max_norm      ``MaxNorm``, ``max_norm_``: the cap on each unit's incoming weights
fused         compiled kernels for the per-step work (``fused=``)
fused_adamw   ``FusedAdamW``: AdamW with an attached prox and EMA in its own pass
groups        ``param_groups``: which parameters get weight decay
noise         ``DropPath``, ``DropBlock1d/2d``, ``DropConnect``, Gaussian noise and dropout
mixing        ``Mixup``, ``CutMix``, soft targets and label smoothing
augment       augmentation presets per kind of data, NEFTune embedding noise
stopping      ``EarlyStopping``
averaging     ``EMA``, ``SWA``
============  ==============================================================================
"""

from __future__ import annotations

from regdial.blocks import schedules
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
from regdial.blocks.schedules import Constant, Cosine, Early, Linear, Schedule, Step
from regdial.blocks.stopping import EarlyStopping

__all__ = [
    "EMA",
    "L1",
    "L2",
    "L2SP",
    "SWA",
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
    "FusedAdamW",
    "GaussianDropout",
    "GaussianNoise",
    "GroupLasso",
    "ImageAugment",
    "Linear",
    "MaxNorm",
    "Mixup",
    "MixupOrCutMix",
    "Penalty",
    "Schedule",
    "SignalAugment",
    "Step",
    "TabularAugment",
    "TokenAugment",
    "attach_prox",
    "augmentation",
    "drop_block",
    "drop_path",
    "drop_path_rates",
    "max_norm_",
    "param_groups",
    "recompute_batchnorm",
    "schedules",
    "set_drop_path",
    "set_dropout",
    "smooth_targets",
    "soft_cross_entropy",
]
