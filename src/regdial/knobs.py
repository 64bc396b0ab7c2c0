"""The one registry of knobs: what each strength of the dial is, and who turns it.

Every other module asks this table instead of keeping its own list: ``Regularization``
validates its fields with ``Knob.check``; ``Applied`` wires each knob by ``applies``; a
search takes its default range (``search``) and the hard limits a range may be extended
to (``limits``) from here; the diagnosis turns a knob by its ``step``; reports read
``scale`` to draw a knob's axis.

``applies`` says which part of training a knob acts on:

==============  ==========================================================================
``optimizer``   the optimizer's own decoupled weight decay, on ``param_groups``' weights
``penalty``     a penalty: a proximal step after ``optimizer.step()``, or a loss term
``constraint``  a projection after ``optimizer.step()`` (max-norm)
``model``       the model's own layers (dropout and drop-path rates)
``batch``       the training batch (input noise, augmentation, Mixup/CutMix)
``embedding``   the output of the model's input embedding (NEFTune-style noise)
``loss``        the loss (label smoothing)
``averaging``   a weight average used for evaluation (EMA)
``stopping``    early stopping
==============  ==========================================================================

Only plain Python here: the building blocks and the upper layers import it alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from regdial._checks import check_int, check_range

__all__ = [
    "GROUP_LAYOUTS",
    "KNOBS",
    "PENALTIES",
    "PENALTIES_IN",
    "Applies",
    "Knob",
    "Scale",
    "retunable",
]

Scale = Literal["log", "linear", "int"]
Applies = Literal[
    "optimizer", "penalty", "constraint", "model", "batch", "embedding", "loss", "averaging", "stopping"
]

GROUP_LAYOUTS = ("rows", "columns", "tensor")
"""How ``GroupLasso`` groups a tensor: per output unit, per input feature, or whole."""

PENALTIES_IN = ("prox", "loss")
"""Where a setting's penalties act: a proximal step after each update, or the loss."""


@dataclass(frozen=True)
class Knob:
    """One numeric knob of a setting.

    Args:
        name: the ``Regularization`` field.
        doc: one line, in the user's words.
        high, high_open: the upper end of the legal range (the lower is always 0).
        scale: how a search explores it: ``log`` (strengths that span decades),
            ``linear`` (rates) or ``int`` (counts).
        schedulable: whether it accepts a ``Schedule`` over training.
        off: the value that turns the technique off (``None``: no such value).
        applies: which part of training it acts on (see the module docstring).
        retunable: whether ``Applied.retune`` may change it during training (what was
            built once at ``apply``, such as L2-SP's anchor or the EMA, may not).
        search: the default range of a search, ``(low, high)``.
        limits: how far a search may extend that range when its best value sits at an
            end, ``(low, high)``.
        step: the diagnosis's move: ``("times", f)`` multiplies (or divides) by ``f``,
            ``("plus", d)`` adds (or subtracts) ``d``.
    """

    name: str
    doc: str
    applies: Applies
    high: float | None = None
    high_open: bool = False
    scale: Scale = "log"
    schedulable: bool = False
    off: float | None = 0.0
    retunable: bool = True
    search: tuple[float, float] | None = None
    limits: tuple[float, float] | None = None
    step: tuple[Literal["times", "plus"], float] = ("times", 3.0)

    def check(self, field_name: str, value: object) -> float:
        """``value`` as a number if it is legal for this knob, else the one-line ValueError."""
        if self.scale == "int":
            return float(
                check_int(field_name, value, low=0, high=None if self.high is None else int(self.high))
            )
        high = MAX_STRENGTH if self.high is None else self.high
        return check_range(field_name, value, low=0.0, high=high, high_open=self.high_open)


MAX_STRENGTH = 1e6
"""The largest value of a knob with no upper end of its own (a strength, a norm, an alpha):
far past any that regularizes (every search limit is at most 1000), and small enough that
a strength times a learning rate stays a float32 number torch's kernels accept (L1 at
1e300 was accepted, then failed inside torch's soft-threshold)."""


