"""attach_prox and the max-norm constraint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from regdial import L1, L2, ElasticNet, GroupLasso, MaxNorm, Penalty, attach_prox, max_norm_, param_groups

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))


def loss_of(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=generator)
    return model(x).square().mean()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_prox_runs_after_each_step_with_the_group_lr(name: str) -> None:
    hooked, manual = make_model(), make_model()
    hooked_opt = OPTIMIZERS[name](param_groups(hooked, 0.0))
    manual_opt = OPTIMIZERS[name](param_groups(manual, 0.0))
    penalty = L1(1.0)
    attach_prox(hooked_opt, penalty, step_size="lr")
    for _ in range(5):
        for model, opt in ((hooked, hooked_opt), (manual, manual_opt)):
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()
        # By hand: the prox on the decayed group only, with the group's lr.
        penalty.prox_(manual_opt.param_groups[0]["params"], lr=manual_opt.param_groups[0]["lr"])
    for a, b in zip(hooked.parameters(), manual.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (hooked[0].weight == 0).any()  # L1 made exact zeros
    assert not (hooked[0].bias == 0).any()  # and left the biases alone


def test_each_group_uses_its_own_current_lr() -> None:
    a, b = torch.nn.Parameter(torch.full((4,), 1.0)), torch.nn.Parameter(torch.full((4,), 1.0))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.5}], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    attach_prox(optimizer, L1(1.0))
    for expected_a, expected_b in [(0.9, 0.5), (0.85, 0.25)]:
        a.grad, b.grad = torch.zeros(4), torch.zeros(4)
        optimizer.step()
        scheduler.step()
        torch.testing.assert_close(a.detach(), torch.full((4,), expected_a))
        torch.testing.assert_close(b.detach(), torch.full((4,), expected_b))


def test_remove_detaches_the_prox() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=1.0)
    handle = attach_prox(optimizer, L2(1.0))
    w.grad = torch.zeros(3)
    optimizer.step()
    assert w.tolist() == [0.5, 0.5, 0.5]
    handle.remove()
    optimizer.step()
    assert w.tolist() == [0.5, 0.5, 0.5]


def test_params_restrict_the_prox() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    first_layer = model[0].weight
    attach_prox(optimizer, GroupLasso(1e6, groups="columns"), params=[first_layer])
    optimizer.zero_grad()
    loss_of(model).backward()
    optimizer.step()
    assert bool((first_layer == 0).all())
    assert not bool((model[3].weight == 0).any())


def test_skips_lr_zero_and_parameters_without_gradient() -> None:
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    frozen_lr = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [used, unused]}, {"params": [frozen_lr], "lr": 0.0}], lr=1.0)
    attach_prox(optimizer, L2(1.0))
    used.grad, frozen_lr.grad = torch.zeros(2), torch.zeros(2)
    optimizer.step()
    assert used.tolist() == [0.5, 0.5]
    assert unused.tolist() == [1.0, 1.0]
    assert frozen_lr.tolist() == [1.0, 1.0]


def test_tensor_learning_rate() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([w], lr=torch.tensor(0.5))
    attach_prox(optimizer, L2(2.0), step_size="lr")
    w.grad = torch.zeros(2)
    optimizer.step()
    torch.testing.assert_close(w.detach(), torch.full((2,), 0.5))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_size_includes_momentum(momentum: float) -> None:
    from regdial.blocks.proximal import optimizer_step_sizes

    w = torch.nn.Parameter(torch.ones(2))
    for nesterov, expected in [(False, 0.1 / (1 - momentum)), (True, 0.1 * (1 + momentum / (1 - momentum)))]:
        if nesterov and momentum == 0.0:
            continue
        optimizer = torch.optim.SGD([w], lr=0.1, momentum=momentum, nesterov=nesterov)
        reader = optimizer_step_sizes(optimizer)
        assert reader(optimizer, optimizer.param_groups[0], [w]) == pytest.approx(expected)


def test_adam_step_size_is_its_per_coordinate_step() -> None:
    from regdial.blocks.proximal import optimizer_step_sizes

    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = torch.optim.Adam([w], lr=0.1, eps=1e-8)
    for _ in range(4):
        w.grad = torch.tensor([1e-3, 1.0, 10.0], dtype=torch.float64)
        before = w.detach().clone()
        optimizer.step()
    # Constant gradients: m_hat = g exactly, so the update is g times the step size.
    (steps,) = optimizer_step_sizes(optimizer)(optimizer, optimizer.param_groups[0], [w])
    torch.testing.assert_close(before - w.detach(), w.grad * steps)


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop", "adagrad"])
@pytest.mark.parametrize("penalty", [L1(3e-3), L2(0.5), ElasticNet(3e-3, l1_ratio=0.3)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_quotient_form_equals_the_step_tensor_form(
    name: str, penalty: Penalty, dtype: torch.dtype
) -> None:
    """Adaptive steps kept as ``scale / d`` (the fast path) give the prox of the explicit
    per-coordinate steps, exact zeros included; 16-bit weights take the step tensor path."""
    from regdial.blocks.proximal import optimizer_step_sizes
    from regdial.blocks.shrinkage import StepQuotients

    torch.manual_seed(0)
    w = torch.nn.Parameter((torch.randn(40, 30) * torch.logspace(-4, 0, 30)).to(dtype))
    optimizer = OPTIMIZERS[name]([w])
    for _ in range(3):
        w.grad = torch.randn_like(w) * torch.logspace(-3, 1, 30).to(dtype)
        optimizer.step()
    steps = optimizer_step_sizes(optimizer)(optimizer, optimizer.param_groups[0], [w])
    assert isinstance(steps, StepQuotients)
    explicit = [steps[0].clone()]
    fast, reference = w.detach().clone(), w.detach().clone()
    penalty.prox_(fast, steps)
    penalty.prox_(reference, explicit)
    tolerance = {"rtol": 1e-2, "atol": 1e-3} if dtype is torch.bfloat16 else {}
    torch.testing.assert_close(fast, reference, **tolerance)
    if not isinstance(penalty, L2) and dtype is not torch.bfloat16:
        assert torch.equal(fast == 0, reference == 0) and int((fast == 0).sum()) > 0


def test_max_norm_caps_each_units_incoming_weights() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 10) * torch.tensor([0.01, 0.1, 1.0, 2.0, 5.0, 10.0])[:, None]
    before = w.clone()
    max_norm_(w, 1.0)
    norms = w.norm(dim=1)
    assert bool((norms <= 1.0 + 1e-5).all())
    inside = before.norm(dim=1) <= 1.0
    assert torch.equal(w[inside], before[inside])  # within the bound: untouched
    torch.testing.assert_close(norms[~inside], torch.ones(int((~inside).sum())))
    # Direction is kept.
    torch.testing.assert_close(w[~inside], before[~inside] / before[~inside].norm(dim=1, keepdim=True))


def test_max_norm_attaches_like_a_penalty() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    attach_prox(optimizer, MaxNorm(0.5))
    for _ in range(3):
        optimizer.zero_grad()
        (-loss_of(model)).backward()  # ascend: weights grow
        optimizer.step()
        for layer in (model[0], model[3]):
            assert bool((layer.weight.norm(dim=1) <= 0.5 + 1e-5).all())


class Conv1D(nn.Module):
    """transformers' ``Conv1D`` (GPT-2's layers) as it stores its weight: ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_a_weight_stored_in_out_has_each_units_incoming_weights_capped() -> None:
    """GPT-2's Conv1D: a unit's incoming weights are a column; max_norm caps those, and
    group lasso's "rows" are its units there too."""
    from regdial.blocks.groups import transposed_weights

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), nn.ReLU(), nn.Linear(6, 3))
    found = transposed_weights(model)
    assert len(found) == 1 and found[0] is model[0].weight
    with torch.no_grad():
        model[0].weight.mul_(5.0)
        model[2].weight.mul_(5.0)
    before = model[0].weight.detach().clone()
    MaxNorm(1.0, transposed=found).prox_([model[0].weight, model[2].weight], 0.1)
    assert bool((model[0].weight.norm(dim=0) <= 1.0 + 1e-5).all())  # columns: its units
    assert bool((model[2].weight.norm(dim=1) <= 1.0 + 1e-5).all())  # rows: a Linear's units
    torch.testing.assert_close(model[0].weight.detach(), before.t().renorm(2, 0, 1.0).t())
    flipped, plain = GroupLasso(0.5, transposed=found), GroupLasso(0.5, groups="columns")
    w = model[0].weight.detach().clone()
    torch.testing.assert_close(flipped.value([model[0].weight]), plain.value([w]))
    flipped.prox_([model[0].weight], 2.0)
    plain.prox_([w], 2.0)
    assert torch.equal(model[0].weight.detach(), w) and bool((w == 0).all(dim=0).any())


