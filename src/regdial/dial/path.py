"""The regularization path: one knob swept from strong to weak, each point warm-started.

As glmnet computes the lasso path: start where the regularization is strong enough that
the solution is simple, then weaken it step by step, each point starting from the
previous point's weights and training briefly. The result is the validation curve over
the knob at a fraction of the cost of independent runs, and its best point is where a
search starts (``auto``).

Any objective can be swept: regdial's trainer always warm-starts; a user's own objective
does when it loads ``trial.initial_weights`` and calls ``trial.save_weights`` (its
points end after ``trial.epochs`` epochs either way). With ``warm_only`` the path stops
after its first point when that point saved no weights: without warm starts its points
are short runs from scratch that differ by noise, not a path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

from optuna import TrialPruned

from regdial._checks import check_int, fail
from regdial.dial.objective import Objective
from regdial.dial.space import Space
from regdial.dial.trial import Trial

__all__ = ["regularization_path"]


def regularization_path(
    objective: Objective,
    space: Space,
    knob: str | None = None,
    *,
    points: int = 6,
    epochs_per_point: int,
    kind: str | None = None,
    say: Callable[[str], None] | None = None,
    warm_only: bool = False,
) -> list[dict[str, Any]]:
    """Sweep ``knob`` (default: the space's first log-scale knob) from strong to weak.

    Returns one row per point: the knob's value, the validation metric and the train
    metric at the point's last epoch, the share of exact zeros, the epochs it took. The
    other knobs stay at the space's base setting.
    """
    knob = knob or space.path_knob
    if knob not in space.knobs:
        fail("path knob", "a knob of the space (" + ", ".join(space.knobs) + ")", knob)
    points = check_int("points", points, low=2, high=100)
    per_point = check_int("epochs_per_point", epochs_per_point, low=1)
    metric = objective.metric
    train_metric = metric.replace("val_", "train_", 1)
    rows: list[dict[str, Any]] = []
    weights = None
    for number, value in enumerate(reversed(space.knobs[knob].values(points))):  # strong to weak
        trial = Trial(space.setting({knob: value}), number=number, metric=metric, epochs=per_point,
                      initial_weights=weights, kind=kind, prune_after=per_point, role="path")  # fmt: skip
        with contextlib.suppress(TrialPruned):  # the point ran its epochs
            objective(trial.setting, trial)
        weights = trial.saved_weights
        last = trial.history.rows[-1] if trial.history.rows else {}
        rows.append({
            "value": value, metric: last.get(metric, math.nan), train_metric: last.get(train_metric, math.nan),
            "zero_fraction": last.get("zero_fraction", math.nan), "epochs": trial.epochs_run,
        })  # fmt: skip
        if say is not None:
            say(f"path {knob}={value:.3g}: {metric} {rows[-1][metric]:.4f} after {trial.epochs_run} epochs")
        if warm_only and weights is None:
            break
    return rows
