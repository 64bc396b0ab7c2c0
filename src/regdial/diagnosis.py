"""Where a run stands on the dial: ``diagnose(history) -> Diagnosis``.

The diagnosis reads smoothed curves, never single noisy epochs. Each loss curve is
smoothed by a centred moving average over ``w = max(3, n // 8)`` epochs (n epochs; odd w,
shrinking at the ends); its noise ``sigma`` is 1.4826 times the median absolute residual
around the smooth curve. A change counts only when it beats both a relative threshold
and ``2 * sigma``. In this order:

1. **diverged**: a loss is NaN or infinite (or the run says it diverged).
2. **overfitting**: the smoothed validation loss rose above its minimum beyond its noise
   (``2 * sigma``, and at least ``RISE_FLOOR``, 1%, of that minimum), while the training
   loss kept falling: whatever the metric columns, a loss-only log included (a language
   model's train 2.48 -> 0.56 while validation rose from 2.635 to 2.767 is overfitting). Or
   validation is no better (a rise beyond ``2 * sigma`` only) for the last quarter of the
   run or more while the training loss fell by ``TRAIN_FELL`` (25%) since its best. Or
   the model has memorized its training data while validation no longer improves: for
   classification, train accuracy >= 99%, at least ``MEMORIZED_GAP`` (5 points) above
   validation, and a training loss under a tenth of the validation loss; for regression,
   train R^2 at least ``MEMORIZED_GAP`` above validation R^2 and a training loss under
   half the validation loss (a steady gap while validation still improves is not
   overfitting yet). Overfitting began at the smoothed minimum (or, for memorization,
   where the smoothed validation loss reached its final plateau).
3. **underfitting**: the final smoothed training loss is more than ``UNDERFIT`` (40%) of
   an untrained model's: ``ln C`` for C classes, or ``1 - R^2`` above 0.4 in regression.
   The model cannot fit even its training data. Above 100% (worse than untrained) the
   problem is the optimization, not the dial: the advice is a lower learning rate.
4. **still improving**: over the last quarter of the run the smoothed validation loss
   fell by more than ``IMPROVING`` (2%) of its value: train longer before judging.
5. **good fit**: none of the above.

The advice is in dial terms: which knobs to turn which way and by how much (each knob's
``step`` in ``regdial.knobs``: multiplicative for penalties and weight decay, additive
for rates), and where early stopping would have stopped. ``Diagnosis.suggest(setting)``
applies it. The setting is the run's own (``history.meta["setting"]``, which ``fit``
records; for a run a controller turned, the last setting it turned to, ``in_force``)
unless one is given.

Only ``epoch``, ``train_loss`` and ``val_loss`` are needed, so any tool's log can be read
(``History.load`` takes Lightning's ``metrics.csv``, Hugging Face's ``trainer_state.json``,
TensorBoard event files, and CSVs by epoch or by step); the memorization test needs train
and validation accuracy (or R^2), and the underfitting test the number of classes (else
the first row's training loss stands in for an untrained model's). A log counted in steps
is read and worded in steps. A log that records no setting gets advice that says so: it
cannot tell which knobs are already on.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from regdial._checks import fail
from regdial.blocks.stopping import EarlyStopping
from regdial.knobs import KNOBS, PENALTIES
from regdial.setting import Regularization
from regdial.training.history import History

logger = logging.getLogger(__name__)

__all__ = ["Diagnosis", "State", "diagnose", "in_force", "smooth"]

State = Literal["diverged", "overfitting", "underfitting", "still improving", "good fit"]

RISE = 0.05
RISE_FLOOR = 0.01
MEMORIZED_GAP = 0.05
UNDERFIT = 0.4
IMPROVING = 0.02
TRAIN_FELL = 0.25
"""Validation no better (beyond its noise) for the last quarter of the run or more while the
smoothed training loss fell by this share since validation's best is overfitting too: a
language model's validation 4.604 -> 4.632 (0.6%, under ``RISE_FLOOR``) while its training
loss halved, 2.29 -> 1.22, read as a good fit."""
PATIENCE = 5


def smooth(values: list[float]) -> tuple[list[float], float]:
    """A centred moving average and the noise around it (robust standard deviation)."""
    n = len(values)
    window = max(3, n // 8)
    window += 1 - window % 2
    half = window // 2
    smoothed = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        smoothed.append(sum(values[lo:hi]) / (hi - lo))
    residuals = [abs(v - s) for v, s in zip(values, smoothed, strict=True)]
    sigma = 1.4826 * statistics.median(residuals) if residuals else 0.0
    return smoothed, sigma


@dataclass(frozen=True)
class Diagnosis:
    """The state of a run and what to do about it."""

    state: State
    message: str
    best_epoch: int | None
    overfit_epoch: int | None = None
    gap: float = 0.0
    early_stop_epoch: int | None = None
    direction: int = 0  # +1: regularize more; -1: less; 0: leave the strengths
    moves: dict[str, Any] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)
    setting_known: bool = True

    def suggest(self, setting: Regularization) -> Regularization:
        """``setting`` with this diagnosis's moves applied."""
        return setting.replace(**self.moves) if self.moves else setting

    def __str__(self) -> str:
        return self.message


