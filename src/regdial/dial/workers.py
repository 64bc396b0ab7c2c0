"""The workers of a search: each runs trials on the shared study until the budget is spent.

One worker runs in the searching process; ``--workers N`` spawns N processes that rebuild
the objective from plain data (``Search.worker_arguments``) and coordinate through the
study alone (see ``regdial.dial.study``): heartbeats free a dead worker's share, a budget
in trials is exact, and a worker that finds the rest of the budget claimed by running
trials waits in case one of them dies.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regdial._checks import InputError
from regdial.dial.budget import Budget
from regdial.dial.choice import extend_ranges
from regdial.dial.continuation import (
    beyond_edge,
    in_reserve,
    length,
    next_continuation,
    tidy_checkpoints,
    trial_dir,
)
from regdial.dial.objective import FitObjective, Objective, UserObjective
from regdial.dial.seeding import repeats
from regdial.dial.space import Space
from regdial.dial.study import (
    ROLE,
    fail_stale,
    first_heartbeat,
    open_storage,
    pruner,
    sampler,
    search_trials,
    usage,
)
from regdial.dial.trial import Trial, trial_summary
from regdial.setting import Regularization
from regdial.training.history import higher_is_better
from regdial.training.progress import Interrupt

if TYPE_CHECKING:
    import optuna

__all__ = ["OverBudgetError", "Worker", "spawn"]

SAMPLED = ("auto", "tpe", "random")
"""The strategies whose ranges follow the study's extensions between trials."""


class OverBudgetError(Exception):
    """A trial started after the budget was spent by others: it fails without training."""


class RepeatError(Exception):
    """A trial drew a setting an earlier trial has: it is skipped (marked ``role=repeat``,
    so no count or choice sees it) before it trains."""


REPEATS_IN_A_ROW = 25
"""Skipped repeats in a row after which a worker takes the space as exhausted and stops."""


