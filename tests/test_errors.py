"""Every bad input and damaged file of tests/damage_cases.py: one line, the right exit code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from damage_cases import CASES, Case
from fuzzing import check, invoke


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    args = ["run", "--task", "wine", "--epochs", "2", "--out", "run", "--set", "l1=0.001", "--quiet"]
    outcome = invoke(args, root)
    check(outcome, args)
    return root / "run"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_case_is_one_clear_line(case: Case, finished_run: Path, tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("a file\n")
    for name, content in case.files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if case.damage is not None:
        shutil.copytree(finished_run, tmp_path / "run")
        case.damage(tmp_path / "run")
    outcome = invoke(case.args, tmp_path)
    check(outcome, case.args)
    assert outcome.code == case.code, outcome.err
    if case.code == 2:
        assert case.message in outcome.err, outcome.err
