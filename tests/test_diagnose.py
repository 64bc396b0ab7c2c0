"""diagnose: synthetic histories of each state, real runs, and the advice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regdial import Regularization, fit
from regdial.diagnosis import diagnose, smooth
from regdial.training.history import History


def history(train, val, *, train_acc=None, val_acc=None, noise=0.0, seed=0, classes=10) -> History:
    rng = np.random.default_rng(seed)
    n = len(train)
    val = np.asarray(val) + noise * rng.standard_normal(n)
    train_acc = np.full(n, 0.9) if train_acc is None else np.asarray(train_acc)
    val_acc = np.full(n, 0.85) if val_acc is None else np.asarray(val_acc)
    rows = [
        {"epoch": e + 1, "train_loss": t, "val_loss": v, "gap": v - t, "train_accuracy": ta, "val_accuracy": va,
         "weight_norm": 1.0, "zero_fraction": 0.0, "lr": 1e-3, "seconds": 0.1}
        for e, (t, v, ta, va) in enumerate(zip(train, val, train_acc, val_acc, strict=True))
    ]  # fmt: skip
    return History("classification", rows, num_classes=classes)


E = np.arange(1, 61)


def test_u_shaped_validation_is_overfitting_since_its_minimum() -> None:
    train = 2.0 * np.exp(-E / 6)
    val = 2.0 * np.exp(-E / 6) + 0.3 + 0.015 * np.maximum(0, E - 20)
    result = diagnose(history(train, val, noise=0.02), Regularization(weight_decay=0.01, dropout=0.1))
    assert result.state == "overfitting"
    assert 16 <= result.overfit_epoch <= 26
    assert result.direction == +1
    assert result.moves == {"weight_decay": 0.03, "dropout": 0.2}
    assert result.message.startswith(f"overfitting since epoch {result.overfit_epoch}, gap ")
    assert "raise weight_decay (x3: 0.01 -> 0.03) or raise dropout (0.1 -> 0.2)" in result.message
    assert result.early_stop_epoch is not None and result.early_stop_epoch > result.overfit_epoch
    assert f"would have stopped at {result.early_stop_epoch}" in result.message
    suggested = result.suggest(Regularization(weight_decay=0.01, dropout=0.1))
    assert (suggested.weight_decay, suggested.dropout) == (0.03, 0.2)
    # A run early stopping did stop there: said as done, not as what it would have done.
    ended = history(train[: result.early_stop_epoch], val[: result.early_stop_epoch], noise=0.02)
    patience = result.message.split("(patience ")[1].split(")")[0]
    stopped = diagnose(ended, Regularization(weight_decay=0.01, dropout=0.1, early_stopping=int(patience)))
    assert f"early stopping (patience {patience}) stopped it at {result.early_stop_epoch}" in stopped.message


def test_memorized_training_data_is_overfitting() -> None:
    train = 2.0 * np.exp(-E / 3) + 1e-4
    val = 0.3 + 2.0 * np.exp(-E / 3)
    accuracy = np.minimum(1.0, 0.5 + E / 20)
    result = diagnose(history(train, val, train_acc=accuracy, val_acc=np.minimum(0.93, accuracy)))
    assert result.state == "overfitting"
    assert "memorized" in result.message
    assert result.moves == {"weight_decay": 0.01, "dropout": 0.1}


def test_flat_high_loss_is_underfitting() -> None:
    train = math.log(10) - 0.05 * (1 - np.exp(-E / 5))
    result = diagnose(history(train, train + 0.01), Regularization(weight_decay=30.0, dropout=0.5))
    assert result.state == "underfitting"
    assert result.direction == -1
    assert result.moves == {"weight_decay": 10.0, "dropout": 0.4}
    assert "lower weight_decay (x0.333: 30 -> 10)" in result.message
    off = diagnose(history(train, train + 0.01), Regularization.off())
    assert "regularization is already off" in off.message
    bare = diagnose(history(train, train + 0.01))  # a log that records no setting: not read as "off"
    assert not bare.setting_known and "already off" not in bare.message
    assert "records no setting" in bare.message


def test_an_online_runs_advice_stays_inside_its_space() -> None:
    """An online run held to its Space (``meta["space"]``): a knob at the range's floor is
    not advised below it (the controller could not have gone there); the range is named."""
    from regdial import Space

    train = math.log(10) - 0.05 * (1 - np.exp(-E / 5))
    run = history(train, train + 0.01)
    space = Space(
        {
            "weight_decay": (1e-4, 1.0),
            "dropout": (0.0, 0.5),
            "l1": {"low": 1e-6, "high": 1e-3, "scale": "log", "optional": True},
        }
    )
    run.meta["space"] = space.to_dict()
    result = diagnose(run, Regularization(weight_decay=1e-4, dropout=0.3, l1=1e-6))
    assert result.state == "underfitting"
    assert "weight_decay" not in result.moves and result.moves["dropout"] == pytest.approx(0.2)
    assert result.moves["l1"] == pytest.approx(1e-6 / 3)  # optional: below its floor is towards off
    assert "weight_decay is at its range's floor (0.0001): widen the Space to go lower" in result.message
    near = diagnose(run, Regularization(weight_decay=2e-4))
    assert near.moves == {"weight_decay": 1e-4}  # held at the floor, not advised past it
    assert "lower weight_decay (x0.5: 0.0002 -> 0.0001)" in near.message


def test_a_loss_above_an_untrained_models_asks_for_a_lower_learning_rate() -> None:
    train = 3 * math.log(10) + 0.0 * E  # three times the loss of a uniform guess, flat
    result = diagnose(history(train, train + 0.1), Regularization(weight_decay=1e-2))
    assert result.state == "underfitting"
    assert result.direction == 0 and result.moves == {}  # not a matter of the dial
    assert "3 times an untrained model's" in result.message
    assert "lower the learning rate" in result.message


def test_falling_to_the_end_is_still_improving() -> None:
    train = 2.0 * np.exp(-E / 40)
    result = diagnose(history(train, train + 0.05))
    assert result.state == "still improving"
    assert result.direction == 0
    assert "train longer" in result.message


def test_plateau_is_a_good_fit_even_with_noise_and_a_last_spike() -> None:
    train = 0.2 + 2.0 * np.exp(-E / 4)
    val = 0.3 + 2.0 * np.exp(-E / 4)
    val_noisy = val + 0.01 * np.random.default_rng(1).standard_normal(len(E))
    val_noisy[-1] += 0.08  # one bad epoch must not flip the verdict
    result = diagnose(history(train, val_noisy))
    assert result.state == "good fit"
    assert result.moves == {}


def test_non_finite_is_diverged() -> None:
    train = list(2.0 * np.exp(-E[:10] / 4))
    val = [*train[:-1], math.nan]
    result = diagnose(history(train, val))
    assert result.state == "diverged"
    assert result.message.startswith("diverged at epoch 10")
    assert "lower the learning rate" in result.message


def test_regression_underfitting_uses_r2() -> None:
    rows = [
        {"epoch": e, "train_loss": 5.0, "val_loss": 5.1, "gap": 0.1, "train_rmse": 2.2, "val_rmse": 2.3,
         "train_r2": 0.3, "val_r2": 0.28, "weight_norm": 1.0, "zero_fraction": 0.0, "lr": 0.1, "seconds": 0.01}
        for e in range(1, 21)
    ]  # fmt: skip
    result = diagnose(History("regression", rows), Regularization(l1=1.0))
    assert result.state == "underfitting"
    assert result.moves == {"l1": pytest.approx(1 / 3)}


def test_too_few_epochs() -> None:
    assert diagnose(history([1.0, 0.8], [1.1, 0.9])).state == "still improving"


def test_smoothing_and_its_noise_estimate() -> None:
    rng = np.random.default_rng(0)
    values = list(1.0 + 0.1 * rng.standard_normal(400))
    smoothed, sigma = smooth(values)
    assert 0.08 < sigma < 0.12
    assert max(abs(s - 1.0) for s in smoothed[30:-30]) < 0.1


def test_a_model_without_dropout_is_not_advised_dropout() -> None:
    """fit and the callbacks record a model with no dropout layers: "raise dropout" would
    turn nothing there (the advice goes on to the next knob, label smoothing)."""
    train = 2.0 * np.exp(-E / 3) + 1e-4
    val = 0.3 + 2.0 * np.exp(-E / 3)
    accuracy = np.minimum(1.0, 0.5 + E / 20)
    run = history(train, val, train_acc=accuracy, val_acc=np.minimum(0.93, accuracy))
    run.meta["no_dropout"] = True
    result = diagnose(run)
    assert result.state == "overfitting"
    assert result.moves == {"weight_decay": 0.01, "label_smoothing": 0.1} and "dropout" not in result.message
    recorded = fit(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), Regularization(),
                   train=DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8),
                   val=DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8),
                   num_classes=2, epochs=1, progress=False)  # fmt: skip
    assert recorded.meta["no_dropout"] is True


def test_real_runs_read_as_they_should() -> None:
    """The issue's two real cases: unregularized digits-small overfits, absurd decay underfits."""
    plain = fit("digits-small", Regularization.off(), epochs=40, progress=False)
    assert diagnose(plain, Regularization.off()).state == "overfitting"
    crushed_setting = Regularization(weight_decay=50.0)
    crushed = fit("digits-small", crushed_setting, epochs=20, progress=False)
    assert diagnose(crushed, crushed_setting).state == "underfitting"