def process_name() -> str:
    """Which process runs a trial (``host:pid``), the ``worker`` column of ``trials.csv``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Worker:
    """One worker on the shared study (a budget in minutes counts from ``started``, a
    ``time.monotonic()`` reading: when the search began). Between trials the space's
    ranges follow the study's extensions (``extend_ranges``)."""

    objective: Objective
    space: Space
    strategy: str
    budget: Budget
    storage: Any
    study_name: str
    seed: int
    grid_points: int
    epochs: int
    kind: str | None
    started: float
    reference: int
    say: Callable[[str], None] | None = None
    run_dir: Path | None = None  # each trial's history goes to run_dir/trials/<number>/
    # While it runs: the space trials sample from (the study's extensions), and its Ctrl-C.
    current: Space = field(init=False)
    interrupt: Interrupt = field(init=False)
    repeated: int = field(init=False)  # trials skipped in a row for drawing a tried setting

    def run(self) -> None:
        """Run trials until the budget is spent, the grid is done, or Ctrl-C."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = optuna.load_study(
            study_name=self.study_name, storage=self.storage, pruner=pruner(self.strategy, self.reference),
            sampler=sampler(self.strategy, self.seed, self.space, self.grid_points),
        )  # fmt: skip
        self.current = self.space
        self.repeated = 0
        self.interrupt = Interrupt("stopping the search before its next trial")
        # Ctrl-C outside a trial's training (fit stops itself at a batch) is deferred to the
        # next safe point: landing inside Optuna's bookkeeping, it could leave a heartbeat
        # thread running that keeps the process alive after the search has said "interrupted".
        with self.interrupt.installed():
            overtime = 0  # trials started after a budget in minutes ran out, none having completed
            while True:
                if self.interrupt.requested:
                    raise KeyboardInterrupt("Ctrl-C between trials")
                fail_stale(study)  # a trial whose worker died stops sending heartbeats: free its share
                used, claimed = usage(study, self.budget, self.started)
                if used >= self.budget.amount:
                    # A budget in minutes that ran out before any trial completed (the path took
                    # it, or its trials were pruned) still ends with a result: up to two more.
                    if self.budget.unit != "minutes" or _completed(study) or overtime >= 2:
                        break
                    overtime += 1
                elif (
                    used + claimed >= self.budget.amount
                ):  # others are spending the rest: wait in case one dies
                    time.sleep(1.0)
                    continue
                if self.strategy == "grid" and len(search_trials(study)) >= len(
                    self.space.grid(self.grid_points)
                ):
                    break
                if self.strategy in SAMPLED:
                    reserve = in_reserve(self.budget, used)
                    before, self.current = self.current, extend_ranges(study, self.space, reserve=reserve)
                    if reserve:
                        self._spend_reserve(study, before, used)
                study.optimize(
                    lambda ot: self._trial(study, ot), n_trials=1, catch=(OverBudgetError, RepeatError),
                    gc_after_trial=False, callbacks=[self._tell],
                )  # fmt: skip
                if self.repeated >= REPEATS_IN_A_ROW:
                    if self.say is not None:
                        self.say(
                            f"stopping: the last {self.repeated} settings drawn had all been tried already"
                        )
                    break
        if self.interrupt.requested:  # Ctrl-C as the last trial ended: the search stops here
            raise KeyboardInterrupt("Ctrl-C after the last trial")

    def _spend_reserve(self, study: optuna.Study, before: Space, used: float) -> None:
        """The reserve's next trial (``regdial.dial.continuation``): a point beyond an edge
        that binds, else the continuation of a trial still improving, else the sampler's."""
        from optuna.trial import TrialState

        if any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
            return  # one already waits
        point = beyond_edge(study, before, self.current)
        if point is not None:
            study.enqueue_trial(point, skip_if_exists=True)
            return
        if self.run_dir is None or not isinstance(self.objective, FitObjective):
            return  # continuing needs regdial's trainer and a directory for the checkpoints
        found = next_continuation(
            study, self.run_dir, self.epochs, self.budget.amount - used, self.budget.unit
        )
        if found is not None:
            parent, to = found
            study.enqueue_trial(
                parent.params,
                user_attrs={"continues": parent.number, "length": to, "planned": to - length(parent)},
            )

    def _run_dir(self, ot: optuna.Trial) -> tuple[Path | None, bool]:
        """Where regdial's trainer keeps trial ``ot``'s run, and whether it resumes the run
        of the trial it continues (moving that one's checkpoints in: they go on here)."""
        if self.run_dir is None or not isinstance(self.objective, FitObjective):
            return None, False
        directory = trial_dir(self.run_dir, ot.number)
        shutil.rmtree(directory, ignore_errors=True)  # a failed try of this number left it
        continues = ot.user_attrs.get("continues")
        if continues is None:
            return directory, False
        source = trial_dir(self.run_dir, int(continues))
        if not (source / "checkpoints" / "last.json").is_file():
            ot.set_user_attr("planned", int(ot.user_attrs.get("length", self.epochs)))  # from the start
            return directory, False
        directory.mkdir(parents=True)
        shutil.copy2(source / "config.toml", directory / "config.toml")
        os.replace(source / "checkpoints", directory / "checkpoints")
        return directory, True

    def _trial(self, study: optuna.Study, ot: optuna.Trial) -> float:
        """One trial: the setting Optuna suggests (or the trial it continues), trained by
        the objective, its score."""
        import optuna
        from optuna.trial import TrialState

        # First: its heartbeat is on record, then the mark that says so (see fail_stale).
        # Optuna's heartbeat thread records its first beat concurrently with this objective;
        # a worker killed before that beat left a trial that no rule could ever fail.
        first_heartbeat(self.storage, study.study_name, ot.number)
        ot.set_user_attr("worker", process_name())
        if self.interrupt.requested:  # inside Optuna's try: the trial is told failed, the search stops
            raise KeyboardInterrupt("Ctrl-C before this trial trained")
        if self.budget.unit == "trials":
            alive = sorted(t.number for t in search_trials(study) if t.state != TrialState.FAIL)
            if ot.number in alive and alive.index(ot.number) >= self.budget.amount:
                raise OverBudgetError("the budget was spent by other workers")
        if "continues" not in ot.user_attrs:
            ot.set_user_attr("planned", self.epochs)
            ot.set_user_attr("length", self.epochs)
        setting = self.current.suggest(ot)
        earlier = None if "continues" in ot.user_attrs else repeats(search_trials(study), ot)
        if earlier is not None:  # no setting is tried twice in one study (a continuation goes on with one)
            ot.set_user_attr(ROLE, "repeat")
            ot.set_user_attr("repeats", earlier)
            self.repeated += 1
            raise RepeatError(f"trial {ot.number} drew the setting of trial {earlier}")
        self.repeated = 0
        metric = self.objective.metric
        run_dir, resume = self._run_dir(ot)
        trial = Trial(
            setting, number=ot.number, metric=metric, epochs=int(ot.user_attrs["length"]), optuna_trial=ot,
            kind=self.kind, run_dir=run_dir, resume=resume, prune="continues" not in ot.user_attrs,
        )  # fmt: skip
        try:
            self.objective(setting, trial)  # a pruned trial raises optuna.TrialPruned: Optuna records it
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as error:  # the user's own code: its type kept, labelled with the trial
            if not isinstance(error, InputError):
                error.add_note(f"regdial: raised in trial {ot.number} of the search, setting {setting!r}")
            raise
        finally:
            for key, value in trial_summary(trial).items():
                ot.set_user_attr(key, value)
            if self.run_dir is not None and trial.history.rows and trial.run_dir is None:
                trial.history.save(trial_dir(self.run_dir, ot.number))  # the diagnosis of any trial reads it
        value, _ = trial.score()
        if not math.isfinite(value):
            reason = trial.history.meta.get("no_score") or (
                f"no finite {metric} reported" if trial.history.rows else "nothing reported to the trial"
            )
            ot.set_user_attr("no_score", reason)
            raise optuna.TrialPruned(f"no finite validation score ({trial.history.meta.get('status')})")
        return value

    def _tell(self, study: optuna.Study, trial: Any) -> None:
        """A line of progress for each finished or pruned trial; checkpoints no longer needed go."""
        from optuna.trial import TrialState

        if self.run_dir is not None and isinstance(self.objective, FitObjective):
            tidy_checkpoints(study, self.run_dir)
        if self.say is None or trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        metric = self.objective.metric
        values = [float(t.value) for t in _completed(study) if t.value is not None]
        best = (max if higher_is_better(metric) else min)(values) if values else math.nan
        value = trial.value if trial.value is not None else trial.user_attrs.get("value", math.nan)
        continued = trial.user_attrs.get("continues")
        how = (
            "" if continued is None else f" continuing trial {continued} to {trial.user_attrs.get('length')}"
        )
        self.say(f"trial {trial.number}: {trial.state.name.lower()} after {trial.user_attrs.get('epochs', 0)} epochs"
                 f"{how}, {metric} {value:.4f} (best {best:.4f})")  # fmt: skip


