"""Reliability under concurrency, resumes and hostile disks (issue 22).

No setting is tried twice in one study (resumes, terminals, workers, PostgreSQL); the
finish of a search happens once and ``best/`` is replaced whole; no write follows a
symbolic link or leaves a partial file; a full disk is one line, and the run resumes
exactly after space is freed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from children import finish, stop_all
from postgres import available, postgres_server
from regdial import tune
from regdial._io import DiskFullError, atomic_write, remove_orphans
from regdial.cli import main
from regdial.dial.finish import CLAIM, finish_claim, replace_directory
from regdial.dial.seeding import trial_seed
from regdial.dial.space import Space
from regdial.training.checkpoint import load_weights

SPACE = Space({"weight_decay": (1e-3, 1.0), "dropout": (0.0, 0.5)})
NO_POSTGRES = available()


CALLS: list[object] = []


def toy(setting: object, trial: object) -> float:
    """A score that needs no training: the sampler is what is under test."""
    CALLS.append(setting)
    return float(getattr(setting, "weight_decay", 0.0)) + float(getattr(setting, "dropout", 0.0))


def exit_code(argv: list[str]) -> int:
    """What ``regdial ARGV`` exits with (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def _study(url: str) -> optuna.Study:
    (name,) = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url)


def _settings(study: optuna.Study) -> list[tuple[tuple[str, float], ...]]:
    return [
        tuple(sorted(t.params.items()))
        for t in study.get_trials()
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "role" not in t.user_attrs
    ]


# -- 1. no setting twice ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["random", "tpe"])
def test_a_resumed_search_never_repeats_a_setting(tmp_path: Path, strategy: str) -> None:
    """'3 trials' then the same search with '6 trials': trials 3-5 were copies of 0-2."""
    for budget in ("3 trials", "6 trials"):
        tune(toy, SPACE, budget=budget, strategy=strategy, run_dir=tmp_path, retrain=False, report=False)
    settings = _settings(_study(f"sqlite:///{tmp_path / 'study.db'}"))
    assert len(settings) == 6
    assert len(set(settings)) == 6
    header = (tmp_path / "trials.csv").read_text().splitlines()[0].split(",")
    assert "worker" in header  # which process ran each trial


def test_a_grid_visits_every_point_once(tmp_path: Path) -> None:
    """Optuna's grid names points by their index in an order shuffled by its seed: a
    sampler seeded per trial repeated points and missed others."""
    grid = Space({"weight_decay": (1e-3, 1.0), "dropout": (0.0, 0.5)})
    tune(toy, grid, budget="9 trials", strategy="grid", grid_points=3, run_dir=tmp_path, retrain=False,
         report=False)  # fmt: skip
    study = _study(f"sqlite:///{tmp_path / 'study.db'}")
    settings = _settings(study)
    assert len(settings) == 9 and len(set(settings)) == 9
    assert not [t for t in study.get_trials() if t.user_attrs.get("role") == "repeat"]


def test_the_seed_still_reproduces_a_search(tmp_path: Path) -> None:
    for name in ("a", "b"):
        tune(toy, SPACE, budget="4 trials", strategy="random", run_dir=tmp_path / name, retrain=False,
             report=False, seed=7)  # fmt: skip
    first, second = (_settings(_study(f"sqlite:///{tmp_path / n / 'study.db'}")) for n in ("a", "b"))
    assert first == second
    assert trial_seed(7, 0) != trial_seed(7, 1) != trial_seed(8, 1)


def test_a_setting_already_tried_is_skipped_before_it_trains(tmp_path: Path) -> None:
    tune(toy, SPACE, budget="2 trials", strategy="random", run_dir=tmp_path, retrain=False, report=False)
    study = _study(f"sqlite:///{tmp_path / 'study.db'}")
    study.enqueue_trial(study.trials[0].params)  # a sampler that proposes a tried setting again
    CALLS.clear()
    tune(toy, SPACE, budget="3 trials", strategy="random", run_dir=tmp_path, retrain=False, report=False)
    trials = study.get_trials()
    skipped = [t for t in trials if t.user_attrs.get("role") == "repeat"]
    assert len(skipped) == 1 and skipped[0].user_attrs["repeats"] == 0
    assert len(CALLS) == 1  # the repeat never trained
    settings = _settings(study)
    assert len(settings) == len(set(settings)) == 3


WORKER = """
import sys, time
from regdial import tune
from regdial.dial.space import Space
def objective(setting, trial):
    time.sleep(0.2)
    return setting.weight_decay + setting.dropout
tune(objective, Space({"weight_decay": (1e-3, 1.0), "dropout": (0.0, 0.5)}), budget=sys.argv[2] + " trials",
     strategy=sys.argv[3], run_dir=sys.argv[1], storage=sys.argv[4] or None, retrain=False, report=False)
"""


