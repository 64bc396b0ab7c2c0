"""The online strategy's controller: the dial turned from inside one training run.

The controller is stateful (the knobs' current values, the turns so far) and saves
itself with ``state_dict``, which ``fit`` puts in every checkpoint: a run with a
controller that is killed after a turn resumes with the knobs where they were.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from regdial.diagnosis import RISE, diagnose, smooth
from regdial.dial.space import Space
from regdial.setting import Regularization
from regdial.training.history import History

if TYPE_CHECKING:
    from regdial.applied import Applied

__all__ = ["OnlineController", "gap_trend"]


def gap_trend(recent: History) -> int:
    """+1 when the smoothed generalization gap (validation minus training loss) widened
    over the window by more than its noise and by 5% of the validation loss; else 0.

    The diagnosis holds while curves are ambiguous ("good fit", "still improving"); a
    widening gap is the earliest sign that the current strengths let the model overfit.
    """
    gaps = [v - t for v, t in zip(recent.column("val_loss"), recent.column("train_loss"), strict=True)]
    smoothed, sigma = smooth(gaps)
    half = len(smoothed) // 2
    widened = statistics.fmean(smoothed[half:]) - statistics.fmean(smoothed[:half])
    scale = statistics.fmean(recent.column("val_loss"))
    return 1 if widened > max(2 * sigma, RISE * scale) else 0


class OnlineController:
    """Turn every knob of a space one step after each diagnosis of the recent curves.

    Pass it to ``fit(..., controller=c)`` and start from ``c.start()``: every ``every``
    epochs (from epoch ``2 * every`` on) it diagnoses the last ``2 * every`` epochs. When
    the diagnosis says to regularize more (or holds while ``gap_trend`` sees the gap
    widen) every knob moves one step stronger; when it says less, one step weaker. A
    log-scale knob steps by ``f = max(2, (high / low) ** (1/6))`` (x f or / f, so six
    steps cross its range); a linear one by a fifth of its range. ``turns`` records each
    step: the epoch after which it applied, its direction and the knobs' new values.
    """

    def __init__(self, space: Space, every: int) -> None:
        self.space, self.every = space, every
        self.values = {name: r.low for name, r in space.knobs.items()}  # start weak: loosen nothing yet
        # Log-scale knobs step by at least x2, and by enough to cross their range in six turns.
        self.factors = {
            name: max(2.0, (r.high / r.low) ** (1 / 6)) for name, r in space.knobs.items() if r.log
        }
        self.turns: list[dict[str, Any]] = []

    def start(self) -> Regularization:
        return self.space.setting(self.values)

    def state_dict(self) -> dict[str, Any]:
        """The knobs' current values and the turns so far (plain values)."""
        return {"values": dict(self.values), "turns": [dict(t) for t in self.turns]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``."""
        self.values = {name: float(state["values"][name]) for name in self.space.knobs}
        self.turns = [dict(t) for t in state["turns"]]

    def __call__(self, history: History, applied: Applied) -> Regularization | None:
        n = len(history)
        if n < 2 * self.every or n % self.every:
            return None
        recent = History(
            history.kind, history.rows[-2 * self.every :], num_classes=history.meta.get("num_classes")
        )
        direction = diagnose(recent).direction or gap_trend(recent)
        if direction == 0:
            return None
        for name, r in self.space.knobs.items():
            value = self.values[name]
            if r.log:
                value = value * self.factors[name] if direction > 0 else value / self.factors[name]
            else:
                value = value + direction * (r.high - r.low) / 5
            self.values[name] = min(r.high, max(r.low, value))
        self.turns.append({"epoch": n, "direction": direction, **self.values})
        return self.space.setting(self.values)
