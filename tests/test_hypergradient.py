"""``HypergradientController``: the strengths it reaches on convex problems against their
closed-form (ridge) and scikit-learn (lasso) optima, exact resume, its limits and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regdial import Regularization, Space, fit, tune
from regdial._checks import InputError
from regdial.dial.hypergradient import HypergradientController, recipe_start
from regdial.dial.implicit import calibrated_cross_entropy
from regdial.training.checkpoint import load_weights


def correlated(seed: int, n: int, n_val: int, d: int, w: np.ndarray, noise: float):
    """Features with a random covariance (so that the Hessian is far from a multiple of I)."""
    g = np.random.default_rng(seed)
    a = g.normal(size=(d, d))
    root = np.linalg.cholesky(a @ a.T / d + 0.1 * np.eye(d))
    x, x_val = g.normal(size=(n, d)) @ root.T, g.normal(size=(n_val, d)) @ root.T
    return x, x @ w + noise * g.normal(size=n), x_val, x_val @ w + noise * g.normal(size=n_val)


def as_batches(x: np.ndarray, y: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))]


def online(knob: str, data, *, optimizer: str, lr: float, epochs: int = 1200, high: float = 100.0, **kwargs):
    x, y, x_val, y_val = data
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1, bias=False)
    controller = HypergradientController(
        Space({knob: (1e-4, high)}), every=4, lr=0.1, warmup=20, solve_steps=2, start={knob: 1e-4}, **kwargs
    )
    history = fit(model, controller.start(), train=as_batches(x, y), val=as_batches(x_val, y_val),
                  kind="regression", epochs=epochs, optimizer=optimizer, lr=lr, lr_schedule="constant",
                  controller=controller, progress=False)  # fmt: skip
    return controller, history


@pytest.fixture(scope="module")
def ridge_data():
    g = np.random.default_rng(0)
    d = 30
    return correlated(0, 120, 400, d, 0.5 * g.normal(size=d), noise=2.0)


def ridge_optimum(data) -> tuple[float, float]:
    """The strength minimizing validation MSE for ``(1/n)||Xw - y||² + (λ/2)||w||²``, whose
    minimizer is ``(XᵀX + nλ/2 I)⁻¹Xᵀy``; and the zero of the one-step (greedy) hypergradient
    ``-∇V(w(λ))·w(λ)``, for comparison."""
    from scipy.optimize import minimize_scalar

    x, y, x_val, y_val = data
    n, d = x.shape

    def weights(log_lam: float) -> np.ndarray:
        return np.linalg.solve(x.T @ x + n * np.exp(log_lam) / 2 * np.eye(d), x.T @ y)

    def val_loss(log_lam: float) -> float:
        return float(np.mean((x_val @ weights(log_lam) - y_val) ** 2))

    grid = np.linspace(np.log(1e-4), np.log(100.0), 400)
    start = grid[int(np.argmin([val_loss(u) for u in grid]))]
    best = minimize_scalar(val_loss, bracket=(start - 0.1, start, start + 0.1), tol=1e-10).x
    greedy = [-(2 * x_val.T @ (x_val @ weights(u) - y_val) / len(y_val)) @ weights(u) for u in grid]
    crossing = next(i for i in range(len(grid) - 1) if np.sign(greedy[i]) != np.sign(greedy[i + 1]))
    return float(np.exp(best)), float(np.exp(grid[crossing]))


def test_the_ridge_problem_is_interior_and_one_step_hypergradients_miss_it(ridge_data) -> None:
    """The optimum sits well inside the range, and a greedy one-step hypergradient's zero is
    more than 10% away from it (short-horizon bias): the tests below can tell them apart."""
    best, greedy = ridge_optimum(ridge_data)
    assert 1e-2 < best < 10.0
    assert abs(greedy / best - 1) > 0.2


@pytest.mark.parametrize(
    ("knob", "optimizer", "lr"),
    [("l2", "adam", 0.05), ("l2", "sgd", 0.02), ("weight_decay", "sgd", 0.02)],
)
def test_ridge_strength_converges_to_the_validation_optimum(ridge_data, knob, optimizer, lr) -> None:
    """L2 (the prox in Adam's metric or SGD's) and SGD's coupled weight decay stop where
    ``∇f + λw = 0``: the online strength lands on the closed-form validation optimum."""
    best, _ = ridge_optimum(ridge_data)
    controller, _ = online(knob, ridge_data, optimizer=optimizer, lr=lr)
    final = controller.values[knob]
    assert final == pytest.approx(best, rel=0.1), (final, best)
    assert controller.moves[0]["value"] < best / 100  # it started far below and climbed
    last = [m["value"] for m in controller.moves[-20:]]
    assert max(last) / min(last) < 1.05  # and settled


@pytest.mark.parametrize(("knob", "optimizer"), [("l1", "adam"), ("l1", "sgd"), ("elastic_net", "adam")])
def test_lasso_strength_converges_to_the_validation_optimum_of_sklearns_path(knob, optimizer) -> None:
    """L1 (and the elastic net, l1_ratio 0.5) through the proximal step: the online strength
    lands within 10% of the strength of scikit-learn's path with the lowest validation
    error (``alpha = s/2``: sklearn's objective halves the squared error)."""
    from sklearn.linear_model import enet_path, lasso_path

    g = np.random.default_rng(1)
    d = 40
    w = np.zeros(d)
    w[:6] = g.normal(size=6)
    g = np.random.default_rng(1)
    a = g.normal(size=(d, d))
    root = np.linalg.cholesky(a @ a.T / d + 0.2 * np.eye(d))
    x, x_val = g.normal(size=(100, d)) @ root.T, g.normal(size=(400, d)) @ root.T
    y, y_val = x @ w + 1.5 * g.normal(size=100), x_val @ w + 1.5 * g.normal(size=400)
    alphas = np.exp(np.linspace(np.log(3.0), np.log(1e-3), 800))
    if knob == "l1":
        _, coefs, _ = lasso_path(x, y, alphas=alphas, tol=1e-10, max_iter=100_000)
    else:
        _, coefs, _ = enet_path(x, y, l1_ratio=0.5, alphas=alphas, tol=1e-10, max_iter=100_000)
    val = [np.mean((x_val @ coefs[:, i] - y_val) ** 2) for i in range(len(alphas))]
    best = 2 * alphas[int(np.argmin(val))]
    assert 0.05 < best < 3.0
    controller, history = online(knob, (x, y, x_val, y_val), optimizer=optimizer,
                                 lr=0.05 if optimizer == "adam" else 0.02, high=10.0)  # fmt: skip
    assert controller.values[knob] == pytest.approx(best, rel=0.1), (controller.values[knob], best)
    assert history.rows[-1]["zero_fraction"] > 0.3  # most weights exactly zero


def test_input_noise_converges_to_the_ridge_optimum_it_equals(ridge_data) -> None:
    """Gaussian input noise on a linear model is ridge in expectation:
    ``E (w·(x + σξ) - y)² = (w·x - y)² + σ²||w||²``, so ``λ/2 = σ²`` and the best noise is
    ``sqrt(λ*/2)``. The noise's hypergradient is a single reparameterized draw (antithetic
    pairs), so the strength wanders around it: its geometric mean over the second half of
    the run is within 10%."""
    best, _ = ridge_optimum(ridge_data)
    x, y, x_val, y_val = ridge_data
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1, bias=False)
    controller = HypergradientController(Space({"noise": (1e-3, 3.0)}), every=4, lr=0.1, warmup=20,
                                         solve_steps=2, start={"noise": 1e-3})  # fmt: skip
    fit(model, controller.start(), train=as_batches(x, y), val=as_batches(x_val, y_val), kind="regression",
        epochs=1500, optimizer="sgd", lr=0.02, lr_schedule="constant", controller=controller, progress=False)  # fmt: skip
    late = [m["value"] for m in controller.moves if m["step"] > 750]
    assert len(late) > 100
    assert float(np.exp(np.mean(np.log(late)))) == pytest.approx((best / 2) ** 0.5, rel=0.1)