def _number(value: object) -> float | None:
    """A knob's fixed value, or None for a schedule (the diagnosis leaves schedules alone)."""
    if value is None:
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _turn(name: str, value: float, direction: int) -> float:
    """``value`` one step of knob ``name`` up (direction > 0) or down, within its limits."""
    knob = KNOBS[name]
    how, size = knob.step
    high = knob.limits[1] if knob.limits else math.inf
    if how == "times":
        moved = value * size if direction > 0 else value / size
    else:
        moved = value + size if direction > 0 else value - size
    return round(min(high, max(0.0, moved)), 12)


# The order in which a diagnosis tightens: a penalty already in use first, then the
# optimizer's decay, then dropout, then (for classifiers) label smoothing; two moves at most.
TIGHTEN = (*PENALTIES, "weight_decay", "dropout", "label_smoothing")
DEFAULT_ON = {"weight_decay": 1e-2, "dropout": 0.1, "label_smoothing": 0.1}


def _moves(
    setting: Regularization, direction: int, kind: str | None, absent: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The knobs to turn and their new values (see ``TIGHTEN``); every active knob when
    loosening. ``absent``: knobs the model has nothing for (``dropout`` without dropout
    layers, ``meta["no_dropout"]``), never advised up."""
    moves: dict[str, Any] = {}
    if direction > 0:
        for name in TIGHTEN:
            value = _number(getattr(setting, name))
            if value is None or name in absent or (name == "label_smoothing" and kind != "classification"):
                continue
            if value > 0:
                moves[name] = _turn(name, value, +1)
            elif name in DEFAULT_ON and not (name == "label_smoothing" and len(moves) >= 2):
                moves[name] = DEFAULT_ON[name]
        return dict(list(moves.items())[:2])
    if direction < 0:
        for name, knob in KNOBS.items():
            if knob.off is None or knob.applies in ("stopping", "averaging", "constraint"):
                continue
            value = _number(getattr(setting, name))
            if value:
                moves[name] = _turn(name, value, -1)
    return moves


def _describe(moves: dict[str, Any], setting: Regularization, known: bool = True) -> str:
    """The moves in words. A rate left unset is the model's own (GPT-2's and BERT's 0.1, a
    plain MLP's none), unknown here: the advice is to go above it. A log that records no
    setting leaves what ran unknown: a knob is raised to its first strength if it was off,
    by its step if it was on."""
    parts = []
    for name, new in moves.items():
        old = _number(getattr(setting, name)) or 0.0
        how, size = KNOBS[name].step
        if not known and old == 0 and new > 0:
            step = f"x{size:g}" if how == "times" else f"+{size:g}"
            parts.append(f"raise {name} ({new:g} if it was off, {step} what ran if not)")
        elif getattr(setting, name) is None:
            parts.append(
                f"raise {name} above the model's own rates (unset here: {new:g} where they are lower)"
            )
        elif how == "times" and old > 0:
            factor = new / old
            parts.append(f"{'raise' if factor > 1 else 'lower'} {name} (x{factor:.3g}: {old:g} -> {new:g})")
        elif new > old:
            parts.append(f"raise {name} ({old:g} -> {new:g})")
        else:
            parts.append(f"lower {name} ({old:g} -> {new:g})")
    return " or ".join(parts)


def _within(moves: dict[str, Any], setting: Regularization, space: object) -> tuple[dict[str, Any], str]:
    """The moves kept inside the ranges an online run's strengths were held to (``meta["space"]``,
    ``Space.to_dict()``), and what says a knob already at its range's edge: advice past the
    range is a run the controller could not make, so the range is what to widen."""
    if not isinstance(space, dict):
        return moves, ""
    kept, edges = {}, []
    for name, new in moves.items():
        bounds = space.get(name)
        old = _number(getattr(setting, name))
        if not isinstance(bounds, dict) or old is None:
            kept[name] = new
            continue
        low = 0.0 if bounds.get("optional") else float(bounds.get("low", 0.0))
        high = float(bounds.get("high", math.inf))
        held = min(high, max(low, new))
        if held != old:
            kept[name] = held
        else:
            side, edge = ("floor", low) if new < old else ("ceiling", high)
            edges.append(f"{name} is at its range's {side} ({edge:g}): widen the Space to go "
                         + ("lower" if new < old else "higher"))  # fmt: skip
    return kept, " or ".join(edges)


def in_force(history: History, setting: Regularization | None) -> Regularization | None:
    """The setting in force at the end of ``history``'s run: the last one a controller
    turned to (``meta["retunes"]``, which ``fit`` records for an online run; a trainer
    callback's ``online=`` run records its last values in ``meta["online"]["values"]``),
    else ``setting``. An online run starts at the recipe and ends elsewhere; advice from its
    start (weight decay 0.05 where the run ended at 0.0001) would be a different run's."""
    retunes = history.meta.get("retunes")
    if isinstance(retunes, list) and retunes and isinstance(retunes[-1], dict):
        last = retunes[-1].get("setting")
        if isinstance(last, dict):
            return Regularization.from_dict(last)
    online = history.meta.get("online")
    if isinstance(online, dict) and isinstance(online.get("values"), dict):
        return Regularization.from_dict(online["values"])
    return setting


def diagnose(
    history: History | str | os.PathLike[str],
    setting: Regularization | None = None,
    *,
    num_classes: int | None = None,
) -> Diagnosis:
    """Read ``history``'s curves; the run's setting (given, or from its metadata) makes the
    advice concrete. ``history`` may be a path, read as ``regdial diagnose`` reads it
    (``regdial.training.reading.read_run``: a run or a search's directory, another loop's log)."""
    if isinstance(history, (str, os.PathLike)):
        from regdial.training.reading import read_run

        history, recorded = read_run(Path(history), logger.info)
        setting = setting if setting is not None else in_force(history, recorded)
    if not isinstance(history, History):
        fail("history", "a regdial History, or the path of a run, a search or a log (as regdial diagnose takes)",
             history)  # fmt: skip
    known = setting is not None
    if setting is None:
        summary = history.meta.get("summary")
        recorded = history.meta.get("setting") or (
            summary.get("setting") if isinstance(summary, dict) else None
        )
        known = isinstance(recorded, dict)
        setting = Regularization.from_dict(recorded) if isinstance(recorded, dict) else Regularization()
        setting = in_force(history, setting) or setting
    unit = str(history.meta.get("epoch_unit") or "epoch")
    n = len(history)
    if n == 0:
        fail("history", "at least one epoch", 0)
    epochs = [int(e) for e in history.column("epoch")]
    train, val = history.column("train_loss"), history.column("val_loss")
    best = history.best_epoch("val_loss")
    diverged = _divergence(history, epochs, train, val, unit)
    if diverged is not None:
        return Diagnosis("diverged", diverged, best, setting_known=known)
    smooth_train, _ = smooth(train)
    smooth_val, sigma = smooth(val)
    gaps, _ = smooth([v - t for v, t in zip(val, train, strict=True)])
    gap = gaps[-1]
    low = min(range(n), key=lambda i: (smooth_val[i], i))
    stopper = EarlyStopping(patience=setting.early_stopping or PATIENCE, restore_best=False)
    early = next((e for e, v in zip(epochs, val, strict=True) if stopper.step(v)), None)
    details = {"sigma": sigma, "smoothed_val_min": smooth_val[low], "smoothed_val_end": smooth_val[-1]}

    def make(state: State, message: str, direction: int, overfit_epoch: int | None = None) -> Diagnosis:
        absent = frozenset({"dropout"} if history.meta.get("no_dropout") else ())
        moves, held = _within(
            _moves(setting, direction, history.kind, absent), setting, history.meta.get("space")
        )
        advice = " or ".join(filter(None, [_describe(moves, setting, known), held]))
        text = message + (f": {advice}" if advice else "")
        if advice and not known:
            text += " (the log records no setting)"
        if direction > 0 and early is not None:
            at = f"{'' if unit == 'epoch' else unit + ' '}{early}"
            stopped = setting.early_stopping > 0 and early == epochs[-1]  # it did: the run ends there
            text += f"; early stopping (patience {stopper.patience}) {'stopped it' if stopped else 'would have stopped'} at {at}"
        if (
            history.meta.get("source") == "lightning"
            and unit == "epoch"
            and history.meta.get("epochs_from_zero", True)
        ):
            text += " (epochs counted from 1: the log's epoch 0 is epoch 1 here)"
        return Diagnosis(state, text, best, overfit_epoch, gap, early, direction, moves, details, known)

    if n < 3:
        return make("still improving", f"only {n} {unit}{'s' * (n > 1)}: too few to judge; train longer", 0)

    rise = smooth_val[-1] - smooth_val[low]
    train_fell = (
        smooth_train[-1] < smooth_train[low] - 2 * sigma or smooth_train[-1] < smooth_train[low] * 0.95
    )
    if low < n - 1 and rise > max(RISE_FLOOR * smooth_val[low], 2 * sigma) and train_fell:
        details["rise"] = rise
        return make("overfitting", f"overfitting since {unit} {epochs[low]}, gap {gap:.3g}", +1, epochs[low])
    quarter = max(1, n // 4)
    if (
        low <= n - 1 - quarter
        and rise > 2 * sigma
        and smooth_train[-1] < (1 - TRAIN_FELL) * smooth_train[low]
        and gaps[-1] > gaps[low]
    ):  # flat since its best while the training loss kept falling: the gap is all the rest bought
        details["rise"] = rise
        dropped = 1 - smooth_train[-1] / smooth_train[low]
        return make("overfitting", f"overfitting since {unit} {epochs[low]}: validation no better for "
                    f"{epochs[-1] - epochs[low]} {unit}s while the training loss fell {dropped:.0%}, gap {gap:.3g}",
                    +1, epochs[low])  # fmt: skip
    fall = smooth_val[-1 - quarter] - smooth_val[-1]
    improving = fall > max(IMPROVING * smooth_val[-1], 2 * sigma)
    memorized = _memorized(history, train, val, smooth_train, smooth_val, sigma, improving, unit, gap)
    if memorized is not None:
        message, since, fit_gap = memorized
        details["fit_gap"] = fit_gap
        return make("overfitting", message, +1, since)

    underfit = _underfit(history, smooth_train, smooth_val, train, num_classes, details, known, setting)
    if underfit is not None:
        return make("underfitting", *underfit)

    if improving:
        details["recent_fall"] = fall
        return make(
            "still improving",
            f"still improving at {unit} {epochs[-1]} (validation loss fell {fall:.3g} over the last {quarter} "
            f"{unit}s): "
            "train longer before turning the dial",
            0,
        )
    return make(
        "good fit",
        f"good fit: best {unit} {best}, gap {gap:.3g}"
        + (
            "; the strengths are close to right"
            if known
            else "; whatever the log's setting was, it is close to right"
        ),
        0,
    )


ROSE = 10.0
"""A training loss this many times its lowest, at the end of a run, has diverged."""


def _divergence(
    history: History, epochs: list[int], train: list[float], val: list[float], unit: str
) -> str | None:
    """The message of a run whose loss became non-finite, or rose to ``ROSE`` times its
    lowest, or None (a finite blow-up to 3.5e4 times the first loss read as underfitting)."""
    if history.meta.get("status") != "diverged" and all(math.isfinite(v) for v in train + val):
        lowest = min(range(len(train)), key=train.__getitem__)
        if (
            len(train) >= 3
            and train[lowest] > 0
            and train[-1] > ROSE * train[lowest]
            and lowest < len(train) - 1
        ):
            return (f"diverged: the training loss rose to {train[-1] / train[lowest]:.3g} times its lowest "
                    f"({train[lowest]:.3g} at {unit} {epochs[lowest]}, {train[-1]:.3g} at {unit} {epochs[-1]}); "
                    "lower the learning rate, then look again")  # fmt: skip
        return None
    bad = next(
        (
            e
            for e, t, v in zip(epochs, train, val, strict=True)
            if not (math.isfinite(t) and math.isfinite(v))
        ),
        None,
    )
    where = f"at {unit} {bad}" if bad is not None else f"after {unit} {epochs[-1]}"
    return f"diverged {where}: the loss became non-finite; lower the learning rate, then look again"


def _memorized(
    history: History, train: list[float], val: list[float], smooth_train: list[float], smooth_val: list[float],
    sigma: float, improving: bool, unit: str, gap: float,
) -> tuple[str, int, float] | None:  # fmt: skip
    """(message, since when, the train/validation fit gap) when the training data is
    memorized and validation no longer improves; None otherwise."""
    columns = history.columns
    epochs = [int(e) for e in history.column("epoch")]
    n = len(epochs)
    if {"train_accuracy", "val_accuracy"} <= set(columns):
        train_fit, val_fit = history.column("train_accuracy")[-1], history.column("val_accuracy")[-1]
        memorized = train_fit >= 0.99 and train_fit - val_fit >= MEMORIZED_GAP and train[-1] < 0.1 * val[-1]
        measure = "accuracy"
    elif {"train_r2", "val_r2"} <= set(columns):
        train_fit, val_fit = history.column("train_r2")[-1], history.column("val_r2")[-1]
        memorized = train_fit - val_fit >= MEMORIZED_GAP and smooth_train[-1] < 0.5 * smooth_val[-1]
        measure = "R^2"
    else:
        return None
    if not memorized or improving:
        return None
    # Since validation stopped improving: before that the gap was the price of learning.
    plateau = smooth_val[-1] + max(IMPROVING * smooth_val[-1], 2 * sigma)
    since = next((epochs[i] for i in range(n) if smooth_val[i] <= plateau), epochs[-1])
    style = ".1%" if measure == "accuracy" else ".3f"
    message = (
        f"overfitting since {unit} {since}: the training data is memorized "
        f"(train {measure} {train_fit:{style}}, validation {val_fit:{style}}), gap {gap:.3g}"
    )
    return message, since, train_fit - val_fit


def _smoothing_floor(history: History, setting: Regularization, classes: int | None) -> float:
    """The least training loss label smoothing ``e`` allows over ``K`` classes, where the
    history's training loss is the training batches' (a trainer's, smoothed): the entropy of
    the smoothed target, ``-(1-e+e/K) ln(1-e+e/K) - (K-1)(e/K) ln(e/K)``; an untrained model's
    is ``ln K`` with or without it. 0 otherwise (``fit``'s training loss is measured unsmoothed)."""
    e = _number(setting.label_smoothing) or 0.0
    if (
        not classes
        or classes < 2
        or not 0 < e < 1
        or "batches" not in str(history.meta.get("train_loss_source"))
    ):
        return 0.0
    top, rest = 1 - e + e / classes, e / classes
    return -top * math.log(top) - (classes - 1) * rest * math.log(rest)


def _underfit(
    history: History, smooth_train: list[float], smooth_val: list[float], train: list[float],
    num_classes: int | None, details: dict[str, float], known: bool, setting: Regularization,
) -> tuple[str, int] | None:  # fmt: skip
    """(message, direction) when the training loss is still a large share of an untrained
    model's (or worse than one: an optimization problem, direction 0); None otherwise."""
    classes = num_classes or history.meta.get("num_classes")
    untrained = "an untrained model's"
    if "train_r2" in history.columns and math.isfinite(history.column("train_r2")[-1]):
        untrained_share = 1.0 - history.column("train_r2")[-1]
    else:
        if not classes:  # a loss-only log (a language model's): its first row stands in
            untrained = f"its first {'epoch' if history.meta.get('epoch_unit', 'epoch') == 'epoch' else 'evaluation'}'s"
        reference = math.log(classes) if classes else train[0]
        floor = _smoothing_floor(history, setting, classes)
        untrained_share = (smooth_train[-1] - floor) / (reference - floor) if reference > floor else 0.0
    details["untrained_share"] = untrained_share
    falling = smooth_train[-1] < smooth_train[0] and smooth_train[-1] <= 1.01 * min(smooth_train)
    if 1.0 < untrained_share <= 100.0 and falling:  # worse than no training yet, and still coming down
        return (
            f"underfitting: the training loss is {untrained_share:.3g} times {untrained} and still falling "
            f"(train {smooth_train[-1]:.3g}, validation {smooth_val[-1]:.3g}): train longer or raise the "
            "learning rate" + (" (a regression target far from 0: standardize it)" if history.kind == "regression"
                               else "") + " before turning the dial",
            0,
        )  # fmt: skip
    if untrained_share > 1.0:  # worse than not training at all, and not coming down: an optimization problem
        return (
            f"underfitting: the training loss is {untrained_share:.3g} times {untrained} "
            f"(train {smooth_train[-1]:.3g}, validation {smooth_val[-1]:.3g}): training is unstable; "
            "lower the learning rate before turning the dial",
            0,
        )
    if untrained_share > UNDERFIT:
        message = (
            f"underfitting: the training loss is still {untrained_share:.0%} of {untrained} "
            f"(train {smooth_train[-1]:.3g}, validation {smooth_val[-1]:.3g})"
        )
        moves = _moves(setting, -1, history.kind)
        if not known:
            message += (
                "; the log records no setting, so which regularization is on is unknown: loosen any that is, "
                "else use a bigger model, a higher learning rate or more epochs"
            )
        elif not moves:
            message += (
                "; regularization is already off: use a bigger model, a higher learning rate or more epochs"
            )
        return message, -1
    return None
