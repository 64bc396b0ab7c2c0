"""The dial's choice holds up: ranges that bind are extended, noise is respected, test data is
honest, and training length is part of the dial (issue 13)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution

from regdial import Space, tune
from regdial.cli import main
from regdial.dial.choice import choose
from regdial.training.data import load_data


def test_a_range_that_binds_is_extended() -> None:
    """sparse-regression's lasso wants L1 near 0.1-0.3: a range that stops at 0.003 binds."""
    result = tune("sparse-regression", Space({"l1": (1e-4, 3e-3)}), epochs=60, budget="14 trials", strategy="tpe",
                  retrain=False)  # fmt: skip
    assert any(
        note.startswith("the range of l1 was extended from [0.0001, 0.003] to [0.0001, ")
        for note in result.notes
    )
    assert result.best.l1 > 3e-3  # and the search went there


def _trial(value: float, se: float, weight_decay: float, dropout: float) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        value=value, params={"weight_decay": weight_decay, "dropout": dropout},
        distributions={"weight_decay": FloatDistribution(1e-4, 1.0, log=True), "dropout": FloatDistribution(0.0, 0.5)},
        user_attrs={"se": se},
    )  # fmt: skip


def test_the_one_standard_error_rule_picks_the_more_regularized_within_noise() -> None:
    space = Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)})
    best = _trial(0.950, 0.010, 1e-4, 0.05)
    close_and_stronger = _trial(0.945, 0.011, 0.1, 0.4)
    far_and_strongest = _trial(0.900, 0.015, 1.0, 0.5)
    trials = [best, close_and_stronger, far_and_strongest]
    for number, trial in enumerate(trials):
        trial.number = number
    chosen, why = choose(trials, space, maximize=True)
    assert chosen is close_and_stronger and why.startswith("one-standard-error rule")
    alone, why = choose([best, far_and_strongest], space, maximize=True)
    assert alone is best and why.startswith("best validation score")
    rmse = [_trial(1.00, 0.05, 1e-3, 0.0), _trial(1.04, 0.05, 0.5, 0.2)]
    for number, trial in enumerate(rmse):
        trial.number = number
    assert choose(rmse, space, maximize=False)[0] is rmse[1]  # lower is better: within 0.05 of 1.00


def test_a_csv_without_a_test_split_gets_one_and_the_table_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 4))
    lines = ["a,b,c,d,label"] + [
        ",".join(f"{v:.4f}" for v in row) + f",{int(row[0] + row[1] > 0)}" for row in x
    ]
    (tmp_path / "mine.csv").write_text("\n".join(lines) + "\n")
    data = load_data(tmp_path / "mine.csv", target="label")
    assert data.test_carved and len(data.x_test) == 30 and len(data.x_val) == 30 and len(data.x_train) == 90
    assert "validation and test splits carved from it" in data.description
    assert set(data.y_test.tolist()) == {0, 1}  # stratified
    main(["tune", "--data", str(tmp_path / "mine.csv"), "--target", "label", "--epochs", "3", "--budget", "2 trials",
          "--strategy", "random", "--out", str(tmp_path / "search"), "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        "test: a test split carved from the training data (seeded, stratified; the search never saw it)"
        in printed
    )


def test_a_regression_csvs_carved_test_split_is_not_said_stratified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 3))
    lines = ["a,b,c,y"] + [",".join(f"{v:.4f}" for v in row) + f",{2.5 * row[0]:.4f}" for row in x]
    (tmp_path / "mine.csv").write_text("\n".join(lines) + "\n")
    main(["tune", "--data", str(tmp_path / "mine.csv"), "--target", "y", "--epochs", "2", "--budget", "2 trials",
          "--strategy", "random", "--out", str(tmp_path / "search"), "--quiet"])  # fmt: skip
    printed = " ".join(capsys.readouterr().out.split())
    assert "test: a test split carved from the training data (seeded; the search never saw it)" in printed


def test_trials_stop_early_keep_their_best_epoch_and_the_budget_counts_what_was_trained() -> None:
    result = tune("breast-cancer", Space({"weight_decay": (1e-4, 1e-2)}), budget="4 trials", strategy="tpe",
                  retrain=False, lr=3e-2)  # fmt: skip
    planned = 40  # the task's 40 epochs, with early stopping (patience max(5, 40 // 4) = 10)
    trained = [int(t["epochs"]) for t in result.trials]
    assert all(n <= planned for n in trained) and min(trained) < planned  # early stopping inside trials
    assert result.epochs_spent == sum(trained)  # the budget counts the epochs actually trained
    assert result.best.early_stopping == 10  # the chosen setting carries its training length