def test_label_smoothings_hypergradient_is_the_derivative_of_the_validation_loss() -> None:
    """Multinomial logistic regression with a fixed L2 (strongly convex), trained to
    convergence at ε = 0.1 and at ε ± 0.01: the hypergradient at the end of the first run
    matches the finite difference of the validation objective (the calibrated cross-entropy)
    to 2%."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 3, generator=g)

    def split(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.randn(n, 10, generator=g)
        return [(x, (x @ w + 1.5 * torch.randn(n, 3, generator=g)).argmax(1))]

    train, val = split(150), split(300)
    steps = 800

    def run(smoothing: float) -> tuple[HypergradientController, float]:
        torch.manual_seed(0)
        model = nn.Linear(10, 3)
        probe = HypergradientController(Space({"label_smoothing": (0.0, 0.5)}, base=Regularization(l2=0.01)), every=steps,
                      lr=1e-9, warmup=steps, solve_steps=60, start={"label_smoothing": smoothing})  # fmt: skip
        fit(model, probe.start(), train=train, val=val, num_classes=3, epochs=steps, optimizer="sgd",
            momentum=0.0, lr=0.5, lr_schedule="constant", controller=probe, progress=False)  # fmt: skip
        with torch.no_grad():
            return probe, float(calibrated_cross_entropy(model(val[0][0]), val[0][1]))

    probe, _ = run(0.1)
    (_, above), (_, below) = run(0.11), run(0.09)
    assert probe.last_hypergradients["label_smoothing"] == pytest.approx((above - below) / 0.02, rel=0.02)
    # not a vanishing number that any estimate matches (the plain loss's is +0.28 here: smoothing
    # hurts the raw cross-entropy and helps the calibrated one)
    assert abs(probe.last_hypergradients["label_smoothing"]) > 0.02


def test_strengths_stay_within_their_ranges(ridge_data) -> None:
    """An optimum above the range's top: the strength climbs to it and stays there."""
    best, _ = ridge_optimum(ridge_data)
    high = best / 10
    controller, _ = online("l2", ridge_data, optimizer="sgd", lr=0.02, epochs=400, high=high)
    values = [m["value"] for m in controller.moves]
    assert all(1e-4 <= v <= high for v in values)
    assert controller.values["l2"] == high
    assert {m["knob"] for m in controller.moves} == {"l2"}
    assert all(set(m) == {"step", "epoch", "knob", "value"} for m in controller.moves)


