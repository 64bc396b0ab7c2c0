"""The dial: find the right strengths from validation results, cheaply.

``tune(task, space, budget=..., strategy=...)`` searches a ``Space`` of settings; each
trial is one ``Regularization`` trained by ``fit`` with the same seed (the same split and
initial weights, so trials differ only in their setting) and scored on the validation
split: accuracy for classification, RMSE for regression. The test split is used once,
at the end, to score the chosen setting beside the unregularized baseline.

Strategies:

``auto`` (default)
    A warm-started regularization path over the space's first log-scale knob (as glmnet
    does for linear models), then Optuna's TPE sampler (multivariate, for a few knobs)
    started from what the path found, with successive-halving pruning of the worse half
    of the trials half-way through their epochs (not earlier: early epochs rank
    regularization settings backwards, see ``_pruner``).
``path``
    The path alone: the knob swept from strong to weak, each point starting from the
    previous point's weights and trained briefly; the validation curve over the knob at
    a fraction of the cost of independent runs.
``online``
    One training run in which, every few epochs, a controller reads the diagnosis of the
    recent curves and turns every knob of the space one step (multiplicative for
    penalties: x or / max(2, (high/low)^(1/6)), so that six steps cross the range; +- a
    fifth of the range for rates); where the diagnosis holds, a widening gap still
    tightens. Its choice is the setting in force at its best epoch.
``tpe``, ``random``, ``grid``
    Optuna's plain TPE, random search and a grid, without pruning: references for
    ``benchmarks/dial.py``.

The study is Optuna's: SQLite in the run directory by default (running the same command
again resumes it, keeping every finished trial), or any URL Optuna takes
(``postgresql://...``) so that workers on many machines share one study; ``workers=N``
starts N local processes on one storage. Trials send heartbeats: a worker killed
mid-trial loses only that trial, which is marked failed, and the others finish the
budget. Optuna's own tools (``optuna-dashboard``, the ``optuna`` CLI) open the study.

The budget is counted in epochs (default: results do not depend on machine speed),
trials or minutes: ``"600"``, ``"600 epochs"``, ``"20 trials"``, ``"5 minutes"``. Minutes
count from the start of the search, the path included; no new trial starts after them,
except that a search with no finished trial yet runs one (two tries) so it has a result.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from regdial._checks import Described, check_choice, check_int, fail
from regdial._io import write_json, write_text
from regdial.history import History
from regdial.online import OnlineController
from regdial.setting import Regularization
from regdial.space import Space
from regdial.tasks import TASKS, Dataset, load_data, load_task

if TYPE_CHECKING:
    import optuna


__all__ = ["STRATEGIES", "Budget", "TuneResult", "epochs_so_far", "regularization_path", "tune"]

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "path", "online", "tpe", "random", "grid")
Unit = Literal["epochs", "trials", "minutes"]


@dataclass(frozen=True)
class Budget:
    """How much a search may spend: epochs (summed over trials), trials or minutes."""

    amount: float
    unit: Unit = "epochs"

    @classmethod
    def parse(cls, value: object) -> Budget:
        if isinstance(value, Budget):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            fail("budget", "a number of epochs, or text like '20 trials' or '5 minutes'", value)
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(epochs?|e|trials?|t|minutes?|min|m)?\s*", text)
        if match is None:
            fail("budget", "a number of epochs, or text like '600 epochs', '20 trials', '5 minutes'", value)
        amount = float(match.group(1))
        word = (match.group(2) or "epochs")[0]
        unit: Unit = {"e": "epochs", "t": "trials", "m": "minutes"}[word]  # type: ignore[assignment]
        if amount <= 0 or (unit != "minutes" and not amount.is_integer()):
            fail(
                "budget",
                f"a positive whole number of {unit}" if unit != "minutes" else "a positive number of minutes",
                value,
            )
        return cls(amount, unit)

    def __str__(self) -> str:
        amount = int(self.amount) if self.amount.is_integer() else self.amount
        return f"{amount} {self.unit}"


@dataclass
class TuneResult:
    """What a search found; ``run_dir`` holds it as files (result.json, best.toml...)."""

    strategy: str
    metric: str
    direction: str
    best: Regularization
    best_value: float
    epochs_spent: int
    trials: list[dict[str, Any]] = field(default_factory=list)
    path: list[dict[str, Any]] = field(default_factory=list)
    importances: dict[str, float] = field(default_factory=dict)
    retrain: dict[str, Any] = field(default_factory=dict)
    path_knob: str | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)  # online: the run, epoch by epoch
    best_epoch: int | None = None  # online: the epoch whose setting was chosen
    run_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "metric": self.metric,
            "direction": self.direction,
            "best": {"setting": self.best.to_dict(), "value": self.best_value},
            "epochs_spent": self.epochs_spent,
            "trials": _counts(self.trials),
            "importances": self.importances,
            "path_knob": self.path_knob,
            "path": self.path,
            "curve": self.curve,
            "best_epoch": self.best_epoch,
            "retrain": self.retrain,
        }


def epochs_so_far(
    path: list[dict[str, Any]], trials: list[dict[str, Any]]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each trial in order, with the epochs the search had spent when it ended: the path's
    points first, then every trial's own, pruned ones included."""
    spent = sum(int(row.get("epochs", 0)) for row in path)
    for trial in sorted(trials, key=lambda t: t["number"]):
        spent += int(trial.get("epochs") or 0)
        yield spent, trial