KNOBS: dict[str, Knob] = {
    knob.name: knob
    for knob in (
        Knob("weight_decay", "decoupled weight decay on the weights (the optimizer's own)", "optimizer",
             schedulable=True, search=(1e-4, 1.0), limits=(1e-7, 10.0)),
        Knob("l1", "L1 (lasso) strength: exact zeros with the proximal step", "penalty", schedulable=True,
             search=(1e-5, 1e-2), limits=(1e-9, 10.0)),
        Knob("l2", "L2 (ridge) strength as a penalty, in the optimizer's metric", "penalty", schedulable=True,
             search=(1e-4, 1.0), limits=(1e-8, 100.0)),
        Knob("elastic_net", "elastic-net strength, mixing L1 and L2 by l1_ratio", "penalty", schedulable=True,
             search=(1e-5, 1e-2), limits=(1e-9, 10.0)),
        Knob("l1_ratio", "the elastic net's share of L1", "penalty", high=1.0, scale="linear", off=None,
             retunable=False, search=(0.1, 0.9), limits=(0.0, 1.0), step=("plus", 0.1)),
        Knob("group_lasso", "group-lasso strength: whole units (rows) go to zero", "penalty", schedulable=True,
             search=(1e-5, 1e-2), limits=(1e-9, 10.0)),
        Knob("l2sp", "L2-SP strength: pull toward the weights at apply time", "penalty", schedulable=True,
             search=(1e-4, 1.0), limits=(1e-7, 100.0)),  # retunable while on: the anchor stays (Applied.retune)
        Knob("max_norm", "cap on each unit's incoming weight norm (0: off)", "constraint", retunable=False,
             search=(0.5, 10.0), limits=(0.05, 100.0), step=("times", 0.5)),
        Knob("dropout", "rate of the model's dropout layers", "model", high=1.0, high_open=True,
             scale="linear", schedulable=True, search=(0.0, 0.5), limits=(0.0, 0.9), step=("plus", 0.1)),
        Knob("drop_path", "maximum stochastic-depth rate", "model", high=1.0, high_open=True, scale="linear",
             schedulable=True, search=(0.0, 0.3), limits=(0.0, 0.8), step=("plus", 0.1)),
        Knob("noise", "std of Gaussian noise added to the inputs", "batch", scale="linear",
             search=(0.0, 0.5), limits=(0.0, 3.0), step=("times", 2.0)),
        Knob("embedding_noise", "NEFTune alpha: uniform noise on the input embeddings, scaled by "
             "alpha/sqrt(length*dim)", "embedding", scale="linear", search=(0.0, 10.0), limits=(0.0, 30.0),
             step=("times", 2.0)),
        Knob("label_smoothing", "label smoothing epsilon", "loss", high=1.0, high_open=True, scale="linear",
             search=(0.0, 0.2), limits=(0.0, 0.5), step=("plus", 0.05)),
        Knob("mixup", "Mixup alpha", "batch", scale="linear", search=(0.0, 0.4), limits=(0.0, 2.0),
             step=("times", 2.0)),
        Knob("cutmix", "CutMix alpha", "batch", scale="linear", search=(0.0, 1.0), limits=(0.0, 2.0),
             step=("times", 2.0)),
        Knob("augment", "data-augmentation strength", "batch", high=1.0, scale="linear", schedulable=True,
             search=(0.0, 1.0), limits=(0.0, 1.0), step=("plus", 0.25)),
        Knob("early_stopping", "early-stopping patience in epochs (0: off)", "stopping", high=1e6,
             scale="int", retunable=False, search=(3.0, 30.0), limits=(1.0, 1000.0), step=("plus", 5.0)),
        Knob("ema", "decay of an exponential moving average of the weights (0: off)", "averaging", high=1.0,
             high_open=True, scale="linear", retunable=False, search=(0.9, 0.999), limits=(0.0, 0.9999),
             step=("plus", 0.01)),
    )
}  # fmt: skip

PENALTIES = tuple(name for name, knob in KNOBS.items() if knob.applies == "penalty" and knob.off is not None)
"""The penalty knobs, in the order ``Applied`` attaches them: l1, l2, elastic_net, group_lasso, l2sp."""


def retunable(name: str) -> bool:
    """Whether ``Applied.retune`` may change setting field ``name`` during training.

    Knobs say so themselves; the setting's other fields (``groups``, ``penalties_in``,
    ``exclude``, ``include``, ``min_delta``) shape what ``apply`` built and never change.
    """
    knob = KNOBS.get(name)
    return knob is not None and knob.retunable
