"""The dial in one run inside a trainer: what both callbacks' ``online=`` share.

``online=Space(...)`` (or a ``HypergradientController`` built on one) makes a trainer's
single run turn its own knobs: after each optimizer step the controller may take a
hypergradient step (``regdial.dial.hypergradient``) on the batch just trained on and a
held-out batch, and after each evaluation the curve controller may turn the knobs that
do not enter training differentiably. A new setting is applied from the next step on
(``Applied.retune``). The held-out batches are the trainer's evaluation data unless
``online_data=`` gives others; the run's start says which, in one line.

At the end the moves are in the history's ``meta["online"]`` (``{step, epoch, knob,
value}`` rows) with the hypergradient steps' share of the training time, logged in one
line. A move's ``epoch`` counts evaluations, as the history's rows do (a trainer that
evaluates every 10 steps has a row, an "epoch", every 10 steps; the trainer's own epoch is
the rows' ``epoch_fraction``): the first row whose evaluation ran with the move in force.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from regdial._checks import Described, fail
from regdial.dial.hypergradient import HypergradientController, recipe_start
from regdial.dial.implicit import Training
from regdial.dial.space import Space
from regdial.setting import Regularization
from regdial.training.batches import check_reiterable

__all__ = ["Online", "smoothed"]

logger = logging.getLogger("regdial.integrations")


def smoothed(loss: Tensor, logits: Tensor, labels: Tensor, smoothing: Tensor | None, shift: bool) -> Tensor:
    """``(1 - ε)·loss + ε·CE_uniform``: the label-smoothed form of a model's own
    cross-entropy ``loss``, with the uniform term over the labels that are not -100
    (shifted by one for a causal language model), as transformers' ``LabelSmoother``."""
    if smoothing is None:
        return loss
    logits = logits.float()
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    keep = labels != -100
    uniform = -logits.log_softmax(-1)[keep].mean(-1).mean()
    return (1 - smoothing) * loss + smoothing * uniform


class Online:
    """One trainer run's controller, its held-out data and its clock."""

    def __init__(self, online: Space | HypergradientController, data: Iterable[Any] | None) -> None:
        if isinstance(online, Space):
            # A step every STEP_COST / SHARE optimizer steps (15; 24 with noise), a third more
            # compute, as the online strategy takes them.
            online = HypergradientController(online, every=None, start=recipe_start(online))
        if not isinstance(online, HypergradientController):
            fail("online", "a regdial.Space or a HypergradientController", online)
        self.controller = online
        # Where the knobs start (a resumed run's controller is made afresh: the same start).
        self.initial = {name: float(getattr(online.start(), name) or 0.0) for name in online.space.knobs}
        self.data = None if data is None else check_reiterable("online_data", data)
        self.started = time.perf_counter()
        self.said = False

    @classmethod
    def of(
        cls, setting: Regularization | None, trial: Any, online: Space | HypergradientController | None,
        data: Iterable[Any] | None,
    ) -> tuple[Online | None, Regularization]:  # fmt: skip
        """A callback's arguments checked: its ``Online`` (None without ``online=``) and the
        setting to start from (the controller's, with ``online=``)."""
        made = None
        if online is not None:
            if setting is not None:
                fail("setting", "None when online= is given (the space's base holds the fixed knobs: "
                     "Space({...}, base=Regularization(...)))", setting)  # fmt: skip
            if trial is not None:
                fail("online", "None inside a search trial (a trial's knobs are the search's)", online)
            made = cls(online, data)
            setting = made.controller.start()
        elif data is not None:
            fail("online_data", "None without online= (it is the hypergradient's held-out data)", data)
        if not isinstance(setting, Regularization):
            fail("setting", "a regdial.Regularization (or None with online=Space(...))", setting)
        return made, setting

    def start(self) -> Regularization:
        self.started = time.perf_counter()
        return self.controller.start()

    def check_evaluates(self, evaluates: bool, where: str) -> None:
        """Refuse a run that never evaluates where a knob needs it: the hypergradient needs
        held-out batches (``online_data=`` serves), the curves' knobs (dropout, mixing,
        augmentation) read the evaluations themselves, which ``online_data`` does not give."""
        if evaluates:
            return
        if self.data is None:
            no_held_out(where)
        curves = [k for k in self.controller.space.knobs if k not in self.controller.ranges]
        if curves:
            fail(f"online.{curves[0]}", f"a knob of {where}: the curves turn it at each "
                 "evaluation, and online_data serves only the hypergradient's knobs "
                 f"({', '.join(self.controller.ranges)})", Described(f"{curves[0]} in the Space"))  # fmt: skip

    def say_data(self, trainer_data: str) -> None:
        """The one line that says where the held-out batches come from."""
        if self.said:
            return
        self.said = True
        where = "online_data" if self.data is not None else trainer_data
        logger.warning("regdial: online: turning %s by their hypergradient on held-out batches from %s",
                       ", ".join(self.controller.ranges), where)  # fmt: skip

    def step(self, training: Training, inputs: Any, targets: Tensor) -> Regularization | None:
        turned = self.controller.step(training, inputs, targets)
        return turned if turned is not None and turned != training.applied.setting else None

    def finish(self, meta: dict[str, Any]) -> None:
        """The moves and the cost into ``meta`` (the history's), and one line."""
        c = self.controller
        total = time.perf_counter() - self.started - c.seconds
        share = c.seconds / total if total > 0 else math.nan
        meta["online"] = {"moves": [dict(m) for m in c.moves], "turns": c.turns, "hypergradient_steps": c.updates,
                          "cost": share if math.isfinite(share) else None,
                          "values": c.start().to_dict(), "start": dict(self.initial),
                          "last_step": c.last_step}  # fmt: skip
        meta["space"] = c.space.to_dict()  # the ranges the strengths stayed in, which the advice keeps
        if c.updates == 0:
            logger.warning("regdial: online: no hypergradient step was taken (the run ended within the warm-up, a "
                           "quarter of it by default, or had no held-out batches)")  # fmt: skip
            return
        logger.warning("regdial: online: %d hypergradient steps, %d moves; they took %.0f%% of the rest of "
                       "training's time; last strengths %s", c.updates, len(c.moves), 100 * share,
                       ", ".join(f"{k}={v:.3g}" for k, v in c.values.items()))  # fmt: skip


def no_held_out(where: str) -> None:
    fail(
        "online_data", f"held-out batches for the hypergradient: {where}, or online_data=", Described("none")
    )