def _counts(trials: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial["state"]] = counts.get(trial["state"], 0) + 1
    return counts


# -- what a trial trains --------------------------------------------------------------------


@dataclass
class _Context:
    """Everything a worker needs to train a trial; plain data, so it crosses processes."""

    task: str | None
    data_path: str | None
    target: str | None
    kind: str
    model: str | None
    model_options: dict[str, Any]
    epochs: int | None
    seed: int
    lr: float | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        self._data: Dataset | None = None

    @property
    def data(self) -> Dataset:
        if self._data is None:
            if self.task is not None:
                self._data = load_task(self.task, self.seed)
            else:
                self._data = load_data(
                    str(self.data_path), target=self.target, kind=self.kind, seed=self.seed
                )
        return self._data

    @property
    def task_arg(self) -> str | Dataset:
        return self.task if self.task is not None else self.data

    @property
    def full_epochs(self) -> int:
        from regdial.train import default_epochs

        return self.epochs if self.epochs is not None else default_epochs(self.task)

    @property
    def metric(self) -> tuple[str, Literal["maximize", "minimize"]]:
        """(the validation metric's name, 'maximize' or 'minimize')."""
        if self.data.kind == "classification":
            return "val_accuracy", "maximize"
        return "val_rmse", "minimize"

    def fit(self, setting: Regularization, **kwargs: Any) -> History:
        from regdial.train import fit

        options: dict[str, Any] = {
            "model": self.model, "model_options": self.model_options, "epochs": self.full_epochs,
            "seed": self.seed, "lr": self.lr, "batch_size": self.batch_size, "progress": False,
        }  # fmt: skip
        options.update(kwargs)
        history = fit(self.task_arg, setting, **options)
        if history.meta.get("status") == "interrupted":
            # fit turns Ctrl-C into a clean stop of its run; for a search it means stop the
            # search (the trial in progress is marked failed, the finished ones are kept).
            raise KeyboardInterrupt(history.meta.get("reason", "interrupted"))
        return history

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _final(history: History, metric: str) -> float:
    """The trial's score: the final model's validation metric (NaN if it did not finish)."""
    final = history.meta.get("summary", {}).get("final", {})
    return float(final.get(metric, math.nan))


# -- the path and the online controller --------------------------------------------------