def test_regression_memorization_and_penalty_moves() -> None:
    """Least squares with 100 features on 150 rows memorizes; the lasso's own knob goes up."""
    plain = fit("sparse-regression", Regularization(), epochs=200, progress=False)
    result = diagnose(plain)
    assert result.state == "overfitting"
    assert "train R^2" in result.message
    assert result.overfit_epoch is not None and result.overfit_epoch > 50  # once validation stopped improving
    # At 100 epochs the same gap is there while validation still falls: not overfitting yet.
    assert diagnose(History(plain.kind, plain.rows[:100], **plain.meta)).state == "still improving"
    lasso = Regularization(l1=0.01)
    weak = diagnose(fit("sparse-regression", lasso, epochs=200, progress=False), lasso)
    assert weak.state == "overfitting"
    assert weak.moves["l1"] == pytest.approx(0.03)  # the penalty in use is turned up first


def test_a_run_a_controller_turned_is_advised_from_where_it_ended(tmp_path) -> None:
    """An online run starts at the recipe (weight decay 0.05, dropout 0.1) and ends
    elsewhere: the advice, the CLI's and the report's, starts from the last setting it
    turned to (``meta["retunes"]``), not from its start."""
    from typer.testing import CliRunner

    from regdial._io import write_json
    from regdial.cli import app
    from regdial.diagnosis import in_force

    train = 2.0 * np.exp(-E / 6)
    val = 2.0 * np.exp(-E / 6) + 0.3 + 0.015 * np.maximum(0, E - 20)
    run = history(train, val, noise=0.02)
    start, end = (
        Regularization(weight_decay=0.05, dropout=0.1),
        Regularization(weight_decay=1e-4, dropout=0.2),
    )
    run.meta["setting"] = start.to_dict()
    run.meta["retunes"] = [{"epoch": 12, "setting": Regularization(weight_decay=1e-3).to_dict()},
                           {"epoch": 40, "setting": end.to_dict()}]  # fmt: skip
    assert in_force(run, start) == end and in_force(history(train, val), start) == start
    assert "raise weight_decay (x3: 0.0001 -> 0.0003) or raise dropout (0.2 -> 0.3)" in diagnose(run).message
    run.save(tmp_path)
    (tmp_path / "summary.json").write_text('{"setting": ' + __import__("json").dumps(start.to_dict()) + "}")
    printed = CliRunner().invoke(app, ["diagnose", str(tmp_path)]).output
    assert "raise weight_decay (x3: 0.0001 -> 0.0003)" in " ".join(printed.split())
    # A trainer callback's online= run records where it ended as meta["online"]["values"]
    # (its regdial_history.json's meta["setting"] is the start): the CLI advised from 0.05.
    del run.meta["retunes"]
    run.meta["online"] = {"moves": [], "values": end.to_dict()}
    assert in_force(run, start) == end
    (tmp_path / "trainer").mkdir()
    write_json(tmp_path / "trainer" / "regdial_history.json", run.to_dict())
    printed = CliRunner().invoke(app, ["diagnose", str(tmp_path / "trainer")]).output
    assert "raise weight_decay (x3: 0.0001 -> 0.0003)" in " ".join(printed.split())


