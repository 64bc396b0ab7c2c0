"""Never a traceback: the CLI fuzzed with Hypothesis (see tests/fuzzing.py).

A fixed number of examples per kind of input runs in the suite (``REGDIAL_FUZZ_EXAMPLES``
raises it); ``benchmarks/fuzz.py`` runs thousands and prints the counts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import (
    DAMAGES,
    FILES,
    OUTSIDE,
    check,
    commands,
    configs,
    damage,
    data_files,
    invoke,
    record,
    scratch,
)

# Examples per kind of input in the suite; damaged directories cost a report each, so fewer.
EXAMPLES = int(os.environ.get("REGDIAL_FUZZ_EXAMPLES", "14"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("REGDIAL_FUZZ_EXAMPLES"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)  # fmt: skip
FUZZ_DIRECTORIES = settings(FUZZ, max_examples=max(1, EXAMPLES // 2))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run directory (checkpoints, weights, history, summary, report), made once."""
    root = tmp_path_factory.mktemp("base")
    outcome = invoke(
        ["run", "--task", "wine", "--epochs", "2", "--out", "run", "--set", "l1=0.001", "--quiet"], root
    )
    check(outcome, ["run"])
    assert outcome.code == 0
    return root / "run"


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    args = ["tune", "--task", "wine", "--epochs", "1", "--budget", "2 trials", "--strategy", "tpe", "--out", "tune",
            "--quiet"]  # fmt: skip
    outcome = invoke(args, root)
    check(outcome, args)
    assert outcome.code == 0
    return root / "tune"


@FUZZ
@given(commands())
def test_command_lines(args: list[str]) -> None:
    with scratch() as directory:
        outcome = invoke(args, directory)
        record("flags", outcome)
        check(outcome, args)


@pytest.mark.slow
@FUZZ
@given(configs(), st.sampled_from(["run", "tune"]))
def test_config_files(text: str, command: str) -> None:
    with scratch() as directory:
        (directory / "config.toml").write_text(text, encoding="utf-8", errors="surrogatepass")
        args = [command, "config.toml", "--quiet", "--out", "out"]
        if command == "tune":
            args += ["--budget", "1 trials", "--no-retrain"]
        outcome = invoke(args, directory)
        record("configs", outcome)
        check(outcome, args)


@FUZZ
@given(data_files(), st.sampled_from(["run", "tune"]))
def test_data_files(file: tuple[str, bytes], command: str) -> None:
    name, payload = file
    with scratch() as directory:
        (directory / name).write_bytes(payload)
        args = [command, "--data", name, "--epochs", "1", "--quiet", "--out", "out"]
        if name.endswith(".csv"):
            args += ["--target", "target"]
        if command == "tune":
            args += ["--budget", "1 trials", "--no-retrain"]
        outcome = invoke(args, directory)
        record("data", outcome)
        check(outcome, args)


@FUZZ_DIRECTORIES
@given(st.sampled_from(FILES), st.sampled_from(DAMAGES), st.integers(0, 10_000),
       st.sampled_from(["resume", "report", "diagnose", "rerun"]))  # fmt: skip
def test_damaged_run_directories(finished_run: Path, target: str, how: str, seed: int, command: str) -> None:
    with scratch() as directory:
        run = directory / "run"
        shutil.copytree(finished_run, run)
        damage(run, target, how, seed)
        args = {"resume": ["run", "--resume", "run", "--quiet"], "report": ["report", "run"],
                "diagnose": ["diagnose", "run"], "rerun": ["run", "run/config.toml", "--out", "again", "--quiet"]}[command]  # fmt: skip
        outcome = invoke(args, directory)
        record("damaged runs", outcome)
        check(outcome, args)
        if how == "symlink":  # no write follows a link out of the run directory
            assert (directory / OUTSIDE).read_text() == "not regdial's", args


@FUZZ_DIRECTORIES
@given(st.sampled_from(["result.json", "trials.csv", "study.db", "best.toml", "best/summary.json"]),
       st.sampled_from(["truncate", "garbage", "empty-json", "list-json", "wrong-types", "dir", "delete"]),
       st.integers(0, 10_000), st.sampled_from(["report", "tune", "run-best"]))  # fmt: skip
def test_damaged_search_directories(
    finished_search: Path, target: str, how: str, seed: int, command: str
) -> None:
    with scratch() as directory:
        search = directory / "tune"
        shutil.copytree(finished_search, search)
        damage(search, target, how, seed)
        args = {"report": ["report", "tune"], "run-best": ["run", "tune/best.toml", "--epochs", "1", "--quiet"],
                "tune": ["tune", "--task", "wine", "--epochs", "1", "--budget", "2 trials", "--strategy", "tpe",
                         "--out", "tune", "--quiet", "--no-retrain"]}[command]  # fmt: skip
        outcome = invoke(args, directory)
        record("damaged searches", outcome)
        check(outcome, args)