def test_the_real_conv1d_of_gpt2_is_found() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    from regdial.blocks.groups import transposed_weights

    names = {id(p): n for n, p in model.named_parameters()}
    found = sorted(names[id(w)] for w in transposed_weights(model))
    assert found == sorted(
        f"transformer.h.{i}.{part}.weight" for i in range(2) for part in ("attn.c_attn", "attn.c_proj",
                                                                          "mlp.c_fc", "mlp.c_proj")
    )  # fmt: skip
    # Through a setting: every unit's incoming weights capped, a Conv1D's columns included.
    from regdial import Applied, Regularization

    columns = [float(w.detach().norm(dim=0).max()) for w in transposed_weights(model)]
    assert min(columns) > 0.03  # the cap binds on every Conv1D's columns
    applied = Applied(Regularization(max_norm=0.02), model, lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    ids = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        applied.optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        applied.optimizer.step()
    for w in transposed_weights(model):
        assert float(w.detach().norm(dim=0).max()) == pytest.approx(0.02, rel=1e-4)  # capped columns


def test_unchanged_models_stay_bitwise_equal_without_prox() -> None:
    # The hook must not touch anything when removed immediately.
    model = make_model()
    clone = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_prox(optimizer, L1(1.0)).remove()
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.1)
    for m, o in ((model, optimizer), (clone, clone_opt)):
        loss_of(m).backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: attach_prox("sgd", L1(0.1)), r"^optimizer must be a torch.optim.Optimizer, got 'sgd'$"),
        (
            lambda: attach_prox(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0), 0.1),
            r"^penalty must be a penalty or constraint with a prox_\(params, lr\) method, got 0.1$",
        ),
        (
            lambda: attach_prox(
                torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0), L1(0.1), params=[torch.ones(1)]
            ),
            r"^params must be parameters the optimizer updates, got 1 tensors it does not hold$",
        ),
        (
            lambda: attach_prox(
                torch.optim.Rprop([torch.nn.Parameter(torch.ones(1))]), L1(0.1), step_size="optimizer"
            ),
            r"^step_size must be 'lr' or 'auto' for Rprop \(readable: SGD, Adam, .*\), got 'optimizer'$",
        ),
        (
            lambda: attach_prox(
                torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0), L1(0.1), step_size="big"
            ),
            r"^step_size must be one of 'auto', 'optimizer', 'lr', got 'big'$",
        ),
        (
            lambda: attach_prox(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0), L1),
            r"^penalty must be a penalty made with its strength, such as L1\(1e-3\), got the class L1$",
        ),
        (lambda: max_norm_([torch.ones(2, 2)], 0.0), r"^max_norm must be in \(0, inf\), got 0.0$"),
        (lambda: max_norm_([torch.ones(2, 2)], 1.0, dim=2), r"^dim must be an integer in \[-2, 1\], got 2$"),
        (lambda: MaxNorm(-3.0), r"^MaxNorm.max_norm must be in \(0, inf\), got -3.0$"),
    ],
)
def test_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_a_weight_losing_a_quarter_of_its_units_is_said_once(caplog) -> None:
    """L1 in Adam's metric on a from-scratch GPT-2 zeroes its query and key projections,
    column blocks of one Conv1D weight (c_attn, stored (in, out)): the tensor never becomes
    entirely zero, so the units are counted. Zeroed input features (a column of a Linear)
    are what L1 selects, and are not said."""
    import logging

    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    attach_prox(optimizer, L1(1e-3), model=model, warmup=0)
    ids = torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="regdial.blocks.proximal"):
        for _ in range(257):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
    w = model.transformer.h[0].attn.c_attn.weight.detach()
    dead = (w == 0).all(dim=0)
    assert dead[:32].float().mean() > 0.5 and not dead.all()  # its queries and keys, not the values
    said = [
        r.getMessage()
        for r in caplog.records
        if "units have all their incoming weights at zero" in r.getMessage()
    ]
    attention = [m for m in said if m.startswith("transformer.h.0.attn.c_attn.weight: ")]
    assert len(attention) == 1 and len(said) == len(set(said))  # once per tensor
    assert " of its 48 units have all their incoming weights at zero under L1(strength=0.001)" in attention[0]
    # Input features L1 drops (a Linear's columns) are what it selects: not said; units
    # (its rows) are, once a quarter of them are gone.
    from regdial.blocks.zeroed import report_dead_units

    caplog.clear()
    features, units = torch.randn(8, 20), torch.randn(8, 20)
    features[:, 5:] = 0.0
    units[:3] = 0.0
    with caplog.at_level(logging.WARNING, logger="regdial.blocks.proximal"):
        report_dead_units([features, units], set(), {id(units): "fc.weight"}, L1(1.0), frozenset())
    assert [r.getMessage()[:35] for r in caplog.records] == ["fc.weight: 3 of its 8 units have al"]


