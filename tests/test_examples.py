"""The examples run and show what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, check=True, timeout=300
    )
    return result.stdout


def test_l1_exact_zeros_example() -> None:
    lines = {
        line.split("  ")[0].strip(): line.split() for line in run("l1_exact_zeros.py").splitlines() if line
    }
    subgradient = lines["a loss term (subgrad.)"]
    proximal = lines["a proximal step"]
    assert subgradient[4] == "0"  # exact zeros with L1 in the loss
    assert proximal[3] == "45"  # all 45 useless weights exactly zero
    assert "exactly" in proximal  # and the surviving weights are the true features


def test_own_loop_example_regularized_beats_unregularized() -> None:
    rows = {}
    for line in run("own_loop.py").splitlines():
        if line.startswith(("without", "with regdial")):
            label = "without" if line.startswith("without") else "with"
            rows[label] = [float(v) for v in line.split()[-3:]]
    train_without, val_without, gap_without = rows["without"]
    _, val_with, gap_with = rows["with"]
    assert train_without == 1.0  # the unregularized CNN memorizes the 150 images
    assert val_with > val_without + 0.01
    assert gap_with < gap_without


CONFIGS = sorted((EXAMPLES / "configs").glob("*.toml"))


def test_there_is_a_config_per_built_in_task() -> None:
    from regdial.tasks import TASKS

    assert {path.stem for path in CONFIGS} == set(TASKS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_configs_run(path: Path, tmp_path: Path) -> None:
    from regdial.cli import main

    main(["run", str(path), "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])  # returns on success
    assert (tmp_path / "run" / "report.html").is_file()
    assert (tmp_path / "run" / "baseline" / "summary.json").is_file()


TUNE_CONFIGS = sorted((EXAMPLES / "tune").glob("*.toml"))


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.stem)
def test_example_tune_configs_run(path: Path, tmp_path: Path) -> None:
    from regdial.cli import main

    out = tmp_path / "tune"
    main(
        [
            "tune",
            str(path),
            "--epochs",
            "2",
            "--budget",
            "2 trials",
            "--out",
            str(out),
            "--no-retrain",
            "--quiet",
        ]
    )
    assert (out / "best.toml").is_file()
    main(["run", str(out / "best.toml"), "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])
    assert (tmp_path / "run" / "summary.json").is_file()
