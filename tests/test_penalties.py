"""Penalties: known answers, fast path vs reference, dtypes, and input checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from regdial import L1, L2, L2SP, ElasticNet, GroupLasso, Penalty
from regdial.schedules import Cosine, Linear

SHAPES = [(7, 5), (3, 4, 3, 3), (6,), (1, 9)]


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in SHAPES]


def make_penalty(kind: str, strength: float = 0.3, *, foreach: bool | None = None) -> Penalty:
    if kind == "l1":
        return L1(strength, foreach=foreach)
    if kind == "l2":
        return L2(strength, foreach=foreach)
    if kind == "elastic_net":
        return ElasticNet(strength, l1_ratio=0.4, foreach=foreach)
    if kind == "group_lasso":
        return GroupLasso(strength, foreach=foreach)
    raise AssertionError(kind)


KINDS = ["l1", "l2", "elastic_net", "group_lasso"]


def expected_value(kind: str, params: list[torch.Tensor], s: float = 0.3) -> float:
    ws = [p.double() for p in params]
    l1 = sum(w.abs().sum().item() for w in ws)
    sq = sum(w.square().sum().item() for w in ws)
    if kind == "l1":
        return s * l1
    if kind == "l2":
        return s / 2 * sq
    if kind == "elastic_net":
        return s * (0.4 * l1 + 0.6 / 2 * sq)
    total = 0.0
    for w in ws:
        rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(-1, 1)
        total += math.sqrt(rows.shape[1]) * rows.norm(dim=1).sum().item()
    return s * total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("foreach", [True, False])
def test_value_is_the_formula(kind: str, foreach: bool) -> None:
    params = make_params(torch.float64)
    value = make_penalty(kind, foreach=foreach).value(params)
    assert value.item() == pytest.approx(expected_value(kind, params), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fast_path_equals_reference(kind: str, dtype: torch.dtype) -> None:
    fast, reference = make_params(dtype), make_params(dtype)
    fast_penalty, reference_penalty = make_penalty(kind, foreach=True), make_penalty(kind, foreach=False)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-5)
    torch.testing.assert_close(
        fast_penalty.value(fast), reference_penalty.value(reference), rtol=tolerance, atol=0
    )
    fast_penalty.prox_(fast, lr=0.5)
    reference_penalty.prox_(reference, lr=0.5)
    eps = torch.finfo(dtype).eps
    for a, b, w in zip(fast, reference, make_params(dtype), strict=True):
        # Rounding errors scale with the input: |w| - t cancels for w near the threshold.
        scale = w.abs().max().item()
        torch.testing.assert_close(a, b, rtol=2 * eps, atol=2 * eps * scale)
        assert torch.equal(a == 0, b == 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_prox_is_the_float32_prox_rounded(kind: str, dtype: torch.dtype) -> None:
    low = make_params(dtype)
    wide = [p.float() for p in low]  # the same values, exactly representable in float32
    make_penalty(kind, strength=0.05).prox_(low, lr=0.01)  # threshold 5e-4: below 16-bit spacing near 1
    make_penalty(kind, strength=0.05).prox_(wide, lr=0.01)
    for a, b in zip(low, wide, strict=True):
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(a.float(), b.to(dtype).float(), rtol=eps, atol=0)


def test_16_bit_value_accumulates_in_float32() -> None:
    # 4096 * 1.0 in float16 would stop growing at 2048; the sum must still be exact.
    ones = torch.ones(4096, dtype=torch.float16)
    value = L1(1.0).value(ones)
    assert value.dtype == torch.float32
    assert value.item() == 4096.0


@pytest.mark.parametrize("kind", [*KINDS, "l2sp"])
def test_strength_zero_is_the_identity(kind: str) -> None:
    params = make_params()
    before = [p.clone() for p in params]
    if kind == "l2sp":
        model = nn.Linear(3, 2)
        penalty: Penalty = L2SP(0.0, copy.deepcopy(model), model=model)
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        before = [p.detach().clone() for p in params]
    else:
        penalty = make_penalty(kind, strength=0.0)
    penalty.prox_(params, lr=10.0)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
    assert penalty.value(params).item() == 0.0


def test_l1_prox_soft_thresholds() -> None:
    w = torch.tensor([-3.0, -0.5, 0.0, 0.2, 0.5, 2.0])
    L1(0.25).prox_(w, lr=2.0)  # threshold 0.5
    assert w.tolist() == [-2.5, 0.0, 0.0, 0.0, 0.0, 1.5]


def test_l2_prox_shrinks() -> None:
    w = torch.tensor([2.0, -4.0], dtype=torch.float64)
    L2(0.5).prox_(w, lr=2.0)
    assert w.tolist() == [1.0, -2.0]


def test_elastic_net_prox_thresholds_then_shrinks() -> None:
    w = torch.tensor([3.0, -1.0, 0.4], dtype=torch.float64)
    ElasticNet(1.0, l1_ratio=0.5).prox_(w, lr=1.0)  # threshold 0.5, then divide by 1.5
    torch.testing.assert_close(w, torch.tensor([2.5 / 1.5, -0.5 / 1.5, 0.0], dtype=torch.float64))


def test_group_lasso_block_soft_threshold_known_answer() -> None:
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    # Row norms 5 and 0.5; threshold lr*s*sqrt(2) = 2.5 halves the first row, zeroes the second.
    GroupLasso(2.5 / math.sqrt(2)).prox_(w, lr=1.0)
    torch.testing.assert_close(w, torch.tensor([[1.5, 2.0], [0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize(("groups", "dim"), [("rows", 0), ("columns", 1)])
def test_group_lasso_zeroes_whole_groups(groups: str, dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.05, 2.0, 16, dtype=torch.float64)
    w = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    w = w * (scales[:, None] if dim == 0 else scales[None, :])
    GroupLasso(0.2, groups=groups).prox_(w, lr=1.0)
    slices = w.unbind(dim)
    zero = [bool((g == 0).all()) for g in slices]
    assert 0 < sum(zero) < len(slices)
    for g, is_zero in zip(slices, zero, strict=True):
        assert is_zero or bool((g != 0).all())  # never a partly zeroed group


@pytest.mark.parametrize("groups", ["rows", "columns", "tensor"])
def test_group_lasso_large_strength_zeroes_everything(groups: str) -> None:
    params = [torch.randn(8, 5), torch.randn(4, 3, 3, 3)]
    GroupLasso(1e6, groups=groups).prox_(params, lr=1.0)
    assert all(bool((p == 0).all()) for p in params)


def test_group_lasso_conv_rows_are_output_channels() -> None:
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    w[1] *= 1e-3
    GroupLasso(0.01).prox_(w, lr=1.0)
    assert bool((w[1] == 0).all())
    assert bool((w[[0, 2, 3]] != 0).all())


def test_l2sp_large_strength_returns_the_anchor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    pretrained = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    L2SP(1e9, pretrained, model=model).prox_(model.parameters(), lr=1.0)
    for p, anchor in zip(model.parameters(), pretrained.parameters(), strict=True):
        torch.testing.assert_close(p, anchor, rtol=0, atol=1e-7)


@pytest.mark.parametrize("foreach", [True, False])
def test_l2sp_value_and_prox_known_answers(foreach: bool) -> None:
    model = nn.Linear(3, 2).double()
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(2.0)
    penalty = L2SP(0.5, anchor, model=model, foreach=foreach)
    # Only the weight moved, by 2 in each of 6 entries: 0.5/2 * 6 * 4 = 6.
    assert penalty.value(model.parameters()).item() == pytest.approx(6.0, rel=1e-12)
    penalty.prox_(model.parameters(), lr=2.0)  # the distance shrinks by 1/(1 + 1)
    torch.testing.assert_close(model.weight, anchor["weight"] + 1.0)
    torch.testing.assert_close(model.bias, anchor["bias"])


def test_l2sp_snapshots_the_model_and_ignores_a_new_head() -> None:
    backbone = nn.Linear(4, 4)
    model = nn.Sequential(backbone, nn.Linear(4, 2))
    penalty = L2SP(
        1.0, {"0.weight": backbone.weight.detach().clone(), "1.weight": torch.zeros(3, 4)}, model=model
    )
    # The head's saved weight has another shape: it is new, left alone.
    assert [id(p) for p in penalty.parameters()] == [id(backbone.weight)]
    head_before = model[1].weight.detach().clone()
    with torch.no_grad():
        backbone.weight.add_(1.0)
    penalty.prox_(model.parameters(), lr=1e9)
    assert torch.equal(model[1].weight, head_before)
    assert penalty.value(model[1].parameters()).item() == 0.0
    # L2SP(s, model) anchors the model at its current weights.
    snapshot = L2SP(1.0, model)
    assert snapshot.value(model.parameters()).item() == 0.0


def test_l2sp_anchor_follows_the_model_to_another_dtype() -> None:
    model = nn.Linear(3, 3)
    penalty = L2SP(1.0, model)
    model.double()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert penalty.value(model.parameters()).dtype == torch.float64
    penalty.prox_(model.parameters(), lr=1e9)
    assert model.weight.dtype == torch.float64


def test_value_is_differentiable_with_the_penalty_gradient() -> None:
    w = torch.tensor([[1.5, -2.0], [0.0, 3.0]], requires_grad=True)
    (L1(0.5).value(w) + L2(0.25).value(w)).backward()
    expected = 0.5 * torch.sign(w.detach()) + 0.25 * w.detach()
    torch.testing.assert_close(w.grad, expected)


def test_scheduled_strength_follows_progress() -> None:
    penalty = L1(Linear(0.0, 1.0))
    w = torch.tensor([2.0])
    assert penalty.value(w).item() == 0.0
    penalty.set_progress(0.5)
    assert penalty.current_strength == 0.5
    assert penalty.value(w).item() == 1.0
    penalty.prox_(w, lr=1.0)
    assert w.item() == 1.5
    with pytest.raises(ValueError, match=r"^progress must be in \[0, 1\], got 1.5$"):
        penalty.set_progress(1.5)


def test_mixed_devices_and_dtypes_sum_together() -> None:
    params = [torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float16)]
    value = L1(1.0).value(params)
    assert value.dtype == torch.float64 and value.item() == 5.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: L1(-0.1), r"^L1.strength must be in \[0, inf\), got -0.1$"),
        (lambda: L2(float("nan")), r"^L2.strength must be a finite number in \[0, inf\), got nan$"),
        (lambda: L1("big"), r"^L1.strength must be a number in \[0, inf\), got 'big'$"),
        (lambda: L1(True), r"^L1.strength must be a number in \[0, inf\), got True$"),
        (lambda: L1(0.1, foreach="no"), r"^L1.foreach must be True, False or None \(pick\), got 'no'$"),
        (lambda: L1(Cosine(1.0, -1.0)), r"^L1.strength must be in \[0, inf\), got -1.0$"),
        (lambda: ElasticNet(0.1, l1_ratio=1.5), r"^ElasticNet.l1_ratio must be in \[0, 1\], got 1.5$"),
        (lambda: ElasticNet(0.1, l1_ratio=-0.2), r"^ElasticNet.l1_ratio must be in \[0, 1\], got -0.2$"),
        (
            lambda: GroupLasso(0.1, groups="diagonal"),
            r"^GroupLasso.groups must be one of 'rows', 'columns', 'tensor', got 'diagonal'$",
        ),
        (lambda: L2SP(0.1, {"w": torch.zeros(1)}), r"^L2SP.model must be the model being trained"),
        (lambda: L2SP(0.1, nn.Linear(2, 2), model=nn.Linear(3, 3)), r"^L2SP.anchor must be weights sharing"),
        (lambda: L2SP(0.1, [torch.zeros(1)]), r"^L2SP.anchor must be an nn.Module or a state dict"),
    ],
)
def test_bad_constructor_arguments(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


TIED = torch.ones(3)  # a tensor listed twice was penalized and shrunk twice, silently


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: L1(0.1).prox_([torch.zeros(2)], lr=0.0), r"^lr must be in \(0, inf\), got 0.0$"),
        (lambda: L1(0.1).prox_([torch.zeros(2)], lr=-1), r"^lr must be in \(0, inf\), got -1$"),
        (lambda: L1(0.1).value([]), r"^params must be a non-empty iterable of tensors, got an empty list$"),
        (lambda: L1(0.1).value(iter([])), r"^params must be a non-empty iterable of tensors"),
        (lambda: L1(0.1).value([torch.zeros(2), "w"]), r"^params\[1\] must be a torch.Tensor, got 'w'$"),
        (lambda: L1(0.1).value(nn.Linear(2, 2)), r"^params must be a tensor or an iterable of tensors"),
        (lambda: L1(0.1).value(torch.zeros(2, dtype=torch.long)), r"^params\[0\] must be a floating-point"),
        (
            lambda: L1(0.1).value([TIED, TIED]),
            r"^params\[1\] must be each tensor once .*, got params\[0\] again$",
        ),
        (
            lambda: L2(0.1).prox_([torch.zeros(2), TIED, TIED], lr=0.1),
            r"^params\[2\] must be each tensor once",
        ),
        (
            lambda: GroupLasso(0.1, groups="columns").value([torch.zeros(3)]),
            r"^GroupLasso.groups must be 'rows' or 'tensor' for a 1-D parameter \(shape \(3,\)\), got 'columns'$",
        ),
    ],
)
def test_bad_call_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_repr_shows_the_strength() -> None:
    assert repr(ElasticNet(0.01, l1_ratio=0.3)) == "ElasticNet(strength=0.01, l1_ratio=0.3)"
    assert repr(GroupLasso(0.1, "columns")) == "GroupLasso(strength=0.1, groups='columns')"


@pytest.mark.parametrize("kind", [*KINDS, "group_lasso_columns", "l2sp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_closed_form_gradient_equals_autograd_of_the_formula(kind: str, dtype: torch.dtype) -> None:
    params = [nn.Parameter(p) for p in make_params(dtype)]
    params[0].data[1] = 0.0  # an all-zero row and zero entries: the subgradient's edge
    twins = [nn.Parameter(p.detach().clone()) for p in params]

    def build(foreach: bool, ps: list[torch.Tensor]) -> Penalty:
        if kind == "group_lasso_columns":
            return GroupLasso(0.3, groups="columns", foreach=foreach)
        if kind == "l2sp":
            anchors = [p.detach() * 0.5 for p in params]
            model = nn.ParameterList(ps)
            return L2SP(0.3, {str(i): a for i, a in enumerate(anchors)}, model=model, foreach=foreach)
        return make_penalty(kind, foreach=foreach)

    chosen = [p for p in params if kind != "group_lasso_columns" or p.dim() > 1]
    chosen_twins = [p for p in twins if kind != "group_lasso_columns" or p.dim() > 1]
    (2.0 * build(True, chosen).value(chosen)).backward()
    (2.0 * build(False, chosen_twins).value(chosen_twins)).backward()
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-3)
    for fast, reference in zip(chosen, chosen_twins, strict=True):
        assert fast.grad.dtype == dtype
        torch.testing.assert_close(fast.grad, reference.grad, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kind", [*KINDS, "group_lasso_columns", "group_lasso_tensor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_constant_diagonal_steps_equal_the_scalar_step(kind: str, dtype: torch.dtype) -> None:
    def build() -> Penalty:
        if kind.startswith("group_lasso_"):
            return GroupLasso(0.3, groups=kind.removeprefix("group_lasso_"))
        return make_penalty(kind)

    params = [p for p in make_params(dtype) if kind != "group_lasso_columns" or p.dim() > 1]
    twins = [p.clone() for p in params]
    build().prox_(params, lr=0.5)
    build().prox_(twins, lr=[torch.full_like(p, 0.5, dtype=torch.float32) for p in twins])
    eps = torch.finfo(dtype).eps
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b, rtol=2 * eps, atol=2 * eps * 3)
        assert torch.equal(a == 0, b == 0)


def test_diagonal_steps_threshold_each_coordinate() -> None:
    w = torch.tensor([1.0, 1.0, -1.0])
    L1(1.0).prox_(w, lr=[torch.tensor([0.5, 2.0, 0.25])])
    assert w.tolist() == [0.5, 0.0, -0.75]
    holder = nn.Module()
    holder.w = nn.Parameter(torch.tensor([1.0, 1.0]))
    L2SP(1.0, {"w": torch.tensor([3.0, 3.0])}, model=holder).prox_(holder.w, lr=[torch.tensor([1.0, 3.0])])
    assert holder.w.tolist() == [2.0, 2.5]  # w0 + (w - w0)/(1 + step)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [torch.ones(3), torch.ones(3)],
            r"^lr must be a number or one step-size tensor per parameter \(1\), got 2 tensors$",
        ),
        ([torch.ones(4)], r"^lr\[0\] must be a tensor that broadcasts to shape \(3,\), got shape \(4,\)$"),
        ("0.1", r"^lr must be a number in \(0, inf\), got '0.1'$"),
    ],
)
def test_bad_step_tensors(steps, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        L1(0.1).prox_(torch.ones(3), lr=steps)


def test_l2sp_anchors_travel_by_name_and_a_missing_or_misshapen_one_is_named() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    penalty = L2SP(0.1, model)
    start = {k: v.clone() for k, v in penalty.anchors(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    resumed = L2SP(0.1, model)  # anchored at the trained weights, as a trainer's resume builds it
    resumed.load_anchors(model, start)
    assert all(torch.equal(resumed.anchors(model)[k], start[k]) for k in start)
    with pytest.raises(
        ValueError, match=r"^L2SP\.anchors\.1\.weight must be a tensor of shape \(2, 4\), got none$"
    ):
        resumed.load_anchors(model, {k: v for k, v in start.items() if k != "1.weight"})
    with pytest.raises(
        ValueError, match=r"^L2SP\.anchors\.0\.bias must be a tensor of shape \(4,\), got shape \(5,\)$"
    ):
        resumed.load_anchors(model, {**start, "0.bias": torch.zeros(5)})
