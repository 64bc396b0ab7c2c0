"""``Trial``: one setting of the dial being tried, by regdial's trainer or by your own code.

An objective in the Optuna manner receives the setting to try and its trial::

    def train(setting: regdial.Regularization, trial: regdial.Trial) -> None:
        model = build()
        if trial.initial_weights is not None:        # the path warm-starts each point
            model.load_state_dict(trial.initial_weights)
        applied = Applied(setting, model, make_optimizer, num_classes=10)
        for epoch in range(1, trial.epochs + 1):     # the path's points train fewer epochs
            ...                                      # your loop, with applied.batch / applied.loss
            trial.report(epoch, train_loss=..., val_loss=..., val_accuracy=...)  # may raise TrialPruned
        trial.save_weights(model)                    # optional: the next path point starts here

``report`` appends a row to ``trial.history`` (a ``History``: the diagnosis and the report
read it), sends the main metric to the search, and raises Optuna's own
``optuna.TrialPruned`` (the one prune exception, as in Optuna's integrations) when the search
stops this trial (never at its last epoch: a finished result is not thrown away). The
trial's score is the main metric of its best epoch, with the standard error reported
beside it (``val_accuracy_se``) when there is one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from regdial._checks import Described, check_int, check_real, fail
from regdial.setting import Regularization
from regdial.training.history import History, higher_is_better

if TYPE_CHECKING:
    import optuna

__all__ = ["Trial"]


class Trial:
    """One setting being tried: report each epoch, and the search may prune it."""

    def __init__(
        self,
        setting: Regularization,
        *,
        number: int,
        metric: str,
        epochs: int,
        optuna_trial: optuna.Trial | None = None,
        initial_weights: Mapping[str, Tensor] | None = None,
        kind: str | None = None,
        prune_after: int | None = None,
        role: str = "trial",
        run_dir: Path | None = None,
        resume: bool = False,
        prune: bool = True,
    ) -> None:
        self.setting, self.number, self.epochs = setting, number, epochs
        # regdial's trainer keeps the trial's run (history, checkpoints) in run_dir, and a
        # trial that continues another resumes that run for longer (``resume``).
        self.run_dir, self.resume, self.prune = run_dir, resume, prune
        self.metric = metric if metric.startswith("val_") else f"val_{metric}"
        self.role = role
        self._optuna = optuna_trial
        self._prune_after = prune_after
        self.initial_weights = None if initial_weights is None else dict(initial_weights)
        self.saved_weights: dict[str, Tensor] | None = None
        self.history = History(
            kind, metric=self.metric.removeprefix("val_"), setting=setting.to_dict(),
            direction="maximize" if higher_is_better(self.metric) else "minimize",
        )  # fmt: skip
        self.pruned = False

    @property
    def maximize(self) -> bool:
        return self.history.higher_is_better

    def report(self, epoch: int, *, train_loss: float, val_loss: float, **metrics: float) -> None:
        """Record epoch ``epoch``'s scores; raise ``optuna.TrialPruned`` if the search stops this trial.

        ``train_loss`` and ``val_loss`` are required (the diagnosis reads them); the main
        metric (``self.metric``, e.g. ``val_accuracy``) must be among ``metrics`` unless it
        is ``val_loss``. Add ``val_<metric>_se`` to give its standard error. Epochs count
        from 0 or 1 as the loop does (``for epoch in range(trial.epochs)``, as Optuna's
        ``report`` takes step 0); each must be above the last. Every value is a number
        (NaN and infinities included: a diverged run records them).
        """
        epoch = check_int("trial.report epoch", epoch, low=0)
        if self.history.rows and epoch <= int(self.history.rows[-1]["epoch"]):
            fail(
                "trial.report epoch",
                f"above the last one reported ({int(self.history.rows[-1]['epoch'])})",
                epoch,
            )
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, **metrics}
        row = {name: check_real(f"trial.report {name}", value) for name, value in row.items()}
        if self.metric not in row:
            fail("trial.report", f"the main metric {self.metric!r} among the values",
                 Described(", ".join(sorted(metrics)) or "only the losses"))  # fmt: skip
        self.history.append(row)
        value = float(self.history.rows[-1][self.metric])
        if self._optuna is not None and math.isfinite(value):
            self._optuna.report(value, epoch)
        if epoch >= self.epochs or len(self.history) >= self.epochs:
            return  # a finished result is never thrown away
        if self._prune_after is not None and len(self.history) >= self._prune_after:
            self.pruned = True
            raise _pruned(f"the path's point ends after {epoch} epochs")
        if self.prune and self._optuna is not None and self._optuna.should_prune():
            self.pruned = True
            raise _pruned(f"pruned after epoch {epoch}: {self.metric} {value:.4g}")

    def save_weights(self, model: nn.Module | Mapping[str, Tensor]) -> None:
        """Keep ``model``'s weights (a copy on the CPU) so the path's next point starts here."""
        state = model.state_dict() if isinstance(model, nn.Module) else model
        if not isinstance(state, Mapping):
            fail("trial.save_weights", "a model or a state dict", model)
        self.saved_weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    @property
    def epochs_run(self) -> int:
        """Epochs reported so far (what the budget counts)."""
        return len(self.history)

    def best_row(self) -> dict[str, float] | None:
        """The reported row with the best main metric (the last one on ties of position)."""
        rows = [r for r in self.history.rows if math.isfinite(r.get(self.metric, math.nan))]
        if not rows:
            return None
        pick = max if self.maximize else min
        return pick(rows, key=lambda r: r[self.metric])

    def score(self) -> tuple[float, float]:
        """(the main metric of the best epoch, its standard error or NaN)."""
        row = self.best_row()
        if row is None:
            return math.nan, math.nan
        return row[self.metric], row.get(f"{self.metric}_se", math.nan)

    def __repr__(self) -> str:
        return f"Trial(number={self.number}, setting={self.setting!r})"


def trial_summary(trial: Trial) -> dict[str, Any]:
    """What a finished trial leaves in the study: its epochs, score and standard error."""
    value, se = trial.score()
    row = trial.best_row()
    return {
        "epochs": trial.epochs_run,
        "value": value,
        "se": se,
        "best_epoch": None if row is None else int(row["epoch"]),
        "status": trial.history.meta.get("status"),
        "setting": trial.setting.to_dict(),
    } | ({"device": trial.history.meta["device"]} if "device" in trial.history.meta else {})


def _pruned(message: str) -> Exception:
    import optuna  # only when a trial is pruned: Trial itself loads nothing of Optuna

    return optuna.TrialPruned(message)