def regularization_path(
    context: _Context,
    space: Space,
    knob: str | None = None,
    *,
    points: int = 6,
    epochs_per_point: int | None = None,
) -> list[dict[str, Any]]:
    """Sweep ``knob`` from strong to weak, each point warm-started from the previous one.

    Returns one row per point: the knob's value, the validation metric, the train metric,
    the share of exact zeros and the epochs it took. The other knobs stay at ``space``'s
    base setting.
    """
    from regdial.models import build_model
    from regdial.train import default_model

    knob = knob or space.path_knob
    if knob not in space.knobs:
        fail("path knob", "a knob of the space (" + ", ".join(space.knobs) + ")", knob)
    points = check_int("points", points, low=2)
    per_point = epochs_per_point or max(2, context.full_epochs // 4)
    metric, _ = context.metric
    data = context.data
    model_name = context.model or default_model(context.task, data)
    net = build_model(model_name, data, context.model_options, seed=context.seed)
    rows = []
    for value in reversed(space.knobs[knob].values(points)):  # strong to weak
        setting = space.setting({knob: value})
        history = context.fit(setting, model=net, epochs=per_point)  # trains `net` in place: the warm start
        last = history.rows[-1]
        rows.append({
            "value": value, metric: _final(history, metric), metric.replace("val_", "train_"): last[metric.replace("val_", "train_")],
            "zero_fraction": last["zero_fraction"], "epochs": len(history),
        })  # fmt: skip
    return rows


# -- the study ---------------------------------------------------------------------------


def _storage(url: str | None, run_dir: Path | None) -> Any:
    import optuna

    if url is None:
        if run_dir is None:
            return optuna.storages.InMemoryStorage()
        run_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{run_dir / 'study.db'}"
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 60}  # several local workers wait for the lock
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=2, grace_period=8)
    except Exception as error:  # any driver error becomes one line
        why = f"{type(error).__name__}: {error}".splitlines()[0]
        if isinstance(error, ImportError) and url.startswith("postgres"):
            why += "; install the driver with: pip install 'regdial[postgres]'"
        raise ValueError(f"storage must be a database Optuna can open, got {url!r} ({why})") from None


def _sampler(strategy: str, seed: int, space: Space, grid_points: int) -> Any:
    import optuna

    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy == "grid":
        values = {name: r.values(grid_points) for name, r in space.knobs.items()}
        return optuna.samplers.GridSampler(values, seed=seed)
    if strategy == "auto":
        # TPE learns from pruned trials (Optuna's GPSampler ignores them and, measured on
        # digits-small, kept proposing the same pruned corner). The path's seeds stand in
        # for most random start-up trials.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=4)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)


def _pruner(strategy: str, epochs: int) -> Any:
    """Successive halving that first judges a trial half-way through its epochs.

    Early epochs rank regularization settings backwards: a regularized model learns more
    slowly at first and ends better. On digits-small, validation accuracy after 6 or 15
    of 60 epochs had a rank correlation of -0.54 and -0.57 with the final accuracy; after
    30 epochs, +0.61. Pruning earlier would keep the weakly regularized trials and stop
    the good ones.
    """
    import optuna

    if strategy == "auto":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, epochs // 2), reduction_factor=2)
    return optuna.pruners.NopPruner()


class _OverBudgetError(Exception):
    """A trial started after the budget was spent by others: it fails without training."""