def test_an_unset_dropout_is_advised_as_the_models_own_rates_not_zero() -> None:
    """A setting that leaves dropout unset leaves the model's own rates (a GPT-2's 0.1):
    'raise dropout (0 -> 0.1)' would be false."""
    train = 2.0 * np.exp(-E / 6)
    val = 2.0 * np.exp(-E / 6) + 0.3 + 0.015 * np.maximum(0, E - 20)
    message = diagnose(history(train, val, noise=0.02), Regularization(weight_decay=0.01)).message
    assert (
        "raise weight_decay (x3: 0.01 -> 0.03) or raise dropout above the model's own rates (unset here: 0.1 "
        "where they are lower)" in message
    )  # "set dropout to 0.1" was a no-op for a GPT-2 or a BERT, whose own rates are 0.1
    assert "dropout (0 ->" not in message


def test_a_log_without_a_setting_is_advised_from_what_ran_whatever_it_was() -> None:
    # nanoGPT's default weight decay is 0.1: "raise weight_decay (0 -> 0.01)" was a tenfold cut.
    train = 2.0 * np.exp(-E / 6)
    val = 2.0 * np.exp(-E / 6) + 0.3 + 0.015 * np.maximum(0, E - 20)
    message = diagnose(history(train, val, noise=0.02)).message
    assert message.startswith(
        "overfitting since epoch 21, gap 0.874: raise weight_decay (0.01 if it was off, x3 what ran if not) or "
        "raise dropout (0.1 if it was off, +0.1 what ran if not) (the log records no setting);"
    )


