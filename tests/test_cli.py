"""The regdial command end to end, on small tasks (seconds each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from regdial.cli import main
from regdial.training.history import metric_columns


def cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def test_run_writes_a_complete_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = cli("run", "--task", "wine", "--epochs", "3", "--out", str(out), "--baseline", "--set", "dropout=0.2",
               "--set", "weight_decay=0.01", "--quiet")  # fmt: skip
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "config.toml",
        "history.csv",
        "history.json",
        "summary.json",
        "checkpoints",
        "report.html",
        "baseline",
    } <= names
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[0].split(",") == metric_columns("classification")
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]
    assert (out / "baseline" / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["setting"]["dropout"] == 0.2
    config = (out / "config.toml").read_text()
    assert 'task = "wine"' in config and "dropout = 0.2" in config
    printed = capsys.readouterr().out
    assert "unregularized" in printed and "this setting" in printed
    assert "diagnosis:" in printed and f"report: {out / 'report.html'}" in printed


def test_a_config_file_and_flags_over_it(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        '[run]\ntask = "breast-cancer"\nepochs = 50\n\n[model]\nwidth = 32\n\n[regularization]\nlabel_smoothing = 0.1\n'
    )
    out = tmp_path / "out"
    assert cli("run", str(config), "--epochs", "2", "--out", str(out), "--quiet") == 0
    assert len((out / "history.csv").read_text().splitlines()) == 3
    assert "width = 32" in (out / "config.toml").read_text()


def test_never_overwrites_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for _ in range(2):
        assert cli("run", "--task", "wine", "--epochs", "1", "--out", str(out), "--quiet") == 0
    assert (tmp_path / "run-2" / "summary.json").is_file()


def test_resume_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli("run", "--task", "wine", "--epochs", "2", "--out", str(out), "--quiet") == 0
    before = (out / "history.csv").read_text()
    assert cli("run", "--resume", str(out), "--quiet") == 0  # finished: only reports again
    assert (out / "history.csv").read_text() == before
    capsys.readouterr()
    assert cli("run", "--resume", str(out), "--epochs", "5") == 2
    assert "--resume must be used alone" in capsys.readouterr().err
    assert cli("run", "--resume", str(tmp_path / "missing")) == 2


def test_diagnose_report_and_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli("run", "--task", "wine", "--epochs", "3", "--out", str(out), "--quiet") == 0
    capsys.readouterr()
    assert cli("diagnose", str(out)) == 0
    said = capsys.readouterr().out
    assert said.startswith(("overfitting", "underfitting", "good fit", "still improving")), said
    assert cli("diagnose", str(out / "history.csv")) == 0
    assert cli("report", str(out)) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    assert cli("tasks") == 0
    listing = capsys.readouterr().out
    assert "digits-small" in listing and "sparse-regression" in listing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--epochs", "0"], "run.epochs must be an integer in [1, 100000], got 0"),
        (["run", "--set", "dropout=1.5"], "regularization.dropout must be in [0, 1), got 1.5"),
        (
            ["run", "--set", "droput=0.1"],
            "regularization.droput is not a known setting; did you mean 'dropout'?",
        ),
        (["run", "--set", "dropout"], "--set must be KEY=VALUE"),
        (["run", "--task", "mnist"], "task must be one of 'digits', 'digits-small'"),
        (["run", "--epoch", "3"], "No such option: --epoch"),
        (["run", "--epochs", "ten"], "run.epochs must be an integer in [1, 100000], got 'ten'"),
        (["run", "--lr", "fast"], "run.lr must be a number in (0, 1000000], got 'fast'"),
        (
            ["run", "--task", "wine", "--data", "x.npz"],
            "run must be either a task or data, not both, got task 'wine' and data 'x.npz'",
        ),
        (["run", "--data", "x.npz"], "data must be an existing .npz or .csv file, got 'x.npz'"),
        (["run", "--task", "wine", "--model", "cnn"], "model must be a model for tabular inputs"),
        (["diagnose", "nowhere"], "history must be a run directory or a history.csv/.json file"),
        (["report", "nowhere"], "run_dir must be a regdial run directory"),
        (["tune", "--budget", "lots"], "budget must be a number of epochs"),
        (
            ["tune", "--strategy", "magic"],
            "strategy must be one of 'auto', 'path', 'online', 'tpe', 'random', 'grid', got 'magic'",
        ),
        (["tune", "--workers", "two"], "tune.workers must be an integer in [1, 256], got 'two'"),
        (["tune", "--workers", "0"], "tune.workers must be an integer in [1, 256], got 0"),
        (["tune", "--storage", "nosuchdb://x"], "storage must be a database Optuna can open"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("regdial: error: ")
    assert message in err


def test_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[run]\ntask = "wine"\nepochz = 3\n')
    assert cli("run", str(config)) == 2
    assert "run.epochz is not a known setting; did you mean 'epochs'?" in capsys.readouterr().err
    config.write_text("[trainig]\nlr = 1\n")
    assert cli("run", str(config)) == 2
    assert "config.trainig is not a known setting" in capsys.readouterr().err
    config.write_text("[run\n")
    assert cli("run", str(config)) == 2
    assert "must be valid TOML" in capsys.readouterr().err


def test_no_traceback_reaches_the_user(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "regdial", "run", "--epochs", "-3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "regdial: error: run.epochs must be an integer in [1, 100000], got -3"


def test_a_diverged_run_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "diverge.toml"
    config.write_text(
        '[run]\ntask = "breast-cancer"\noptimizer = "sgd"\nlr = 1e6\nlr_schedule = "constant"\nepochs = 20\n'
    )
    assert cli("run", str(config), "--out", str(tmp_path / "run"), "--quiet") == 1
    printed = capsys.readouterr().out
    assert "non-finite training loss (nan) at epoch 1" in printed and "lower the learning rate" in printed


@pytest.mark.parametrize("flags", [["--lr", "5"], ["--seed", "7"], ["--device", "cpu"], ["--baseline"]])
def test_resume_refuses_flags_it_cannot_honour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    out = tmp_path / "run"
    assert cli("run", "--task", "wine", "--epochs", "1", "--out", str(out), "--quiet") == 0
    capsys.readouterr()
    assert cli("run", "--resume", str(out), *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("regdial: error: --resume must be used alone") and f"also {flags[0]}" in err


def test_every_file_a_run_writes_loads_back(tmp_path: Path) -> None:
    """config.toml from the CLI and from fit itself both load as configs and train again."""
    from regdial import Regularization, fit
    from regdial.config import load_config

    out = tmp_path / "run"
    assert (
        cli("run", "--task", "wine", "--epochs", "2", "--out", str(out), "--set", "dropout=0.1", "--quiet")
        == 0
    )
    assert load_config(out / "config.toml").regularization == Regularization(dropout=0.1)
    fit("wine", Regularization(l1=1e-4), epochs=2, momentum=0.8, train_eval_size=64, run_dir=tmp_path / "py",
        progress=False)  # fmt: skip
    loaded = load_config(tmp_path / "py" / "config.toml")
    assert loaded.run.momentum == 0.8 and loaded.run.train_eval_size == 64
    assert cli("run", str(tmp_path / "py" / "config.toml"), "--out", str(tmp_path / "again"), "--quiet") == 0
    assert cli("run", "--resume", str(tmp_path / "py"), "--quiet") == 0
