"""The task's time scale: the probe's curve sets the trials' length, patience and budget."""

from __future__ import annotations

import importlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from regdial import tune
from regdial.dial.space import Space
from regdial.dial.timescale import RECIPE, TimeScale, noise_and_slope, patience_for, recipe, recipe_params
from regdial.training.history import History


def curve(noise: float, epochs: int = 120, peak: int = 90, seed: int = 0, rise: float = 0.3) -> History:
    """Validation accuracy rising by ``rise`` until ``peak``, then falling, with Gaussian noise."""
    rng = random.Random(seed)
    rows = []
    for epoch in range(1, epochs + 1):
        mean = 0.5 + rise * min(epoch, peak) / peak - 0.002 * max(0, epoch - peak)
        rows.append({"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": mean + rng.gauss(0, noise),
                     "seconds": 0.5})  # fmt: skip
    return History("classification", rows)


def test_the_trials_length_follows_the_best_epoch_within_the_usual_length_and_the_cap() -> None:
    scale = TimeScale.read(curve(0.0), "val_accuracy", reference=30, cap=240)
    assert scale.best_epoch == 90 and scale.epochs == math.ceil(1.25 * 90) and scale.probe_epochs == 120
    assert scale.seconds_per_epoch == pytest.approx(0.5)
    assert TimeScale.read(curve(0.0, epochs=20, peak=10), "val_accuracy", reference=30, cap=240).epochs == 30
    assert TimeScale.read(curve(0.0), "val_accuracy", reference=30, cap=100).epochs == 100


def test_patience_grows_with_the_validation_noise() -> None:
    patiences = []
    for noise in (0.01, 0.02, 0.04):  # a curve still rising 0.1 over 90 epochs: 3 * noise / slope decides
        scales = [TimeScale.read(curve(noise, seed=s, rise=0.1), "val_accuracy", reference=30, cap=240)
                  for s in range(5)]  # fmt: skip
        assert all(max(5, t.epochs // 2) <= t.patience <= max(5, t.epochs) for t in scales)
        patiences.append(sorted(t.patience for t in scales)[2])  # the median over seeds
    assert patiences[0] < patiences[1] < patiences[2]


def test_the_noise_and_slope_of_known_curves() -> None:
    line = [0.01 * i for i in range(40)]
    noise, slope = noise_and_slope(line)
    assert noise == pytest.approx(0.0, abs=1e-12) and slope == pytest.approx(0.01)
    rng = np.random.default_rng(0)
    flat = list(rng.normal(0.5, 0.02, size=400))
    noise, slope = noise_and_slope(flat)
    assert noise == pytest.approx(0.02, rel=0.25)  # the five-epoch median takes a little of it
    assert patience_for(0.02, 0.0, 100) == 100 and patience_for(0.0, 0.0, 100) == 50
    assert patience_for(0.02, 0.001, 100) == 60  # 3 * noise / slope


def test_the_recipe_is_the_practitioners_within_the_space() -> None:
    space = Space({"weight_decay": (1e-4, 0.01), "dropout": (0.0, 0.5), "l1": (1e-6, 1e-3)})
    setting = recipe(space)
    assert setting.weight_decay == 0.01  # RECIPE's 0.05, kept inside the range
    assert setting.dropout == RECIPE["dropout"]
    assert setting.l1 == 1e-6  # no recipe for l1: its weakest value in range, as the recipe's trial takes it
    assert space.setting(space.values_of(recipe_params(space))) == setting  # the probe is the recipe's trial
    optional = Space({"weight_decay": (1e-4, 0.1), "l1": {"low": 1e-6, "high": 1e-3, "optional": True}})
    assert recipe(optional).l1 == 0.0 and recipe_params(optional)["l1_on"] is False
    assert optional.setting(optional.values_of(recipe_params(optional))) == recipe(optional)


@pytest.fixture(scope="module")
def long_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    np.savez(directory / "mine.npz", x=x, y=y)
    return directory / "mine.npz"


@pytest.mark.slow
def test_a_search_on_your_data_learns_its_time_scale_and_spends_the_budget_it_printed(
    long_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default budget, 12 runs, on a task whose usual length is 4 epochs: quick.
    monkeypatch.setattr(importlib.import_module("regdial.training.fit"), "default_epochs", lambda task: 4)
    said: list[str] = []
    result = tune(long_task, model="linear", budget=None, strategy="random", run_dir=tmp_path, retrain=False,
                  progress=said.append)  # fmt: skip
    scale = json.loads((tmp_path / "timescale.json").read_text())
    assert any(line.startswith("probing the time scale: ") for line in said)
    assert scale["probe_epochs"] in (4, 8, 16, 32)  # the probe's run doubled while it improved at its end
    budget_line = next(line for line in said if line.startswith("budget: about 12 runs of ~"))
    budget = 12 * scale["epochs"]
    assert f"({budget:,} epochs)" in budget_line
    # what was spent is what was printed, within 10% (the last trial may run past it)
    assert abs(result.epochs_spent - budget) <= 0.1 * budget
    assert max(int(t["epochs"]) for t in result.trials) <= scale["epochs"]
    # the same command again resumes: the time scale is read back, not measured again
    said.clear()
    tune(long_task, model="linear", strategy="random", run_dir=tmp_path, retrain=False, progress=said.append)
    assert not any(line.startswith("probing") for line in said)


def test_a_built_in_task_or_given_epochs_keep_their_length(long_task: Path, tmp_path: Path) -> None:
    said: list[str] = []
    tune(long_task, model="linear", epochs=3, budget="2 trials", strategy="random", retrain=False,
         progress=said.append)  # fmt: skip
    assert not any(line.startswith("probing") for line in said)


def test_a_one_run_strategy_prints_no_budget(
    long_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """online and path refuse a budget: the probe's time scale is said, a budget is not."""
    monkeypatch.setattr(importlib.import_module("regdial.training.fit"), "default_epochs", lambda task: 4)
    said: list[str] = []
    tune(long_task, model="linear", strategy="path", run_dir=tmp_path, retrain=False, progress=said.append)
    assert any(line.startswith("time scale: ") for line in said)
    assert not any(line.startswith("budget: ") for line in said)
