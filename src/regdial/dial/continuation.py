"""The reserve: budget kept back to continue trials still improving, and to follow a range that binds.

Learning curves cross: a regularized trial learns more slowly and ends better, so the
best trial of a search is often still improving when its length runs out. Freeze-thaw
Bayesian optimization (Swersky et al. 2014), DyHPO (Wistuba et al. 2022) and in-context
freeze-thaw BO (Rakotoarison et al. 2024) continue such curves instead of starting new
ones. regdial resumes a run exactly (``regdial.training.resume``), so continuing is cheap:
the trial's run goes on from its checkpoint, and only the new epochs are paid for.

Once ``1 - RESERVE`` of a sampled search's budget is spent, each next trial is, in order:

1. **a point beyond a binding edge**: when the best trials sit at an end of a knob's
   range (``extend_ranges``, with the reserve's lower count of evidence), the range is
   extended and the best trial's setting is tried with that knob in the new part;
2. **a continuation**: the best-scoring of the top ``TOP`` trials that ran its whole
   length with its best epoch in the last ``LATE`` of it (still improving), trained on
   for ``GROWTH`` times its length again (at most ``MAX_GROWTH`` times the trials' length,
   and within the budget left). It is a new trial of the same setting, marked
   ``continues``, whose epochs are the new ones alone (the budget counts each epoch
   once) and whose run directory holds the whole curve; it is never pruned;
3. otherwise the sampler's next suggestion.

Checkpoints are kept only where a continuation or the finish may use them: a trial's
``checkpoints/`` is removed once it is neither among the ``TOP`` best nor still improving.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regdial.dial.budget import Budget
from regdial.dial.space import Space
from regdial.dial.study import search_trials

if TYPE_CHECKING:
    import optuna

__all__ = [
    "GROWTH",
    "LATE",
    "MAX_GROWTH",
    "RESERVE",
    "TOP",
    "beyond_edge",
    "in_reserve",
    "length",
    "next_continuation",
    "still_improving",
    "tidy_checkpoints",
    "trial_dir",
]

RESERVE = 0.3
"""The share of a budget kept for continuations and binding ranges."""
GROWTH = 0.5
"""A continuation trains on for this share of the trial's length again."""
MAX_GROWTH = 4
"""A trial is continued to at most this many times the search's trial length."""
LATE = 0.2
"""Still improving: the best epoch within the last fifth of the epochs trained."""
TOP = 3
"""Only the best few trials are continued (and keep their checkpoints)."""


def trial_dir(run_dir: Path, number: int) -> Path:
    """Where trial ``number`` keeps its run: ``run_dir/trials/<number>``."""
    return run_dir / "trials" / str(number)


def in_reserve(budget: Budget, used: float) -> bool:
    """Whether the search has spent all but the reserve of ``budget``."""
    return used >= (1.0 - RESERVE) * budget.amount


def length(trial: Any) -> int:
    """The epochs trial ``trial``'s run trained to (its start included, for a continuation)."""
    return int(trial.user_attrs.get("length", trial.user_attrs.get("planned", 0)) or 0)


def still_improving(trial: Any) -> bool:
    """``trial`` ran its whole length (not stopped early or pruned) and validated best in
    the last ``LATE`` of it."""
    total, best = length(trial), trial.user_attrs.get("best_epoch")
    if trial.user_attrs.get("status") != "completed" or not total or best is None:
        return False
    return int(best) > total - max(1, math.ceil(LATE * total))


def _ranked(study: optuna.Study) -> list[Any]:
    from optuna.trial import TrialState

    complete = [t for t in search_trials(study) if t.state == TrialState.COMPLETE and t.value is not None]
    maximize = study.direction.name == "MAXIMIZE"
    return sorted(complete, key=lambda t: (float(t.value), -t.number), reverse=maximize)


def next_continuation(
    study: optuna.Study, run_dir: Path, trial_length: int, remaining: float, unit: str
) -> tuple[Any, int] | None:
    """The trial to continue and the length to continue it to, or None (see the module docstring)."""
    continued = {int(t.user_attrs["continues"]) for t in search_trials(study) if "continues" in t.user_attrs}
    for trial in _ranked(study)[:TOP]:
        if trial.number in continued or not still_improving(trial):
            continue
        if not (trial_dir(run_dir, trial.number) / "checkpoints" / "last.json").is_file():
            continue
        total = length(trial)
        extra = min(math.ceil(GROWTH * total), MAX_GROWTH * trial_length - total)
        if unit == "epochs":
            extra = min(extra, int(remaining))
        if extra < max(2, total // 8):
            continue
        return trial, total + extra
    return None


def tidy_checkpoints(study: optuna.Study, run_dir: Path) -> None:
    """Remove the checkpoints no continuation or finish will read: those of every trial
    outside the ``TOP`` best that is not still improving."""
    from optuna.trial import TrialState

    keep = {t.number for t in _ranked(study)[:TOP]}
    for trial in search_trials(study):
        if trial.state == TrialState.RUNNING or trial.number in keep:
            continue
        directory = trial_dir(run_dir, trial.number) / "checkpoints"
        if directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)


def beyond_edge(study: optuna.Study, before: Space, after: Space) -> dict[str, Any] | None:
    """The best trial's parameters with each knob whose range grew set in the middle of
    its new part (geometrically on a log scale), or None when no range grew."""
    ranked = _ranked(study)
    if not ranked:
        return None
    params = dict(ranked[0].params)
    moved = False
    for name, r in after.knobs.items():
        old = before.knobs.get(name)
        if old is None or (old.low, old.high) == (r.low, r.high):
            continue
        low, high = (r.low, old.low) if r.low < old.low else (old.high, r.high)
        params[name] = math.sqrt(low * high) if r.log and low > 0 else (low + high) / 2
        if r.optional:
            params[f"{name}_on"] = True
        moved = True
    return params if moved else None