def test_a_choice_still_improving_at_its_end_is_trained_longer() -> None:
    """A learning rate too low for the epochs: the chosen run is still improving at its last
    epoch, so the search trains it again for twice the length and says what the limit was."""
    result = tune("breast-cancer", Space({"weight_decay": (1e-4, 1e-2)}), epochs=6, lr=1e-4, budget="2 trials",
                  strategy="random")  # fmt: skip
    said = " ".join(result.notes)
    assert "after 6 epochs" in said and (
        "trained for 12 it validates better" in said or "trained for 12 it did not validate better" in said
    )
    trials = sum(int(t["epochs"]) for t in result.trials)
    assert trials < result.epochs_spent <= trials + 12  # the longer run (early stopping may end it) counts


def test_a_choice_whose_early_stopping_never_fired_is_trained_longer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the curve reads as settled, a run that hit the epoch cap with early stopping
    armed was cut by the cap: the search tries twice the length, and counts it."""
    import regdial.diagnosis as diagnosis

    settled = diagnosis.Diagnosis("good fit", "good fit", best_epoch=None)
    monkeypatch.setattr(diagnosis, "diagnose", lambda *args, **kwargs: settled)
    result = tune("breast-cancer", Space({"weight_decay": (1e-4, 1e-2)}), epochs=6, budget="2 trials",
                  strategy="random")  # fmt: skip
    said = " ".join(result.notes)
    assert "still improving within early stopping's patience (5 epochs) after 6 epochs" in said
    trials = sum(int(t["epochs"]) for t in result.trials)
    assert trials < result.epochs_spent <= trials + 12


def test_a_search_whose_trials_all_score_alike_says_its_choice_is_arbitrary() -> None:
    """A model that predicts the majority class scores the same under every setting."""
    from regdial import Regularization, Trial

    def majority(setting: Regularization, trial: Trial) -> float:
        return 0.91  # a rare positive class: every trial predicts "negative"

    result = tune(majority, space=Space({"weight_decay": (1e-4, 1e-1)}), budget="5 trials", strategy="random",
                  epochs=2, metric="val_accuracy", report=False)  # fmt: skip
    said = [
        note for note in result.notes if note.startswith("every one of the 5 trials scored val_accuracy 0.91")
    ]
    assert len(said) == 1 and "its choice is arbitrary" in said[0]


def test_trials_that_differ_say_nothing_of_it() -> None:
    from regdial.dial.choice import flat_notes

    alike = [_trial(0.9 + 1e-6 * i, 0.01, 1e-3, 0.1) for i in range(4)]
    assert flat_notes(alike, "val_accuracy") and not flat_notes(alike[:3], "val_accuracy")
    apart = [_trial(0.9 + 0.01 * i, 0.01, 1e-3, 0.1) for i in range(4)]
    assert not flat_notes(apart, "val_accuracy")
    within_noise_of_each_other = [_trial(0.9 + 1e-4 * i, 0.01, 1e-3, 0.1) for i in range(4)]
    assert flat_notes(within_noise_of_each_other, "val_accuracy")  # 3e-4 < 5% of the 0.01 standard error


def test_the_notes_say_the_tuned_row_is_scored_at_its_best_epoch_and_the_baseline_at_its_last() -> None:
    result = tune("wine", budget="3 trials", strategy="random", epochs=20, report=False)
    tuned, base = result.retrain["tuned"], result.retrain["baseline"]
    said = [note for note in result.notes if note.startswith("the tuned row is scored at its best epoch")]
    if tuned["best_epoch"] < tuned["epochs_run"]:
        assert said == [f"the tuned row is scored at its best epoch ({tuned['best_epoch']} of {tuned['epochs_run']}: "
                        "early stopping and the best weights are part of the setting), the unregularized baseline "
                        f"at its last ({base['epochs_run']})"]  # fmt: skip
    else:
        assert not said
    assert tuned["best_epoch"] < tuned["epochs_run"]  # wine at seed 0 stops early: the note is checked
