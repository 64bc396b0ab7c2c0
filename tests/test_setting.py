"""Regularization: validation, TOML round trip, and apply() wiring a real loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regdial import Applied, DropPath, InputError, Regularization
from regdial.knobs import KNOBS
from regdial.schedules import Cosine, Early, Linear, Step

FULL = Regularization(
    weight_decay=Cosine(0.05, 0.0),
    l1=1e-4,
    l2=Linear(0.0, 1e-3),
    elastic_net=2e-4,
    l1_ratio=0.3,
    group_lasso=1e-3,
    groups="columns",
    l2sp=0.01,
    max_norm=3.0,
    penalties_in="loss",
    exclude=("head.*",),
    include=("*.gain",),
    dropout=Early(0.2, until=0.25),
    drop_path=Step((0.1, 0.05), milestones=(0.5,)),
    noise=0.05,
    label_smoothing=0.1,
    mixup=0.2,
    cutmix=1.0,
    augment=0.3,
    early_stopping=7,
    min_delta=0.001,
    ema=0.999,
)


def test_toml_round_trip_is_exact() -> None:
    text = FULL.to_toml()
    assert text.startswith("[regularization]")
    assert Regularization.from_toml(text) == FULL
    assert Regularization.from_toml(Regularization().to_toml()) == Regularization()
    # A float that decimal text cannot round: repr round-trips it exactly.
    odd = Regularization(l1=0.1 + 0.2)
    assert Regularization.from_toml(odd.to_toml()).l1 == 0.1 + 0.2


def test_toml_file_and_flat_document(tmp_path) -> None:
    path = tmp_path / "setting.toml"
    path.write_text(FULL.to_toml())
    assert Regularization.from_toml(path) == FULL
    assert Regularization.from_toml(str(path)) == FULL
    assert Regularization.from_toml("dropout = 0.1\nl1 = 1e-5\n") == Regularization(dropout=0.1, l1=1e-5)


def test_unknown_keys_fail_by_name() -> None:
    with pytest.raises(
        ValueError, match=r"^regularization.droput is not a known setting; did you mean 'dropout'\? known: "
    ):
        Regularization.from_toml("[regularization]\ndroput = 0.1\n")
    with pytest.raises(ValueError, match=r"^regularization.l3 is not a known setting"):
        Regularization().replace(l3=0.1)
    with pytest.raises(ValueError, match=r"^regularization.dropout.schedule must be one of 'constant'"):
        Regularization.from_toml('dropout = {schedule = "exponential"}')


def test_bad_toml_is_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^config must be valid TOML, got a syntax error: ") as error:
        Regularization.from_toml("dropout = = 0.1")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"must be a readable TOML file, got no such file$"):
        Regularization.from_toml(tmp_path / "missing.toml")


RANGES = [
    ("weight_decay", -0.1, r"in \[0, 1000000\], got -0.1"),
    ("l1", -1e-4, r"in \[0, 1000000\], got -0.0001"),
    ("l1_ratio", 1.5, r"in \[0, 1\], got 1.5"),
    ("dropout", 1.0, r"in \[0, 1\), got 1.0"),
    ("drop_path", -0.2, r"in \[0, 1\), got -0.2"),
    ("label_smoothing", 1.0, r"in \[0, 1\), got 1.0"),
    ("mixup", -1.0, r"in \[0, 1000000\], got -1.0"),
    ("cutmix", -0.5, r"in \[0, 1000000\], got -0.5"),
    ("augment", 2.0, r"in \[0, 1\], got 2.0"),
    ("early_stopping", 2.5, r"an integer in \[0, 1000000\], got 2.5"),
    ("early_stopping", -3, r"an integer in \[0, 1000000\], got -3"),
    ("embedding_noise", -1.0, r"in \[0, 1000000\], got -1.0"),
    ("ema", 1.0, r"in \[0, 1\), got 1.0"),
    ("noise", float("nan"), r"a finite number in \[0, 1000000\], got nan"),
    ("dropout", "high", r"a number in \[0, 1\), got 'high'"),
]


@pytest.mark.parametrize(("name", "value", "message"), RANGES)
def test_every_knob_is_range_checked(name: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^regularization.{name} must be {message}$"):
        Regularization(**{name: value})
    with pytest.raises(ValueError, match=rf"^regularization.{name} must be "):
        Regularization().replace(**{name: value})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"groups": "diagonal"},
            r"^regularization.groups must be one of 'rows', 'columns', 'tensor', got 'diagonal'$",
        ),
        (
            {"penalties_in": "both"},
            r"^regularization.penalties_in must be one of 'prox', 'loss', got 'both'$",
        ),
        (
            {"mixup": Linear(0.0, 0.2)},
            r"^regularization.mixup must be a number \(this knob takes no schedule\)",
        ),
        ({"dropout": Linear(0.0, 1.0)}, r"^regularization.dropout must be in \[0, 1\), got 1.0$"),
        ({"exclude": (3,)}, r"^regularization.exclude must be a list of fnmatch patterns"),
        ({"min_delta": -1}, r"^regularization.min_delta must be in \[0, inf\), got -1$"),
    ],
)
def test_other_bad_values(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Regularization(**kwargs)


def test_every_knob_has_a_range_test() -> None:
    tested = {name for name, _, _ in RANGES} | {"l2", "elastic_net", "group_lasso", "l2sp", "max_norm"}
    assert tested >= set(KNOBS) - {"l2", "elastic_net", "group_lasso", "l2sp", "max_norm"}
    for name in ("l2", "elastic_net", "group_lasso", "l2sp", "max_norm"):
        with pytest.raises(ValueError, match=rf"^regularization.{name} must be in \[0, 1000000\], got -1.0$"):
            Regularization(**{name: -1.0})


def test_immutable_replace_and_off() -> None:
    setting = Regularization(dropout=0.1)
    with pytest.raises(AttributeError):
        setting.dropout = 0.5  # type: ignore[misc]
    assert setting.replace(dropout=0.3).dropout == 0.3
    assert setting.dropout == 0.1
    assert Regularization.off().is_off()
    assert Regularization().is_off()
    assert not setting.is_off()
    assert setting.active() == {"dropout": 0.1}
    assert isinstance(Regularization(early_stopping=5).early_stopping, int)


# -- apply ---------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Dropout(0.5))
        self.path = DropPath(0.0)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.path(self.body(x)))


def adamw(groups):
    return torch.optim.AdamW(groups, lr=0.05)


def step(applied, x, y) -> None:
    xb, yb = applied.batch(x, y)
    loss = applied.loss(applied.model(xb), yb) + applied.penalty()
    applied.optimizer.zero_grad()
    loss.backward()
    applied.optimizer.step()


def test_apply_builds_groups_proximal_steps_and_rates() -> None:
    model = Net()
    applied = Applied(
        Regularization(weight_decay=0.01, l1=0.05, dropout=0.2, drop_path=0.1), model, adamw, num_classes=3
    )
    decay, spared = applied.optimizer.param_groups
    assert decay["weight_decay"] == 0.01
    assert spared["weight_decay"] == 0.0
    assert model.body[3].p == 0.2
    assert model.path.p == 0.1
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for _ in range(10):
        step(applied, x, y)
    assert (model.body[0].weight == 0).sum() > 0  # L1 gave exact zeros on the weights
    assert (model.body[0].bias == 0).sum() == 0  # and left the biases alone
    applied.remove()
    assert applied.handles == []


def test_off_setting_is_a_plain_loop() -> None:
    plain, regularized = Net(), Net()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    applied = Applied(Regularization.off(), regularized, adamw, num_classes=3)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=0.05, weight_decay=0.0)
    plain.body[3].p = 0.0
    for _ in range(3):
        step(applied, x, y)
        optimizer.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        optimizer.step()
    for a, b in zip(plain.parameters(), regularized.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_batch_and_loss_smoothing_mixing_noise() -> None:
    torch.manual_seed(0)
    applied = Applied(Regularization(mixup=0.4, label_smoothing=0.1, noise=0.1), Net(), adamw, num_classes=3)
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    xb, targets = applied.batch(x, y)
    assert targets.shape == (8, 3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    assert not torch.equal(xb, x)
    logits = torch.randn(8, 3)
    expected = nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
    torch.testing.assert_close(applied.loss(logits, targets), expected)


def test_a_target_outside_the_classes_is_one_line_naming_minus_100() -> None:
    """nanoGPT marks ignored targets -1: torch's "Target -1 is out of bounds" did not say
    which value is ignored (-100)."""
    from regdial import InputError

    applied = Applied(Regularization(label_smoothing=0.1), Net(), adamw, num_classes=3)
    logits = torch.randn(4, 3)
    with pytest.raises(InputError, match=r"^targets must be class ids in \[0, 3\) or -100 \(ignored; nanoGPT's "
                       r"-1: map it, y\[y == -1\] = -100\), got -1$"):  # fmt: skip
        applied.loss(logits, torch.tensor([0, -1, 2, 1]))
    kept = torch.tensor([0, -100, 2, 1])
    expected = nn.functional.cross_entropy(logits, kept, label_smoothing=0.1)
    torch.testing.assert_close(applied.loss(logits, kept), expected)


def test_regression_loss_is_mse() -> None:
    applied = Applied(Regularization(), nn.Linear(3, 1), adamw)
    output, targets = torch.randn(5, 1), torch.randn(5)
    torch.testing.assert_close(
        applied.loss(output, targets), nn.functional.mse_loss(output.squeeze(1), targets)
    )


def test_loss_mode_penalty_is_the_sum_of_values() -> None:
    model = Net()
    applied = Applied(Regularization(l1=0.1, l2=0.2, penalties_in="loss"), model, adamw, num_classes=3)
    weights = [model.body[0].weight, model.head.weight]
    expected = 0.1 * sum(w.abs().sum() for w in weights) + 0.1 * sum(w.square().sum() for w in weights)
    torch.testing.assert_close(applied.penalty(), expected)
    assert applied.handles == []  # no proximal steps in loss mode


def test_end_epoch_moves_schedules_and_early_stopping_restores() -> None:
    model = Net()
    setting = Regularization(dropout=Early(0.3, until=0.5), weight_decay=Linear(0.1, 0.0), early_stopping=2)
    applied = Applied(setting, model, adamw, num_classes=3)
    assert model.body[3].p == 0.3
    assert applied.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert not applied.end_epoch(1, 4, val_metric=1.0)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.body[3].p == 0.3
    assert applied.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.075)
    step(applied, torch.randn(8, 8), torch.randint(0, 3, (8,)))
    assert not applied.end_epoch(2, 4, val_metric=1.5)
    assert model.body[3].p == 0.0  # early dropout is over
    assert applied.end_epoch(3, 4, val_metric=1.2)  # patience 2 exhausted
    assert applied.finish()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, best[name])


def test_ema_is_the_eval_model() -> None:
    model = Net()
    applied = Applied(Regularization(ema=0.9), model, adamw, num_classes=3)
    step(applied, torch.randn(8, 8), torch.randint(0, 3, (8,)))
    assert torch.equal(applied.eval_model.head.weight, model.head.weight)  # the first update copies
    step(applied, torch.randn(8, 8), torch.randint(0, 3, (8,)))
    assert applied.eval_model is applied.ema.module
    assert not torch.equal(applied.eval_model.head.weight, model.head.weight)


def test_the_average_is_in_the_models_mode() -> None:
    """A user's loop calls model.eval(), then evaluates applied.eval_model: the average's
    dropout and BatchNorm stayed in training mode (two evaluations of one input differed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    applied = Applied(Regularization(ema=0.9), model, adamw, num_classes=3)
    for _ in range(3):
        step(applied, torch.randn(8, 8), torch.randint(0, 3, (8,)))
    model.eval()
    average = applied.eval_model
    assert not any(module.training for module in average.modules())
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(average(x), average(x))
    model.train()
    assert all(module.training for module in applied.eval_model.modules())


def test_label_smoothing_on_a_regression_is_one_line() -> None:
    """The mean squared error has no labels to smooth: it trained without, recorded as on."""
    applied = Applied(Regularization(label_smoothing=0.1), nn.Linear(4, 1), adamw)
    with pytest.raises(
        InputError, match=r"^regularization.label_smoothing must be 0 for regression .*got 0.1$"
    ):
        applied.loss(torch.randn(8, 1), torch.randn(8))
    assert (
        Applied(Regularization(), nn.Linear(4, 1), adamw).loss(torch.zeros(2, 1), torch.zeros(2)).item()
        == 0.0
    )


def test_l2sp_anchors_at_apply_time() -> None:
    model = Net()
    start = model.head.weight.detach().clone()
    applied = Applied(Regularization(l2sp=1e6), model, lambda g: torch.optim.SGD(g, lr=0.1), num_classes=3)
    step(applied, torch.randn(8, 8), torch.randint(0, 3, (8,)))
    torch.testing.assert_close(model.head.weight, start, atol=1e-5, rtol=0)


def test_augment_infers_the_kind_of_data() -> None:
    applied = Applied(Regularization(augment=0.5), nn.Linear(8, 3), adamw, num_classes=3)
    x = torch.randn(16, 8)
    torch.manual_seed(0)
    xb, _ = applied.batch(x, torch.randint(0, 3, (16,)))
    assert type(applied.augment).__name__ == "TabularAugment"
    assert not torch.equal(xb, x)


def test_apply_errors() -> None:
    instance = torch.optim.SGD(Net().parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"^optimizer must be built from regdial.param_groups\(...\) \(or pass a factory\)"
    ):
        Applied(Regularization(weight_decay=0.1), Net(), instance)
    with pytest.raises(
        ValueError, match=r"^regularization.cutmix must be 0 for inputs that are not sequences or images"
    ):
        Applied(Regularization(cutmix=1.0), Net(), adamw, num_classes=3).batch(
            torch.randn(4, 8), torch.arange(4) % 3
        )
    with pytest.raises(ValueError, match=r"^data_kind must be one of 'image'"):
        Applied(Regularization(), Net(), adamw, data_kind="audio")


def test_retune_turns_knobs_during_training() -> None:
    model = Net()
    applied = Applied(Regularization(dropout=0.1, weight_decay=0.01), model, adamw, num_classes=3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    step(applied, x, y)
    applied.retune(Regularization(dropout=0.4, weight_decay=0.05, l1=0.5, label_smoothing=0.1, mixup=0.2))
    assert model.body[3].p == 0.4
    assert applied.optimizer.param_groups[0]["weight_decay"] == 0.05
    assert [type(p).__name__ for p in applied.penalties] == ["L1"]
    for _ in range(5):
        step(applied, x, y)
    assert (model.body[0].weight == 0).sum() > 0  # the L1 turned on mid-run gives exact zeros
    _, targets = applied.batch(x, y)
    assert targets.shape == (32, 3)  # mixing is on now
    applied.retune(Regularization(dropout=0.4, weight_decay=0.05, l1=0.0))
    assert applied.penalties[0].current_strength == 0.0  # off again: the prox is the identity
    with pytest.raises(
        ValueError, match=r"^regularization.ema must be unchanged during training \(0.0\), got 0.99$"
    ):
        applied.retune(Regularization(ema=0.99))


def test_l2sp_turns_while_it_is_on_and_keeps_its_anchor() -> None:
    model = Net()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    applied = Applied(Regularization(l2sp=0.01), model, adamw, num_classes=3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(3):
        step(applied, x, y)
    applied.retune(Regularization(l2sp=100.0))  # a strong pull, toward the weights at apply time
    (penalty,) = applied.penalties
    assert penalty.current_strength == 100.0
    names = {id(param): name for name, param in model.named_parameters()}
    assert {names[id(param)] for param, _ in penalty._anchors.values()} == set(start)
    for param, anchor in penalty._anchors.values():
        assert torch.equal(anchor, start[names[id(param)]])
    off = Applied(Regularization(), Net(), adamw, num_classes=3)
    with pytest.raises(ValueError, match=r"^regularization.l2sp must be 0 during training when it was off "):
        off.retune(Regularization(l2sp=0.1))


def test_online_refuses_a_knob_that_cannot_turn_during_training() -> None:
    from regdial import Space, tune

    with pytest.raises(
        ValueError, match=r"^space must be knobs that can turn during training .*\(not max_norm"
    ):
        tune(
            "wine", Space({"weight_decay": (1e-4, 1.0), "max_norm": (0.5, 5.0)}), epochs=2, strategy="online"
        )
