"""Proximal gradient with regdial's penalties reaches scikit-learn's solutions.

The problem is linear regression with an unpenalized intercept and the loss
(1/2n)||y - Xw - b||^2, trained full-batch by ``torch.optim.SGD`` with step 1/L and the
penalty's prox attached by ``attach_prox``: ISTA, which converges to the exact optimum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso as SkLasso
from sklearn.linear_model import Ridge as SkRidge
from torch import nn

from regdial import L1, L2, ElasticNet, GroupLasso, Penalty, attach_prox, param_groups


def regression_problem(n: int = 200, d: int = 20, informative: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    coef = np.zeros(d)
    coef[:informative] = rng.uniform(1.0, 3.0, informative) * rng.choice([-1, 1], informative)
    y = X @ coef + 0.5 + 0.5 * rng.standard_normal(n)
    return X, y


def fit_proximal(
    X: np.ndarray, y: np.ndarray, penalty: Penalty | None, steps: int = 3000, *, loss_penalty=None
):
    """Full-batch SGD on (1/2n)||y - Xw - b||^2; ``penalty`` as a prox, or in the loss."""
    torch.manual_seed(0)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    model = nn.Linear(X.shape[1], 1).double()
    # Lipschitz constant of the gradient in (w, b): largest eigenvalue of [X 1]^T [X 1] / n.
    augmented = np.hstack([X, np.ones((len(X), 1))])
    lipschitz = np.linalg.eigvalsh(augmented.T @ augmented / len(X)).max()
    optimizer = torch.optim.SGD(param_groups(model, 0.0), lr=1.0 / lipschitz)
    if penalty is not None:
        attach_prox(optimizer, penalty)  # the bias group is marked unregularized
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.5 * (yt - model(Xt).squeeze(1)).square().mean()
        if loss_penalty is not None:
            loss = loss + loss_penalty.value(model.weight)
        loss.backward()
        optimizer.step()
    return model.weight.detach().squeeze(0).numpy(), float(model.bias.detach())


def sklearn_fit(estimator, X, y):
    estimator.fit(X, y)
    return estimator.coef_, float(estimator.intercept_)


@pytest.mark.parametrize("strength", [0.05, 0.3])
def test_l1_prox_matches_sklearn_lasso(strength: float) -> None:
    X, y = regression_problem()
    coef, intercept = fit_proximal(X, y, L1(strength))
    expected, expected_intercept = sklearn_fit(SkLasso(alpha=strength, tol=1e-12, max_iter=100_000), X, y)
    np.testing.assert_allclose(coef, expected, atol=1e-4, rtol=0)
    assert abs(intercept - expected_intercept) <= 1e-4
    np.testing.assert_array_equal(coef == 0, expected == 0)
    assert (coef == 0).sum() >= 10  # the lasso really selected features


@pytest.mark.parametrize(("strength", "l1_ratio"), [(0.1, 0.3), (0.2, 0.7), (0.1, 1.0)])
def test_elastic_net_prox_matches_sklearn(strength: float, l1_ratio: float) -> None:
    X, y = regression_problem(seed=1)
    coef, intercept = fit_proximal(X, y, ElasticNet(strength, l1_ratio=l1_ratio))
    estimator = SkElasticNet(alpha=strength, l1_ratio=l1_ratio, tol=1e-12, max_iter=100_000)
    expected, expected_intercept = sklearn_fit(estimator, X, y)
    np.testing.assert_allclose(coef, expected, atol=1e-4, rtol=0)
    assert abs(intercept - expected_intercept) <= 1e-4
    np.testing.assert_array_equal(coef == 0, expected == 0)
    assert (coef == 0).sum() >= 5


@pytest.mark.parametrize("strength", [0.01, 0.5])
def test_l2_prox_matches_sklearn_ridge(strength: float) -> None:
    X, y = regression_problem(seed=2)
    coef, intercept = fit_proximal(X, y, L2(strength))
    expected, expected_intercept = sklearn_fit(SkRidge(alpha=len(X) * strength), X, y)
    np.testing.assert_allclose(coef, expected, atol=1e-4, rtol=0)
    assert abs(intercept - expected_intercept) <= 1e-4


def test_l1_in_the_loss_leaves_almost_no_exact_zeros() -> None:
    X, y = regression_problem()
    prox_coef, _ = fit_proximal(X, y, L1(0.3))
    subgradient_coef, _ = fit_proximal(X, y, None, loss_penalty=L1(0.3))
    assert (prox_coef == 0).sum() >= 10
    assert (subgradient_coef == 0).sum() <= 1


def test_group_lasso_prox_reaches_the_kkt_point() -> None:
    """Column groups on a multi-output regression: the optimality conditions hold.

    At the optimum of f(W) + s * sum_j sqrt(k) ||W[:, j]||, for each input feature j:
    zero column  -> ||grad_j f|| <= s*sqrt(k);
    other column -> grad_j f = -s*sqrt(k) * W[:, j] / ||W[:, j]||.
    """
    rng = np.random.default_rng(3)
    n, d, k = 300, 12, 3
    X = rng.standard_normal((n, d))
    W_true = np.zeros((k, d))
    W_true[:, :4] = rng.standard_normal((k, 4)) * 2
    Y = X @ W_true.T + 0.3 * rng.standard_normal((n, k))
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    weight = torch.zeros(k, d, dtype=torch.float64, requires_grad=True)
    strength = 0.08
    optimizer = torch.optim.SGD([weight], lr=1.0 / np.linalg.eigvalsh(X.T @ X / n).max())
    attach_prox(optimizer, GroupLasso(strength, groups="columns"))
    for _ in range(3000):
        optimizer.zero_grad()
        loss = 0.5 * (Yt - Xt @ weight.T).square().sum(dim=1).mean()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad()
    (0.5 * (Yt - Xt @ weight.T).square().sum(dim=1).mean()).backward()
    grad, W = weight.grad.numpy(), weight.detach().numpy()
    threshold = strength * np.sqrt(k)
    norms = np.linalg.norm(W, axis=0)
    zero = norms == 0
    assert zero.sum() >= 6 and (~zero).sum() >= 4
    assert np.all(np.linalg.norm(grad[:, zero], axis=0) <= threshold + 1e-8)
    np.testing.assert_allclose(grad[:, ~zero], -threshold * W[:, ~zero] / norms[~zero], atol=1e-7)


OPTIMIZERS = {
    "sgd-momentum": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda g: torch.optim.Adam(g, lr=0.01),
    "adamw": lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.0),
    "adam-amsgrad": lambda g: torch.optim.Adam(g, lr=0.01, amsgrad=True),
    "nadam": lambda g: torch.optim.NAdam(g, lr=0.01),
    "radam": lambda g: torch.optim.RAdam(g, lr=0.01),
    "adamax": lambda g: torch.optim.Adamax(g, lr=0.01),
    "adagrad": lambda g: torch.optim.Adagrad(g, lr=0.5),
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=0.002, momentum=0.5),
}


def fit_with(make_optimizer, X, y, strength: float, step_size: str = "auto", steps: int = 3000):
    torch.manual_seed(0)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    model = nn.Linear(X.shape[1], 1).double()
    optimizer = make_optimizer(param_groups(model, 0.0))
    # RMSprop has no bias correction and oscillates at a constant lr: let it anneal.
    anneal = isinstance(optimizer, torch.optim.RMSprop)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps if anneal else 10**9)
    attach_prox(optimizer, L1(strength), step_size=step_size)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (yt - model(Xt).squeeze(1)).square().mean()).backward()
        optimizer.step()
        scheduler.step()
    return model.weight.detach().squeeze(0).numpy()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_l1_means_the_lasso_with_any_optimizer(name: str) -> None:
    """With the prox in the optimizer's own step sizes, every optimizer reaches the lasso."""
    X, y = regression_problem()
    expected, _ = sklearn_fit(SkLasso(alpha=0.1, tol=1e-12, max_iter=100_000), X, y)
    coef = fit_with(OPTIMIZERS[name], X, y, 0.1)
    np.testing.assert_array_equal(coef == 0, expected == 0)
    np.testing.assert_allclose(coef, expected, atol=1e-4, rtol=0)


def test_adam_with_a_plain_lr_prox_misses_the_lasso() -> None:
    """Why step_size="auto": Adam normalizes every step to about lr, so lr*s cannot tell
    useful from useless weights."""
    X, y = regression_problem()
    expected, _ = sklearn_fit(SkLasso(alpha=0.1, tol=1e-12, max_iter=100_000), X, y)
    coef = fit_with(OPTIMIZERS["adam"], X, y, 0.1, step_size="lr")
    assert (expected == 0).sum() == 15
    assert (coef == 0).sum() <= 2