@pytest.mark.parametrize("l1_first", [True, False])
def test_l1_with_l2sp_is_the_prox_of_their_sum_in_either_order_of_attaching(l1_first: bool) -> None:
    # The prox of s1|w| + (s2/2)(w - w0)^2 pulls toward w0 first, then soft-thresholds: in the
    # other order the pull moved every exact zero L1 made off zero (0 of 1280 stayed zero).
    from regdial import L2SP

    torch.manual_seed(0)
    model = nn.Linear(16, 8, bias=False)
    anchor = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    l1, l2sp = L1(0.5), L2SP(2.0, anchor, model=model)
    for penalty in (l1, l2sp) if l1_first else (l2sp, l1):
        attach_prox(optimizer, penalty, step_size="lr")
    model.weight.grad = torch.randn_like(model.weight)
    stepped = (model.weight - 0.1 * model.weight.grad).detach()
    optimizer.step()
    t1, t2 = 0.1 * 0.5, 0.1 * 2.0
    pulled = anchor.weight.detach() + (stepped - anchor.weight.detach()) / (1 + t2)
    expected = pulled.sign() * (pulled.abs() - t1).clamp(min=0)
    assert torch.allclose(model.weight.detach(), expected, atol=1e-7)
    assert int((model.weight == 0).sum()) == int((expected == 0).sum()) > 0


