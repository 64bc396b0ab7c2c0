"""The end of a search: retrain the chosen setting and the baseline, note, write the files.

The test split is used here once: the chosen setting and the unregularized baseline are
scored on it, each in a run directory under ``run_dir/best``. The chosen setting's run is
the chosen trial's own when its checkpoint was kept (resumed, it trains no more: the
model the search validated is the one scored), else it is trained again, to the trial's
length. A chosen run that reached its length still improving is continued from its
checkpoint to twice that length, keeping its best epoch: the training length is part of
the dial, and no epoch is paid for twice.

The finish happens once per search directory: the process that creates
``run_dir/.finishing`` (``O_CREAT | O_EXCL``, holding ``host:pid``) retrains and writes;
another process that reaches the finish meanwhile says so in one line, waits, and reads
the finisher's ``result.json``. A claim whose process died on this host is stale and
taken over. ``best/`` is built in a staging directory and renamed into place (the old one
renamed away first, then removed), so it is never half-written or mixed.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regdial.dial.choice import notes
from regdial.dial.objective import FitObjective
from regdial.dial.result import TuneResult
from regdial.dial.trial import Trial
from regdial.setting import Regularization
from regdial.training.history import higher_is_better

if TYPE_CHECKING:
    from regdial.dial.search import Search

__all__ = ["CLAIM", "finish", "finish_claim", "replace_directory", "run_tables"]


CLAIM = ".finishing"
"""The file in a search's directory that says which process is finishing it."""


def finish(search: Search, result: TuneResult) -> TuneResult:
    """Retrain the chosen setting and the baseline once, score them on test, note what
    the numbers can and cannot say, and write the files; in a search directory, only the
    process that claims the finish does (the others wait for it and read its result)."""
    if search.run_dir is None:
        return _finish(search, result)
    with finish_claim(search.run_dir, search.say) as mine:
        if mine:
            done = _finished(search, result)
            return done if done is not None else _finish(search, result)
    done = _finished(search, result)
    return done if done is not None else finish(search, result)  # its finisher died: claim it again


def _finished(search: Search, result: TuneResult) -> TuneResult | None:
    """The result another process already finished for these same trials, or None."""
    assert search.run_dir is not None
    if not (search.run_dir / "result.json").is_file():
        return None
    try:
        done = TuneResult.load(search.run_dir)
    except ValueError:  # damaged or from an older version: finish again
        return None
    same = sorted((t["number"], t["state"]) for t in done.trials) == sorted(
        (t["number"], t["state"]) for t in result.trials
    )
    retrained = bool(done.retrain) or not search.retrain
    if same and retrained and done.best_trial == result.best_trial and result.trials:
        search.say(
            "this search was already finished (by an earlier run or another process): its result is read back"
        )
        return done
    return None


@contextmanager
def finish_claim(run_dir: Path, say: Callable[[str], None]) -> Iterator[bool]:
    """Yield True to the one process that holds ``run_dir/.finishing`` (removed when the
    block ends), or False once another process that held it is done or dead."""
    claim = run_dir / CLAIM
    me = f"{socket.gethostname()}:{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        try:
            handle = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(claim)
            if owner is not None and _dead(owner):
                _take_away(claim)
                continue
            if not told:
                say(f"another process ({owner or 'unknown'}) is finishing this search: waiting for it")
                told = True
            while claim.exists() and not (owner is not None and _dead(owner)):
                time.sleep(0.5)
            if claim.exists():  # it died: the loop takes the claim over
                continue
            yield False
            return
        with os.fdopen(handle, "w") as file:
            file.write(me)
        try:
            yield True
        finally:
            claim.unlink(missing_ok=True)
        return


def _owner(claim: Path) -> str | None:
    try:
        return claim.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _dead(owner: str) -> bool:
    """Whether ``host:pid`` is a process of this host that no longer runs (another
    host's process cannot be asked, and is taken to be alive)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _take_away(claim: Path) -> None:
    """Remove a dead process's claim (renamed first: of two that found it stale, one removes it)."""
    spare = claim.with_name(f"{CLAIM}.stale-{os.getpid()}")
    try:
        os.replace(claim, spare)
    except FileNotFoundError:
        return
    spare.unlink(missing_ok=True)