def test_a_smoothed_training_loss_at_label_smoothings_floor_is_not_underfitting() -> None:
    """A trainer's training loss is the smoothed one, which cannot go below the smoothed
    target's entropy (1.18 for 10 classes at 0.3): a model that fits its data sits there,
    and reading it against ln 10 said "underfitting: still 56%"."""
    floor = -(0.73 * math.log(0.73)) - 9 * 0.03 * math.log(0.03)
    train = floor + 0.02 + 1.5 * np.exp(-E / 3)
    run = history(train, 0.35 + 1.0 * np.exp(-E / 3), classes=10)
    run.meta["train_loss_source"] = "running mean of the training batches' losses"
    result = diagnose(run, Regularization(label_smoothing=0.3), num_classes=10)
    assert result.state != "underfitting" and result.details["untrained_share"] < 0.05
    run.meta["train_loss_source"] = "measured on the training split"  # fit's: unsmoothed, no floor
    assert diagnose(run, Regularization(label_smoothing=0.3), num_classes=10).state == "underfitting"


def test_a_finite_blow_up_is_diverged_and_a_falling_loss_above_the_mean_is_not_unstable() -> None:
    """A loss that rose to 3.5e4 times its first read as underfitting; a regression's loss
    still far above predicting the mean (a target near 150, five epochs) but falling every
    epoch was told "training is unstable; lower the learning rate", the opposite of its cure."""
    rising = 1.5 * np.exp(-E[:15] / 5)
    blown = history(np.concatenate([rising, rising[-1] * np.exp(E[:25] / 2)]), np.full(40, 2.0))
    reading = diagnose(blown)
    assert reading.state == "diverged" and reading.message.startswith("diverged: the training loss rose to ")
    train = np.array([28126.0, 27111.0, 26219.0, 25754.0, 25671.0])
    rows = [{"epoch": e + 1, "train_loss": t, "val_loss": t * 1.02, "train_r2": -3.12 - (4 - e) * 0.3}
            for e, t in enumerate(train)]  # fmt: skip
    slow = diagnose(History("regression", rows))
    assert slow.state == "underfitting" and "still falling" in slow.message
    assert "raise the learning rate (a regression target far from 0: standardize it)" in slow.message
    assert "lower the learning rate" not in slow.message
    flat = [{"epoch": e + 1, "train_loss": 3e4, "val_loss": 3e4, "train_r2": -3.0} for e in range(5)]
    assert "training is unstable; lower the learning rate" in diagnose(History("regression", flat)).message


