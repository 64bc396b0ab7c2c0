"""What ``attach_prox`` and an ``EMA`` hand a ``FusedAdamW``, so that its fused loop runs
their work in its own pass (``regdial.blocks.fused_adamw``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["NO_PROX", "AveragePlan", "GroupProx", "ProxPlan"]

ProxPlan = Callable[[dict[str, Any]], "GroupProx | None"]
"""What ``attach_prox`` gives a ``FusedAdamW`` for one param group, after the step count's
increment: the group's prox as a ``GroupProx`` (``NO_PROX`` where the hook has nothing to
do for it), or None to leave it to its step hook."""


class GroupProx(NamedTuple):
    """One param group's prox in Adam's metric, for the fused loop: on the tensors with a
    gradient that ``selected`` holds (by id; None: all of the group's), with ``τ = strength
    lr sqrt(c2) f_t`` (``f_t = min(1, t / horizon)``; 1 with ``horizon`` 0) the threshold
    ``ratio τ`` and the addition ``addition τ`` (``Penalty.quotient_coefficients``)."""

    selected: frozenset[int] | set[int] | None
    strength: float
    ratio: float
    addition: float
    horizon: int


NO_PROX = GroupProx(frozenset(), 0.0, 0.0, 0.0, 0)
"""A group the prox does not act on (``lr == 0``, marked not to regularize, strength 0): no tensor of
it is under the loop's prox, and its hook has nothing left to do."""


AveragePlan = Callable[[], "tuple[dict[int, Tensor], float] | None"]
"""What an ``EMA`` attached to a ``FusedAdamW`` gives it each step: its average of each
model tensor (by the tensor's id) and this update's weight ``a`` (1 for the first, a
copy), or None to leave the update to its step hook."""