def wine_run(run_dir: Path, **kwargs):
    space = Space({"weight_decay": (1e-4, 1.0), "label_smoothing": (0.0, 0.2), "noise": (0.0, 0.5),
                   "dropout": (0.0, 0.5)})  # fmt: skip
    controller = HypergradientController(space, every=3, epochs_every=2, start={"weight_decay": 1e-2})
    fit("wine", controller.start(), epochs=8, run_dir=run_dir, checkpoint_seconds=0, progress=False,
        controller=controller, **kwargs)  # fmt: skip
    return controller


class _StopError(Exception):
    """Stands for a kill between two epochs."""


def _stop_at(epoch: int):
    def on_epoch(row) -> bool:
        if row["epoch"] == epoch:
            raise _StopError
        return False

    return on_epoch


def test_a_resumed_online_run_continues_bit_identically(tmp_path: Path) -> None:
    """Killed after epoch 5 and resumed: the same weights, the same history and the same
    knob trace as the run that was never stopped (q, the moments and the validation
    batch's position are in the checkpoint)."""
    straight = wine_run(tmp_path / "straight")
    steps_per_epoch = 7  # 106 rows in batches of 16
    knobs = {m["knob"] for m in straight.moves}
    assert {"weight_decay", "label_smoothing", "noise"} <= knobs
    assert any(m["step"] <= 5 * steps_per_epoch for m in straight.moves)
    assert any(m["step"] > 5 * steps_per_epoch for m in straight.moves)
    with pytest.raises(_StopError):
        wine_run(tmp_path / "killed", on_epoch=_stop_at(6))
    resumed = wine_run(tmp_path / "killed", resume=True)
    assert resumed.moves == straight.moves
    assert resumed.values == straight.values
    a = load_weights(tmp_path / "killed" / "checkpoints" / "final.safetensors")
    b = load_weights(tmp_path / "straight" / "checkpoints" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads((tmp_path / d / "history.json").read_text())["rows"] for d in ("killed", "straight")]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows[0]] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in rows[1]
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"start": {"l2": 0.0}}, r"^start\.l2 must be in \[0\.0001, 1\], got 0\.0$"),
        ({"start": {"l2": 5.0}}, r"^start\.l2 must be in \[0\.0001, 1\], got 5\.0$"),
        ({"start": {"dropout": 0.1}}, r"^start must be strengths of the space's knobs \(l2\)"),
        ({"every": 0}, r"^every must be an integer in \[1, inf\), got 0$"),
        ({"lr": 0.0}, r"^lr must be in \(0, 10\], got 0\.0$"),
        ({"solve_steps": -1}, r"^solve_steps must be an integer in \[0, 100\], got -1$"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(arguments, message) -> None:
    with pytest.raises(InputError, match=message):
        HypergradientController(Space({"l2": (1e-4, 1.0)}), **arguments)


def test_a_space_without_differentiable_knobs_is_refused() -> None:
    with pytest.raises(InputError, match=r"^space must be at least one knob of weight_decay, l2, l1"):
        HypergradientController(Space({"dropout": (0.0, 0.5)}))


def test_strengths_start_in_the_middle_of_their_ranges_on_a_log_scale() -> None:
    """A range that starts at 0 is floored at a thousandth of its top."""
    controller = HypergradientController(Space({"label_smoothing": (0.0, 0.2), "l2": (1e-4, 1.0)}))
    assert controller.values == {
        "label_smoothing": pytest.approx((2e-4 * 0.2) ** 0.5),
        "l2": pytest.approx(1e-2),
    }
    assert controller.start().label_smoothing == pytest.approx((2e-4 * 0.2) ** 0.5)
    with pytest.raises(InputError, match=r"^start\.label_smoothing must be in \[0\.0002, 0\.2\], got 0\.0$"):
        HypergradientController(Space({"label_smoothing": (0.0, 0.2)}), start={"label_smoothing": 0.0})


class _Every3:
    """A step controller: turns weight decay at step 3, and records the steps it saw."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.decay_seen: list[float] = []

    def __call__(self, history, applied):
        return None

    def after_step(self, run, inputs, targets):
        self.steps.append(run.loop.step)
        self.decay_seen.append(run.applied.optimizer.param_groups[0]["weight_decay"])
        assert isinstance(inputs, torch.Tensor) and len(inputs) == len(targets)
        return Regularization(weight_decay=0.5) if run.loop.step == 3 else None


def test_the_loop_calls_a_step_controller_after_every_step_and_applies_its_setting_next() -> None:
    controller = _Every3()
    x, y = torch.randn(40, 4), torch.randn(40)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    fit(nn.Linear(4, 1), Regularization(weight_decay=0.1), train=batches, val=batches, kind="regression",
        epochs=2, controller=controller, progress=False)  # fmt: skip
    assert controller.steps == list(range(1, 9))
    assert controller.decay_seen == [0.1] * 3 + [0.5] * 5  # step 3's setting from step 4 on


def test_the_hypergradient_turns_a_knob_of_a_real_transformers_model() -> None:
    """A tiny BERT from its config: its attention (SDPA) is differentiated twice by the
    Hessian-vector products, which the fused CPU attention kernel cannot do."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=2)  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(12):
        ids = torch.randint(0, 100, (8, 12), generator=generator)
        batches.append(({"input_ids": ids}, (ids[:, 0] > 50).long()))
    controller = HypergradientController(Space({"weight_decay": (1e-4, 0.3)}), every=4, warmup=4)
    fit(model, controller.start(), train=batches[:9], val=batches[9:], num_classes=2, epochs=2,
        controller=controller, progress=False)  # fmt: skip
    assert controller.updates > 0 and controller.moves


def test_the_calibrated_cross_entropy_is_the_cross_entropy_at_its_best_temperature() -> None:
    """Against a dense grid of temperatures; its gradient is the plain one at that temperature
    (the temperature's own derivative is zero there); ignored labels are left out."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(64, 5, generator=g)).requires_grad_(True)
    targets = torch.randint(0, 5, (64,), generator=g)
    targets[:4] = -100
    keep = targets != -100
    temperatures = torch.exp(torch.linspace(-3, 3, 20001))
    losses = torch.stack([F.cross_entropy(logits.detach()[keep] / t, targets[keep]) for t in temperatures])
    best = float(temperatures[losses.argmin()])
    value = calibrated_cross_entropy(logits, targets)
    assert float(value) == pytest.approx(float(losses.min()), rel=1e-6)
    assert float(value) < float(F.cross_entropy(logits[keep], targets[keep]))
    (grad,) = torch.autograd.grad(value, logits)
    (expected,) = torch.autograd.grad(F.cross_entropy(logits[keep] / best, targets[keep]), logits)
    assert torch.allclose(grad, expected, atol=1e-4)
    assert grad[:4].abs().sum() == 0


def test_the_online_start_is_the_recipe_where_there_is_one() -> None:
    """The knobs practitioners set start at ``RECIPE``'s strengths, kept inside their
    ranges; the others are left to the controller's own start (mid-range)."""
    space = Space(
        {
            "weight_decay": (1e-4, 1.0),
            "l1": (1e-4, 1.0),
            "dropout": (0.2, 0.5),
            "label_smoothing": (0.0, 0.05),
        }
    )
    start = recipe_start(space)
    assert start == {"weight_decay": 0.05, "dropout": 0.2, "label_smoothing": 0.05}
    controller = HypergradientController(space, start=start)
    assert controller.values == {
        "weight_decay": 0.05,
        "l1": pytest.approx(1e-2),
        "label_smoothing": 0.05,
    }
    assert controller.start().dropout == 0.2


def test_a_curve_knobs_start_outside_its_range_is_one_line() -> None:
    space = Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)})
    with pytest.raises(InputError, match=r"^start\.dropout must be in \[0, 0\.5\], got 0\.9$"):
        HypergradientController(space, start={"dropout": 0.9})
    assert HypergradientController(space, start={"dropout": 0.3}).start().dropout == 0.3