def test_diagnose_reads_a_path_as_regdial_diagnose_does(tmp_path, capsys) -> None:
    from regdial.cli import main

    setting = Regularization(weight_decay=0.02)
    fit("wine", setting, epochs=4, run_dir=tmp_path / "run", progress=False)
    from_path = diagnose(tmp_path / "run")
    assert from_path.message == diagnose(str(tmp_path / "run")).message
    assert from_path.setting_known  # the run's summary.json: advice from its weight decay
    main(["diagnose", str(tmp_path / "run")])
    assert from_path.message in " ".join(capsys.readouterr().out.split())
    with pytest.raises(
        ValueError, match=r"^history must be a run directory or a history.csv/.json file, got "
    ):
        diagnose(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"^history must be a regdial History, or the path of a run"):
        diagnose(3)


def test_a_flat_validation_while_the_training_loss_halves_is_overfitting() -> None:
    """A language model's loss-only log (GPT-2 under the Trainer, a newcomer's pass): its
    validation loss 4.596 at epoch 16, 4.632 at 30 (0.8%, under the 1% rise), while the
    training loss went 2.29 -> 1.22; it read as a good fit."""
    train = [
        5.329,
        4.746,
        4.251,
        3.781,
        3.334,
        2.934,
        2.585,
        2.287,
        2.033,
        1.807,
        1.621,
        1.472,
        1.352,
        1.267,
        1.218,
    ]
    val = [
        5.353,
        5.144,
        4.974,
        4.831,
        4.744,
        4.673,
        4.616,
        4.596,
        4.613,
        4.603,
        4.603,
        4.608,
        4.616,
        4.632,
        4.632,
    ]
    history = History("classification")
    for epoch, (t, v) in enumerate(zip(train, val, strict=True), start=1):
        history.append({"epoch": 2 * epoch, "train_loss": t, "val_loss": v})
    reading = diagnose(history)
    assert reading.state == "overfitting" and reading.message.startswith("overfitting since epoch 1")
    assert "while the training loss fell" in reading.message and "raise weight_decay" in reading.message
    plateau = [2.3, 1.5, 1.0, 0.8, 0.7, 0.65, 0.62, 0.6, 0.59, 0.585, 0.58, 0.58, 0.578, 0.577, 0.577]
    flat = History("classification")
    for epoch, t in enumerate(plateau, start=1):  # both curves settle together: a good fit still
        flat.append({"epoch": epoch, "train_loss": t - 0.1, "val_loss": t + 0.005 * (epoch % 2)})
    assert diagnose(flat).state == "good fit"