def test_fused_adamw_leaves_l1_to_run_after_l2sps_pull() -> None:
    from regdial import L2SP
    from regdial.blocks.fused_adamw import FusedAdamW

    def trained(make: type[torch.optim.Optimizer]) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(32, 16, bias=False)
        optimizer = make(model.parameters(), lr=3e-2)
        attach_prox(optimizer, L1(0.05), warmup=0)
        attach_prox(optimizer, L2SP(0.5, copy.deepcopy(model), model=model))
        for _ in range(20):
            optimizer.zero_grad()
            model(torch.randn(64, 32)).square().mean().backward()
            optimizer.step()
        return model.weight.detach()

    fused, eager = trained(FusedAdamW), trained(torch.optim.AdamW)
    assert int((fused == 0).sum()) > 0 and torch.equal(fused == 0, eager == 0)
    assert torch.allclose(fused, eager, atol=1e-6)


class LoRA(nn.Module):
    """peft's low-rank adapter: ``x + B A x`` with ``B`` at 0, so ``A``'s first gradient is 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.A = nn.Parameter(torch.empty(4, 16).uniform_(-0.25, 0.25))
        self.B = nn.Parameter(torch.zeros(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x @ self.A.T @ self.B.T


@pytest.mark.parametrize("fused", [False, True])
def test_a_tensor_without_a_gradient_yet_gets_no_prox_in_adams_metric(fused: bool) -> None:
    """Adam's step for a coordinate whose second moment is 0 is lr/eps: L1 at 1e-3 zeroed
    every entry of a LoRA adapter's A at the first step (helper pass, tiny GPT-2 + peft)."""
    from regdial.blocks.fused_adamw import FusedAdamW

    model = LoRA()
    start = model.A.detach().clone()
    make = (
        (lambda ps: FusedAdamW(ps, lr=1e-3, weight_decay=0.0, fused=True))
        if fused
        else (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0))
    )
    optimizer = make(model.parameters())
    attach_prox(optimizer, L1(1e-3))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        optimizer.zero_grad()
        (model(x) - x.roll(1, dims=1)).square().mean().backward()
        optimizer.step()
        if step == 0:  # no gradient, no Adam step (FusedAdamW's to rounding), no prox
            assert torch.allclose(model.A.detach(), start, rtol=0, atol=1e-7) and not bool(
                (model.A == 0).any()
            )
    assert int((model.A == 0).sum()) < model.A.numel() // 10  # then the prox at the strength it means
    assert not torch.equal(model.A.detach(), start)