def test_the_curves_first_epoch_is_checked_under_its_own_name() -> None:
    space = Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)})
    with pytest.raises(InputError, match=r"^epochs_first must be an integer in \[1, inf\), got 0$"):
        HypergradientController(space, epochs_first=0)
    curves = HypergradientController(space, epochs_every=2, epochs_first=9).curves
    assert curves is not None and curves.first == 9


def test_a_short_online_search_turns_its_curve_knobs_from_their_usual_epoch() -> None:
    """A quarter of a 3-epoch run is no epoch: the curves keep their own first turn."""
    space = Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)})
    result = tune("wine", space, epochs=3, strategy="online", retrain=False)
    assert result.epochs_spent == 3


def test_a_run_with_few_hypergradient_steps_moves_a_strength_at_most_tenfold_and_says_so(caplog) -> None:
    """A short run, a hypergradient step every 12 optimizer steps after a quarter of it:
    crossing weight decay's range twice (a factor of 1e4) would take steps of a
    hundredfold or more; each is a tenfold at most."""
    import itertools
    import logging
    import math

    controller = HypergradientController(Space({"weight_decay": (1e-4, 1.0)}), every=12)
    with caplog.at_level(logging.WARNING, logger="regdial.dial.hypergradient"):
        fit("wine", controller.start(), epochs=6, progress=False, controller=controller)
    assert 0 < controller.updates < math.log(1e4) / math.log(10)  # too few to cross the range once
    assert controller.lr == pytest.approx(math.log(10))
    values = [0.01] + [m["value"] for m in controller.moves]  # the start: the range's log middle
    assert all(1 / 10 - 1e-9 <= b / a <= 10 + 1e-9 for a, b in itertools.pairwise(values))
    assert f"regdial: online: {controller.updates} hypergradient steps fit in this run" in caplog.text
    assert "at most tenfold each, the knobs cannot cross their ranges" in caplog.text


