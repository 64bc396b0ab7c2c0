"""EMA and SWA: hand-computed averages, integer buffers copied, BatchNorm recomputed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regdial.blocks.averaging import EMA, SWA, recompute_batchnorm


def model_with_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def perturb(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * step)
    model.train()
    model(torch.randn(8, 3))  # moves BN statistics and num_batches_tracked


def test_ema_matches_a_hand_computed_average() -> None:
    model = model_with_bn()
    ema = EMA(model, decay=0.9)
    expected = {k: v.clone().float() for k, v in model.state_dict().items()}
    for step in range(1, 6):
        perturb(model, step)
        ema.update_parameters(model)
        for name, value in model.state_dict().items():
            if step == 1:
                expected[name] = value.clone().float()  # the first update copies
            elif value.is_floating_point():
                expected[name] = 0.9 * expected[name] + 0.1 * value
    averaged = ema.module.state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[name], expected[name])
    # The integer counter is copied, not averaged.
    assert averaged["1.num_batches_tracked"].item() == model.state_dict()["1.num_batches_tracked"].item() == 5


def test_ema_warmup_decay() -> None:
    weight = nn.Parameter(torch.zeros(1))
    model = nn.ParameterList([weight])
    ema = EMA(model, decay=0.999, warmup=True)
    ema.update_parameters(model)  # copy: 0
    expected = 0.0
    for t in range(1, 4):
        with torch.no_grad():
            weight.fill_(float(t))
        ema.update_parameters(model)
        decay = min(0.999, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * t
    assert ema.module[0].item() == pytest.approx(expected)


def test_swa_is_the_equal_average_and_attaches_to_an_optimizer() -> None:
    weight = nn.Parameter(torch.zeros(2))
    model = nn.ParameterList([weight])
    swa = SWA(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = swa.attach(optimizer, model, every=2)
    seen = []
    for _ in range(6):
        weight.grad = torch.full((2,), -1.0)  # each step adds 1
        optimizer.step()
        seen.append(weight.detach().clone())
    handle.remove()
    expected = torch.stack(seen[1::2]).mean(dim=0)  # after steps 2, 4, 6
    torch.testing.assert_close(swa.module[0], expected)


def test_recompute_batchnorm_uses_the_data() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    swa = SWA(model)
    data = [torch.randn(64, 3) * 2 + 5 for _ in range(4)]
    recompute_batchnorm(swa, data)
    torch.testing.assert_close(swa.module[0].running_mean, torch.cat(data).mean(dim=0), rtol=0, atol=1e-5)


def test_bad_decay() -> None:
    with pytest.raises(ValueError, match=r"^EMA.decay must be in \[0, 1\], got 1.5$"):
        EMA(nn.Linear(1, 1), decay=1.5)
