"""The reserve: trials still improving go on from their checkpoints, binding ranges are followed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from regdial import InputError, Regularization, Space, Trial, fit, tune
from regdial.dial.budget import Budget
from regdial.dial.continuation import GROWTH, beyond_edge, in_reserve


def test_a_completed_run_resumed_with_more_epochs_trains_on_and_counts_each_epoch_once(
    tmp_path: Path,
) -> None:
    setting = Regularization(weight_decay=0.05)
    first = fit("wine", setting, epochs=4, run_dir=tmp_path, seed=0, progress=False)
    assert first.meta["summary"]["status"] == "completed"
    longer = fit("wine", setting, epochs=7, run_dir=tmp_path, resume=True, seed=0, progress=False)
    assert [int(r["epoch"]) for r in longer.rows] == list(range(1, 8))
    assert longer.rows[:4] == first.rows  # the first four epochs are the first run's, not trained again
    assert longer.meta["summary"]["status"] == "completed" and longer.meta["summary"]["epochs"] == 7
    assert "epochs = 7" in (tmp_path / "config.toml").read_text()
    with pytest.raises(InputError, match="epochs must be at least the 7 the run has trained"):
        fit("wine", setting, epochs=5, run_dir=tmp_path, resume=True, seed=0, progress=False)
    with pytest.raises(InputError, match="lr = "):  # another option than the length is still refused
        fit("wine", setting, epochs=9, run_dir=tmp_path, resume=True, seed=0, lr=0.5, progress=False)


def test_a_run_that_stopped_early_stays_stopped_when_resumed_for_longer(tmp_path: Path) -> None:
    setting = Regularization(early_stopping=1, min_delta=10.0)  # nothing is an improvement: it stops at once
    first = fit("wine", setting, epochs=6, run_dir=tmp_path, seed=0, progress=False)
    assert first.meta["summary"]["status"] == "stopped early"
    again = fit("wine", setting, epochs=12, run_dir=tmp_path, resume=True, seed=0, progress=False)
    assert len(again) == len(first)


def test_the_reserve_is_the_last_share_of_the_budget() -> None:
    budget = Budget.parse("10 trials")
    assert not in_reserve(budget, 6) and in_reserve(budget, 7)


def test_a_trial_still_improving_at_its_length_is_continued_from_its_checkpoint(tmp_path: Path) -> None:
    # Four epochs of wine at a tenth of its learning rate: every trial still improves at its end.
    said: list[str] = []
    result = tune("wine", epochs=4, lr=1e-4, budget="6 trials", strategy="random", run_dir=tmp_path,
                  space=Space({"weight_decay": (1e-4, 1e-2)}), retrain=True, progress=said.append)  # fmt: skip
    continued = [t for t in result.trials if t.get("continues") is not None]
    assert continued, said
    child = continued[0]
    parent = next(t for t in result.trials if t["number"] == child["continues"])
    assert parent["length"] == 4 and child["length"] == 4 + math.ceil(GROWTH * 4)
    assert child["epochs"] == child["length"] - parent["length"]  # only the new epochs are paid for
    assert child["weight_decay"] == parent["weight_decay"]
    history = json.loads((tmp_path / "trials" / str(child["number"]) / "history.json").read_text())
    before = json.loads((tmp_path / "trials" / str(parent["number"]) / "history.json").read_text())
    assert [r["epoch"] for r in history["rows"]] == list(range(1, child["length"] + 1))
    assert history["rows"][: parent["length"]] == before["rows"]  # the parent's curve, going on
    # each epoch counted once: the trials' own, and the finish's continuation of the chosen run
    trained = sum(int(t["epochs"]) for t in result.trials)
    chosen = next(t for t in result.trials if t["number"] == result.best_trial)
    longer = any("it validates better" in note for note in result.notes)
    tried = any(f"trained for {2 * chosen['length']}" in note for note in result.notes)
    assert result.epochs_spent == trained + (2 * chosen["length"] if tried else 0)
    rows = json.loads((tmp_path / "best" / "history.json").read_text())["rows"]
    # trained again for twice the length, afresh (its schedules span it): best.toml says so
    assert len(rows) == (2 if longer else 1) * chosen["length"]
    assert f"epochs = {len(rows)}" in (tmp_path / "best.toml").read_text()
    assert result.retrain["epochs"] == len(rows)
    baseline = json.loads((tmp_path / "best" / "baseline" / "history.json").read_text())["rows"]
    assert len(baseline) == len(rows)  # the unregularized run as long as the tuned one
    assert any(f"continuing trial {parent['number']} to {child['length']}" in line for line in said)
    assert not (tmp_path / "trials" / str(parent["number"]) / "checkpoints").exists()  # moved on, not copied
    # the chosen trial's own run is what the finish scores, when its checkpoint was kept
    assert (tmp_path / "best" / "history.json").is_file()
    kept = len(list((tmp_path / "trials").glob("*/checkpoints")))
    assert kept <= 3  # only the best few keep their checkpoints


def falling(setting: Regularization, trial: Trial) -> float:
    """A validation loss that falls with weight decay: the best value sits beyond the range's top."""
    return 0.1 * (math.log10(setting.weight_decay) - 0.5) ** 2


def test_a_range_that_binds_is_extended_while_budget_remains() -> None:
    result = tune(falling, space=Space({"weight_decay": (1e-4, 1e-2)}), budget="10 trials", strategy="tpe",
                  retrain=False)  # fmt: skip
    beyond = [t for t in result.trials if t["weight_decay"] > 1e-2]
    assert beyond, "a trial beyond the old edge, before the budget ran out"
    first = beyond[0]["number"]
    assert len(result.trials) == 10 and first < 9
    assert any("the range of weight_decay was extended from [0.0001, 0.01]" in note for note in result.notes)


def test_a_point_beyond_a_binding_edge_is_the_best_setting_moved_into_the_new_part() -> None:
    import optuna

    study = optuna.create_study(direction="minimize")
    distributions = {"weight_decay": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for value, loss in ((1e-2, 0.1), (1e-3, 0.5)):
        study.add_trial(optuna.trial.create_trial(params={"weight_decay": value}, distributions=distributions,
                                                  value=loss))  # fmt: skip
    before = Space({"weight_decay": (1e-4, 1e-2)})
    after = before.narrow(weight_decay={**before.knobs["weight_decay"].to_dict(), "high": 1e-1})
    point = beyond_edge(study, before, after)
    assert point is not None and point["weight_decay"] == pytest.approx(math.sqrt(1e-2 * 1e-1))
    assert beyond_edge(study, before, before) is None  # no range grew: nothing to try