def _completed(study: optuna.Study) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in search_trials(study) if t.state == TrialState.COMPLETE]


def spawn(arguments: list[dict[str, Any]]) -> list[Any]:
    """Start one worker process for each entry of ``arguments`` (see ``_worker_process``)."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_process, args=(each,)) for each in arguments]
    for process in processes:
        process.start()
    return processes


def _worker_process(arguments: dict[str, Any]) -> None:
    """Entry point of a spawned worker: rebuilds its objective and runs trials."""
    described = arguments["objective"]
    objective: Objective = (
        FitObjective(**described["fit"]) if "fit" in described else UserObjective.from_dict(described["user"])
    )
    space = Space.from_dict(arguments["space"], Regularization.from_dict(arguments["base"]))
    storage = open_storage(arguments["storage"], Path(arguments["run_dir"]) if arguments["run_dir"] else None)
    try:
        Worker(
            objective, space, arguments["strategy"], Budget(**arguments["budget"]), storage, arguments["study_name"],
            arguments["seed"], arguments["grid_points"], arguments["epochs"], arguments["kind"],
            started=arguments["started"], reference=arguments["reference"],
            run_dir=Path(arguments["run_dir"]) if arguments["run_dir"] else None,
        ).run()  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: each stops quietly, the parent says so
        return
