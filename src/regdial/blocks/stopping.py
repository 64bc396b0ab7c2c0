"""Early stopping: stop when the validation metric stops improving, keep the best weights.

Stopping early is regularization: the number of epochs is a dial too, and the best epoch
on validation data is where the model generalized best. ``EarlyStopping`` follows the
conventions of Keras and Lightning and says why it acted:

- ``"patience exhausted"``: no improvement by more than ``min_delta`` for ``patience``
  epochs in a row;
- ``"non-finite metric"``: the metric was NaN or infinite (with ``check_finite``);
- ``"baseline not reached"``: with a ``baseline``, ``patience`` epochs passed without
  any epoch beating it.

Epochs are counted from 1, in the order ``step`` is called. Epochs before
``start_from_epoch`` are ignored entirely. A NaN with ``check_finite=False`` never counts
as an improvement. An exact tie with the best value is an improvement when a second
value, ``tiebreak`` (lower is better: the validation loss beside an accuracy), is lower
than the best epoch's: an accuracy on a few hundred rows ties often, and among the tied
epochs the one that predicts its right answers most surely is kept, not the first.
With ``restore_best``, the best weights are kept in memory (a detached
copy of the state dict, on its device) and ``restore(model)`` puts them back, whoever
ended training: the stopper, the epoch budget or Ctrl-C. ``patience=None`` never stops:
it only keeps the best epoch and its weights (what ``fit`` uses when early stopping is off).

``state_dict()`` holds the counters and the best weights, so a resumed run stops where
the uninterrupted one would have and restores the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from regdial._checks import check_choice, check_int, check_range, fail

__all__ = ["EarlyStopping", "StopReason"]

StopReason = Literal["patience exhausted", "non-finite metric", "baseline not reached"]


class EarlyStopping:
    """Decide after each epoch whether to stop; remember the best epoch and its weights.

    Args:
        patience: epochs without improvement to tolerate (>= 1); None: never stop, only
            keep the best epoch and weights.
        min_delta: an improvement must beat the best by more than this (>= 0).
        mode: ``"min"`` for losses, ``"max"`` for accuracies.
        restore_best: keep the best weights and let ``restore`` put them back.
        start_from_epoch: ignore the first epochs (warm-up), counted from 1.
        baseline: a value the metric must beat within ``patience`` epochs.
        check_finite: stop at once on a NaN or infinite metric.
        monitor: the metric's name, used in messages.
    """

    def __init__(
        self,
        patience: int | None = 10,
        min_delta: float = 0.0,
        mode: str = "min",
        *,
        restore_best: bool = True,
        start_from_epoch: int = 0,
        baseline: float | None = None,
        check_finite: bool = True,
        monitor: str = "val_loss",
    ) -> None:
        self.patience = None if patience is None else check_int("EarlyStopping.patience", patience, low=1)
        self.min_delta = check_range("EarlyStopping.min_delta", min_delta, low=0.0)
        self.mode = check_choice("EarlyStopping.mode", mode, ("min", "max"))
        self.restore_best = bool(restore_best)
        self.start_from_epoch = check_int("EarlyStopping.start_from_epoch", start_from_epoch, low=0)
        self.baseline = None if baseline is None else check_range("EarlyStopping.baseline", baseline)
        self.check_finite = bool(check_finite)
        self.monitor = monitor
        self.best_state: dict[str, Tensor] | None = None
        self._reset()

    def _reset(self) -> None:
        self.epoch = 0
        self.best: float | None = self.baseline
        self.best_epoch: int | None = None
        self.best_tiebreak: float | None = None
        self.wait = 0
        self.reason: StopReason | None = None
        self.stopped_epoch: int | None = None

    def _improves(self, value: float, tiebreak: float | None) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if value == self.best and self.best_epoch is not None:
            return tiebreak is not None and self.best_tiebreak is not None and tiebreak < self.best_tiebreak
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(
        self,
        metric: float | Tensor,
        model: nn.Module | None = None,
        *,
        tiebreak: float | Tensor | None = None,
    ) -> bool:
        """Record this epoch's ``metric``; return True if training should stop now.

        ``model`` is needed when ``restore_best``: its weights are copied whenever the
        metric improves. ``tiebreak`` (lower is better) decides an exact tie with the best
        ``metric``: the later epoch is the better one if its ``tiebreak`` is lower. A NaN
        ``tiebreak`` never wins a tie.
        """
        value = float(metric)
        second = None if tiebreak is None or math.isnan(float(tiebreak)) else float(tiebreak)
        self.epoch += 1
        if self.reason is not None:
            return True
        if self.epoch <= self.start_from_epoch:
            return False
        if self.check_finite and not math.isfinite(value):
            return self._stop("non-finite metric")
        if self._improves(value, second):
            self.best, self.best_epoch, self.best_tiebreak, self.wait = value, self.epoch, second, 0
            if self.restore_best:
                if model is None:
                    fail("model", "the model being trained when restore_best=True", None)
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.wait += 1
        if self.patience is not None and self.wait >= self.patience:
            return self._stop("baseline not reached" if self.best_epoch is None else "patience exhausted")
        return False

    def _stop(self, reason: StopReason) -> bool:
        self.reason, self.stopped_epoch = reason, self.epoch
        return True

    @property
    def should_stop(self) -> bool:
        """Whether a stop was decided."""
        return self.reason is not None

    @torch.no_grad()
    def restore(self, model: nn.Module) -> bool:
        """Load the best weights into ``model``; False if there are none to restore."""
        if not self.restore_best or self.best_state is None:
            return False
        model.load_state_dict(self.best_state)
        return True

    @property
    def message(self) -> str:
        """One line: why it stopped (or that it did not) and the best value and epoch."""
        best = (
            "no epoch yet"
            if self.best_epoch is None
            else f"best {self.monitor} {self.best:.4g} at epoch {self.best_epoch}"
        )
        if self.reason == "patience exhausted":
            return (
                f"stopped at epoch {self.stopped_epoch}: {self.monitor} did not improve by more than "
                f"{self.min_delta:g} for {self.patience} epochs; {best}"
            )
        if self.reason == "non-finite metric":
            return f"stopped at epoch {self.stopped_epoch}: {self.monitor} was not finite; {best}"
        if self.reason == "baseline not reached":
            return (
                f"stopped at epoch {self.stopped_epoch}: {self.monitor} did not beat the baseline "
                f"{self.baseline:g} in {self.patience} epochs"
            )
        return f"not stopped after {self.epoch} epochs; {best}"

    def state_dict(self) -> dict[str, Any]:
        """The counters (plain values) and the best weights (tensors, or None)."""
        return {
            "epoch": self.epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_tiebreak": self.best_tiebreak,
            "wait": self.wait,
            "reason": self.reason,
            "stopped_epoch": self.stopped_epoch,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``, so a resumed run stops where it would have."""
        self._reset()
        self.epoch, self.wait = int(state["epoch"]), int(state["wait"])
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        tiebreak = state.get("best_tiebreak")
        self.best_tiebreak = None if tiebreak is None else float(tiebreak)
        self.reason, self.stopped_epoch = state["reason"], state["stopped_epoch"]
        best_state = state.get("best_state")
        self.best_state = None if best_state is None else dict(best_state)

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta}, mode={self.mode!r}, "
            f"monitor={self.monitor!r})"
        )
