"""Strength schedules: a strength as a function of training progress in [0, 1].

``regdial.schedules.Linear(0, 0.1)`` is a schedule of a strength over training, not a layer,
so the schedules have a namespace of their own::

    from regdial import Regularization
    from regdial.schedules import Cosine, Linear

    setting = Regularization(weight_decay=Cosine(0.1, 0.01), l1=Linear(0.0, 1e-3))

Any strength of a setting, a penalty or an augmentation preset may be one (see
``regdial.blocks.schedules`` for the formulas).
"""

from __future__ import annotations

from regdial.blocks.schedules import Constant, Cosine, Early, Linear, Schedule, Step, schedule_from_dict

__all__ = ["Constant", "Cosine", "Early", "Linear", "Schedule", "Step", "schedule_from_dict"]