def _terminals(count: int, run_dir: Path, trials: int, strategy: str, storage: str = "") -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-c", WORKER, str(run_dir), str(trials), strategy, storage]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(count)
    ]
    try:
        for process in processes:
            _, err = finish(process, 240)
            assert process.returncode == 0, err
            assert "Traceback" not in err
    finally:
        stop_all(processes)


@pytest.mark.slow
@pytest.mark.parametrize(("count", "trials"), [(2, 8), (4, 8)])
def test_terminals_on_one_directory_try_distinct_settings(tmp_path: Path, count: int, trials: int) -> None:
    """Two terminals on one directory, 8 trials: 4 distinct settings; four terminals: 3."""
    _terminals(count, tmp_path, trials, "random")
    study = _study(f"sqlite:///{tmp_path / 'study.db'}")
    settings = _settings(study)
    assert len(settings) == trials  # exactly the budget
    assert len(set(settings)) == trials  # none twice
    workers = {t.user_attrs["worker"] for t in study.get_trials() if t.state == TrialState.COMPLETE}
    assert len(workers) >= 2  # really several processes


@pytest.mark.slow
@pytest.mark.skipif(NO_POSTGRES is not None, reason=str(NO_POSTGRES))
def test_postgres_workers_try_distinct_settings(tmp_path: Path) -> None:
    with postgres_server() as url:
        _terminals(2, tmp_path, 6, "tpe", url)
        settings = _settings(_study(url))
    assert len(settings) == 6
    assert len(set(settings)) == 6


# -- 2. the finish happens once --------------------------------------------------------------