def _usage(study: optuna.Study, budget: Budget, started: float) -> tuple[float, float]:
    """(used, claimed by running trials) in the budget's unit."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if budget.unit == "minutes":
        return (time.monotonic() - started) / 60, 0.0
    if budget.unit == "trials":
        return float(sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)), float(
            len(running)
        )
    used = int(study.user_attrs.get("path_epochs", 0))
    used += sum(
        int(t.user_attrs.get("epochs", 0))
        for t in trials
        if t.state not in (TrialState.RUNNING, TrialState.WAITING)
    )
    return float(used), float(sum(int(t.user_attrs.get("planned", 0)) for t in running))


def _run_worker(
    context: _Context,
    space: Space,
    strategy: str,
    budget: Budget,
    storage: Any,
    study_name: str,
    seed: int,
    grid_points: int,
    say: Callable[[str], None] | None = None,
    started: float | None = None,
) -> None:
    """Run trials on the shared study until the budget is spent (a budget in minutes
    counts from ``started``, a ``time.monotonic()`` reading: when the search began)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # regdial reports trials itself
    metric, _ = context.metric
    epochs = context.full_epochs
    study = optuna.load_study(
        study_name=study_name, storage=storage, sampler=_sampler(strategy, seed, space, grid_points),
        pruner=_pruner(strategy, epochs),
    )  # fmt: skip
    started = time.monotonic() if started is None else started

    def objective(trial: optuna.Trial) -> float:
        if budget.unit == "trials":
            alive = sorted(t.number for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL)
            if alive.index(trial.number) >= budget.amount:
                raise _OverBudgetError("the budget was spent by other workers")
        trial.set_user_attr("planned", epochs)
        trial.set_user_attr("worker", os.getpid())
        setting = space.suggest(trial)

        def report(row: Mapping[str, float]) -> bool:
            trial.report(row[metric], int(row["epoch"]))
            return row["epoch"] < epochs and trial.should_prune()  # a finished trial is never thrown away

        history = context.fit(setting, on_epoch=report)
        trial.set_user_attr("epochs", len(history))
        trial.set_user_attr("setting", setting.to_dict())
        if history.meta.get("status") == "pruned":
            raise optuna.TrialPruned(f"pruned after epoch {len(history)}")
        value = _final(history, metric)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"no finite validation score ({history.meta.get('status')})")
        return value

    def tell(study: optuna.Study, trial: Any) -> None:
        if say is None or trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = study.best_value if complete else math.nan
        value = trial.value if trial.value is not None else math.nan
        say(
            f"trial {trial.number}: {trial.state.name.lower()} after {trial.user_attrs.get('epochs', 0)} epochs, "
            f"{metric} {value:.4f} (best {best:.4f})"
        )

    overtime = 0  # trials started after a budget in minutes ran out, none having completed
    while True:
        # A trial whose worker died stops sending heartbeats: mark it failed, free its share.
        with warnings.catch_warnings():  # "experimental" in Optuna 5, and exactly what is needed
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        used, claimed = _usage(study, budget, started)
        if used >= budget.amount:
            # A budget in minutes that ran out before any trial completed (the path took it,
            # or its trials were pruned) still ends with a result: up to two more trials.
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if budget.unit != "minutes" or done or overtime >= 2:
                break
            overtime += 1
        elif used + claimed >= budget.amount:  # others are spending the rest: wait in case one dies
            time.sleep(1.0)
            continue
        if strategy == "grid" and len(study.get_trials(deepcopy=False)) >= len(space.grid(grid_points)):
            break
        study.optimize(
            objective, n_trials=1, catch=(_OverBudgetError,), gc_after_trial=False, callbacks=[tell]
        )


def _worker_process(arguments: dict[str, Any]) -> None:
    """Entry point of a spawned worker: rebuilds its context and runs trials."""
    context = _Context(**arguments["context"])
    space = Space.from_dict(arguments["space"], Regularization.from_dict(arguments["base"]))
    storage = _storage(arguments["storage"], Path(arguments["run_dir"]) if arguments["run_dir"] else None)
    try:
        _run_worker(
            context, space, arguments["strategy"], Budget(**arguments["budget"]), storage, arguments["study_name"],
            arguments["seed"], arguments["grid_points"], started=arguments["started"],
        )  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: each stops quietly, the parent says so
        return


# -- tune ------------------------------------------------------------------------------------


