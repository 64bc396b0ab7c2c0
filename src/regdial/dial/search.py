"""The dial: find the right strengths from validation results, cheaply.

A ``Search`` owns an objective (what a trial trains, ``regdial.dial.objective``), a
``Space`` of settings, a ``Budget`` and the Optuna study that records it. Every trial of
regdial's own trainer uses the same seed (the same split and initial weights, so trials
differ only in their setting) and is scored on the validation split: its best epoch's
accuracy for classification, RMSE for regression, with the score's standard error. The
test split is used once, at the end, to score the chosen setting beside the
unregularized baseline.

Strategies:

``auto`` (default)
    A warm-started regularization path over the space's first log-scale knob (as glmnet
    does for linear models), then Optuna's TPE sampler (multivariate) started from what
    the path found, with successive-halving pruning of the worse half of the trials
    half-way through their epochs (not earlier: early epochs rank regularization
    settings backwards, see ``regdial.dial.study.pruner``).
``path``
    The path alone: the knob swept from strong to weak, each point starting from the
    previous point's weights and trained for a quarter of the epochs.
``online``
    One training run in which, every few epochs, a controller reads the diagnosis of the
    recent curves and turns every knob of the space one step (``OnlineController``).
    Its choice is the setting in force at its best epoch.
``tpe``, ``random``, ``grid``
    Optuna's plain TPE, random search and a grid, without pruning: references for
    ``benchmarks/dial.py``.

The choice follows the one-standard-error rule of glmnet and CART: among the finished
trials whose score is within one standard error of the best, the most regularized (the
largest ``Space.strength``). When the best trial's score has no standard error (a user
objective that reports none), it is the best trial.

The budget is counted in epochs (default: results do not depend on machine speed),
trials or minutes (see ``Budget``). Minutes count from the start of the search, the
path included; no new trial starts after them, except that a search with no finished
trial yet runs one (two tries) so it has a result. ``path`` and ``online`` have a fixed
cost and refuse a budget, workers, a storage and grid points.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regdial._checks import Described, check_int, fail, shorten
from regdial.dial.budget import Budget
from regdial.dial.objective import FitObjective, Objective, UserObjective
from regdial.dial.online import OnlineController
from regdial.dial.options import TuneOptions
from regdial.dial.path import regularization_path
from regdial.dial.result import TuneResult
from regdial.dial.space import Space
from regdial.dial.study import (
    fail_stale,
    open_storage,
    path_claim,
    pruner,
    sampler,
    search_trials,
    usage,
)
from regdial.dial.trial import Pruned, Trial, trial_summary
from regdial.knobs import retunable
from regdial.setting import Regularization
from regdial.training.progress import Interrupt

if TYPE_CHECKING:
    import optuna

    from regdial.training.history import History

__all__ = ["STRATEGIES", "Search"]

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "path", "online", "tpe", "random", "grid")
PATH_POINTS = 6


class _OverBudgetError(Exception):
    """A trial started after the budget was spent by others: it fails without training."""


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
    ) -> None:
        self.objective, self.space, self.kind = objective, space, kind
        if not isinstance(space, Space):
            fail("space", "a regdial.Space", space)
        options = TuneOptions.parse(
            {"strategy": strategy, "workers": workers, "storage": storage, "grid_points": grid_points}, "tune"
        )
        self.strategy, self.workers, self.storage_url = options.strategy, options.workers, options.storage
        grid_points = options.grid_points
        self.devices = self._devices(devices)
        self.seed = check_int("seed", seed, low=0, high=2**32 - 1)
        self.epochs = check_int("epochs", epochs, low=1)
        self.reference = (
            self.epochs
            if reference_epochs is None
            else check_int("reference_epochs", reference_epochs, low=1)
        )
        if patience is not None and isinstance(objective, FitObjective) and self.strategy != "online":
            patience = check_int("patience", patience, low=1)
            if not space.base.early_stopping and "early_stopping" not in space.knobs:
                space = Space(space.knobs, space.base.replace(early_stopping=patience))
                self.space = space
        if self.strategy in ("path", "online"):
            given = [name for name, value in (("budget", budget), ("storage", storage), ("grid_points", grid_points))
                     if value is not None] + (["workers"] if self.workers > 1 else [])  # fmt: skip
            if given:
                fail(given[0], f"unset with strategy {self.strategy!r} (its cost is fixed: "
                     f"{'six warm-started points' if self.strategy == 'path' else 'one run of twice the epochs'})",
                     budget if given[0] == "budget" else storage if given[0] == "storage" else
                     grid_points if given[0] == "grid_points" else self.workers)  # fmt: skip
        elif grid_points is not None and self.strategy != "grid":
            fail("grid_points", f"unset with strategy {self.strategy!r} (it applies to 'grid')", grid_points)
        self.grid_points = grid_points or 4
        if self.strategy == "grid":
            space.grid(self.grid_points)  # refuse an oversized grid now
        self.budget = Budget.parse(budget if budget is not None else 12 * (reference_epochs or self.epochs))
        self.run_dir = None if run_dir is None else Path(run_dir)
        if self.workers > 1 and self.run_dir is None and storage is None:
            fail("workers", "1 without a run directory or a storage URL to share", workers)
        if self.workers > 1:
            self._worker_objective()  # refuse an objective other processes cannot rebuild, now
        if self.strategy == "online":
            if not isinstance(objective, FitObjective):
                fail("strategy", "not 'online' for your own training code (the controller turns knobs inside "
                     "regdial's trainer; use auto, tpe, random or grid)", self.strategy)  # fmt: skip
            fixed = [name for name in self.space.knobs if not retunable(name)]
            if fixed:
                fail("space", f"knobs that can turn during training with strategy 'online' (not {', '.join(fixed)}: "
                     "use auto, tpe, random or grid)", Described(", ".join(self.space.knobs)))  # fmt: skip
        self.retrain = bool(retrain)
        self.identity = dict(identity or {})
        self.study_name = study_name or f"regdial-{self.identity.get('task', 'search')}-{self.strategy}"
        self.say = progress or (lambda message: logger.info("%s", message))
        self.verbose = progress is not None
        self.started = time.monotonic()
        self.online_run: History | None = None  # the online strategy's one run: its model is the result

    # -- the whole search ---------------------------------------------------------------

    def run(self) -> TuneResult:
        """Search, choose, retrain and write the result files (see the module docstring)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # regdial reports trials itself
        self.started = time.monotonic()  # a budget in minutes includes the path
        self._check_directory()
        if self.strategy == "online":
            result = self._online()
        elif self.strategy == "path":
            result = self._path_only()
        else:
            result = self._study_search()
        return self._finish(result)

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
            mine = {"strategy": self.strategy, "identity": self.identity, "space": self.space.to_dict()}
            theirs = {key: saved.get(key) for key in mine} if isinstance(saved, dict) else {}
            if theirs != mine:
                differs = next((k for k in mine if theirs.get(k) != mine[k]), "strategy")
                fail("run_dir", "a new directory, or this same search's to resume (a directory never mixes two "
                     f"searches; its result has another {differs})", str(directory))  # fmt: skip
        if (directory / "study.db").is_file() and self.storage_url is None:
            import optuna

            names = optuna.study.get_all_study_names(open_storage(None, directory))
            others = [n for n in names if n != self.study_name]
            if others or (self.strategy in ("path", "online") and names):
                fail("run_dir", "a new directory, or this same search's to resume (a directory never mixes two "
                     f"searches; its study.db holds {', '.join(others or names)})", str(directory))  # fmt: skip

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
            self.objective.device = names[0]
        return names

    def _worker_objective(self, index: int = 0) -> dict[str, Any]:
        if isinstance(self.objective, FitObjective):
            described = self.objective.to_dict()
            if self.devices is not None:
                described["device"] = self.devices[index % len(self.devices)]
            return {"fit": described}
        if isinstance(self.objective, UserObjective):
            return {"user": self.objective.to_dict()}
        fail("workers", "1 for this objective (it cannot be rebuilt in another process)", self.workers)

    # -- path and online ------------------------------------------------------------------

    def _path_only(self) -> TuneResult:
        knob = self.space.path_knob
        self.say(f"regularization path over {knob}")
        rows = regularization_path(self.objective, self.space, points=PATH_POINTS, epochs_per_point=max(2, self.reference // 4),
                                   kind=self.kind, say=self.say if self.verbose else None)  # fmt: skip
        metric = self.objective.metric
        maximize = _maximize(metric)
        best_row = (max if maximize else min)(rows, key=lambda r: _finite(r[metric], maximize))
        return TuneResult(
            "path", metric, _direction(metric), self.space.setting({knob: best_row["value"]}), best_row[metric],
            sum(r["epochs"] for r in rows), path=rows, path_knob=knob,
        )  # fmt: skip

    def _online(self) -> TuneResult:
        assert isinstance(self.objective, FitObjective)
        metric = self.objective.metric
        epochs = 2 * self.epochs
        controller = OnlineController(self.space, every=max(2, epochs // 12))
        self.say(
            f"one run of {epochs} epochs, turning {', '.join(self.space.knobs)} every {controller.every} epochs"
        )
        in_force = dict(controller.values)  # the knobs at the start; the controller then turns them
        # One run is the whole method: its best epoch is the model (as population-based
        # training keeps its trained weights), scored on test once in _retrain, not refit
        # from scratch with the knobs frozen where they stood at that epoch.
        history = self.objective.fit(controller.start(), epochs=epochs, controller=controller, monitor=metric,
                                     restore_best=True, run_dir=self._staging(fresh=True) if self.retrain else None)  # fmt: skip
        self.online_run = history
        summary = history.meta["summary"]
        best = Regularization.from_dict(summary.get("best_setting", controller.start().to_dict()))
        value = float(summary.get("best", summary.get("final", {})).get(metric, math.nan))
        train_metric = metric.replace("val_", "train_", 1)
        turns = {turn["epoch"]: turn for turn in controller.turns}
        curve = []
        for row in history.rows:  # a turn after epoch n applies from epoch n + 1
            epoch = int(row["epoch"])
            curve.append(
                {"epoch": epoch, metric: row.get(metric), train_metric: row.get(train_metric), **in_force}
            )
            if epoch in turns:
                in_force = {name: turns[epoch][name] for name in self.space.knobs}
        trial = {"number": 0, "state": "complete", "value": value, "epochs": len(history),
                 **self.space.values_of(best.to_dict())}  # fmt: skip
        return TuneResult("online", metric, _direction(metric), best, value, len(history), trials=[trial],
                          turns=controller.turns, curve=curve, best_epoch=summary.get("best_epoch"))  # fmt: skip

    # -- the study ------------------------------------------------------------------------

    def _study_search(self) -> TuneResult:
        import optuna

        storage = open_storage(self.storage_url, self.run_dir)
        metric = self.objective.metric
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, direction="maximize" if _maximize(metric) else "minimize",
            load_if_exists=True,
            sampler=sampler(self.strategy, self.seed, self.space, self.grid_points),
            pruner=pruner(self.strategy, self.reference),
        )  # fmt: skip
        self._check_identity(study)
        if self.strategy == "auto":
            self._warm_start(study, storage)
        self.say(f"searching {', '.join(self.space.knobs)} with budget {self.budget} "
                 f"({self.strategy}, {self.workers} worker{'s' * (self.workers > 1)})")  # fmt: skip
        processes: list[Any] = []
        try:
            if self.workers == 1:
                run_worker(self.objective, self.space, self.strategy, self.budget, storage, self.study_name, self.seed,
                           self.grid_points, self.epochs, self.kind, started=self.started,
                           say=self.say if self.verbose else None, reference=self.reference)  # fmt: skip
            else:
                processes = self._spawn()
                for process in processes:
                    process.join()
        except KeyboardInterrupt:
            for process in processes:  # Ctrl-C reached them too: let them stop
                process.join(timeout=60)
            raise
        return self._from_study(study)

    def _check_identity(self, study: optuna.Study) -> None:
        identity = {**self.identity, "space": self.space.to_dict(), "base": self.space.base.to_dict(),
                    "metric": self.objective.metric, "epochs": self.epochs}  # fmt: skip
        stored = study.user_attrs.get("regdial")
        if stored is None:
            study.set_user_attr("regdial", identity)
        elif stored != identity:
            differs = next(k for k in {*identity, *stored} if stored.get(k) != identity.get(k))
            fail("study", f"the same search to resume ({differs} was {shorten(repr(stored.get(differs)), 50)})",
                 Described(f"{differs} {shorten(repr(identity.get(differs)), 50)}"))  # fmt: skip

    def _warm_start(self, study: optuna.Study, storage: Any) -> None:
        """Run the path once (whichever worker claims it) and seed the sampler from it."""
        with path_claim(study, storage, os.getpid()) as mine:
            if not mine:
                return
            knob = self.space.path_knob
            self.say(f"regularization path over {knob} (warm-started)")
            rows = regularization_path(self.objective, self.space, points=PATH_POINTS,
                                       epochs_per_point=max(2, self.reference // 4), kind=self.kind,
                                       say=self.say if self.verbose else None)  # fmt: skip
            metric = self.objective.metric
            maximize = _maximize(metric)
            best = (max if maximize else min)(rows, key=lambda r: _finite(r[metric], maximize))["value"]
            for params in _seeds(self.space, best):
                study.enqueue_trial(params, skip_if_exists=True)
            study.set_user_attr("path_epochs", sum(r["epochs"] for r in rows))
            study.set_user_attr("path", rows)

    def _spawn(self) -> list[Any]:
        arguments = {
            "objective": self._worker_objective(), "space": self.space.to_dict(), "base": self.space.base.to_dict(),
            "strategy": self.strategy, "budget": {"amount": self.budget.amount, "unit": self.budget.unit},
            "storage": self.storage_url, "run_dir": str(self.run_dir) if self.run_dir else None,
            "study_name": self.study_name, "grid_points": self.grid_points, "epochs": self.epochs, "kind": self.kind,
            "reference": self.reference,
            "started": self.started,  # CLOCK_MONOTONIC: one clock for every process on this machine
        }  # fmt: skip
        spawn = multiprocessing.get_context("spawn")
        processes = [
            spawn.Process(target=_worker_process,
                          args=({**arguments, "seed": self.seed + i, "objective": self._worker_objective(i)},))
            for i in range(self.workers)
        ]  # fmt: skip
        for process in processes:
            process.start()
        return processes

    def _from_study(self, study: optuna.Study) -> TuneResult:
        from optuna.trial import TrialState

        trials = search_trials(study)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            fail("budget", "enough to complete at least one trial", Described("no trial completed"))
        metric = self.objective.metric
        space = extended_space(study, self.space)
        chosen, chosen_by = choose(complete, space, _maximize(metric))
        rows = [_trial_row(t, space) for t in trials]
        path = list(study.user_attrs.get("path", []))
        epochs = int(study.user_attrs.get("path_epochs", 0)) + sum(int(r["epochs"] or 0) for r in rows)
        result = TuneResult(
            self.strategy, metric, _direction(metric), space.setting(space.values_of(chosen.params)),
            float(chosen.value if chosen.value is not None else math.nan), epochs,
            best_se=float(chosen.user_attrs.get("se", math.nan)), best_trial=chosen.number, chosen_by=chosen_by,
            trials=rows, path=path, path_knob=self.space.path_knob if path else None,
            importances=_importances(study, complete, space),
        )  # fmt: skip
        result.notes += edge_notes(self.space, space, result.best, complete, _maximize(metric))
        return result

    # -- the end ------------------------------------------------------------------------

    def _finish(self, result: TuneResult) -> TuneResult:
        """Retrain the chosen setting and the baseline once, score them on test, note what
        the numbers can and cannot say, and write the files."""
        result.run_dir, result.space, result.identity = self.run_dir, self.space.to_dict(), self.identity
        result.task = self.identity.get("task")
        if self.retrain:
            if isinstance(self.objective, FitObjective):
                self._retrain(result)
            else:
                self._baseline_trial(result)
        result.notes += notes(result)
        if self.run_dir is not None:
            run_table = model_table = None
            if isinstance(self.objective, FitObjective) and self.objective.dataset is not None:
                run_table, model_table = run_tables(
                    self.objective
                )  # loaders in memory: [regularization] only
            result.write(self.run_dir, run_table, model_table)
        return result

    def _retrain(self, result: TuneResult) -> None:
        """Train the chosen setting and the unregularized baseline again, each in its own run
        directory under ``run_dir/best``, and score both once on the test split. When the
        chosen run was still improving at its last epoch, train it once more for twice as
        long, and keep that if it validates better."""
        objective = self.objective
        assert isinstance(objective, FitObjective)
        data = objective.dataset
        has_test = (data is not None and data.x_test is not None) or (
            data is None and objective.user_loaders()[2] is not None)  # fmt: skip
        if not has_test:
            split = (
                "validation only (no test split was given: pass test= to score on data the search never saw)"
            )
        elif data is not None and getattr(data, "test_carved", False):
            split = "a test split carved from the training data (seeded, stratified; the search never saw it)"
        else:
            split = "the test split"
        staging = self._staging(fresh=self.online_run is None)  # online's run is already there
        if self.online_run is not None:
            self.say(
                f"scoring the online run and training the unregularized baseline, scoring both on {split}"
            )
            tuned = self.online_run
        else:
            self.say(f"training the chosen setting and the unregularized baseline, scoring both on {split}")
            tuned = objective.fit(result.best, run_dir=staging, monitor=objective.metric,
                                  restore_best=True, epochs=self.epochs)  # fmt: skip
            longer = self._train_longer(result, tuned, staging)
            if longer is not None:
                tuned = longer
        base = objective.fit(Regularization.off(), run_dir=None if staging is None else staging / "baseline",
                             epochs=self.reference)  # fmt: skip
        result.retrain = {"tuned": tuned.meta["summary"], "baseline": base.meta["summary"], "test": split}
        if staging is not None and self.run_dir is not None:
            final = self.run_dir / "best"
            shutil.rmtree(final, ignore_errors=True)  # a directory never mixes two searches' runs
            os.replace(staging, final)

    def _staging(self, *, fresh: bool) -> Path | None:
        """The directory of the chosen run, renamed to ``run_dir/best`` at the end; emptied
        first when ``fresh``."""
        if self.run_dir is None:
            return None
        staging = self.run_dir / f".best-{os.getpid()}"
        if fresh:
            shutil.rmtree(staging, ignore_errors=True)
        return staging

    def _train_longer(self, result: TuneResult, tuned: Any, staging: Path | None) -> Any:
        """The training length is part of the dial: a chosen run that ran to the epoch cap
        while still improving (its diagnosis says so, it underfit, or its early stopping was
        armed and never fired) is trained again for twice as long, and kept if it validates
        better."""
        from regdial.diagnosis import diagnose

        summary = tuned.meta["summary"]
        reading = diagnose(tuned, result.best)
        ran_out = summary.get("status") == "completed" and summary.get("epochs_run") == self.epochs
        if not ran_out:
            return None
        # Early stopping is the length dial: armed and never fired means the validation
        # metric was still improving within the patience window when the cap ended training,
        # whatever the train/validation gap says (with the best epoch restored, twice as long
        # can only be kept if it validates better).
        capped = result.best.early_stopping > 0
        state: str
        if reading.state in ("still improving", "underfitting") and reading.direction <= 0:
            state = reading.state
        elif capped:
            state = f"still improving within early stopping's patience ({result.best.early_stopping} epochs)"
        else:
            return None
        assert isinstance(self.objective, FitObjective)
        metric = self.objective.metric
        self.say(f"the chosen setting was {state} at epoch {self.epochs}: training it for {2 * self.epochs}")
        longer = self.objective.fit(result.best, monitor=metric, restore_best=True, epochs=2 * self.epochs,
                                    run_dir=None if staging is None else staging.with_name(staging.name + "-longer"))  # fmt: skip
        before = summary.get("best", summary.get("final", {})).get(metric, math.nan)
        after = (
            longer.meta["summary"].get("best", longer.meta["summary"].get("final", {})).get(metric, math.nan)
        )
        better = after > before if _maximize(metric) else after < before
        if staging is not None:
            spare = staging.with_name(staging.name + "-longer")
            if better:
                shutil.rmtree(staging, ignore_errors=True)
                os.replace(spare, staging)
            else:
                shutil.rmtree(spare, ignore_errors=True)
        result.epochs_spent += len(longer)
        if better:
            result.notes.append(f"the chosen setting was {state} after {self.epochs} epochs; trained for "
                                f"{2 * self.epochs} it validates better ({metric} {after:.4f} vs {before:.4f}): the "
                                "training length, not the regularization, was the limit")  # fmt: skip
            return longer
        result.notes.append(f"the chosen setting was {state} after {self.epochs} epochs, but twice as long "
                            f"did not validate better ({after:.4f} vs {before:.4f}): the model's capacity or the "
                            "learning rate may be the limit")  # fmt: skip
        return None

    def _baseline_trial(self, result: TuneResult) -> None:
        """For the user's own objective: run it once with every technique off."""
        self.say("training the unregularized baseline with your objective")
        trial = Trial(Regularization.off(), number=-1, metric=self.objective.metric, epochs=self.epochs,
                      kind=self.kind, role="baseline")  # fmt: skip
        self.objective(trial.setting, trial)
        row = trial.best_row() or {}
        best_row = next((t for t in result.trials if t["number"] == result.best_trial), {})
        result.retrain = {
            "baseline": {"final": {k: v for k, v in row.items() if k.startswith(("val_", "test_"))}},
            "tuned": {"final": {self.objective.metric: result.best_value,
                                f"{self.objective.metric}_se": best_row.get("se", math.nan)}},
        }  # fmt: skip


# -- one worker ----------------------------------------------------------------------------


def run_worker(
    objective: Objective,
    space: Space,
    strategy: str,
    budget: Budget,
    storage: Any,
    study_name: str,
    seed: int,
    grid_points: int,
    epochs: int,
    kind: str | None,
    *,
    started: float,
    say: Callable[[str], None] | None = None,
    reference: int | None = None,
) -> None:
    """Run trials on the shared study until the budget is spent (a budget in minutes
    counts from ``started``, a ``time.monotonic()`` reading: when the search began).
    Between trials the space's ranges follow the study's extensions (``extend_ranges``)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler(strategy, seed, space, grid_points),
                              pruner=pruner(strategy, reference or epochs))  # fmt: skip
    original = space
    metric = objective.metric

    interrupt = Interrupt("stopping the search before its next trial")

    def optuna_objective(ot: optuna.Trial) -> float:
        ot.set_user_attr("worker", os.getpid())  # first: its heartbeats have started (see fail_stale)
        if interrupt.requested:  # inside Optuna's try: the trial is told failed, the search stops
            raise KeyboardInterrupt("Ctrl-C before this trial trained")
        if budget.unit == "trials":
            alive = sorted(t.number for t in search_trials(study) if t.state != TrialState.FAIL)
            if ot.number in alive and alive.index(ot.number) >= budget.amount:
                raise _OverBudgetError("the budget was spent by other workers")
        ot.set_user_attr("planned", epochs)
        setting = current.suggest(ot)
        trial = Trial(setting, number=ot.number, metric=metric, epochs=epochs, optuna_trial=ot, kind=kind)
        try:
            objective(setting, trial)
        except Pruned as pruned:
            raise optuna.TrialPruned(str(pruned)) from None
        finally:
            for key, value in trial_summary(trial).items():
                ot.set_user_attr(key, value)
        value, _ = trial.score()
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"no finite validation score ({trial.history.meta.get('status')})")
        return value

    def tell(study: optuna.Study, trial: Any) -> None:
        if say is None or trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        complete = [t for t in search_trials(study) if t.state == TrialState.COMPLETE]
        values = [float(t.value) for t in complete if t.value is not None]
        best = (max if _maximize(metric) else min)(values) if values else math.nan
        value = trial.value if trial.value is not None else trial.user_attrs.get("value", math.nan)
        say(f"trial {trial.number}: {trial.state.name.lower()} after {trial.user_attrs.get('epochs', 0)} epochs, "
            f"{metric} {value:.4f} (best {best:.4f})")  # fmt: skip

    current = original
    overtime = 0  # trials started after a budget in minutes ran out, none having completed
    # Ctrl-C outside a trial's training (fit stops itself at a batch) is deferred to the
    # next safe point: landing inside Optuna's bookkeeping, it could leave a heartbeat
    # thread running that keeps the process alive after the search has said "interrupted".
    with interrupt.installed():
        while True:
            if interrupt.requested:
                raise KeyboardInterrupt("Ctrl-C between trials")
            fail_stale(study)  # a trial whose worker died stops sending heartbeats: free its share
            used, claimed = usage(study, budget, started)
            if used >= budget.amount:
                # A budget in minutes that ran out before any trial completed (the path took it,
                # or its trials were pruned) still ends with a result: up to two more trials.
                done = [t for t in search_trials(study) if t.state == TrialState.COMPLETE]
                if budget.unit != "minutes" or done or overtime >= 2:
                    break
                overtime += 1
            elif used + claimed >= budget.amount:  # others are spending the rest: wait in case one dies
                time.sleep(1.0)
                continue
            if strategy == "grid" and len(search_trials(study)) >= len(space.grid(grid_points)):
                break
            if strategy in ("auto", "tpe", "random"):
                current = extend_ranges(study, original)
            study.optimize(
                optuna_objective,
                n_trials=1,
                catch=(_OverBudgetError,),
                gc_after_trial=False,
                callbacks=[tell],
            )
    if interrupt.requested:  # Ctrl-C as the last trial ended: the search stops here
        raise KeyboardInterrupt("Ctrl-C after the last trial")


def _worker_process(arguments: dict[str, Any]) -> None:
    """Entry point of a spawned worker: rebuilds its objective and runs trials."""
    described = arguments["objective"]
    objective: Objective = (
        FitObjective(**described["fit"]) if "fit" in described else UserObjective.from_dict(described["user"])
    )
    space = Space.from_dict(arguments["space"], Regularization.from_dict(arguments["base"]))
    storage = open_storage(arguments["storage"], Path(arguments["run_dir"]) if arguments["run_dir"] else None)
    try:
        run_worker(
            objective, space, arguments["strategy"], Budget(**arguments["budget"]), storage, arguments["study_name"],
            arguments["seed"], arguments["grid_points"], arguments["epochs"], arguments["kind"],
            started=arguments["started"], reference=arguments["reference"],
        )  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: each stops quietly, the parent says so
        return


# -- choosing, and what the numbers say -------------------------------------------------------


def choose(complete: list[Any], space: Space, maximize: bool) -> tuple[Any, str]:
    """The one-standard-error choice among finished trials (see the module docstring)."""
    best = (max if maximize else min)(complete, key=lambda t: t.value)
    se = float(best.user_attrs.get("se", math.nan))
    if not math.isfinite(se) or se <= 0:
        return best, "best validation score"
    within = [t for t in complete if (t.value >= best.value - se if maximize else t.value <= best.value + se)]
    pick = max(within, key=lambda t: (space.strength(space.values_of(t.params)), -t.number))
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


def extend_ranges(study: optuna.Study, space: Space) -> Space:
    """Extend a range whose end binds, and return the space the next trial samples from.

    A knob's range is extended at an end when the best finished trial sits within
    ``EDGE`` of it and the three best trials all lie in that half of the range (the
    evidence that the knob matters, there): a log-scale range by a decade, a linear one by
    half its width, within the knob's hard limits (``Knob.limits``). It waits for
    ``max(6, 2 * knobs)`` finished trials, and for three more after each extension.
    """
    from optuna.trial import TrialState

    from regdial.knobs import KNOBS

    current = extended_space(study, space)
    complete = [t for t in search_trials(study) if t.state == TrialState.COMPLETE and t.value is not None]
    if (
        len(complete) < max(6, 2 * len(space.knobs))
        or len(complete) < int(study.user_attrs.get("extended_at", 0)) + 3
    ):
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
    return said


def run_tables(objective: FitObjective) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``[run]`` and ``[model]`` tables of ``best.toml``, as ``regdial run`` reads them."""
    run: dict[str, Any] = {}
    if objective.task is not None:
        run["task"] = objective.task
    elif objective.data_path is not None:
        run.update({"data": objective.data_path, "kind": objective.kind})
        if objective.target:
            run["target"] = objective.target
    if objective.model is not None:
        run["model"] = objective.model
    run.update({"epochs": objective.full_epochs, "seed": objective.seed, "optimizer": objective.optimizer,
                "device": objective.device, "precision": objective.precision, "deterministic": objective.deterministic,
                "monitor": objective.metric, "restore_best": True})  # the run the search scored  # fmt: skip
    for name in ("lr", "batch_size"):
        if getattr(objective, name) is not None:
            run[name] = getattr(objective, name)
    return run, dict(objective.model_options)


def _seeds(space: Space, path_value: float) -> list[dict[str, Any]]:
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


def _trial_row(t: Any, space: Space) -> dict[str, Any]:
    seconds = (
        (t.datetime_complete - t.datetime_start).total_seconds()
        if t.datetime_complete and t.datetime_start
        else None
    )
    value = t.value if t.value is not None else t.user_attrs.get("value")
    return {"number": t.number, "state": t.state.name.lower(), "value": value, "se": t.user_attrs.get("se"),
            "epochs": t.user_attrs.get("epochs", 0), **space.values_of(t.params), "seconds": seconds,
            "device": t.user_attrs.get("device")}  # fmt: skip


def _importances(study: optuna.Study, complete: list[Any], space: Space) -> dict[str, float]:
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


def _direction(metric: str) -> str:
    return "maximize" if _maximize(metric) else "minimize"


def _maximize(metric: str) -> bool:
    from regdial.training.history import higher_is_better

    return higher_is_better(metric)


def _finite(value: float, maximize: bool) -> float:
    if math.isfinite(value):
        return value
    return -math.inf if maximize else math.inf