@pytest.mark.slow
def test_two_searches_on_one_directory_finish_once(tmp_path: Path) -> None:
    """Two `regdial tune --out D` with retraining: one finishes, the other waits and says so;
    best/ is whole and `regdial diagnose D/best` reads it."""
    command = [sys.executable, "-m", "regdial", "tune", "--task", "wine", "--epochs", "1", "--budget", "3 trials",
               "--strategy", "random", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    try:
        outputs = [finish(process, 300) for process in processes]
    finally:
        stop_all(processes)
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert "Traceback" not in out + err
    said = "".join(out for out, _ in outputs)
    assert said.count("training the chosen setting and the unregularized baseline") <= 1
    assert not list(tmp_path.glob(".best-*")) and not (tmp_path / CLAIM).exists()
    assert (tmp_path / "best" / "checkpoints" / "final.safetensors").is_file()
    assert (tmp_path / "best" / "baseline" / "summary.json").is_file()
    assert exit_code(["diagnose", str(tmp_path / "best")]) == 0


def test_a_trial_marked_as_a_workers_has_its_heartbeat_on_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``worker`` mark is what tells ``fail_stale`` that Optuna's heartbeat rule covers
    a trial. Optuna's heartbeat thread records its first beat concurrently with the
    objective: a worker killed before that beat (seen in CI: a resumed search then waited
    forever on the dead trial's share of the budget) must still leave a beat on record.
    Here the thread never beats at all, the worst case of that race."""
    import sqlite3

    from optuna.storages._heartbeat import HeartbeatThread

    monkeypatch.setattr(HeartbeatThread, "_record_heartbeat", staticmethod(lambda *_: None))
    seen: list[tuple[str, int]] = []
    database = tmp_path / "study.db"

    def objective(setting: object, trial: object) -> float:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            (trial_id,) = db.execute("SELECT trial_id FROM trials WHERE state = 'RUNNING'").fetchone()
            (mark,) = db.execute(
                "SELECT value_json FROM trial_user_attributes WHERE trial_id = ? AND key = 'worker'",
                (trial_id,),
            ).fetchone()
            (beats,) = db.execute(
                "SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = ?", (trial_id,)
            ).fetchone()
        seen.append((mark, beats))
        return 0.0

    space = Space({"weight_decay": (1e-3, 1.0)})
    tune(
        objective, space, budget="2 trials", strategy="random", run_dir=tmp_path, retrain=False, report=False
    )
    assert len(seen) == 2 and all(mark and beats == 1 for mark, beats in seen)


def test_the_finish_claim_waits_for_a_live_owner_and_takes_over_from_a_dead_one(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / CLAIM).write_text(f"{os.uname().nodename}:{sleeper.pid}")
        said: list[str] = []
        threading.Timer(0.6, lambda: (tmp_path / CLAIM).unlink()).start()  # the owner finishes
        with finish_claim(tmp_path, said.append) as mine:
            assert mine is False
        assert said and "another process" in said[0] and str(sleeper.pid) in said[0]
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / CLAIM).write_text(f"{os.uname().nodename}:{sleeper.pid}")  # its owner is dead now
    with finish_claim(tmp_path, said.append) as mine:
        assert mine is True
        assert (tmp_path / CLAIM).read_text().endswith(f":{os.getpid()}")
    assert not (tmp_path / CLAIM).exists()


def test_best_is_replaced_whole(tmp_path: Path) -> None:
    final, staging = tmp_path / "best", tmp_path / ".best-1"
    (final / "checkpoints").mkdir(parents=True)
    (final / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    replace_directory(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# -- 3. no write follows a link ------------------------------------------------------------------


def test_a_symlink_in_a_run_directory_is_replaced_not_written_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    main(["run", "--task", "wine", "--epochs", "1", "--out", str(run), "--quiet"])
    outside = tmp_path / "precious.txt"
    outside.write_text("not a picture")
    for name in ("gap.png", "learning_curves.png", "report.html"):
        (run / name).unlink()
        (run / name).symlink_to(outside)
    with contextlib.suppress(SystemExit):
        main(["report", str(run)])
    assert outside.read_text() == "not a picture"
    assert not (run / "gap.png").is_symlink()
    assert (run / "gap.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_picture_that_fails_half_way_leaves_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "progress.png"
    target.write_bytes(b"the old picture")

    def half(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(DiskFullError, match="no space left on device: it needed more than 4 bytes"):
        atomic_write(target, half)
    assert target.read_bytes() == b"the old picture"
    assert [p.name for p in tmp_path.iterdir()] == ["progress.png"]


def test_orphans_of_any_temporary_name_are_removed(tmp_path: Path) -> None:
    for name in (".state-000001.safetensors.x1.tmp", ".tmpa8Zq3b", "keep.json"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_orphans(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


# -- 4. a full disk -------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[bool]:
    """A tmpfs of ``size`` at ``where`` where this machine lets the test mount one (root),
    else yields False (the test then patches the writer)."""
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode:  # fmt: skip
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_one_line_and_the_run_resumes_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    arguments = ["--task", "wine", "--epochs", "3", "--quiet"]
    main(["run", *arguments, "--out", str(tmp_path / "straight")])
    capsys.readouterr()
    disk = tmp_path / "disk"
    with small_disk(disk, "1700k") as mounted:
        run = disk / "run"
        if not mounted:  # the second checkpoint finds the disk full
            import safetensors.torch

            real, calls = safetensors.torch.save_file, []

            def full(tensors: object, filename: str, *args: object, **kwargs: object) -> None:
                calls.append(filename)
                if len(calls) == 2:
                    Path(filename).write_bytes(b"half")
                    raise safetensors.SafetensorError(
                        "Error while serializing: No space left on device (os error 28)"
                    )
                real(tensors, filename, *args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(SystemExit) as done:
            main(["run", *arguments, "--out", str(run)])
        assert done.value.code == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "state-000001.safetensors" in err and "no space left on device: it needed about 1.1 MB" in err
        assert "the last checkpoint (epoch 1) is intact" in err
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        else:
            monkeypatch.undo()
        main(["run", "--resume", str(run), "--quiet"])
        a = load_weights(run / "checkpoints" / "final.safetensors")
        b = load_weights(tmp_path / "straight" / "checkpoints" / "final.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- 5. one line and exit 2 where the input is the problem -----------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert exit_code(["run", "--task", "wine", "--epochs", "2", "--out", str(run), "--quiet"]) == 0
    return run


def _damaged_copy(run: Path, where: Path, damage: str) -> Path:
    import json
    import shutil

    copy = where / "copy"
    shutil.copytree(run, copy)
    if damage == "final is 5":
        summary = json.loads((copy / "summary.json").read_text())
        (copy / "summary.json").write_text(json.dumps({**summary, "final": 5}))
    elif damage == "a NaN epoch":
        history = json.loads((copy / "history.json").read_text())
        history["rows"][0]["epoch"] = float("nan")
        (copy / "history.json").write_text(json.dumps(history))
    elif damage == "history.json is a directory":
        (copy / "history.json").unlink()
        (copy / "history.json").mkdir()
        (copy / "history.csv").unlink()
    elif damage == "bad integer keys":
        text = (copy / "checkpoints" / "last.json").read_text()
        document = json.loads(text)

        def spoil(value: object) -> bool:
            if isinstance(value, dict):
                table = value.get("$int_keys")
                if isinstance(table, dict) and table:
                    table["abc"] = table.pop(next(iter(table)))
                    return True
                return any(spoil(v) for v in value.values())
            return isinstance(value, list) and any(spoil(v) for v in value)

        assert spoil(document)
        (copy / "checkpoints" / "last.json").write_text(json.dumps(document))
    return copy


@pytest.mark.parametrize(
    ("command", "damage", "message"),
    [
        (["report", "{copy}"], "final is 5", r"summary\.json must be a run summary .*'final' that is not a table"),
        (["report", "{copy}"], "a NaN epoch", r"history\.json must be a history .*row\.epoch must be a finite"),
        (["diagnose", "{copy}"], "a NaN epoch", r"row\.epoch must be a finite number of epochs, at least 0, got nan"),
        (["run", "--resume", "{copy}", "--quiet"], "bad integer keys", r"last\.json must be a checkpoint .*'abc'"),
        (["run", "--resume", "{copy}", "--quiet"], "history.json is a directory",
         r"history\.json must be a file regdial can replace, got a directory"),
    ],
)  # fmt: skip
def test_damaged_files_are_one_line(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], damage: str,
    message: str,
) -> None:  # fmt: skip
    import re

    copy = _damaged_copy(finished_run, tmp_path, damage)
    capsys.readouterr()
    assert exit_code([part.format(copy=copy) for part in command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert ".tmp" not in err  # the file named is the user's, not a temporary one


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "exclude=5"], r"regularization\.exclude must be a list of fnmatch patterns .*got 5$"),
        (
            ["--set", "include=true"],
            r"regularization\.include must be a list of fnmatch patterns .*got True$",
        ),
        (["--set", "l1=1e300"], r"regularization\.l1 must be in \[0, 1000000\], got 1e\+300$"),
        (
            ["--set", "elastic_net=1e300"],
            r"regularization\.elastic_net must be in \[0, 1000000\], got 1e\+300$",
        ),
    ],
)
def test_bad_settings_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    import re

    assert exit_code(["run", "--task", "wine", "--epochs", "1", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_bad_config_values_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[regularization]\nexclude = 5\n")
    assert (
        exit_code(["run", str(config), "--task", "wine", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    )
    assert "regularization.exclude must be a list of fnmatch patterns" in capsys.readouterr().err
    search = tmp_path / "tune.toml"
    search.write_text("[regularization]\nexclude = 1.5\n")
    assert (
        exit_code(["tune", str(search), "--task", "wine", "--epochs", "1", "--out", str(tmp_path / "t")]) == 2
    )
    assert "regularization.exclude must be a list of fnmatch patterns" in capsys.readouterr().err


def test_an_in_memory_sqlite_storage_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    command = ["tune", "--task", "wine", "--epochs", "1", "--budget", "1 trials", "--no-retrain",
               "--storage", "sqlite:///:memory:", "--out", str(tmp_path / "t")]  # fmt: skip
    assert exit_code(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "an in-memory SQLite database is private" in err


def test_an_empty_validation_split_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    data = tmp_path / "empty_val.npz"
    x = np.random.default_rng(0).random((40, 4)).astype("float32")
    np.savez(data, x=x, y=np.arange(40) % 2, x_val=np.zeros((0, 4), "float32"), y_val=np.zeros((0,), "int64"))
    assert exit_code(["run", "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x_val must be at least one row" in err, err


# -- 6. a process group regdial started ends in order -------------------------------------------------


class _Group:
    """Stands in for ``Distributed`` under torchrun: records what the command does with it."""

    is_main = True
    owned = True  # torchrun's group, which regdial initialized

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def broadcast(self, value: object) -> object:
        return value

    def close(self, *, wait: bool) -> None:
        self.log.append(f"close(wait={wait})")


@pytest.mark.parametrize("fails", [False, True])
def test_regdial_run_destroys_the_process_group_it_started_after_every_rank_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """The flaky DDP resume: a rank left with gloo's group alive died in the interpreter's
    teardown (``terminate called without an active exception``). The command now waits for
    every rank, then destroys the group; after a failure it destroys it without waiting.
    A rank that finished then leaves without the interpreter's teardown (where gloo's
    threads, alive after the group is destroyed, still aborted it); a failed one does not."""
    import regdial.cli.run as command

    log: list[str] = []
    monkeypatch.setattr(command, "_leave_without_teardown", lambda: log.append("left"))

    def execute(*args: object, **kwargs: object) -> None:
        log.append("trained")
        if fails:
            raise RuntimeError("a rank failed")

    monkeypatch.setattr(command, "_data_parallel", lambda device: _Group(log))
    monkeypatch.setattr(command, "_execute", execute)
    code = exit_code(["run", "--task", "wine", "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"])
    assert code == (3 if fails else 0)
    assert log == ["trained", f"close(wait={not fails})", *([] if fails else ["left"])]


def test_a_group_regdial_did_not_start_is_left_to_its_owner() -> None:
    from regdial.training.distributed import Distributed

    Distributed(0, 2, 0).close(wait=True)  # the user's own group: nothing is done to it (no group here)
    assert not torch.distributed.is_initialized()