def tune(
    task: str | Dataset | Path,
    space: Space | None = None,
    *,
    model: str | None = None,
    model_options: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    budget: object = None,
    strategy: str = "auto",
    storage: str | None = None,
    workers: int = 1,
    seed: int = 0,
    sampler_seed: int | None = None,
    run_dir: str | Path | None = None,
    study_name: str | None = None,
    target: str | None = None,
    kind: str = "auto",
    grid_points: int = 4,
    retrain: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search ``space`` (default: ``Space.default`` for the task) for the best setting.

    Args:
        task: a built-in task's name or a data file's path (``.npz``/``.csv``; ``target``
            and ``kind`` as for ``load_data``).
        budget: epochs, trials or minutes (see the module docstring); default 12 full
            trials' worth of epochs.
        strategy: one of ``STRATEGIES``.
        storage: an Optuna storage URL; default SQLite in ``run_dir`` (in memory without).
        workers: local worker processes on the storage (needs a run_dir or a URL).
        seed: the data split, initial weights and batches, the same for every trial.
        sampler_seed: the search's own randomness (default: ``seed``).
        retrain: train the best setting again (and the unregularized baseline) with a run
            directory each, and score both once on the test split.
    """
    import optuna

    from regdial.train import default_model

    started = time.monotonic()  # a budget in minutes includes the path
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # regdial reports trials itself
    check_choice("strategy", strategy, STRATEGIES)
    workers = check_int("workers", workers, low=1)
    seed = check_int("seed", seed, low=0)
    search_seed = seed if sampler_seed is None else check_int("sampler_seed", sampler_seed, low=0)
    say = progress or (lambda message: logger.info("%s", message))
    if isinstance(task, Dataset):
        fail(
            "task",
            "a built-in task's name or a data file's path (workers reload it)",
            Described("a Dataset object"),
        )
    is_file = isinstance(task, Path) or (isinstance(task, str) and task.endswith((".npz", ".csv")))
    if not is_file:
        check_choice("task", task, TASKS)
    context = _Context(
        task=None if is_file else str(task), data_path=str(task) if is_file else None, target=target, kind=kind,
        model=model, model_options=dict(model_options or {}), epochs=epochs, seed=seed, lr=lr, batch_size=batch_size,
    )  # fmt: skip
    data = context.data
    space = space if space is not None else Space.default(data, model or default_model(context.task, data))
    full = context.full_epochs
    plan = Budget.parse(budget if budget is not None else 12 * full)
    metric, direction = context.metric
    directory = None if run_dir is None else Path(run_dir)
    if workers > 1 and directory is None and storage is None:
        fail("workers", "1 without a run directory or a storage URL to share", workers)
    name = study_name or f"regdial-{data.name}-{strategy}"

    if strategy == "online":
        return _online(context, space, directory, retrain, say)
    if strategy == "path":
        say(f"regularization path over {space.path_knob}")
        rows = regularization_path(context, space)
        best_row = _best_row(rows, metric, direction)
        best = space.setting({space.path_knob: best_row["value"]})
        result = TuneResult(
            "path", metric, direction, best, best_row[metric], sum(r["epochs"] for r in rows), path=rows,
            path_knob=space.path_knob,
        )  # fmt: skip
        return _finish(result, context, space, directory, retrain, say)

    store = _storage(storage, directory)
    study = optuna.create_study(
        study_name=name, storage=store, direction=direction, load_if_exists=True,
        sampler=_sampler(strategy, search_seed, space, grid_points), pruner=_pruner(strategy, full),
    )  # fmt: skip
    identity = {
        "task": data.name,
        "model": model,
        "space": space.to_dict(),
        "metric": metric,
        "epochs": full,
        "seed": seed,
        "base": space.base.to_dict(),
    }
    stored = study.user_attrs.get("regdial")
    if stored is None:
        study.set_user_attr("regdial", identity)
    elif stored != identity:
        differs = next(k for k in identity if stored.get(k) != identity[k])
        fail(
            "study",
            f"the same search to resume ({differs} was {stored.get(differs)!r})",
            Described(f"{differs} {identity[differs]!r}"),
        )
    if storage is None and directory is not None:
        _fail_leftover_trials(study)  # a crashed run's trials: nobody else uses this file

    if strategy == "auto" and "path" not in study.user_attrs:
        say(f"regularization path over {space.path_knob} (warm-started)")
        rows = regularization_path(context, space)
        study.set_user_attr("path", rows)
        study.set_user_attr("path_epochs", sum(r["epochs"] for r in rows))
        for params in _seeds(space, _best_row(rows, metric, direction)["value"]):
            study.enqueue_trial(params, skip_if_exists=True)

    say(
        f"searching {', '.join(space.knobs)} with budget {plan} ({strategy}, {workers} worker{'s' * (workers > 1)})"
    )
    processes: list[Any] = []
    try:
        if workers == 1:
            _run_worker(
                context, space, strategy, plan, store, name, search_seed, grid_points,
                say=say if progress else None, started=started,
            )  # fmt: skip
        else:
            arguments = {
                "context": context.to_dict(), "space": space.to_dict(), "base": space.base.to_dict(), "strategy": strategy,
                "budget": {"amount": plan.amount, "unit": plan.unit}, "storage": storage,
                "run_dir": str(directory) if directory else None, "study_name": name, "grid_points": grid_points,
                "started": started,  # CLOCK_MONOTONIC: one clock for every process on this machine
            }  # fmt: skip
            spawn = multiprocessing.get_context("spawn")
            processes += [
                spawn.Process(target=_worker_process, args=({**arguments, "seed": search_seed + i},))
                for i in range(workers)
            ]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
    except KeyboardInterrupt:
        for process in processes:  # Ctrl-C reached them too: let them stop
            process.join(timeout=60)
        if storage is None and directory is not None:
            _fail_leftover_trials(study)  # the trials in progress, wherever Ctrl-C caught them
        raise
    return _from_study(study, context, space, strategy, directory, retrain, say)


def _best_row(rows: list[dict[str, Any]], metric: str, direction: str) -> dict[str, Any]:
    """The path point with the best validation metric."""
    return (max if direction == "maximize" else min)(rows, key=lambda r: r[metric])


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


def _fail_leftover_trials(study: optuna.Study) -> None:
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        logger.info("trial %d was left running by an interrupted search: marked failed", trial.number)


def _trial_rows(study: optuna.Study, space: Space) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({
            "number": t.number, "state": t.state.name.lower(), "value": t.value, "epochs": t.user_attrs.get("epochs", 0),
            **space.values_of(t.params),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None,
        })  # fmt: skip
    return rows


def _from_study(
    study: optuna.Study,
    context: _Context,
    space: Space,
    strategy: str,
    directory: Path | None,
    retrain: bool,
    say: Callable[[str], None],
) -> TuneResult:
    import optuna
    from optuna.trial import TrialState

    metric, direction = context.metric
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        fail("budget", "enough to complete at least one trial", Described("no trial completed"))
    best_trial = study.best_trial
    best = space.setting(space.values_of(best_trial.params))
    importances: dict[str, float] = {}
    if len(completed) >= 3 and len(space.knobs) > 1:
        try:
            with warnings.catch_warnings(record=True) as caught:  # few trials: Optuna warns, we log
                warnings.simplefilter("always")
                importances = dict(optuna.importance.get_param_importances(study))
            for warning in caught:
                logger.info("knob importances: %s", warning.message)
        except (RuntimeError, ValueError) as error:  # too few distinct trials
            logger.info("knob importances unavailable: %s", error)
    trials = _trial_rows(study, space)
    epochs = int(study.user_attrs.get("path_epochs", 0)) + sum(int(t["epochs"] or 0) for t in trials)
    result = TuneResult(
        strategy, metric, direction, best, float(best_trial.value or math.nan), epochs, trials=trials,
        path=list(study.user_attrs.get("path", [])), importances=importances,
        path_knob=space.path_knob if "path" in study.user_attrs else None,
    )  # fmt: skip
    return _finish(result, context, space, directory, retrain, say)


def _online(
    context: _Context, space: Space, directory: Path | None, retrain: bool, say: Callable[[str], None]
) -> TuneResult:
    metric, direction = context.metric
    epochs = 2 * context.full_epochs
    controller = OnlineController(space, every=max(2, epochs // 12))
    say(f"one run of {epochs} epochs, turning {', '.join(space.knobs)} every {controller.every} epochs")
    in_force = dict(controller.values)  # the knobs at the start; the controller then turns them
    history = context.fit(controller.start(), epochs=epochs, controller=controller)
    summary = history.meta["summary"]
    best = Regularization.from_dict(summary.get("best_setting", controller.start().to_dict()))
    value = float(summary.get("best", summary["final"]).get(metric, math.nan))
    train_metric = metric.replace("val_", "train_")
    turns = {turn["epoch"]: turn for turn in controller.turns}
    curve = []
    for row in history.rows:  # a turn after epoch n applies from epoch n + 1
        epoch = int(row["epoch"])
        curve.append({"epoch": epoch, metric: row[metric], train_metric: row[train_metric], **in_force})
        if epoch in turns:
            in_force = {name: turns[epoch][name] for name in space.knobs}
    result = TuneResult(
        "online", metric, direction, best, value, len(history),
        trials=[{"number": 0, "state": "complete", "value": value, "epochs": len(history), **space.values_of(best.to_dict())}],
        path=controller.turns, curve=curve, best_epoch=summary.get("best_epoch"),
    )  # fmt: skip
    return _finish(result, context, space, directory, retrain, say)


def _finish(
    result: TuneResult,
    context: _Context,
    space: Space,
    directory: Path | None,
    retrain: bool,
    say: Callable[[str], None],
) -> TuneResult:
    """Retrain the best setting and the baseline once, score them on test, write the files."""
    result.run_dir = directory
    if retrain:
        say("training the chosen setting and the unregularized baseline, scoring both on the test split")
        best_dir = None if directory is None else directory / "best"
        tuned = context.fit(result.best, run_dir=best_dir)
        base = context.fit(Regularization.off(), run_dir=None if best_dir is None else best_dir / "baseline")
        result.retrain = {"tuned": tuned.meta["summary"], "baseline": base.meta["summary"]}
        if best_dir is not None:
            from regdial.report import report

            report(best_dir)  # the tuned run's own report, beside its baseline
    if directory is not None:
        _write(result, context, space, directory)
    return result


def _write(result: TuneResult, context: _Context, space: Space, directory: Path) -> None:
    import tomli_w

    directory.mkdir(parents=True, exist_ok=True)
    write_json(
        directory / "result.json", {"task": context.data.name, "space": space.to_dict(), **result.to_dict()}
    )
    run: dict[str, Any] = {"seed": context.seed, "epochs": context.full_epochs}
    if context.task is not None:
        run["task"] = context.task
    else:
        run.update(
            {"data": context.data_path, "kind": context.kind}
            | ({"target": context.target} if context.target else {})
        )
    if context.model is not None:
        run["model"] = context.model
    for name in ("lr", "batch_size"):
        if getattr(context, name) is not None:
            run[name] = getattr(context, name)
    document: dict[str, Any] = {"run": run}
    if context.model_options:
        document["model"] = context.model_options
    document["regularization"] = result.best.to_dict(changed_only=True)
    write_text(
        directory / "best.toml",
        "# the best setting found by regdial tune; run it with: regdial run best.toml\n"
        + tomli_w.dumps(document),
    )
    out = io.StringIO()
    names = ["number", "state", "value", "epochs", *space.knobs, "seconds"]
    writer = csv.DictWriter(out, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result.trials:
        writer.writerow(row)
    write_text(directory / "trials.csv", out.getvalue())
    from regdial.report import tune_report

    tune_report(directory)