def test_the_solves_preconditioner_is_floored_where_a_weight_gets_no_gradient() -> None:
    """Adam's ``1/(sqrt(v̂) + eps)`` is 1e8 where a weight never had a gradient; the
    preconditioner floors the denominator at PRECONDITION_FLOOR times its tensor's mean."""
    from regdial.dial.implicit import PRECONDITION_FLOOR, _metrics

    w = nn.Parameter(torch.ones(4, 4))
    optimizer = torch.optim.Adam([w], lr=1e-3)
    grad = torch.zeros(4, 4)
    grad[:2] = 1.0  # half the rows get a gradient, half none
    w.grad = grad
    optimizer.step()
    _, (precondition,) = _metrics(optimizer, [w])
    root = optimizer.state[w]["exp_avg_sq"].div(1 - 0.999).sqrt().add(1e-8)
    assert isinstance(precondition, torch.Tensor)
    assert torch.allclose(precondition[:2], root[:2].reciprocal())  # live weights: Adam's own
    assert torch.allclose(precondition[2:], torch.full((2, 4), 1 / (PRECONDITION_FLOOR * float(root.mean()))))
    assert float(precondition.max()) < 1e3


class _TinyGPT(nn.Module):
    """nanoGPT's forward contract: ``model(idx, targets)`` returns ``(logits, loss)``, and
    every position's logits only when given the targets (the last one's otherwise)."""

    def __init__(self, vocab: int = 16, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.head(torch.tanh(self.embed(idx)))
        if targets is None:
            return logits[:, [-1], :], None
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_your_own_loop_turns_the_knobs_with_turn(monkeypatch) -> None:
    """A hand-written loop (nanoGPT's shape: shifted targets, ``(logits, loss)`` outputs):
    ``turn`` after each optimizer step moves the knobs on held-out batches, applies them,
    and scores validation with fit's calibrated cross-entropy on every position."""
    from regdial import Applied
    from regdial.dial import implicit

    scored: list[tuple[int, ...]] = []
    original = implicit.calibrated_cross_entropy
    monkeypatch.setattr(implicit, "calibrated_cross_entropy",
                        lambda z, y: scored.append(tuple(z.shape)) or original(z, y))  # fmt: skip
    torch.manual_seed(0)
    data = (torch.arange(4500) * 7 % 16).reshape(-1, 9)  # a sequence the next token follows from
    batches = [(data[i : i + 32, :-1], data[i : i + 32, 1:]) for i in range(0, 320, 32)] * 4
    val = [(data[i : i + 32, :-1], data[i : i + 32, 1:]) for i in range(320, 416, 32)]
    model = _TinyGPT()
    controller = HypergradientController(Space({"weight_decay": (1e-4, 1.0), "label_smoothing": (0.0, 0.2)}),
                                         every=4)  # fmt: skip
    applied = Applied(
        controller.start(), model, lambda groups: torch.optim.AdamW(groups, lr=1e-2), num_classes=16
    )
    turned = []
    for step, (x, y) in enumerate(batches, start=1):
        logits, _ = model(x, y)
        loss = applied.loss(logits, y) + applied.penalty()
        applied.optimizer.zero_grad()
        loss.backward()
        applied.optimizer.step()
        new = controller.turn(applied, x, y, step=step, total_steps=len(batches), val=val,
                              forward=lambda x, y: model(x, y)[0])  # fmt: skip
        if new is not None:
            turned.append(new)
    assert controller.updates == 8  # steps 12, 16, ..., 40: every 4 after a quarter of the run
    assert turned and applied.setting == turned[-1]
    assert {m["knob"] for m in controller.moves} == {"weight_decay", "label_smoothing"}
    decay = [g["weight_decay"] for g in applied.optimizer.param_groups if g.get("regularize", True)]
    assert decay and all(d == pytest.approx(controller.values["weight_decay"]) for d in decay)
    assert scored == [(32, 8, 16)] * controller.updates  # every position's logits, not the last one's
    with pytest.raises(InputError, match=r"^step must be an integer in \[1, inf\), got 0$"):
        controller.turn(applied, x, y, step=0, total_steps=len(batches), val=val)


def test_what_turn_cannot_move_in_your_loop_is_one_line_at_the_first_turn(caplog) -> None:
    """nanoGPT's loop keeps the model's own loss: label smoothing's turns were recorded (to
    0.2) for a loss never smoothed; a dropout in the Space was held at the range's start and
    never moved; without forward=, the last position's logits failed a quarter of the run
    later, naming the held-out batches. Each is now one line at the first turn."""
    import logging

    from regdial import Applied

    data = (torch.arange(900) * 7 % 16).reshape(-1, 9)
    x, y = data[:32, :-1], data[:32, 1:]
    val = [(data[32:64, :-1], data[32:64, 1:])]

    def one_step(space: Space, own_loss: bool) -> tuple[HypergradientController, Applied, nn.Module]:
        torch.manual_seed(0)
        model = _TinyGPT()
        controller = HypergradientController(space, every=4)
        applied = Applied(controller.start(), model, lambda g: torch.optim.AdamW(g, lr=1e-2), num_classes=16)
        logits, loss = model(x, y)
        (loss if own_loss else applied.loss(logits, y)).backward()
        applied.optimizer.step()
        return controller, applied, model

    controller, applied, model = one_step(Space({"label_smoothing": (0.0, 0.2)}), own_loss=True)
    with pytest.raises(InputError, match=r"^online.label_smoothing must be a knob your loop applies: train on "
                       r"applied.loss\(logits, y\), not the model's own loss"):  # fmt: skip
        controller.turn(applied, x, y, step=1, total_steps=40, val=val, forward=lambda a, b: model(a, b)[0])
    controller, applied, model = one_step(Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)}), False)
    with pytest.raises(InputError, match=r"^online.dropout must be a knob turn\(\) moves"):
        controller.turn(applied, x, y, step=1, total_steps=40, val=val, forward=lambda a, b: model(a, b)[0])
    controller, applied, model = one_step(Space({"weight_decay": (1e-4, 1.0)}), own_loss=False)
    state = torch.get_rng_state()
    with pytest.raises(InputError, match=r"^forward must be a function \(inputs, targets\) -> the logits of every "
                       r"target.*got outputs of shape \(32, 1, 16\) for targets of shape \(32, 8\)$"):  # fmt: skip
        controller.turn(applied, x, y, step=1, total_steps=40, val=val)
    assert torch.equal(torch.get_rng_state(), state)  # the check draws nothing from the run's random stream
    assert controller.turn(applied, x, y, step=1, total_steps=40, val=val,
                           forward=lambda a, b: model(a, b)[0]) is None  # fmt: skip
    # Built without num_classes, the right forward= was refused as if it were wrong.
    controller = HypergradientController(Space({"weight_decay": (1e-4, 1.0)}), every=4)
    applied = Applied(controller.start(), model, lambda g: torch.optim.AdamW(g, lr=1e-2))
    with pytest.raises(InputError, match=r"^num_classes must be the classes of the model's logits: Applied\(\.\.\., "
                       r"num_classes=16\) .*got None with logits of shape \(32, 8, 16\) for torch.int64 targets$"):  # fmt: skip
        controller.turn(applied, x, y, step=1, total_steps=40, val=val, forward=lambda a, b: model(a, b)[0])
    # A fixed setting's loss-side knob in a loop that never calls applied.loss: said when it finishes.
    model = _TinyGPT()
    applied = Applied(
        Regularization(label_smoothing=0.1), model, lambda g: torch.optim.AdamW(g), num_classes=16
    )
    with caplog.at_level(logging.WARNING, logger="regdial"):
        applied.finish()
    assert "label_smoothing=0.1 did not train: the loop never called applied.loss" in caplog.text


