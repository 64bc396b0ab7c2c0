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
    model(torch.randn(8, 3).to(model[0].weight.dtype))  # moves BN statistics and num_batches_tracked


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


def _torch_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torch's own EMA with the integer buffers copied: the oracle of EMA's kept groups."""
    from torch.optim.swa_utils import AveragedModel

    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], n: object) -> None:
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:
            torch._foreach_copy_(averaged, current)

    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)


def test_ema_follows_replaced_added_and_moved_tensors_as_torch_does() -> None:
    """The groups EMA keeps between updates are rebuilt when the model's tensors change:
    a parameter replaced, a module added to both, a tensor's dtype changed by ``.data =``."""
    model, twin = model_with_bn(), model_with_bn()
    ema, oracle = EMA(model, decay=0.8), _torch_ema(twin, 0.8)

    def update(step: int) -> None:
        for m in (model, twin):
            torch.manual_seed(step)  # the same batch through both
            perturb(m, step)
        ema.update_parameters(model)
        oracle.update_parameters(twin)
        torch.testing.assert_close(ema.module.state_dict(), oracle.module.state_dict(), rtol=0, atol=0)

    for step in range(1, 4):
        update(step)
    for m in (model, twin):  # a new tensor for the first layer's bias
        m[0].bias = nn.Parameter(m[0].bias.detach() + 1.0)
    update(4)
    for m in (model, twin, ema.module, oracle.module):  # a module added everywhere
        m.append(nn.Linear(4, 2))
        with torch.no_grad():
            m[-1].weight.fill_(0.5)
            m[-1].bias.zero_()
    update(5)
    for m in (model, twin, ema.module, oracle.module):
        m.double()  # the same parameter objects, their data replaced (``.data =``)
    update(6)
    assert ema.module[-1].weight.dtype == torch.float64


def test_a_copied_ema_updates_its_own_average() -> None:
    import copy

    model = model_with_bn()
    ema = EMA(model, decay=0.5)
    ema.update_parameters(model)
    ema.update_parameters(model)  # the groups are kept now
    twin = copy.deepcopy(ema)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    perturb(model, 1)
    twin.update_parameters(model)
    torch.testing.assert_close(ema.module.state_dict(), before, rtol=0, atol=0)  # untouched
    assert not torch.equal(twin.module[0].weight, before["0.weight"])
