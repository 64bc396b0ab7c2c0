"""The choice: pure functions of a study's finished trials, testable without training.

- ``choose``: the one-standard-error rule of glmnet and CART. Among the finished trials
  whose score is within one standard error of the best, the most regularized (the largest
  ``Space.strength``); the best trial when its score has no standard error.
- ``extend_ranges``/``extended_space``: a range whose end binds is extended.
- ``edge_notes``, ``notes``: what the numbers can and cannot say.
- ``seeds``: the first trials after the warm-started path; ``trial_row``, ``importances``:
  the result's table and the knobs' importances.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any, Literal

from regdial.dial.result import TuneResult
from regdial.dial.space import Space
from regdial.dial.study import search_trials
from regdial.setting import Regularization
from regdial.training.history import higher_is_better

if TYPE_CHECKING:
    import optuna

__all__ = [
    "EDGE",
    "best_row",
    "choose",
    "direction",
    "edge_notes",
    "extend_ranges",
    "extended_space",
    "importances",
    "notes",
    "seeds",
    "trial_row",
]

logger = logging.getLogger(__name__)


def choose(complete: list[Any], space: Space, maximize: bool) -> tuple[Any, str]:
    """The one-standard-error choice among finished trials (see the module docstring)."""
    best = (max if maximize else min)(complete, key=lambda t: t.value)
    se = float(best.user_attrs.get("se", math.nan))
    if not math.isfinite(se) or se <= 0:
        return best, "best validation score"
    within = [t for t in complete if (t.value >= best.value - se if maximize else t.value <= best.value + se)]
    sign = 1.0 if maximize else -1.0  # equal strengths (a trial and its continuation): the better score
    pick = max(within, key=lambda t: (space.strength(space.values_of(t.params)), sign * t.value, -t.number))
    if pick.number == best.number:
        return (
            best,
            f"best validation score (nothing within one standard error, {se:.3g}, was more regularized)",
        )
    return pick, (
        f"one-standard-error rule: the most regularized of {len(within)} settings within {se:.3g} of the best "
        f"score ({best.value:.4g}, trial {best.number})"
    )


EDGE = 0.2
"""How near an end of its range a knob's best value must sit to count as at that end: one
step of a six-point grid (a fifth of the range, on the knob's scale)."""


def extended_space(study: optuna.Study, space: Space) -> Space:
    """``space`` with the ranges the study has extended (its ``ranges`` attribute)."""
    ranges = study.user_attrs.get("ranges", {})
    if not ranges:
        return space
    changed = {name: {**space.knobs[name].to_dict(), "low": low, "high": high}
               for name, (low, high) in ranges.items() if name in space.knobs}  # fmt: skip
    return space.narrow(**changed)


def extend_ranges(study: optuna.Study, space: Space, *, reserve: bool = False) -> Space:
    """Extend a range whose end binds, and return the space the next trial samples from.

    A knob's range is extended at an end when the best finished trial sits within
    ``EDGE`` of it and the three best trials all lie in that half of the range (the
    evidence that the knob matters, there): a log-scale range by a decade, a linear one by
    half its width, within the knob's hard limits (``Knob.limits``). It waits for
    ``max(6, 2 * knobs)`` finished trials, and for three more after each extension; in the
    budget's reserve (``regdial.dial.continuation``), for 4 and 2: the budget left is what
    the extension can still use.
    """
    from optuna.trial import TrialState

    from regdial.knobs import KNOBS

    current = extended_space(study, space)
    complete = [t for t in search_trials(study) if t.state == TrialState.COMPLETE and t.value is not None]
    needed, after = (4, 2) if reserve else (max(6, 2 * len(space.knobs)), 3)
    if len(complete) < needed or len(complete) < int(study.user_attrs.get("extended_at", 0)) + after:
        return current
    maximize = study.direction.name == "MAXIMIZE"
    ranked = sorted(complete, key=lambda t: float(t.value or 0.0), reverse=maximize)[:3]
    ranges = dict(study.user_attrs.get("ranges", {}))
    for name, r in current.knobs.items():
        positions = [r.position(current.values_of(t.params).get(name, 0.0)) for t in ranked]
        limits = KNOBS[name].limits or (r.low, r.high)
        low, high = r.low, r.high
        if positions[0] <= EDGE and all(p <= 0.5 for p in positions) and r.low > limits[0]:
            low = max(limits[0], r.low / 10 if r.log else r.low - (r.high - r.low) / 2)
            if r.log and low <= 0:
                low = r.low / 10
        elif positions[0] >= 1 - EDGE and all(p >= 0.5 for p in positions) and r.high < limits[1]:
            high = min(limits[1], r.high * 10 if r.log else r.high + (r.high - r.low) / 2)
        if (low, high) != (r.low, r.high):
            ranges[name] = [low, high]
            logger.info("range of %s extended to [%g, %g]: its best value sat at an end", name, low, high)
    if ranges != study.user_attrs.get("ranges", {}):
        study.set_user_attr("ranges", ranges)
        study.set_user_attr("extended_at", len(complete))
    return extended_space(study, space)


def edge_notes(
    original: Space, final: Space, best: Regularization, complete: list[Any], maximize: bool
) -> list[str]:
    """Which ranges were extended, and which still bind the chosen setting."""
    from regdial.knobs import KNOBS

    said = []
    for name, r in final.knobs.items():
        start = original.knobs[name]
        if (r.low, r.high) != (start.low, start.high):
            said.append(f"the range of {name} was extended from [{start.low:g}, {start.high:g}] to [{r.low:g}, {r.high:g}]: "
                        "the best values sat at its end")  # fmt: skip
        value = float(getattr(best, name) or 0.0)
        position = r.position(value)
        limits = KNOBS[name].limits or (r.low, r.high)
        if len(complete) >= 4 and (position <= EDGE or position >= 1 - EDGE):
            end = "low" if position <= EDGE else "high"
            at_limit = (r.low <= limits[0]) if end == "low" else (r.high >= limits[1])
            if end == "low" and at_limit:
                continue  # at its weakest possible value: the knob is (nearly) off, nothing to widen
            said.append(f"{name} = {value:.3g} still sits at the {end} end of its range [{r.low:g}, {r.high:g}]"
                        + (" (regdial's hard limit)" if at_limit else ": widen it, or give the search more budget"))  # fmt: skip
    return said


def flat_notes(complete: list[Any], metric: str) -> list[str]:
    """Said when every completed trial scored alike (four or more): the search could not
    tell its settings apart, so its choice is arbitrary. A model that predicts one class
    (a rare positive class) or one value (a target on a scale the model cannot reach)
    does this whatever the regularization."""
    values = [float(t.value) for t in complete if t.value is not None and math.isfinite(float(t.value))]
    if len(values) < 4:
        return []
    errors = sorted(float(e) for t in complete if math.isfinite(e := float(t.user_attrs.get("se", math.nan))))
    middle = sorted(values)[len(values) // 2]
    tolerance = max(1e-4 * max(1.0, abs(middle)), 0.05 * errors[len(errors) // 2] if errors else 0.0)
    if max(values) - min(values) > tolerance:
        return []
    return [f"every one of the {len(values)} trials scored {metric} {middle:.4g}: the search could not tell "
            "its settings apart, so its choice is arbitrary; a model that predicts one class or one value "
            "does this whatever the regularization (check the classes' balance, the target's scale, the "
            "learning rate)"]  # fmt: skip


def notes(result: TuneResult) -> list[str]:
    """What the numbers can and cannot say: a gain inside noise is not claimed."""
    said: list[str] = []
    tuned, base = (
        result.retrain.get("tuned", {}).get("final", {}),
        result.retrain.get("baseline", {}).get("final", {}),
    )
    maximize = result.direction == "maximize"
    for split in ("test", "val"):
        name = result.metric.replace("val_", f"{split}_", 1)
        if name in tuned and name in base:
            a, b = tuned[name], base[name]
            spread = math.hypot(tuned.get(f"{name}_se", math.nan), base.get(f"{name}_se", math.nan))
            gain = (a - b) if maximize else (b - a)
            if math.isfinite(spread) and abs(a - b) <= spread:
                said.append(f"the unregularized baseline is within noise of the tuned setting on {split} "
                            f"({name} {a:.4f} vs {b:.4f}, one standard error of the difference {spread:.4f}): "
                            "no gain is claimed")  # fmt: skip
            elif gain < 0:
                said.append(f"the unregularized baseline scores better on {split} ({name} {b:.4f} vs {a:.4f}): "
                            "this model may need no more regularization, or the space should reach weaker settings")  # fmt: skip
            break
    tuned_run, base_run = result.retrain.get("tuned", {}), result.retrain.get("baseline", {})
    best, ran = tuned_run.get("best_epoch"), tuned_run.get("epochs_run")
    if isinstance(best, int) and isinstance(ran, int) and best < ran and base_run.get("epochs_run"):
        said.append(f"the tuned row is scored at its best epoch ({best} of {ran}: early stopping and the best "
                    f"weights are part of the setting), the unregularized baseline at its last "
                    f"({base_run['epochs_run']})")  # fmt: skip
    return said


def seeds(space: Space, path_value: float) -> list[dict[str, Any]]:
    """First trials from the path: its best value, with the other knobs midway and a quarter way.

    (Not at their weakest: with every other technique off a trial is the unregularized
    baseline, which the end of the search trains anyway.)
    """
    trials = []
    for position in (0.5, 0.25):
        params: dict[str, Any] = {}
        for name, r in space.knobs.items():
            value = path_value if name == space.path_knob else (
                r.low * (r.high / r.low) ** position if r.log else r.low + (r.high - r.low) * position
            )  # fmt: skip
            params[name] = value
            if r.optional:
                params[f"{name}_on"] = True
        trials.append(params)
    return trials


def trial_row(t: Any, space: Space) -> dict[str, Any]:
    seconds = (
        (t.datetime_complete - t.datetime_start).total_seconds()
        if t.datetime_complete and t.datetime_start
        else None
    )
    value = t.value if t.value is not None else t.user_attrs.get("value")
    return {"number": t.number, "state": t.state.name.lower(), "value": value, "se": t.user_attrs.get("se"),
            "epochs": t.user_attrs.get("epochs", 0), **space.values_of(t.params), "seconds": seconds,
            "device": t.user_attrs.get("device"), "worker": t.user_attrs.get("worker"),
            "length": t.user_attrs.get("length"), "continues": t.user_attrs.get("continues")}  # fmt: skip


def importances(study: optuna.Study, complete: list[Any], space: Space) -> dict[str, float]:
    import optuna

    if len(complete) < 3 or len(space.knobs) < 2:
        return {}
    try:
        with warnings.catch_warnings(record=True) as caught:  # few trials: Optuna warns, we log
            warnings.simplefilter("always")
            found = dict(optuna.importance.get_param_importances(study))
        for warning in caught:
            logger.info("knob importances: %s", warning.message)
    except (RuntimeError, ValueError) as error:  # too few distinct trials
        logger.info("knob importances unavailable: %s", error)
        return {}
    return {k: float(v) for k, v in found.items() if math.isfinite(v)}


def direction(metric: str) -> Literal["maximize", "minimize"]:
    """Optuna's word for which way ``metric`` is better."""
    return "maximize" if higher_is_better(metric) else "minimize"


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The row (of the path) with the best ``metric``; a non-finite score never wins."""
    maximize = higher_is_better(metric)
    worst = -math.inf if maximize else math.inf
    return (max if maximize else min)(
        rows, key=lambda row: row[metric] if math.isfinite(row[metric]) else worst
    )
