"""The Optuna study behind a search: storage, sampler, pruner, budget and many workers.

The study is Optuna's own: SQLite in the run directory by default (embedded; running the
same search again resumes it), or any URL Optuna takes (``postgresql://...``) so that
workers on many machines share one study. Optuna's tools (``optuna-dashboard``, the
``optuna`` CLI) open it.

Workers on one study coordinate through the database only:

- Trials send heartbeats. A trial whose worker died stops sending them, and after the
  grace period any worker marks it failed (``optuna.storages.fail_stale_trials``); a
  live trial is never touched, so a second ``regdial tune`` on the same directory simply
  joins as one more worker.
- A budget in trials is exact: trial numbers are assigned atomically by the database,
  and a trial whose rank among the non-failed ones is past the budget fails at once,
  without training.
- The warm-started path runs once: a worker claims it by creating a ``role=path`` trial
  (created with its attribute in one atomic write, through the storage's public
  ``create_new_trial``); the lowest-numbered live claim wins and the others wait for it.
  The claim ends failed (it is a lock, not a result, and must not reach the sampler);
  the path's rows are a study attribute.

Nothing here writes through Optuna's private API: ``study.tell`` and the storage's
documented methods (``create_new_trial``, ``set_trial_user_attr``,
``set_trial_state_values``, ``record_heartbeat``) do it all.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from regdial._checks import InputError, fail, shorten
from regdial.dial.budget import Budget
from regdial.dial.space import Space

if TYPE_CHECKING:
    import optuna

__all__ = [
    "HEARTBEAT",
    "ROLE",
    "fail_stale",
    "open_storage",
    "path_claim",
    "pruner",
    "sampler",
    "search_trials",
    "usage",
]

logger = logging.getLogger(__name__)


def _heartbeat_setting() -> tuple[int, int]:
    """``REGDIAL_HEARTBEAT="2,8"``: seconds between a trial's heartbeats, and seconds of
    silence after which a trial is stale (its worker died). A longer grace period suits
    machines that pause for long (swapping, suspended VMs); it delays taking over a dead
    worker's share of the budget by as much."""
    import os

    text = os.environ.get("REGDIAL_HEARTBEAT", "2,8")
    try:
        interval, grace = (int(part) for part in text.split(","))
    except ValueError:
        fail("REGDIAL_HEARTBEAT", "two whole numbers of seconds, like '2,8'", text)
    if not 1 <= interval < grace <= 3600:
        fail("REGDIAL_HEARTBEAT", "an interval of at least 1 s below a grace period of at most 3600 s", text)
    return interval, grace


HEARTBEAT = _heartbeat_setting()
"""(seconds between a trial's heartbeats, seconds of silence after which it is stale)."""
ROLE = "role"
"""The user attribute that marks a study's bookkeeping trials (the path's claim)."""


def open_storage(url: str | None, run_dir: Path | None) -> Any:
    """An Optuna storage: ``url``, else SQLite in ``run_dir``, else in memory. Any driver
    error is one line (a missing PostgreSQL driver says how to install it)."""
    import optuna

    if url is None:
        if run_dir is None:
            return optuna.storages.InMemoryStorage()
        run_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{run_dir / 'study.db'}"
    if not isinstance(url, str) or not url.strip():
        fail("storage", "an Optuna storage URL (sqlite:///path/study.db, postgresql://...)", url)
    if url.startswith("sqlite") and (
        url.rstrip("/") in ("sqlite:", "sqlite:/", "sqlite://") or ":memory:" in url or "mode=memory" in url
    ):
        fail("storage", "a database file or server that workers share (sqlite:///path/study.db, postgresql://...); "
             "an in-memory SQLite database is private to one connection", url)  # fmt: skip
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 60}  # several local workers wait for the lock
    # Two commands started at once on one new database both create its tables: the
    # loser's UNIQUE or "already exists" error clears once the winner is done. Retry those.
    for attempt in range(4):
        try:
            return _rdb_storage(url, engine)
        except Exception as error:  # any driver or URL error becomes one line
            said = f"{type(error).__name__}: {error}"
            if attempt < 3 and any(
                w in said for w in ("IntegrityError", "already exists", "UniqueViolation")
            ):
                time.sleep(0.25 * (attempt + 1))
                continue
            _storage_error(url, error)
    raise AssertionError("unreachable")


def _rdb_storage(url: str, engine: dict[str, Any]) -> Any:
    import optuna

    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT[0], grace_period=HEARTBEAT[1]
        )


def _storage_error(url: str, error: Exception) -> NoReturn:
    """A driver or URL error as one line (a missing PostgreSQL driver says how to install it)."""
    why = shorten(f"{type(error).__name__}: {error}".splitlines()[0], 120)
    if isinstance(error, ImportError) and url.startswith("postgres"):
        why += "; install the driver with: pip install 'regdial[postgres]'"
    raise InputError(
        f"storage must be a database Optuna can open, got {shorten(repr(url), 60)} ({why})"
    ) from None


