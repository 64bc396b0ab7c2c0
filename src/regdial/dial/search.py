"""The dial: find the right strengths from validation results, cheaply.

A ``Search`` owns an objective (what a trial trains, ``regdial.dial.objective``), a
``Space`` of settings, a ``Budget`` and the Optuna study that records it. Every trial of
regdial's own trainer uses the same seed (the same split and initial weights, so trials
differ only in their setting) and is scored on the validation split: its best epoch's
accuracy for classification, RMSE for regression, with the score's standard error. The
test split is used once, at the end, to score the chosen setting beside the
unregularized baseline.

The search hands its work to one module per concept, as Optuna's ``study`` hands off to
``_optimize`` and ``_tell``:

==============  ======================================================================
module          what it does
==============  ======================================================================
``search``      the inputs checked, the directory and the study's identity, dispatch
``strategies``  how each strategy spends the budget (``STRATEGIES``, see there)
``workers``     the trial loop on the shared study, in this process or spawned ones
``choice``      the one-standard-error choice, range extension, notes (pure functions)
``finish``      retraining, the baseline on the test split, the result files
==============  ======================================================================

The budget is counted in epochs (default: results do not depend on machine speed),
trials or minutes (see ``Budget``). Minutes count from the start of the search, the
path included; no new trial starts after them, except that a search with no finished
trial yet runs one (two tries) so it has a result. ``path`` and ``online`` have a fixed
cost and refuse a budget, workers, a storage and grid points.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regdial._checks import Described, check_int, fail, shorten
from regdial.dial.budget import Budget
from regdial.dial.finish import finish
from regdial.dial.objective import FitObjective, Objective, UserObjective
from regdial.dial.options import FIXED_COST, STRATEGIES, TuneOptions
from regdial.dial.result import TuneResult
from regdial.dial.space import Space
from regdial.dial.strategies import search_online, search_path, search_study
from regdial.dial.study import open_storage
from regdial.dial.timescale import TimeScale, improving_at_end, recipe
from regdial.knobs import retunable

if TYPE_CHECKING:
    import optuna

    from regdial.training.history import History

__all__ = ["STRATEGIES", "Search"]

logger = logging.getLogger(__name__)

DEFAULT_RUNS = 12
"""Without a ``budget``: this many full trials' worth of epochs (of the learned length, when
the length is the dial's to learn)."""


