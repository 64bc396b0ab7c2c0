"""Fused (compiled) kernels against the eager path: same numbers, same exact zeros.

Every test uses the same few tiny shapes, so each kernel compiles once per dtype for the
whole file (compiling is what costs here, not the tensors).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

from regdial import L1, L2, L2SP, ElasticNet, GroupLasso, InputError, MaxNorm, Penalty, attach_prox, schedules
from regdial.blocks import fused
from regdial.blocks.proximal import optimizer_step_sizes

SHAPES = [(6, 5), (7,), (2, 3, 4)]


def weights(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ws = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in SHAPES]
    ws[0][0, :3] = 0.0  # sign(0) = 0 on both paths
    return ws


def anchored(fused_flag: bool | None, ws: list[torch.Tensor]) -> tuple[L2SP, list[nn.Parameter]]:
    model = nn.ParameterList([nn.Parameter(w.clone()) for w in ws])
    penalty = L2SP(0.3, {str(i): w * 0.5 for i, w in enumerate(ws)}, model=model, fused=fused_flag)
    return penalty, list(model)


MAKERS: dict[str, Callable[[bool | None], Penalty]] = {
    "L1": lambda f: L1(0.3, fused=f),
    "L2": lambda f: L2(0.3, fused=f),
    "ElasticNet": lambda f: ElasticNet(0.3, l1_ratio=0.7, fused=f),
}


def value_and_grads(
    name: str, flag: bool | None, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ws = weights(dtype)
    if name == "L2SP":
        penalty, params = anchored(flag, ws)
    else:
        penalty, params = MAKERS[name](flag), [w.clone().requires_grad_() for w in ws]
    value = penalty.value(params)
    value.backward()
    return value.detach(), [p.grad for p in params if p.grad is not None]


CASES = [(name, torch.float32) for name in ("L1", "L2", "ElasticNet", "L2SP")] + [
    ("ElasticNet", torch.float64)
]


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_value_and_gradient_match_eager(name: str, dtype: torch.dtype) -> None:
    eager_value, eager_grads = value_and_grads(name, False, dtype)
    fused_value, fused_grads = value_and_grads(name, True, dtype)
    tight = 1e-6 if dtype == torch.float32 else 1e-13
    assert fused_value.dtype == eager_value.dtype
    torch.testing.assert_close(fused_value, eager_value, rtol=tight, atol=0.0)
    assert len(fused_grads) == len(eager_grads) == len(SHAPES)
    for got, want in zip(fused_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tight, atol=tight)
        assert torch.equal(got == 0, want == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("absolute", "squares", "with_anchors"),
    [(True, False, False), (False, True, False), (True, True, False), (False, True, True)],
)
def test_penalty_sums_are_the_formulas(
    dtype: torch.dtype, absolute: bool, squares: bool, with_anchors: bool
) -> None:
    """The kernel's own arithmetic (run eagerly here; compiled above): sum|x| and sum x^2
    in the order asked, x = w - w0 with anchors."""
    ws = weights(dtype)
    anchors = [w * 0.5 + 0.25 for w in ws] if with_anchors else None
    xs = ws if anchors is None else [w - a for w, a in zip(ws, anchors, strict=True)]
    expected = [sum(float(v) for x in xs for v in x.abs().flatten())] if absolute else []
    expected += [sum(float(v) ** 2 for x in xs for v in x.flatten())] if squares else []
    got = fused.penalty_sums(ws, anchors, absolute, squares)
    assert [s.dtype for s in got] == [dtype] * len(expected)
    tight = 1e-6 if dtype == torch.float32 else 1e-13
    assert [s.item() for s in got] == pytest.approx(expected, rel=tight)


@pytest.mark.parametrize("name", ["L1", "L2", "ElasticNet"])
def test_prox_matches_eager(name: str) -> None:
    eager, compiled = weights(torch.float32), weights(torch.float32)
    MAKERS[name](False).prox_(eager, 0.5)
    MAKERS[name](True).prox_(compiled, 0.5)
    for got, want in zip(compiled, eager, strict=True):
        assert torch.equal(got, want)  # elastic net: the same arithmetic in the same order
    if name != "L2":
        assert sum(int((w == 0).sum()) for w in compiled) > 5


def stepped(
    optimizer_class: type[torch.optim.Optimizer], dtype: torch.dtype, **options: float
) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    params = [nn.Parameter(w) for w in weights(dtype)]
    optimizer = optimizer_class(params, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype)
        optimizer.step()
    return optimizer, params


OPTIMIZERS: list[tuple[type[torch.optim.Optimizer], dict[str, float]]] = [
    (torch.optim.Adam, {"lr": 0.3}),
    (torch.optim.AdamW, {"lr": 0.3}),
    (torch.optim.NAdam, {"lr": 0.3}),
    (torch.optim.Adagrad, {"lr": 0.5}),
    (torch.optim.RMSprop, {"lr": 0.05}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["L1", "L2", "ElasticNet"])
@pytest.mark.parametrize(("optimizer_class", "options"), OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_prox_in_optimizer_metric_matches_eager(
    optimizer_class: type[torch.optim.Optimizer], options: dict[str, float], name: str, dtype: torch.dtype
) -> None:
    results = []
    for flag in (False, True):
        optimizer, params = stepped(optimizer_class, dtype, **options)
        reader = optimizer_step_sizes(optimizer)
        assert reader is not None
        MAKERS[name](flag).prox_(params, reader(optimizer, optimizer.param_groups[0], params))
        results.append([p.detach() for p in params])
    tight = 1e-6 if dtype == torch.float32 else 1e-13
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=tight, atol=tight)  # an ulp: inductor's fused arithmetic
        assert torch.equal(got == 0, want == 0)
    if name != "L2":
        assert sum(int((w == 0).sum()) for w in results[1]) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_keep_the_eager_path(dtype: torch.dtype) -> None:
    eager, compiled = weights(dtype), weights(dtype)
    ElasticNet(0.3, fused=False).prox_(eager, 0.5)
    before = dict(fused.ELASTIC_PROX._calls)
    ElasticNet(0.3, fused=True).prox_(compiled, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))
    assert fused.ELASTIC_PROX._calls == before and not any(
        key[1] == dtype for key in fused.ELASTIC_PROX._ready
    )
    assert torch.equal(L1(0.3, fused=True).value(weights(dtype)), L1(0.3, fused=False).value(weights(dtype)))


def test_max_norm_matches_renorm() -> None:
    eager = [w * 3 for w in weights(torch.float32)]
    compiled = [w.clone() for w in eager]
    MaxNorm(2.0, fused=False).prox_(eager, 1.0)
    MaxNorm(2.0, fused=True).prox_(compiled, 1.0)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert float(compiled[0].norm(dim=1).max()) <= 2.0 + 1e-5


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["stats"].values())) + int(sum(counters["frames"].values()))


def test_a_schedule_does_not_recompile() -> None:
    """Strengths, warm-up factors and bias corrections change every step: no recompile."""
    params = [nn.Parameter(w) for w in weights(torch.float32)]
    optimizer = torch.optim.Adam(params, lr=0.1)
    penalty = ElasticNet(schedules.Linear(0.01, 0.5), l1_ratio=0.7, fused=True)
    attach_prox(optimizer, penalty, params=params, warmup=5)
    l1 = L1(schedules.Cosine(0.0, 0.2), fused=True)

    def step(progress: float) -> None:
        penalty.set_progress(progress)
        l1.set_progress(progress)
        optimizer.zero_grad()
        loss = sum((p * p).sum() for p in params) + l1.value(params)
        loss.backward()
        optimizer.step()

    step(0.05)
    step(0.1)  # the first step past a warm-up of 0 strength: both kernels compiled by now
    compiled = graphs()
    for i in range(2, 10):
        step(i / 10)
    assert graphs() == compiled
    assert fused.QUOTIENT_PROX._ready and fused.GRADIENTS._ready


def test_a_missing_compiler_falls_back_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch._inductor.config

    fused.compiler_missing.cache_clear()
    monkeypatch.setattr(fused, "_SAID", set())
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(fused, "MIN_CALLS", 1)
    try:
        with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
            assert fused.compiler_missing("cpu") == "no C++ compiler found"
        ws = [torch.randn(4, 9), torch.randn(9)]  # shapes no other test compiled
        with caplog.at_level(logging.INFO, logger="regdial.blocks.fused"):
            for _ in range(3):
                value, expected = ElasticNet(0.2).value(ws), ElasticNet(0.2, fused=False).value(ws)
                ElasticNet(0.2).prox_(ws, 0.1)
        assert [r.getMessage() for r in caplog.records] == [
            "regdial: fused kernels off on cpu: no C++ compiler found; eager path"
        ]
        torch.testing.assert_close(value, expected)
        with pytest.raises(
            InputError, match=r"^L1.fused must be False or None on cpu \(no C\+\+ compiler found\), got True$"
        ):
            L1(0.2, fused=True).value(ws)
        for call in (
            lambda: ElasticNet(0.2, fused=True).prox_(ws, 0.1),
            lambda: L2(0.2, fused=True).value(ws),
        ):
            with pytest.raises(InputError, match=r"^(ElasticNet|L2).fused must be False or None on cpu"):
                call()
    finally:
        fused.compiler_missing.cache_clear()


def test_a_compile_failure_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fused, "compiler_missing", lambda device_type: None)

    def data_dependent(group: list[torch.Tensor]) -> torch.Tensor:
        torch._dynamo.graph_break()  # what fullgraph=True refuses
        return group[0].sum()

    kernel = fused.FusedKernel(data_dependent)
    with caplog.at_level(logging.WARNING, logger="regdial.blocks.fused"):
        assert kernel(True, [torch.ones(3)]) is None
        assert kernel(True, [torch.ones(3)]) is None  # not tried again
    assert len(caplog.records) == 1
    assert "compiling data_dependent failed" in caplog.records[0].getMessage()


def test_pick_for_me_stays_eager_for_small_groups() -> None:
    ws = [torch.randn(5, 3)]
    before = {kernel.name: len(kernel._ready) for kernel in (fused.SUMS, fused.ELASTIC_PROX)}
    for _ in range(fused.MIN_CALLS + 1):
        ElasticNet(0.2).value(ws)
        ElasticNet(0.2).prox_(ws, 0.1)
    assert {kernel.name: len(kernel._ready) for kernel in (fused.SUMS, fused.ELASTIC_PROX)} == before
    assert not fused.SUMS._calls.get((ws[0].device, ws[0].dtype, (True, True, True), (5, 3)))


def test_pick_for_me_keeps_l2s_squares_eager_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager's foreach 2-norm beats the compiled sum of squares on the CPU: fused=None never
    compiles L2's; the sums eager takes with a temporary per tensor (L1's) it compiles."""
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(fused, "MIN_CALLS", 1)
    ws = [torch.randn(7, 2), torch.randn(2)]
    squares, sums = len(fused.SQUARES._ready), len(fused.SUMS._ready)
    for _ in range(3):
        torch.testing.assert_close(L2(0.2).value(ws), L2(0.2, fused=False).value(ws))
        torch.testing.assert_close(L1(0.2).value(ws), L1(0.2, fused=False).value(ws))
    assert len(fused.SQUARES._ready) == squares and fused.SQUARES.pick_on == ("cuda",)
    assert len(fused.SUMS._ready) == sums + (fused.compiler_missing("cpu") is None)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: L1(0.1, fused="yes"), r"L1.fused must be True, False or None \(pick\), got 'yes'"),
        (lambda: L2(0.1, foreach=False, fused=True), r"L2.fused must be False or None with foreach=False"),
        (lambda: MaxNorm(1.0, fused=1), r"MaxNorm.fused must be True, False or None"),
    ],
)
def test_fused_flag_is_checked(make: Callable[[], object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        make()


def test_every_kernel_compiles_under_a_code_object_of_its_own() -> None:
    """Dynamo keeps compiled entries, and counts them against recompile_limit, per code
    object: two kernels sharing one would use up each other's shape sets (torch's
    "hit config.recompile_limit" warnings where regdial's own count said there was room)."""
    kernels = [k for k in vars(fused).values() if isinstance(k, fused.FusedKernel)]
    assert len(kernels) >= 6
    codes = {id(k.function.__code__) for k in kernels}
    assert len(codes) == len(kernels)


def test_group_lasso_takes_the_fused_flag_and_says_it_has_no_kernel() -> None:
    ws = [torch.randn(4, 9)]
    assert GroupLasso(0.1, fused=None).value(ws) == GroupLasso(0.1, fused=False).value(ws)
    for flag in (True, "yes"):
        with pytest.raises(
            InputError, match=r"^GroupLasso.fused must be False or None \(GroupLasso has no fused kernel"
        ):
            GroupLasso(0.1, fused=flag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_in_place_kernels_write_a_0_dim_tensor(dtype: torch.dtype) -> None:
    """Inductor loses in-place writes into 0-dim float64 tensors: a scalar left at 0.3."""
    made = lambda: [torch.tensor(0.3, dtype=dtype), torch.full((3,), 0.3, dtype=dtype)]  # noqa: E731
    for penalty in (ElasticNet(0.6, l1_ratio=0.4, fused=True), L1(0.6, fused=True)):
        got, want = made(), made()
        penalty.prox_(got, 0.05)
        type(penalty)(
            0.6, **({"l1_ratio": 0.4} if isinstance(penalty, ElasticNet) else {}), fused=False
        ).prox_(want, 0.05)
        assert float(got[0]) != 0.3
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    moved = []
    for flag in (True, False):  # the prox in Adam's step sizes (QUOTIENT_PROX)
        scalar = torch.tensor(0.3, dtype=dtype)
        optimizer = torch.optim.Adam([scalar], lr=0.1)
        optimizer.state[scalar].update(
            step=torch.tensor(3.0),
            exp_avg=torch.zeros_like(scalar),
            exp_avg_sq=torch.tensor(4.0, dtype=dtype),
        )
        reader = optimizer_step_sizes(optimizer)
        assert reader is not None
        L1(0.6, fused=flag).prox_([scalar], reader(optimizer, optimizer.param_groups[0], [scalar]))
        moved.append(scalar)
    assert float(moved[0]) != 0.3
    torch.testing.assert_close(moved[0], moved[1])