def sampler(strategy: str, seed: int, space: Space, grid_points: int) -> Any:
    """The sampler of a strategy (see ``regdial.dial.search``), seeded per trial.

    Each trial's sampler is seeded from the study's seed and the trial's number (which the
    database hands out once per study), not from a seed per process: a resumed search, a
    second terminal, ``--workers`` and PostgreSQL workers on other machines then never
    draw the same sequence twice, and a search run again from scratch with its seed
    draws what it drew before."""
    from regdial.dial.seeding import PerTrialSeed

    if strategy == "grid":
        # Optuna's GridSampler shuffles its grid with its seed and names a point by its index
        # in that order: a sampler seeded per trial named a different point by each index, so
        # trials repeated points and never reached others (measured: 26 of 27 points, 72 of
        # 81). One seed for all; the grid itself passes over the points that are taken.
        return PerTrialSeed(lambda _: _make_sampler(strategy, seed, space, grid_points), seed)
    return PerTrialSeed(lambda trial_seed: _make_sampler(strategy, trial_seed, space, grid_points), seed)


def _make_sampler(strategy: str, seed: int, space: Space, grid_points: int) -> Any:
    import optuna

    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy == "grid":
        values = {name: r.values(grid_points) for name, r in space.knobs.items()}
        return optuna.samplers.GridSampler(values, seed=seed)
    # TPE learns from pruned trials (Optuna's GPSampler ignores them and, measured on
    # digits-small, kept proposing the same pruned corner). In auto, the path's seeds
    # stand in for most of the random start-up trials.
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=4 if strategy == "auto" else 5
    )


def pruner(strategy: str, epochs: int) -> Any:
    """Successive halving that first judges a trial half-way through its epochs (auto only).

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


def search_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials that tried a setting (not its bookkeeping claims)."""
    return [t for t in study.get_trials(deepcopy=False) if ROLE not in t.user_attrs]


def fail_stale(study: optuna.Study) -> None:
    """Mark failed the trials whose worker died: those whose heartbeats stopped (Optuna's
    rule), and those that never got as far as their first heartbeat and have been running
    for twice the grace period. A worker killed between creating a trial and starting its
    heartbeats leaves such a trial; Optuna passes over it (it has no heartbeat to be stale),
    and it would hold its share of the budget forever.

    A trial's ``worker`` attribute marks that its heartbeat is on record: a search trial
    records one itself and then sets it, first thing in its objective (``first_heartbeat``:
    Optuna's heartbeat thread beats concurrently, and may not have yet), and the path's
    claim sets it once its own heartbeat is recorded."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():  # "experimental" in Optuna 5, and exactly what is needed
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=2 * HEARTBEAT[1])  # Optuna's clock
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if (
            "worker" not in trial.user_attrs
            and trial.datetime_start is not None
            and trial.datetime_start < cutoff
        ):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)  # it may just have ended


def first_heartbeat(storage: Any, study_name: str, number: int) -> None:
    """Record trial ``number``'s heartbeat now (where the storage keeps heartbeats), so
    that once its ``worker`` mark is set, the trial is on Optuna's heartbeat record: if its
    worker dies, ``fail_stale`` fails it after the grace period."""
    record = getattr(storage, "record_heartbeat", None)
    if callable(record) and getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        study_id = storage.get_study_id_from_name(study_name)
        record(storage.get_trial_id_from_study_id_trial_number(study_id, number))


def usage(study: optuna.Study, budget: Budget, started: float) -> tuple[float, float]:
    """(spent, claimed by running trials) in the budget's unit."""
    from optuna.trial import TrialState

    trials = search_trials(study)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if budget.unit == "minutes":
        return (time.monotonic() - started) / 60, 0.0
    if budget.unit == "trials":
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        return float(done), float(len(running))
    used = int(study.user_attrs.get("path_epochs", 0))
    used += sum(
        int(t.user_attrs.get("epochs", 0))
        for t in trials
        if t.state not in (TrialState.RUNNING, TrialState.WAITING)
    )
    return float(used), float(sum(int(t.user_attrs.get("planned", 0)) for t in running))


@contextmanager
def _heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Send ``trial_id``'s heartbeats while the block runs (what ``study.optimize`` does for its trials)."""
    record = getattr(storage, "record_heartbeat", None)
    if not callable(record):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT[0]):
            try:
                record(trial_id)
            except Exception:  # a missed beat is harmless; the next one retries
                logger.debug("heartbeat of trial %d failed", trial_id, exc_info=True)

    record(trial_id)
    thread = threading.Thread(target=beat, daemon=True, name=f"regdial-heartbeat-{trial_id}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def path_claim(study: optuna.Study, storage: Any, worker: int) -> Iterator[bool]:
    """Claim the path: yields True to the one worker that runs it, False to the others
    once it is done (they wait while its owner is alive; a dead owner's claim goes stale
    and the next worker takes over)."""
    import optuna
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    while "path" not in study.user_attrs:
        fail_stale(study)
        template = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={ROLE: "path"})
        trial_id = storage.create_new_trial(study_id, template_trial=template)
        mine = storage.get_trial(trial_id).number
        live = [t.number for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get(ROLE) == "path" and t.state == TrialState.RUNNING]  # fmt: skip
        if min(live) == mine:
            try:
                with _heartbeat(storage, trial_id):
                    storage.set_trial_user_attr(trial_id, "worker", worker)  # beating: see fail_stale
                    yield True
            finally:
                storage.set_trial_state_values(trial_id, state=TrialState.FAIL)  # a lock, not a result
            return
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        while "path" not in study.user_attrs:  # another worker runs it: wait for it, or for its death
            time.sleep(1.0)
            fail_stale(study)
            owner = [t for t in study.get_trials(deepcopy=False)
                     if t.user_attrs.get(ROLE) == "path" and t.state == TrialState.RUNNING]  # fmt: skip
            if not owner:
                break
    yield False
