"""L1 as a proximal step gives exact zeros; the same L1 in the loss does not.

A sparse linear regression: 50 features, of which only 5 matter. Two fits of one linear
model with Adam, at the same strength:

1. the L1 penalty added to the loss (what most code does): Adam follows a subgradient,
   so the useless weights hover near zero but never reach it;
2. the same L1 as a proximal step after each optimizer step (``attach_prox``): the
   useless weights are set to exactly 0, and the surviving ones are the true features.

Run: ``python examples/l1_exact_zeros.py`` (a few seconds on a laptop CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from regdial import L1, attach_prox, param_groups

FEATURES, INFORMATIVE, SAMPLES, STRENGTH = 50, 5, 400, 0.05


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    true_weight = torch.zeros(FEATURES)
    true_weight[:INFORMATIVE] = torch.tensor([2.0, -1.5, 1.0, -0.8, 0.6])
    y = x @ true_weight + 0.3 * torch.randn(SAMPLES, generator=generator)
    return x, y, true_weight


def fit(x: torch.Tensor, y: torch.Tensor, *, proximal: bool) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 1)
    optimizer = torch.optim.Adam(param_groups(model, weight_decay=0.0), lr=0.02)
    penalty = L1(STRENGTH)
    if proximal:
        # Soft-threshold after every step; biases spared. warmup=0: a linear model is convex,
        # so the warm-up that shields a deep network's weights while Adam's second moment
        # is still near zero (attach_prox's default) is not needed here.
        attach_prox(optimizer, penalty, warmup=0)
    for _ in range(600):
        optimizer.zero_grad()
        loss = 0.5 * (model(x).squeeze(1) - y).square().mean()
        if not proximal:
            loss = loss + penalty.value(model.weight)  # the subgradient route
        loss.backward()
        optimizer.step()
    return model


def main() -> None:
    x, y, true_weight = make_data()
    x_val, y_val, _ = make_data(seed=1)
    true_support = set(torch.nonzero(true_weight).flatten().tolist())
    print(f"{FEATURES} features, {INFORMATIVE} informative; L1 strength {STRENGTH}\n")
    print(f"{'L1 applied as':<24}{'exact zeros':>12}{'|w| < 1e-3':>12}{'support found':>15}{'val MSE':>9}")
    for label, proximal in (("a loss term (subgrad.)", False), ("a proximal step", True)):
        model = fit(x, y, proximal=proximal)
        weight = model.weight.detach().squeeze(0)
        zeros = int((weight == 0).sum())
        tiny = int((weight.abs() < 1e-3).sum())
        support = set(torch.nonzero(weight).flatten().tolist())
        found = "exactly" if support == true_support else f"{len(support)} features kept"
        with torch.no_grad():
            mse = float((model(x_val).squeeze(1) - y_val).square().mean())
        print(f"{label:<24}{zeros:>12}{tiny:>12}{found:>15}{mse:>9.4f}")
    print("\nThe proximal step zeroes the 45 useless weights exactly, so the model also selects features.")


if __name__ == "__main__":
    main()
