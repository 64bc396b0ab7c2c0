"""The strategies: how a search spends its budget, each a function of the ``Search``.

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
    One training run in which the knobs that enter training differentiably (weight decay,
    L1, L2, elastic net, label smoothing, input noise) follow their validation
    hypergradient every few steps (``HypergradientController``) and, every few epochs, a
    controller reads the diagnosis of the recent curves and turns one of the others
    (``OnlineController``). Its choice is the setting in force at its best epoch; its
    model is that run.
``tpe``, ``random``, ``grid``
    Optuna's plain TPE, random search and a grid, without pruning: references for
    ``benchmarks/dial.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from regdial._checks import Described, fail
from regdial.dial.choice import (
    best_row,
    choose,
    direction,
    edge_notes,
    extended_space,
    flat_notes,
    importances,
    seeds,
    trial_row,
)
from regdial.dial.hypergradient import DIFFERENTIABLE, HypergradientController, recipe_start
from regdial.dial.objective import FitObjective
from regdial.dial.online import OnlineController
from regdial.dial.path import regularization_path
from regdial.dial.result import TuneResult
from regdial.dial.space import Space
from regdial.dial.study import open_storage, path_claim, pruner, sampler, search_trials
from regdial.dial.timescale import recipe_params
from regdial.dial.workers import Worker, spawn
from regdial.setting import Regularization
from regdial.training.history import higher_is_better

if TYPE_CHECKING:
    import optuna

    from regdial.dial.search import Search

__all__ = ["PATH_POINTS", "search_online", "search_path", "search_study"]

PATH_POINTS = 6


def _path_rows(search: Search, warm_only: bool = False) -> list[dict[str, Any]]:
    return regularization_path(
        search.objective, search.space, points=PATH_POINTS, epochs_per_point=max(2, search.reference // 4),
        kind=search.kind, say=search.say if search.verbose else None, warm_only=warm_only,
    )  # fmt: skip


def search_path(search: Search) -> TuneResult:
    """``path``: the warm-started path alone; its best point is the choice."""
    knob = search.space.path_knob
    search.say(f"regularization path over {knob}")
    rows = _path_rows(search)
    metric = search.objective.metric
    best = best_row(rows, metric)
    return TuneResult(
        "path", metric, direction(metric), search.space.setting({knob: best["value"]}), best[metric],
        sum(r["epochs"] for r in rows), path=rows, path_knob=knob,
    )  # fmt: skip


def search_online(search: Search) -> TuneResult:
    """``online``: one run of the trial length, the controllers turning the knobs.

    The knobs that enter training differentiably (``DIFFERENTIABLE``) follow their
    hypergradient every ``HypergradientController.every`` steps; the others are turned from
    the curves every twelfth of the run (``OnlineController``). A space of only the latter
    gets the curve controller alone."""
    objective = search.objective
    assert isinstance(objective, FitObjective)  # Search refuses online for the user's own code
    metric = objective.metric
    epochs = search.epochs
    every = max(2, epochs // 12)
    controller: OnlineController | HypergradientController
    if any(name in DIFFERENTIABLE for name in search.space.knobs):
        # The knobs practitioners set start where they set them (RECIPE), the rest mid-range.
        recipe_values = recipe_start(search.space)
        controller = HypergradientController(
            search.space,
            every=None,
            epochs_every=every,
            start=recipe_values,
            # The curves' knobs wait a quarter of the run too, as the hypergradient does: early
            # curves read as underfitting, and loosening on them is the short horizon's trap
            # (motifs: dropout 0.1 -> 0 and augmentation 0.5 -> 0.3 by epoch 21 of 85).
            epochs_first=max(1, epochs // 4),
        )
        hyper = ", ".join(controller.ranges)
        curves = (
            f"; {', '.join(controller.curves.space.knobs)} every {every} epochs from epoch {controller.curves.first}"
            if controller.curves
            else ""
        )
        search.say(f"one run of {epochs} epochs, turning {hyper} by their hypergradient every "
                   f"{controller.every} steps{curves}")  # fmt: skip
    else:
        controller = OnlineController(search.space, every=every)
        search.say(
            f"one run of {epochs} epochs, turning {', '.join(search.space.knobs)} every {every} epochs"
        )
    start = controller.start()
    # One run is the whole method: its best epoch is the model (as population-based
    # training keeps its trained weights), scored on test once when the search finishes,
    # not refit from scratch with the knobs frozen where they stood at that epoch.
    history = objective.fit(start, epochs=epochs, controller=controller, monitor=metric,
                            restore_best=True, run_dir=search.staging(fresh=True) if search.retrain else None)  # fmt: skip
    search.online_run = history
    summary = history.meta["summary"]
    best = Regularization.from_dict(summary.get("best_setting", start.to_dict()))
    value = float(summary.get("best", summary.get("final", {})).get(metric, math.nan))
    train_metric = metric.replace("val_", "train_", 1)
    curve = [{"epoch": int(row["epoch"]), metric: row.get(metric), train_metric: row.get(train_metric),
              **in_force} for row, in_force in zip(history.rows, _in_force(search.space, start, controller),
                                                    strict=False)]  # fmt: skip
    trial = {"number": 0, "state": "complete", "value": value, "epochs": len(history),
             **search.space.values_of(best.to_dict())}  # fmt: skip
    moved = bool(getattr(controller, "moves", None)) or bool(controller.turns)
    result = TuneResult("online", metric, direction(metric), best, value, len(history), trials=[trial],
                        turns=controller.turns, curve=curve, best_epoch=summary.get("best_epoch"),
                        chosen_by="the online run at its best epoch" + ("" if moved else
                                  "; no knob moved: this is the run's start, the recipe"))  # fmt: skip
    if isinstance(controller, HypergradientController):
        result.moves = controller.moves
        cost = controller.cost(history)
        if math.isfinite(cost):
            result.notes.append(
                f"online: {controller.updates} hypergradient steps (a validation forward/backward and "
                f"{controller.solve_steps + 1} Hessian-vector products each) cost {cost:.0%} of the training steps"
            )
    return result


def _in_force(
    space: Space, start: Regularization, controller: OnlineController | HypergradientController
) -> Iterator[dict[str, float]]:
    """The knobs in force at the end of each epoch, from the first (a turn after epoch n
    applies from epoch n + 1; a hypergradient move, from the step after it)."""
    values = {name: float(getattr(start, name)) for name in space.knobs}
    if isinstance(controller, HypergradientController):
        moves = sorted(controller.moves, key=lambda m: (m["epoch"], m["step"]))
        epoch, index = 1, 0
        while True:
            while index < len(moves) and moves[index]["epoch"] <= epoch:
                values[moves[index]["knob"]] = float(moves[index]["value"])
                index += 1
            yield dict(values)
            epoch += 1
    turns = {turn["epoch"]: turn for turn in controller.turns}
    epoch = 1
    while True:
        yield dict(values)
        if epoch in turns:
            values = {name: turns[epoch][name] for name in space.knobs}
        epoch += 1


def search_study(search: Search) -> TuneResult:
    """``auto``, ``tpe``, ``random``, ``grid``: trials on an Optuna study, by one or many workers."""
    import optuna

    storage = open_storage(search.storage_url, search.run_dir)
    metric = search.objective.metric
    study = optuna.create_study(
        study_name=search.study_name, storage=storage, load_if_exists=True,
        direction=direction(metric), sampler=sampler(search.strategy, search.seed, search.space, search.grid_points),
        pruner=pruner(search.strategy, search.reference),
    )  # fmt: skip
    search.check_identity(study)
    if search.time_scale is not None and search.strategy != "grid":  # the probe's recipe: the first trial
        study.enqueue_trial(recipe_params(search.space), skip_if_exists=True)
    if search.strategy == "auto":
        _warm_start(search, study, storage)
    search.say(f"searching {', '.join(search.space.knobs)} with budget {search.budget} "
               f"({search.strategy}, {search.workers} worker{'s' * (search.workers > 1)})")  # fmt: skip
    processes: list[Any] = []
    try:
        if search.workers == 1:
            Worker(
                search.objective, search.space, search.strategy, search.budget, storage, search.study_name,
                search.seed, search.grid_points, search.epochs, search.kind, started=search.started,
                reference=search.reference, say=search.say if search.verbose else None, run_dir=search.run_dir,
            ).run()  # fmt: skip
        else:
            processes = spawn([search.worker_arguments(i) for i in range(search.workers)])
            for process in processes:
                process.join()
    except KeyboardInterrupt:
        for process in processes:  # Ctrl-C reached them too: let them stop
            process.join(timeout=60)
        raise
    return _from_study(search, study)


def _warm_start(search: Search, study: optuna.Study, storage: Any) -> None:
    """Run the path once (whichever worker claims it) and seed the sampler from it."""
    with path_claim(study, storage, os.getpid()) as mine:
        if not mine:
            return
        knob = search.space.path_knob
        if isinstance(search.objective, FitObjective):
            search.say(f"regularization path over {knob} (warm-started)")
            rows = _path_rows(search)
        else:  # the user's code warm-starts only if it saves its weights: its first point tells
            search.say(
                f"regularization path over {knob}, warm-started if the objective calls trial.save_weights"
            )
            rows = _path_rows(search, warm_only=True)
            if len(rows) < PATH_POINTS:
                search.say("no warm-started path: the objective saved no weights (trial.save_weights); "
                           "TPE from the start")  # fmt: skip
                study.set_user_attr("path_epochs", sum(r["epochs"] for r in rows))
                return
        for params in seeds(search.space, best_row(rows, search.objective.metric)["value"]):
            study.enqueue_trial(params, skip_if_exists=True)
        study.set_user_attr("path_epochs", sum(r["epochs"] for r in rows))
        study.set_user_attr("path", rows)


def _from_study(search: Search, study: optuna.Study) -> TuneResult:
    """The result of a study: the one-standard-error choice among its finished trials."""
    from optuna.trial import TrialState

    trials = search_trials(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        reasons = [(t.number, t.user_attrs["no_score"]) for t in trials if t.user_attrs.get("no_score")]
        if reasons and len(reasons) == len(trials):
            number, reason = reasons[0]
            fail("the objective's score", f"a finite {search.objective.metric} in at least one trial (return it, or "
                 "report it with trial.report)", Described(f"none in {len(trials)} trial"
                 f"{'s' * (len(trials) > 1)} (trial {number}: {reason})"))  # fmt: skip
        fail("budget", "enough to complete at least one trial", Described("no trial completed"))
    metric = search.objective.metric
    maximize = higher_is_better(metric)
    space = extended_space(study, search.space)
    chosen, chosen_by = choose(complete, space, maximize)
    rows = [trial_row(t, space) for t in trials]
    path = list(study.user_attrs.get("path", []))
    epochs = int(study.user_attrs.get("path_epochs", 0)) + sum(int(r["epochs"] or 0) for r in rows)
    result = TuneResult(
        search.strategy, metric, direction(metric), space.setting(space.values_of(chosen.params)),
        float(chosen.value if chosen.value is not None else math.nan), epochs,
        best_se=float(chosen.user_attrs.get("se", math.nan)), best_trial=chosen.number, chosen_by=chosen_by,
        trials=rows, path=path, path_knob=search.space.path_knob if path else None,
        importances=importances(study, complete, space),
    )  # fmt: skip
    result.notes += edge_notes(search.space, space, result.best, complete, maximize)
    result.notes += flat_notes(complete, metric)
    return result
