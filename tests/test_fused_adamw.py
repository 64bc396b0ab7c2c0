"""FusedAdamW: AdamW and an attached prox in one compiled pass, against the reference
(torch's AdamW step, then the prox in its step hook): same numbers, same exact zeros.

One tiny model for the whole file, so the fused step compiles once per variant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from regdial import (
    EMA,
    L1,
    L2,
    L2SP,
    Applied,
    ElasticNet,
    FusedAdamW,
    GroupLasso,
    InputError,
    Penalty,
    Regularization,
    attach_prox,
    schedules,
)
from regdial.blocks import fused, fused_adamw

X = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))


def groups(net: nn.Module) -> list[dict[str, object]]:
    return [
        {"params": [p for p in net.parameters() if p.dim() > 1], "weight_decay": 0.05},
        {"params": [p for p in net.parameters() if p.dim() == 1], "weight_decay": 0.0, "regularize": False},
    ]


def train(
    flag: bool | None,
    penalty: Callable[[], Penalty] | None,
    steps: int = 25,
    optimizer: Callable[[list[dict[str, object]], bool | None], torch.optim.Optimizer] | None = None,
    warmup: int | None = 8,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = model()
    make = optimizer or (lambda gs, f: FusedAdamW(gs, lr=3e-2, fused=f))
    opt = make(groups(net), flag)
    made = penalty() if penalty is not None else None
    if made is not None:
        attach_prox(opt, made, warmup=warmup)
    for step in range(steps):
        if made is not None:
            made.set_progress(step / steps)
        for group in opt.param_groups:
            group["lr"] = 3e-2 * (1 - step / (2 * steps))  # a scheduler's changes
        loss = nn.functional.cross_entropy(net(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, opt


def assert_same(fused_net: nn.Module, reference: nn.Module) -> None:
    for got, want in zip(fused_net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got == 0, want == 0)  # the same exact zeros


PENALTIES: dict[str, Callable[[], Penalty]] = {
    "L1": lambda: L1(schedules.Linear(1e-3, 6e-3)),
    "L2": lambda: L2(0.5),
    "ElasticNet": lambda: ElasticNet(schedules.Cosine(2e-3, 8e-3), l1_ratio=0.6),
}


@pytest.mark.parametrize("name", list(PENALTIES))
def test_the_fused_step_gives_adamw_and_its_prox(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = []
    monkeypatch.setattr(fused_adamw.ADAMW_PROX, "run_", counting(fused_adamw.ADAMW_PROX.run_, runs))
    got, got_opt = train(True, PENALTIES[name])
    want, want_opt = train(False, PENALTIES[name])
    assert len(runs) == 25  # every step fused
    assert_same(got, want)
    if name != "L2":
        assert int(sum((p == 0).sum() for p in got.parameters())) > 50  # the prox did zero weights
    for p, q in zip(got.parameters(), want.parameters(), strict=True):
        a, b = got_opt.state[p], want_opt.state[q]
        assert float(a["step"]) == float(b["step"]) == 25.0
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def counting(function: Callable[..., bool], calls: list[int]) -> Callable[..., bool]:
    def counted(*args: object, **kwargs: object) -> bool:
        calls.append(1)
        return function(*args, **kwargs)

    return counted


def test_without_a_prox_it_is_torchs_adamw_and_shares_its_state() -> None:
    got, got_opt = train(True, None)
    want, want_opt = train(False, None, optimizer=lambda gs, f: torch.optim.AdamW(gs, lr=3e-2))
    assert_same(got, want)
    plain = torch.optim.AdamW(groups(want), lr=3e-2)
    plain.load_state_dict(got_opt.state_dict())  # the same layout: it loads into torch's
    again = FusedAdamW(groups(got), lr=3e-2, fused=True)
    again.load_state_dict(want_opt.state_dict())
    assert float(next(iter(again.state.values()))["step"]) == 25.0


def test_a_schedule_does_not_recompile() -> None:
    from torch._dynamo.utils import counters

    train(True, PENALTIES["ElasticNet"], steps=3)  # compiled by now
    before = int(sum(counters["stats"].values())) + int(sum(counters["frames"].values()))
    train(True, PENALTIES["ElasticNet"], steps=12)  # strengths, lr, warm-up and steps all move
    after = int(sum(counters["stats"].values())) + int(sum(counters["frames"].values()))
    assert after == before


def test_where_the_fused_loop_does_not_apply_a_step_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []
    monkeypatch.setattr(fused_adamw.ADAMW_PROX, "run_", counting(fused_adamw.ADAMW_PROX.run_, runs))
    got, _ = train(True, PENALTIES["L1"], optimizer=_amsgrad)
    want, _ = train(False, PENALTIES["L1"], optimizer=_amsgrad)
    assert runs == []
    assert_same(got, want)


def _amsgrad(gs: list[dict[str, object]], flag: bool | None) -> FusedAdamW:
    opt = FusedAdamW(gs, lr=3e-2, fused=flag)
    for group in opt.param_groups:
        group["amsgrad"] = True
    return opt


def test_a_hook_that_runs_before_the_prox_keeps_its_place() -> None:
    """A step hook registered before attach_prox's sees the weights before the prox, as
    with the reference: the prox then stays in its hook."""
    seen: dict[bool | None, list[torch.Tensor]] = {True: [], False: []}

    def make(gs: list[dict[str, object]], flag: bool | None) -> FusedAdamW:
        opt = FusedAdamW(gs, lr=3e-2, fused=flag)
        first = opt.param_groups[0]["params"][0]
        opt.register_step_post_hook(lambda *_: seen[flag].append(first.detach().clone()))
        return opt

    got, _ = train(True, PENALTIES["L1"], optimizer=make)
    want, _ = train(False, PENALTIES["L1"], optimizer=make)
    assert_same(got, want)
    for a, b in zip(seen[True], seen[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_state_reset_by_hand_is_followed() -> None:
    """``optimizer.state.clear()`` (moments reset, as some schedules do) and a replaced
    moment are what the next fused step uses, as the reference's."""
    results = []
    for flag in (True, False):
        net = model()
        opt = FusedAdamW(groups(net), lr=3e-2, fused=flag)
        for step in range(6):
            nn.functional.cross_entropy(net(X), Y).backward()
            opt.step()
            opt.zero_grad()
            if step == 2:
                opt.state.clear()
            if step == 4:
                first = opt.param_groups[0]["params"][0]
                opt.state[first]["exp_avg"] = torch.zeros_like(first)
        results.append(net)
    assert_same(results[0], results[1])


