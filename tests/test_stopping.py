"""EarlyStopping as a table: (metrics, settings) -> stop epoch, best epoch, reason."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from regdial.blocks.stopping import EarlyStopping

NAN = math.nan

TABLE = [
    # metrics, kwargs, stop epoch, best epoch, reason
    ([1.0, 0.9, 0.8, 0.85, 0.86, 0.87], {"patience": 3}, 6, 3, "patience exhausted"),
    ([1.0, 0.9, 0.8, 0.85, 0.86, 0.87], {"patience": 4}, None, 3, None),
    ([1.0, 0.95, 0.94, 0.935], {"patience": 2, "min_delta": 0.02}, 4, 2, "patience exhausted"),
    ([1.0, 0.98, 0.965, 0.95], {"patience": 1, "min_delta": 0.01}, None, 4, None),
    ([1.0, 0.98, 0.975], {"patience": 1, "min_delta": 0.01}, 3, 2, "patience exhausted"),
    ([0.5, 0.6, 0.55, 0.58], {"patience": 2, "mode": "max"}, 4, 2, "patience exhausted"),
    ([0.5, 0.6, 0.7, 0.8], {"patience": 1, "mode": "max"}, None, 4, None),
    ([1.0, NAN, 0.5], {"patience": 5}, 2, 1, "non-finite metric"),
    ([1.0, math.inf], {"patience": 5}, 2, 1, "non-finite metric"),
    ([1.0, NAN, NAN], {"patience": 2, "check_finite": False}, 3, 1, "patience exhausted"),
    ([1.0, 0.9, 0.95], {"patience": 3, "baseline": 0.5}, 3, None, "baseline not reached"),
    ([1.0, 0.4, 0.45, 0.5], {"patience": 2, "baseline": 0.5}, 4, 2, "patience exhausted"),
    ([5.0, 4.0, 3.0, 3.5, 3.6], {"patience": 2, "start_from_epoch": 2}, 5, 3, "patience exhausted"),
    ([NAN, 4.0, 3.0], {"patience": 2, "start_from_epoch": 1}, None, 3, None),
]


@pytest.mark.parametrize(("metrics", "kwargs", "stop", "best", "reason"), TABLE)
def test_stop_epoch_best_epoch_and_reason(metrics, kwargs, stop, best, reason) -> None:
    model = nn.Linear(1, 1, bias=False)
    stopper = EarlyStopping(**kwargs)
    stopped_at = None
    for epoch, value in enumerate(metrics, start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights of epoch e are e
        if stopper.step(value, model):
            stopped_at = epoch
            break
    assert stopped_at == stop
    assert stopper.best_epoch == best
    assert stopper.reason == reason
    # Whoever ended training, the best epoch's weights come back.
    assert stopper.restore(model) == (best is not None)
    if best is not None:
        assert model.weight.item() == best


def test_messages_give_the_reason_and_the_best_value() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.001)
    for value in [0.5, 0.3121, 0.4, 0.41]:
        stopper.step(value, nn.Linear(1, 1))
    assert stopper.message == (
        "stopped at epoch 4: val_loss did not improve by more than 0.001 for 2 epochs; best val_loss 0.3121 at epoch 2"
    )
    nan = EarlyStopping(monitor="val_accuracy", mode="max", restore_best=False)
    nan.step(0.8)
    nan.step(NAN)
    assert nan.message == "stopped at epoch 2: val_accuracy was not finite; best val_accuracy 0.8 at epoch 1"
    assert EarlyStopping(restore_best=False).message == "not stopped after 0 epochs; no epoch yet"


def test_state_dict_resumes_exactly() -> None:
    metrics = [1.0, 0.8, 0.9, 0.95, 0.7, 0.75, 0.76, 0.77]
    full = EarlyStopping(patience=3, restore_best=False)
    full_stop = next(e for e, v in enumerate(metrics, 1) if full.step(v))
    first = EarlyStopping(patience=3, restore_best=False)
    for value in metrics[:4]:
        first.step(value)
    state = first.state_dict()
    resumed = EarlyStopping(patience=3, restore_best=False)
    resumed.load_state_dict(state)
    resumed_stop = next(e for e, v in enumerate(metrics[4:], 5) if resumed.step(v))
    assert resumed_stop == full_stop == 8
    assert resumed.state_dict() == full.state_dict()


def test_an_exact_tie_goes_to_the_epoch_with_the_lower_tiebreak() -> None:
    # An accuracy on a few hundred rows ties: 0.88 at epochs 2, 4 and 5. The validation
    # loss decides: epoch 4's is the lowest of the three, epoch 5's is higher again.
    accuracy = [0.80, 0.88, 0.86, 0.88, 0.88, 0.87]
    loss = [0.60, 0.50, 0.45, 0.40, 0.42, 0.41]
    model = nn.Linear(1, 1, bias=False)
    stopper = EarlyStopping(patience=2, mode="max")
    plain = EarlyStopping(patience=2, mode="max", restore_best=False)
    stops = []
    for epoch, (value, second) in enumerate(zip(accuracy, loss, strict=True), start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stops.append(stopper.step(value, model, tiebreak=second))
        plain.step(value)
    assert stopper.best_epoch == 4 and stopper.best == 0.88 and stopper.best_tiebreak == 0.40
    assert stops.index(True) == 5  # the tie at epoch 4 reset the patience: stopped after epoch 6
    assert stopper.restore(model) and model.weight.item() == 4
    assert plain.best_epoch == 2  # without a tiebreak the first of the ties stays
    # A NaN tiebreak, or one the best epoch lacked, never wins a tie; a near tie is no tie.
    other = EarlyStopping(patience=None, mode="max", restore_best=False)
    other.step(0.5)
    other.step(0.5, tiebreak=0.1)
    assert other.best_epoch == 1
    other.step(0.6, tiebreak=0.3)
    other.step(0.6, tiebreak=NAN)
    other.step(0.6 - 1e-12, tiebreak=0.0)
    assert other.best_epoch == 3
    # The tiebreak's best survives a resume.
    resumed = EarlyStopping(patience=None, mode="max", restore_best=False)
    resumed.load_state_dict(other.state_dict())
    resumed.step(0.6, tiebreak=0.2)
    assert resumed.best_epoch == 6 and resumed.best_tiebreak == 0.2


def test_restore_needs_a_model_when_improving() -> None:
    with pytest.raises(
        ValueError, match=r"^model must be the model being trained when restore_best=True, got None$"
    ):
        EarlyStopping().step(1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patience": 0}, r"^EarlyStopping.patience must be an integer in \[1, inf\), got 0$"),
        ({"min_delta": -0.1}, r"^EarlyStopping.min_delta must be in \[0, inf\), got -0.1$"),
        ({"mode": "lowest"}, r"^EarlyStopping.mode must be one of 'min', 'max', got 'lowest'$"),
        (
            {"start_from_epoch": -1},
            r"^EarlyStopping.start_from_epoch must be an integer in \[0, inf\), got -1$",
        ),
    ],
)
def test_bad_values(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**kwargs)


def test_the_trainer_callbacks_break_an_accuracys_ties_on_the_validation_loss() -> None:
    from regdial import Regularization
    from regdial.integrations._common import Session

    session = Session(Regularization(early_stopping=3), None, "val_accuracy")
    model = nn.Linear(1, 1, bias=False)
    for epoch, (accuracy, loss) in enumerate([(0.9, 0.5), (0.9, 0.3), (0.9, 0.4)], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        session.evaluated(float(epoch), {"val_accuracy": accuracy, "val_loss": loss}, model)
    assert session.stopper.best_epoch == 2
    assert session.stopper.restore(model) and model.weight.item() == 2
