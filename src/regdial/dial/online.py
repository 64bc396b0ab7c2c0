"""The online strategy's controller: the dial turned from inside one training run.

The controller is stateful (the knobs' current values, the turns so far) and saves
itself with ``state_dict``, which ``fit`` puts in every checkpoint: a run with a
controller that is killed after a turn resumes with the knobs where they were.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from regdial._checks import check_int, check_range
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
    """Turn the knobs of a space from inside one run, each on its own evidence.

    Pass it to ``fit(..., controller=c)`` and start from ``c.start()`` (every knob at its
    weakest, or at ``start``'s strength). Every ``every`` epochs, from epoch ``2 * every`` on:

    1. The previous turn is judged: the validation metric's mean over the ``every``
       epochs since the turn is compared with its mean over the ``every`` before it.
       When it got worse by more than its noise (the robust spread of the window's
       smoothed metric, over ``sqrt(every)``), the turn is undone and that knob is not
       turned that way again for ``2 * knobs`` decisions.
    2. The recent ``2 * every`` epochs are diagnosed. When the diagnosis says to
       regularize more (or holds while ``gap_trend`` sees the gap widen), the next knob in
       turn moves one step stronger; when it says less, one step weaker. A turn that was
       kept and that the curves still ask for is repeated on the same knob (a line search
       along it); an undone one passes the turn to the next knob. A log-scale knob
       steps by ``f = max(2, (high / low) ** (1/6))`` (x f or / f, so six steps cross its
       range); a linear one by a fifth of its range.

    One knob at a time, judged by what it did, is what lets the knobs part ways: on
    sparse-regression L1 climbs while L2 stays near its floor, which a single direction
    for all knobs cannot reach. ``turns`` records each step and each undo.

    ``first``: no turn before this epoch (at least ``2 * every``).

    ``rise_only``: tighten only when the validation loss rose above its minimum (the
    diagnosis's first overfitting rule), not on a gap alone (a widening gap, or training
    data memorized while validation still improves). ``HypergradientController`` sets it
    for the knobs it hands over: its own knobs follow the validation loss itself and
    answer a gap first, and while they move the judge credits their gain to the curves'
    turn (on friedman dropout climbed 0.1 to 0.5 on the gap while weight decay rose to
    its top, test RMSE 2.487; tightening on a rise only, dropout stays at 0.1, 2.393).
    """

    def __init__(
        self,
        space: Space,
        every: int,
        start: dict[str, float] | None = None,
        *,
        rise_only: bool = False,
        first: int | None = None,
    ) -> None:
        self.space, self.every = space, every
        self.rise_only = rise_only
        self.first = max(2 * every, check_int("first", first, low=1) if first is not None else 0)
        self.values = {name: r.low for name, r in space.knobs.items()}  # start weak: loosen nothing yet
        for name, value in (start or {}).items():
            if name in self.values:
                r = space.knobs[name]
                self.values[name] = check_range(f"start.{name}", value, low=r.low, high=r.high)
        # Log-scale knobs step by at least x2, and by enough to cross their range in six turns.
        self.factors = {
            name: max(2.0, (r.high / r.low) ** (1 / 6)) for name, r in space.knobs.items() if r.log
        }
        self.turns: list[dict[str, Any]] = []
        self.next = 0  # the knob whose turn it is, round-robin
        self.pending: dict[str, Any] | None = None  # the last turn, until it is judged
        self.blocked: dict[str, int] = {}  # "knob:direction" -> decisions left before it may be tried again

    def start(self) -> Regularization:
        return self.space.setting(self.values)

    def state_dict(self) -> dict[str, Any]:
        """The knobs' values, the turns so far and the evidence (plain values)."""
        return {"values": dict(self.values), "turns": [dict(t) for t in self.turns], "next": self.next,
                "pending": self.pending, "blocked": dict(self.blocked)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``."""
        self.values = {name: float(state["values"][name]) for name in self.space.knobs}
        self.turns = [dict(t) for t in state["turns"]]
        self.next, self.pending = int(state.get("next", 0)), state.get("pending")
        self.blocked = {str(k): int(v) for k, v in state.get("blocked", {}).items()}

    def _step(self, name: str, direction: int) -> float:
        r = self.space.knobs[name]
        value = self.values[name]
        if r.log:
            value = value * self.factors[name] if direction > 0 else value / self.factors[name]
        else:
            value = value + direction * (r.high - r.low) / 5
        return min(r.high, max(r.low, value))

    def _metric(self, history: History, first: int, last: int) -> float:
        """The validation metric's mean over epochs ``first..last`` (1-based), higher better."""
        column = f"val_{history.metric}" if f"val_{history.metric}" in history.columns else "val_loss"
        values = [row[column] for row in history.rows[first - 1 : last]]
        mean = statistics.fmean(values) if values else 0.0
        return mean if column != "val_loss" and history.higher_is_better else -mean

    def _judge(self, history: History, n: int) -> dict[str, Any] | None:
        """Undo the pending turn if the metric got worse since it, beyond the noise; return
        the turn if it was kept."""
        turn, self.pending = self.pending, None
        if turn is None:
            return None
        before = self._metric(history, turn["epoch"] - self.every + 1, turn["epoch"])
        after = self._metric(history, turn["epoch"] + 1, n)
        column = f"val_{history.metric}" if f"val_{history.metric}" in history.columns else "val_loss"
        _, sigma = smooth([row[column] for row in history.rows[-2 * self.every :]])
        if after < before - sigma / max(1.0, self.every**0.5):
            self.values[turn["knob"]] = turn["old"]
            self.blocked[f"{turn['knob']}:{turn['direction']}"] = 2 * len(self.space.knobs)
            self.turns.append(
                {"epoch": n, "direction": -turn["direction"], "undone": turn["knob"], **self.values}
            )
            return None
        return turn

    def __call__(self, history: History, applied: Applied) -> Regularization | None:
        n = len(history)
        if n < self.first or n % self.every:
            return None
        before = dict(self.values)
        kept = self._judge(history, n)
        self.blocked = {key: left - 1 for key, left in self.blocked.items() if left > 1}
        recent = History(
            history.kind, history.rows[-2 * self.every :], num_classes=history.meta.get("num_classes")
        )
        reading = diagnose(recent)
        direction = reading.direction or gap_trend(recent)
        if self.rise_only and direction > 0 and "rise" not in reading.details:
            direction = 0  # a gap alone, with validation still at its best: hold
        names = list(self.space.knobs)
        first = self.next
        if kept is not None and kept["direction"] == direction:
            first = names.index(kept["knob"])  # a kept turn that the curves still ask for: again
        for offset in range(len(names) if direction else 0):
            name = names[(first + offset) % len(names)]
            moved = self._step(name, direction)
            if moved == self.values[name] or f"{name}:{direction}" in self.blocked:
                continue
            self.pending = {"knob": name, "old": self.values[name], "direction": direction, "epoch": n}
            self.values[name] = moved
            self.next = (first + offset + 1) % len(names)
            self.turns.append({"epoch": n, "direction": direction, "knob": name, **self.values})
            break
        return self.space.setting(self.values) if self.values != before else None