def test_max_norm_beside_a_penalty_knob_is_said_once(caplog) -> None:
    """The projection is not in the fixed point the hypergradient differentiates."""
    import logging

    space = Space({"weight_decay": (1e-4, 1.0)}, base=Regularization(max_norm=3.0))
    controller = HypergradientController(space, every=10)
    with caplog.at_level(logging.WARNING, logger="regdial.dial.hypergradient"):
        fit("wine", controller.start(), epochs=2, progress=False, controller=controller)
    said = [r.getMessage() for r in caplog.records if "max_norm caps the weights" in r.getMessage()]
    assert len(said) == 1 and "weight_decay's hypergradient takes the uncapped fixed point" in said[0]


def test_a_state_loaded_into_a_controller_in_use_walks_its_held_out_loader_from_the_saved_place() -> None:
    # A notebook resumes a trainer's run with the same callback: its controller, already
    # walking the held-out loader, is handed the checkpoint's state. The walk goes on from
    # the checkpoint's place, not from where the controller's own iterator stood.
    loader = torch.utils.data.DataLoader(torch.arange(8.0).unsqueeze(1), batch_size=1)
    controller = HypergradientController(Space({"weight_decay": (1e-4, 1.0)}), every=3)
    first = controller._next_loaded(loader)
    state = controller.state_dict()
    walked = [controller._next_loaded(loader) for _ in range(3)]
    controller.load_state_dict(state)
    assert float(first) == 0.0 and [float(b) for b in walked] == [1.0, 2.0, 3.0]
    assert float(controller._next_loaded(loader)) == 1.0