def test_a_removed_prox_is_not_fused() -> None:
    net = model()
    opt = FusedAdamW(groups(net), lr=3e-2, fused=True)
    handle = attach_prox(opt, L1(0.5), warmup=0)
    handle.remove()
    before = [p.detach().clone() for p in net.parameters()]
    nn.functional.cross_entropy(net(X), Y).backward()
    opt.step()
    reference = model()
    plain = torch.optim.AdamW(groups(reference), lr=3e-2)
    nn.functional.cross_entropy(reference(X), Y).backward()
    plain.step()
    assert_same(net, reference)
    assert not any(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


def spy_averages(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each fused step's call was given averages to update."""
    averaged: list[bool] = []
    run = fused_adamw.ADAMW_PROX.run_

    def spy(fused_flag: bool | None, *args: object, **kwargs: Any) -> bool:
        averaged.append(args[-1] is not None)
        return run(fused_flag, *args, **kwargs)

    monkeypatch.setattr(fused_adamw.ADAMW_PROX, "run_", spy)
    return averaged


@pytest.mark.parametrize("l1", [5e-3, 0.0])
def test_applied_with_an_ema_the_same_as_the_reference(l1: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The EMA's update fused into the step (after the prox's, or alone), BatchNorm's
    buffers left to its hook: the weights and the whole average as the reference's."""
    averaged = spy_averages(monkeypatch)
    setting = Regularization(weight_decay=0.05, l1=schedules.Linear(0.0, l1) if l1 else 0.0, ema=0.9)
    nets = {}
    for flag in (True, False):
        torch.manual_seed(0)
        # No bias before the BatchNorm: its gradient is rounding noise (1e-9) that Adam
        # scales up to full steps, where torch's own fused AdamW and its for-loop differ by 7e-3.
        net = nn.Sequential(nn.Linear(12, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
        applied = Applied(setting, net, lambda gs, f=flag: FusedAdamW(gs, lr=3e-2, fused=f), num_classes=3)
        for step in range(20):
            applied.set_progress(step / 20)
            loss = applied.loss(net(X), Y) + applied.penalty()
            applied.optimizer.zero_grad()
            loss.backward()
            applied.optimizer.step()
        assert isinstance(applied.ema, EMA)
        nets[flag] = (net, applied.ema.module)
    assert averaged == [True] * 20  # the fused run's every step averaged in the loop
    assert_same(nets[True][0], nets[False][0])
    got, want = nets[True][1].state_dict(), nets[False][1].state_dict()
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["1.running_mean"], nets[True][0].state_dict()["1.running_mean"])


@torch.no_grad()
def shrink(net: nn.Module) -> None:
    torch._foreach_mul_(list(net.parameters()), 0.99)


def test_an_ema_attached_after_another_hook_stays_in_its_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    averaged = spy_averages(monkeypatch)
    results = []
    for flag in (True, False):
        net = model()
        opt = FusedAdamW(groups(net), lr=3e-2, fused=flag)
        attach_prox(opt, L1(5e-3), warmup=0)
        opt.register_step_post_hook(lambda o, *_, n=net: shrink(n))  # runs between the two
        ema = EMA(net, decay=0.8)
        ema.attach(opt, net)
        for _ in range(6):
            nn.functional.cross_entropy(net(X), Y).backward()
            opt.step()
            opt.zero_grad()
        results.append(ema.module)
    assert averaged == [False] * 6
    assert_same(results[0], results[1])


@pytest.mark.parametrize("name", ["GroupLasso", "L2SP"])
def test_an_ema_after_a_prox_the_loop_cannot_fuse_averages_the_weights_after_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GroupLasso's and L2-SP's prox run in their hooks after the loop: an EMA updated in
    the loop averaged the weights before them (1.4e-2 off the reference's average)."""
    averaged = spy_averages(monkeypatch)
    results = []
    for flag in (True, False):
        net = model()
        opt = FusedAdamW(groups(net), lr=3e-2, fused=flag)
        anchor = {key: torch.zeros_like(value) for key, value in net.state_dict().items()}
        penalty = GroupLasso(0.05) if name == "GroupLasso" else L2SP(5.0, anchor, model=net)
        attach_prox(opt, penalty, warmup=0)
        ema = EMA(net, decay=0.5)
        ema.attach(opt, net)
        average: list[torch.Tensor] | None = None
        for _ in range(8):
            nn.functional.cross_entropy(net(X), Y).backward()
            opt.step()
            opt.zero_grad()
            now = [p.detach().clone() for p in net.parameters()]
            average = (
                now if average is None else [0.5 * a + 0.5 * w for a, w in zip(average, now, strict=True)]
            )
        assert average is not None
        for got, want in zip(ema.module.parameters(), average, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the weights after the prox
        results.append((net, ema.module))
    assert averaged == [False] * 8  # the loop stepped, the average stayed in its hook
    assert_same(results[0][0], results[1][0])
    assert_same(results[0][1], results[1][1])


def test_a_missing_compiler_leaves_the_reference_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fused, "compiler_missing", lambda device_type: "no C++ compiler found")
    monkeypatch.setattr(fused, "_SAID", set())
    fresh = fused.FusedKernel(fused_adamw.adamw_prox_, pick_on=("cpu", "cuda"))  # none compiled, picked here
    monkeypatch.setattr(fused_adamw, "ADAMW_PROX", fresh)
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(fused, "MIN_CALLS", 1)
    with caplog.at_level(logging.INFO, logger="regdial.blocks.fused"):
        got, _ = train(None, PENALTIES["L1"], steps=4)
    want, _ = train(False, PENALTIES["L1"], steps=4)
    assert_same(got, want)
    assert [r.getMessage() for r in caplog.records] == [
        "regdial: fused kernels off on cpu: no C++ compiler found; eager path"
    ]
    with pytest.raises(
        InputError, match=r"FusedAdamW.fused must be False or None on cpu \(no C\+\+ compiler found\)"
    ):
        FusedAdamW(model().parameters(), fused=True)


def test_pick_for_me_stays_the_reference_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(fused, "MIN_CALLS", 1)
    monkeypatch.setattr(fused_adamw.ADAMW_PROX, "run_", counting(fused_adamw.ADAMW_PROX.run_, runs))
    got, _ = train(None, PENALTIES["L1"], steps=4)
    want, _ = train(False, PENALTIES["L1"], steps=4)
    assert runs == []
    for p, q in zip(got.parameters(), want.parameters(), strict=True):
        assert torch.equal(p, q)  # the same code ran


def test_fused_is_checked() -> None:
    with pytest.raises(InputError, match=r"FusedAdamW\.fused must be True, False or None"):
        FusedAdamW(model().parameters(), fused="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_division_stays_within_rounding_of_torchs_step_at_the_extremes(dtype: torch.dtype) -> None:
    """The loop folds AdamW's ``m / (sqrt(v)/sqrt(c2) + eps)`` into the prox's denominator
    ``d = sqrt(v) + eps sqrt(c2)``: where ``d`` is tiny (zero gradients from the first step,
    ``d = eps sqrt(c2)`` about 3e-10), huge (gradients of 1e6) or the weights are 0, it
    must stay torch's step to rounding, with and without L1 on the same tensors."""
    scales = torch.tensor([0.0, 1e-30, 1e-8, 1.0, 1e6], dtype=dtype)

    def run(flag: bool, l1: float) -> list[torch.Tensor]:
        torch.manual_seed(3)
        weights = [torch.randn(5, 40, dtype=dtype), torch.zeros(5, 40, dtype=dtype)]
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, fused=flag)
        if l1:
            attach_prox(opt, L1(l1), warmup=0)
        generator = torch.Generator().manual_seed(4)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator, dtype=dtype) * scales[:, None]
            opt.step()
        return [p.detach() for p in params]

    tight = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    for l1 in (0.0, 1e-2):
        for got, want in zip(run(True, l1), run(False, l1), strict=True):
            torch.testing.assert_close(got, want, **tight)
            assert torch.equal(got == 0, want == 0)


@pytest.mark.parametrize("option", ["amsgrad", "maximize"])
def test_torchs_keywords_take_torchs_step(option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A drop-in for ``torch.optim.AdamW``: its keywords are taken, and where the fused
    loop does not apply (AMSGrad, ``maximize``) the step is torch's, hooks and all."""
    calls: list[int] = []
    monkeypatch.setattr(fused_adamw.ADAMW_PROX, "run_", counting(fused_adamw.ADAMW_PROX.run_, calls))
    got, _ = train(
        True, lambda: L1(5e-3), optimizer=lambda gs, f: FusedAdamW(gs, lr=3e-2, fused=f, **{option: True})
    )
    want, _ = train(
        None, lambda: L1(5e-3), optimizer=lambda gs, f: torch.optim.AdamW(gs, lr=3e-2, **{option: True})
    )
    assert calls == []
    for a, b in zip(got.parameters(), want.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_step_that_raises_leaves_the_step_count_where_it_was() -> None:
    """A prox whose plan raises at the second step: the error reaches the caller, and the
    optimizer's state is the first step's (the count was not moved without the moments)."""

    class Broken(L1):
        calls = 0

        def quotient_coefficients(self) -> tuple[float, float, float] | None:
            Broken.calls += 1
            if Broken.calls == 2:
                raise RuntimeError("plan failed")
            return super().quotient_coefficients()

    net = model()
    opt = FusedAdamW(net.parameters(), lr=3e-2, fused=True)
    attach_prox(opt, Broken(1e-3), warmup=0)
    for step in range(2):
        loss = nn.functional.cross_entropy(net(X), Y)
        opt.zero_grad()
        loss.backward()
        if step == 1:
            before = {id(p): (float(s["step"]), s["exp_avg"].clone()) for p, s in opt.state.items()}
            with pytest.raises(RuntimeError, match="plan failed"):
                opt.step()
        else:
            opt.step()
    for p, s in opt.state.items():
        count, moment = before[id(p)]
        assert float(s["step"]) == count == 1.0
        assert torch.equal(s["exp_avg"], moment)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_0_dim_parameter_is_stepped_with_its_state(dtype: torch.dtype) -> None:
    """A learned temperature (CLIP's logit_scale): inductor loses in-place writes into 0-dim
    float64 tensors, and the fused loop left its weight, moments and average as they were."""
    results = []
    for flag in (True, False):
        torch.manual_seed(0)
        temperature = nn.Parameter(torch.tensor(1.0, dtype=dtype))
        vector = nn.Parameter(torch.randn(5, dtype=dtype))
        optimizer = FusedAdamW([temperature, vector], lr=0.1, fused=flag)
        attach_prox(optimizer, L1(0.05), warmup=0)
        for _ in range(4):
            loss = (vector * temperature).sum() ** 2 + (temperature - 3) ** 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = optimizer.state[temperature]
        results.append(
            [temperature.detach().clone(), vector.detach().clone(), state["exp_avg"], state["exp_avg_sq"]]
        )
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert float(results[0][2]) != 0.0  # the moments were written


def test_a_state_of_another_shape_is_one_line() -> None:
    """A state of a smaller model loaded by hand (torch's load_state_dict checks no shape),
    or moments kept across a resize: one line, before anything moves."""
    small, large = model(), nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 3))
    saved = FusedAdamW(small.parameters(), lr=1e-2, fused=True)
    small(X).sum().backward()
    saved.step()
    optimizer = FusedAdamW(large.parameters(), lr=1e-2, fused=True)
    optimizer.load_state_dict(saved.state_dict())
    large(X).sum().backward()
    with pytest.raises(InputError, match=r"^FusedAdamW.state\[param_groups\[0\] parameter 0\].exp_avg must "
                       r"be of its parameter's shape \(40, 12\) .*optimizer.state.pop\(p\)\), got shape "
                       r"\(32, 12\)$"):  # fmt: skip
        optimizer.step()
    assert float(optimizer.state[large[0].weight]["step"]) == 1.0  # nothing moved
