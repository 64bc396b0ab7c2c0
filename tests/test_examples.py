"""The examples run and show what they claim."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(script: str) -> ModuleType:
    """An example as a module, so its own functions can be checked (not its printout's columns)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_l1_exact_zeros_example() -> None:
    example = load("l1_exact_zeros.py")
    x, y, true_weight = example.make_data()
    truth = set(torch.nonzero(true_weight).flatten().tolist())
    subgradient = example.fit(x, y, proximal=False).weight.detach().squeeze(0)
    proximal = example.fit(x, y, proximal=True).weight.detach().squeeze(0)
    assert int((subgradient == 0).sum()) == 0  # L1 in the loss: weights hover near zero, never at it
    assert (
        int((proximal == 0).sum()) == example.FEATURES - example.INFORMATIVE
    )  # every useless weight exactly 0
    assert set(torch.nonzero(proximal).flatten().tolist()) == truth  # and the rest is the true support
    printed = subprocess.run([sys.executable, str(EXAMPLES / "l1_exact_zeros.py")], capture_output=True, text=True,
                             check=True, timeout=300).stdout  # fmt: skip
    assert "a proximal step" in printed and "exactly" in printed


@pytest.mark.slow
def test_own_loop_example_regularized_beats_unregularized() -> None:
    example = load("own_loop.py")
    train_without, val_without = example.train(example.Regularization.off(), seed=0)
    train_with, val_with = example.train(example.SETTING, seed=0)
    assert train_without == 1.0  # the unregularized CNN memorizes the 150 images
    assert val_with > val_without + 0.01
    assert train_with - val_with < train_without - val_without  # a smaller gap


CONFIGS = sorted((EXAMPLES / "configs").glob("*.toml"))


def test_there_is_a_config_per_built_in_task() -> None:
    from regdial.training.tasks import TASKS

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


@pytest.mark.slow
@pytest.mark.parametrize("script", ["tune_huggingface.py", "tune_lightning.py", "tune_own_model.py"])
def test_the_tuning_examples_run(script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example, on a tiny budget: the path runs, a report is written, the baseline is there,
    and nothing lands in the working directory (a trainer's default log directory)."""
    monkeypatch.chdir(tmp_path)
    pytest.importorskip(
        "transformers" if "huggingface" in script else "lightning" if "lightning" in script else "torch"
    )
    example = load(script)
    result = example.main("3 trials", 4, str(tmp_path / "run"))
    assert result.path and (tmp_path / "run" / "report.html").is_file()
    assert "val_accuracy" in result.baseline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