class Search:
    """A search over ``space`` for ``objective``, within ``budget``; ``run()`` returns the result.

    Args:
        objective: what a trial trains (``FitObjective`` or ``UserObjective``).
        space: the knobs and ranges to search.
        budget: epochs, trials or minutes (``Budget.parse``); default 12 full trials'
            worth of epochs. Refused by ``path`` and ``online``.
        strategy: one of ``STRATEGIES``.
        storage: an Optuna storage URL; default SQLite in ``run_dir`` (in memory without).
        workers: local worker processes on the storage (needs a run_dir or a URL, and an
            objective other processes can rebuild).
        devices: one worker per device (``["cuda:0", "cuda:1"]``); each worker's trials
            train on its device (regdial's trainer only).
        seed: the search's own randomness (the sampler's).
        run_dir: where the study and the result files go.
        grid_points: values per knob of the ``grid`` strategy (default 4).
        retrain: train the chosen setting and the unregularized baseline again, each with
            a run directory under ``run_dir/best``, and score both once on the test split.
        progress: called with a line of text as the search goes (None: logging only).
        identity: what makes two searches the same (a rerun resumes only the same one).
        epochs: each trial's most epochs (``trial.epochs``).
        reference_epochs: the task's usual length (default ``epochs``): pruning first
            judges a trial at half of it, and the path's points train a quarter of it.
        patience: early stopping inside trials of regdial's trainer (on the validation
            metric, keeping the best epoch), unless the space's base already sets it or
            the space searches it; the budget counts the epochs actually trained.
        learn_length: the trials' length is the dial's to choose (regdial's trainer only):
            before the budget is spent, the practitioner's recipe trains once for up to
            eight times ``epochs`` and its curve sets the trials' length, their patience
            and, without a ``budget``, a budget of ``DEFAULT_RUNS`` runs of that length
            (``regdial.dial.timescale``); the recipe is the first trial.

    Neither ``objective`` nor ``space`` is changed: the search keeps its own (``self.space``
    is ``space`` with the patience, ``self.objective`` a copy on the one device given).
    """

    def __init__(
        self,
        objective: Objective,
        space: Space,
        *,
        budget: object = None,
        strategy: str = "auto",
        storage: str | None = None,
        workers: int = 1,
        devices: list[str] | None = None,
        seed: int = 0,
        run_dir: str | Path | None = None,
        study_name: str | None = None,
        grid_points: int | None = None,
        retrain: bool = True,
        progress: Callable[[str], None] | None = None,
        identity: Mapping[str, Any] | None = None,
        kind: str | None = None,
        epochs: int = 30,
        reference_epochs: int | None = None,
        patience: int | None = None,
        learn_length: bool = False,
    ) -> None:
        if not isinstance(space, Space):
            fail("space", "a regdial.Space", space)
        options = TuneOptions.parse(
            {"strategy": strategy, "workers": workers, "storage": storage, "grid_points": grid_points}, "tune"
        )
        self.strategy, self.workers, self.storage_url = options.strategy, options.workers, options.storage
        self.objective, self.kind = objective, kind
        self.devices = self._devices(devices)
        self.seed = check_int("seed", seed, low=0, high=2**32 - 1)
        self.epochs = check_int("epochs", epochs, low=1)
        self.reference = (
            self.epochs
            if reference_epochs is None
            else check_int("reference_epochs", reference_epochs, low=1)
        )
        self.given_space = space
        self.space = self._with_patience(space, patience)
        self._refuse_for_fixed_cost(budget, options.grid_points)
        self.learn_length = bool(learn_length) and isinstance(objective, FitObjective)
        self.budget_given = budget is not None
        self.time_scale: TimeScale | None = None
        self.grid_points = options.grid_points or 4
        if self.strategy == "grid":
            optional = [name for name, r in self.space.knobs.items() if r.optional]
            if optional:  # Optuna's grid holds each knob's values, not its on/off switch
                fail(f"space.{optional[0]}", "a range without optional=True for strategy 'grid' (its grid "
                     "spans the range; search a knob that may be off with 'auto' or 'tpe')",
                     Described("optional=True"))  # fmt: skip
            self.space.grid(self.grid_points)  # refuse an oversized grid now
        self.budget = Budget.parse(budget if budget is not None else DEFAULT_RUNS * self.reference)
        self.run_dir = None if run_dir is None else Path(run_dir)
        if self.workers > 1 and self.run_dir is None and storage is None:
            fail("workers", "1 without a run directory or a storage URL to share", workers)
        if self.workers > 1:
            self._worker_objective(0)  # refuse an objective other processes cannot rebuild, now
        if self.strategy == "online":
            self._refuse_for_online()
        self.retrain = bool(retrain)
        self.identity = dict(identity or {})
        self.study_name = study_name or f"regdial-{self.identity.get('task', 'search')}-{self.strategy}"
        self.say = progress or (lambda message: logger.info("%s", message))
        self.verbose = progress is not None
        self.started = time.monotonic()
        self.online_run: History | None = None  # the online strategy's one run: its model is the result

    # -- the inputs -----------------------------------------------------------------------

    def _with_patience(self, space: Space, patience: int | None) -> Space:
        """``space`` with early stopping inside regdial's trials, unless it sets or searches it."""
        if patience is None or not isinstance(self.objective, FitObjective) or self.strategy == "online":
            return space
        patience = check_int("patience", patience, low=1)
        if space.base.early_stopping or "early_stopping" in space.knobs:
            return space
        return Space(space.knobs, space.base.replace(early_stopping=patience))

    def _refuse_for_fixed_cost(self, budget: object, grid_points: int | None) -> None:
        """``path`` and ``online`` cost what they cost; ``grid_points`` is the grid's alone."""
        if self.strategy in FIXED_COST:
            given = {"budget": budget, "storage": self.storage_url, "grid_points": grid_points,
                     "workers": self.workers if self.workers > 1 else None}  # fmt: skip
            name = next((name for name, value in given.items() if value is not None), None)
            if name is not None:
                cost = "six warm-started points" if self.strategy == "path" else "one run of the trial length"
                fail(name, f"unset with strategy {self.strategy!r} (its cost is fixed: {cost})", given[name])
        elif grid_points is not None and self.strategy != "grid":
            fail("grid_points", f"unset with strategy {self.strategy!r} (it applies to 'grid')", grid_points)

    def _refuse_for_online(self) -> None:
        if not isinstance(self.objective, FitObjective):
            fail("strategy", "not 'online' for your own training code (the controller turns knobs inside "
                 "regdial's trainer; use auto, tpe, random or grid)", self.strategy)  # fmt: skip
        fixed = [name for name in self.space.knobs if not retunable(name)]
        if fixed:
            fail("space", f"knobs that can turn during training with strategy 'online' (not {', '.join(fixed)}: "
                 "use auto, tpe, random or grid)", Described(", ".join(self.space.knobs)))  # fmt: skip

    def _devices(self, devices: list[str] | None) -> list[str] | None:
        """One device per worker: checked names, and the worker count they imply."""
        if devices is None:
            return None
        from regdial.training.devices import check_device_name

        if not isinstance(devices, list | tuple) or not devices:
            fail("tune.devices", "a non-empty list of devices like ['cuda:0', 'cuda:1']", devices)
        names = [check_device_name(f"tune.devices[{i}]", d) for i, d in enumerate(devices)]
        if not isinstance(self.objective, FitObjective):
            fail("tune.devices", "unset for your own training code (it chooses its device)", names)
        if self.workers not in (1, len(names)):
            fail("tune.workers", f"{len(names)}, one per device ({', '.join(names)})", self.workers)
        self.workers = len(names)
        if len(names) == 1:
            self.objective = self.objective.on_device(names[0])
        return names

    # -- the whole search ---------------------------------------------------------------

    def run(self) -> TuneResult:
        """Search, choose, retrain and write the result files (see the module docstring)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # regdial reports trials itself
        self.started = time.monotonic()  # a budget in minutes includes the path
        self._check_directory()
        if self.learn_length:
            self._learn_length()
        strategy = {"online": search_online, "path": search_path}.get(self.strategy, search_study)
        return finish(self, strategy(self))

    def _learn_length(self) -> None:
        """Probe the task's time scale (or read it back: a rerun resumes the same search),
        then size the trials, their patience and the default budget by it."""
        from regdial._io import read_json, write_json

        saved = None if self.run_dir is None else self.run_dir / "timescale.json"
        if saved is not None and saved.is_file():
            scale = TimeScale(**read_json(saved, "the time scale regdial tune measured"))
        else:
            scale = self._probe()
            if saved is not None:
                write_json(saved, scale.to_dict())
        self.time_scale = scale
        self.epochs = self.reference = scale.epochs
        self.space = self._with_patience(self.given_space, scale.patience)
        if not self.budget_given:
            self.budget = Budget.parse(DEFAULT_RUNS * scale.epochs)
        runs = self.budget.amount / scale.epochs if self.budget.unit == "epochs" else None
        minutes = self.budget.amount * scale.seconds_per_epoch / 60 if self.budget.unit == "epochs" else None
        self.say(f"time scale: the practitioner's recipe validated best at epoch {scale.best_epoch} of "
                 f"{scale.probe_epochs} (noise {scale.noise:.3g}, late slope {scale.slope:.3g} per epoch): trials "
                 f"train up to {scale.epochs} epochs, stopping after {scale.patience} without a better score")  # fmt: skip
        if runs is not None and minutes is not None and self.strategy not in ("online", "path"):  # no budget
            self.say(f"budget: about {runs:.0f} runs of ~{scale.epochs} epochs ({self.budget.amount:,.0f} epochs): "
                     f"~{max(1, round(minutes))} minute{'s' * (round(minutes) > 1)} on this machine, after the probe's "
                     f"{scale.probe_epochs}")  # fmt: skip

    def _probe(self) -> TimeScale:
        """Train the practitioner's recipe for the usual length, then on from its checkpoint
        to twice the length while it is still improving at its end, up to eight times it."""
        import tempfile

        objective = self.objective
        assert isinstance(objective, FitObjective)
        cap, length = 8 * self.reference, self.reference
        setting = recipe(self.given_space)
        metric = objective.metric
        self.say(f"probing the time scale: {_described(setting)} for {length} epochs, doubling while it "
                 f"improves at its end (up to {cap})")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="regdial-probe-") as scratch:
            directory = Path(scratch) if self.run_dir is None else self.run_dir / "probe"
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)  # a probe cut short starts over
            history = objective.fit(
                setting, epochs=length, monitor=metric, restore_best=True, run_dir=directory
            )
            while 2 * length <= cap and improving_at_end(history, metric, length):
                length *= 2
                self.say(f"probe: still improving at its end: on to {length} epochs")
                history = objective.fit(setting, epochs=length, monitor=metric, restore_best=True,
                                        run_dir=directory, resume=True)  # fmt: skip
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir / "probe" / "checkpoints", ignore_errors=True)  # its history stays
        return TimeScale.read(history, metric, reference=self.reference, cap=cap)

    def _check_directory(self) -> None:
        """A directory holds one search: never a run's, never two searches' files mixed."""
        directory = self.run_dir
        if directory is None or not directory.exists():
            return
        if not directory.is_dir():
            fail("run_dir", "a directory for the search", Described(f"{shorten(str(directory), 60)}, a file"))
        is_search = (directory / "result.json").exists() or (directory / "study.db").exists()
        if not is_search and any(
            (directory / name).exists() for name in ("history.json", "history.csv", "config.toml")
        ):
            fail("run_dir", "a new directory or a search's (this one holds a training run; a search would "
                 "overwrite its report)", str(directory))  # fmt: skip
        if (directory / "result.json").is_file():
            from regdial._io import read_json

            saved = read_json(directory / "result.json", "a search result written by regdial tune")
            theirs = (
                {key: saved.get(key) for key in ("strategy", "identity", "space")}
                if isinstance(saved, dict)
                else {}
            )
            mine = {"strategy": self.strategy, "identity": _as_saved(self.identity, theirs.get("identity")),
                    "space": self.space.to_dict()}  # fmt: skip
            if theirs != mine:
                differs = next((k for k in mine if theirs.get(k) != mine[k]), "strategy")
                fail("run_dir", "a new directory, or this same search's to resume (a directory never mixes two "
                     f"searches; its result has another {differs})", str(directory))  # fmt: skip
        if (directory / "study.db").is_file() and self.storage_url is None:
            import optuna

            names = optuna.study.get_all_study_names(open_storage(None, directory))
            others = [n for n in names if n != self.study_name]
            if others or (self.strategy in FIXED_COST and names):
                fail("run_dir", "a new directory, or this same search's to resume (a directory never mixes two "
                     f"searches; its study.db holds {', '.join(others or names)})", str(directory))  # fmt: skip

    def check_identity(self, study: optuna.Study) -> None:
        """A study resumed is the same search: the same space, base, metric and length."""
        identity = {**self.identity, "space": self.space.to_dict(), "base": self.space.base.to_dict(),
                    "metric": self.objective.metric, "epochs": self.epochs}  # fmt: skip
        stored = study.user_attrs.get("regdial")
        identity = _as_saved(identity, stored)
        if stored is None:
            study.set_user_attr("regdial", identity)
        elif stored != identity:
            differs = next(k for k in {*identity, *stored} if stored.get(k) != identity.get(k))
            fail("study", f"the same search to resume ({differs} was {shorten(repr(stored.get(differs)), 50)})",
                 Described(f"{differs} {shorten(repr(identity.get(differs)), 50)}"))  # fmt: skip

    # -- what the strategies and the finish share --------------------------------------------

    def _worker_objective(self, index: int) -> dict[str, Any]:
        """The objective as plain data another process rebuilds (on worker ``index``'s device)."""
        if isinstance(self.objective, FitObjective):
            described = self.objective.to_dict()
            if self.devices is not None:
                described["device"] = self.devices[index % len(self.devices)]
            return {"fit": described}
        if isinstance(self.objective, UserObjective):
            return {"user": self.objective.to_dict()}
        fail("workers", "1 for this objective (it cannot be rebuilt in another process)", self.workers)

    def worker_arguments(self, index: int) -> dict[str, Any]:
        """What a spawned worker ``index`` rebuilds its search from (plain data)."""
        return {
            "objective": self._worker_objective(index), "space": self.space.to_dict(), "base": self.space.base.to_dict(),
            "strategy": self.strategy, "budget": {"amount": self.budget.amount, "unit": self.budget.unit},
            "storage": self.storage_url, "run_dir": str(self.run_dir) if self.run_dir else None,
            "study_name": self.study_name, "grid_points": self.grid_points, "epochs": self.epochs, "kind": self.kind,
            "reference": self.reference, "seed": self.seed,  # each trial's sampler seeds itself (dial.seeding)
            "started": self.started,  # CLOCK_MONOTONIC: one clock for every process on this machine
        }  # fmt: skip

    def staging(self, *, fresh: bool) -> Path | None:
        """The directory of the chosen run, renamed to ``run_dir/best`` at the end; emptied
        first when ``fresh``."""
        if self.run_dir is None:
            return None
        staging = self.run_dir / f".best-{os.getpid()}"
        if fresh:
            shutil.rmtree(staging, ignore_errors=True)
        return staging


def _as_saved(identity: dict[str, Any], saved: object) -> dict[str, Any]:
    """``identity`` as a search saved before fingerprints would have it (without one), so
    that such a search still resumes; else as it is."""
    if isinstance(saved, dict) and "fingerprint" not in saved:
        return {k: v for k, v in identity.items() if k != "fingerprint"}
    return identity


def _described(setting: Any) -> str:
    active = setting.active()
    return (
        ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in active.items())
        or "no regularization"
    )