def test_an_epochs_setting_is_the_one_its_last_step_trained_under(tmp_path: Path) -> None:
    # A move after an epoch's last step applies from the next epoch: the weights the epoch
    # ended with (the ones a best epoch is restored to) never trained under it.
    class LastStepTurn:
        def __init__(self) -> None:
            self.turns = 0

        def __call__(self, history, applied):
            return None

        def after_step(self, run, inputs, targets):
            if run.loop.step % run.source.steps_per_epoch():
                return None
            self.turns += 1
            return Regularization(weight_decay=0.01 * 2**self.turns)

    history = fit("wine", Regularization(weight_decay=0.01), epochs=3, controller=LastStepTurn(), progress=False,
                  run_dir=tmp_path)  # fmt: skip
    said = history.meta["summary"]
    assert said["best_setting"]["weight_decay"] == 0.01 * 2 ** (said["best_epoch"] - 1)


def test_the_validation_objective_takes_a_models_flattened_logits_and_refuses_mismatched_targets() -> None:
    logits, targets = torch.randn(6 * 5, 7), torch.randint(0, 7, (6, 5))  # nanoGPT's logits.view(-1, V)
    assert torch.isclose(
        calibrated_cross_entropy(logits, targets), calibrated_cross_entropy(logits, targets.reshape(-1))
    )
    with pytest.raises(
        InputError,
        match=r"^val must be held-out batches shaped as the training ones.*got targets of shape \(6, 4\)$",
    ):
        calibrated_cross_entropy(logits, targets[:, :4])


def test_a_fit_resumed_at_its_end_does_not_say_its_knobs_never_trained(tmp_path, caplog) -> None:
    """fit's loop applies its knobs; a run resumed at its last epoch trains no batch, and
    Applied.finish's check named an API a CLI user never calls (a resumed tune's trials)."""
    import logging

    setting = Regularization(label_smoothing=0.1)
    fit("wine", setting, epochs=2, run_dir=tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="regdial"):
        fit("wine", setting, epochs=2, run_dir=tmp_path, resume=True, progress=False)
    assert "did not train" not in caplog.text