def replace_directory(staging: Path, final: Path) -> None:
    """Put ``staging`` at ``final``: the old one renamed away first, then removed, so
    ``final`` is at every moment a whole directory (one of the two) or, for an instant,
    absent; never half of each."""
    old = final.with_name(f".{final.name}-old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _finish(search: Search, result: TuneResult) -> TuneResult:
    result.run_dir, result.space, result.identity = search.run_dir, search.space.to_dict(), search.identity
    result.task = search.identity.get("task")
    if search.retrain:
        if isinstance(search.objective, FitObjective):
            _retrain(search, result)
        else:
            _baseline_trial(search, result)
    result.notes += notes(result)
    if search.run_dir is not None:
        run_table = model_table = None
        if isinstance(search.objective, FitObjective) and search.objective.dataset is not None:
            # best.toml trains what the table scored: the retrained length (36 where the trials ran 8)
            length = result.retrain.get("epochs") if search.online_run is None else None
            run_table, model_table = run_tables(
                search.objective, length
            )  # loaders in memory: [regularization] only
        trained = result.retrain.get("epochs") or search.epochs
        result.write(search.run_dir, run_table, model_table, trained if isinstance(trained, int) else None)
    return result


def _retrain(search: Search, result: TuneResult) -> None:
    """Train the chosen setting and the unregularized baseline again, each in its own run
    directory under ``run_dir/best``, and score both once on the test split. When the
    chosen run was still improving at its last epoch, train it once more for twice as
    long, and keep that if it validates better."""
    objective = search.objective
    assert isinstance(objective, FitObjective)
    data = objective.dataset
    has_test = (data is not None and data.x_test is not None) or (
        data is None and objective.user_loaders()[2] is not None)  # fmt: skip
    if not has_test:
        split = "validation only (no test split was given: pass test= to score on data the search never saw)"
    elif data is not None and getattr(data, "test_carved", False):
        how = "seeded, stratified" if getattr(data, "kind", None) == "classification" else "seeded"
        split = f"a test split carved from the training data ({how}; the search never saw it)"
    else:
        split = "the test split"
    staging = search.staging(fresh=search.online_run is None)  # online's run is already there
    if search.online_run is not None:
        search.say(f"scoring the online run and training the unregularized baseline, scoring both on {split}")
        tuned = search.online_run
    else:
        length = _chosen_length(search, result)
        kept = _take_trial_run(search, result, staging)
        search.say(f"{'scoring the chosen trial' if kept else 'training the chosen setting'} and training the "
                   f"unregularized baseline, scoring both on {split}")  # fmt: skip
        tuned = objective.fit(result.best, run_dir=staging, monitor=objective.metric, restore_best=True,
                              epochs=length, resume=kept)  # fmt: skip
        longer = _train_longer(search, result, tuned, staging, length)
        if longer is not None:
            tuned, length = longer, 2 * length
    # The baseline trains as long as the chosen setting did: a table of 8 epochs against 36
    # credited the length's gain to the regularization.
    epochs = search.reference if search.online_run is not None else length
    base = objective.fit(Regularization.off(), run_dir=None if staging is None else staging / "baseline",
                         epochs=epochs)  # fmt: skip
    result.retrain = {"tuned": tuned.meta["summary"], "baseline": base.meta["summary"], "test": split,
                      "epochs": epochs}  # fmt: skip
    if staging is not None and search.run_dir is not None:
        replace_directory(staging, search.run_dir / "best")  # never mixes two searches' runs


def _chosen_length(search: Search, result: TuneResult) -> int:
    """The epochs the chosen trial trained to (a continued trial's are more than the search's)."""
    row = next((r for r in result.trials if r.get("number") == result.best_trial), None)
    return int((row or {}).get("length") or search.epochs)


def _take_trial_run(search: Search, result: TuneResult, staging: Path | None) -> bool:
    """Copy the chosen trial's run (checkpoint, history) to ``staging``, if it was kept."""
    from regdial.dial.continuation import trial_dir

    if staging is None or search.run_dir is None or result.best_trial is None:
        return False
    source = trial_dir(search.run_dir, result.best_trial)
    if not (source / "checkpoints" / "last.json").is_file():
        return False
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    return True


def _train_longer(search: Search, result: TuneResult, tuned: Any, staging: Path | None, length: int) -> Any:
    """The training length is part of the dial: a chosen run that ran to its length while
    still improving (its diagnosis says so, it underfit, or its early stopping was armed
    and never fired) is trained again for twice as long, and kept (its best epoch) if it
    validates better."""
    from regdial.diagnosis import diagnose

    summary = tuned.meta["summary"]
    reading = diagnose(tuned, result.best)
    ran_out = summary.get("status") == "completed" and summary.get("epochs_run") == length
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
    assert isinstance(search.objective, FitObjective)
    metric = search.objective.metric
    search.say(f"the chosen setting was {state} at epoch {length}: training it again for {2 * length}")
    # Afresh, not continued from the checkpoint: its schedules then span the whole length, so
    # best.toml (epochs = 2 * length) trains the very run the table scores (a continued run
    # tested 84.0 RMSE where `regdial run best.toml` gave 59.1).
    aside = None if staging is None else staging.with_name(staging.name + "-longer")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    longer = search.objective.fit(result.best, monitor=metric, restore_best=True, epochs=2 * length,
                                  run_dir=aside)  # fmt: skip
    before = summary.get("best", summary.get("final", {})).get(metric, math.nan)
    after = longer.meta["summary"].get("best", longer.meta["summary"].get("final", {})).get(metric, math.nan)
    better = after > before if higher_is_better(metric) else after < before
    result.epochs_spent += len(longer)
    if better:
        if aside is not None and staging is not None:
            replace_directory(aside, staging)
        result.notes.append(f"the chosen setting was {state} after {length} epochs; trained for "
                            f"{2 * length} it validates better ({metric} {after:.4f} vs {before:.4f}): the "
                            "training length, not the regularization, was the limit")  # fmt: skip
        return longer
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    result.notes.append(f"the chosen setting was {state} after {length} epochs, but trained for {2 * length} "
                        f"it did not validate better ({after:.4f} vs {before:.4f}; the {length}-epoch run is kept): "
                        "the model's capacity or the learning rate may be the limit")  # fmt: skip
    return None


def _baseline_trial(search: Search, result: TuneResult) -> None:
    """For the user's own objective: run it once with every technique off."""
    search.say("training the unregularized baseline with your objective")
    trial = Trial(Regularization.off(), number=-1, metric=search.objective.metric, epochs=search.epochs,
                  kind=search.kind, role="baseline")  # fmt: skip
    search.objective(trial.setting, trial)
    row = trial.best_row() or {}
    best_row = next((t for t in result.trials if t["number"] == result.best_trial), {})
    result.retrain = {
        "baseline": {"final": {k: v for k, v in row.items() if k.startswith(("val_", "test_"))}},
        "tuned": {"final": {search.objective.metric: result.best_value,
                            f"{search.objective.metric}_se": best_row.get("se", math.nan)}},
    }  # fmt: skip


def run_tables(objective: FitObjective, epochs: object = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``[run]`` and ``[model]`` tables of ``best.toml``, as ``regdial run`` reads them:
    the run the search scored (its length, ``epochs`` where the chosen setting was trained on
    past the trials', its seed, optimizer..., with the best epoch restored)."""
    from regdial.training.options import RunOptions, run_table

    length = epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else objective.full_epochs
    given = {"epochs": length, "seed": objective.seed, "optimizer": objective.optimizer,
             "device": objective.device, "precision": objective.precision, "deterministic": objective.deterministic,
             "monitor": objective.metric, "restore_best": True}  # fmt: skip
    given |= {
        name: getattr(objective, name)
        for name in ("lr", "batch_size")
        if getattr(objective, name) is not None
    }
    # The data file as an absolute path: best.toml runs from any directory, not only the
    # one the search ran in (a relative path failed there as "an existing file").
    data = None if objective.data_path is None else str(Path(objective.data_path).resolve())
    run = run_table(RunOptions.parse(given, "run"), task=objective.task, data=data,
                    kind=objective.kind, target=objective.target, model=objective.model)  # fmt: skip
    return run, dict(objective.model_options)
