"""AdamW, the proximal step in its own metric and an EMA's update: one compiled pass a step.

``torch.optim.AdamW``'s update of a weight ``w`` with gradient ``g`` at step ``t``
(decoupled decay ``λ``, ``c1 = 1 - β1^t``, ``c2 = 1 - β2^t``)::

    w <- w (1 - lr λ)
    m <- m + (1 - β1) (g - m)
    v <- β2 v + (1 - β2) g²
    w <- w - (lr / c1) m / (sqrt(v) / sqrt(c2) + ε)

then ``attach_prox``'s proximal step, in Adam's metric (``regdial.blocks.proximal``,
``StepQuotients``), and an ``EMA``'s update (``regdial.blocks.averaging``)::

    d = sqrt(v) + ε sqrt(c2);   w <- soft(w d, r τ) / (d + q τ),   τ = s lr sqrt(c2) f_t
    e <- lerp(e, w, a)

(``s`` the penalty's strength, ``f_t`` the prox's warm-up factor; L1: ``r = 1, q = 0``,
L2: ``r = 0, q = 1``, elastic net ``r = l1_ratio, q = 1 - l1_ratio``; ``a`` the EMA's
weight, 1 at its first update). One after the other, the three read and write every
weight three times and read ``v`` again: on a CPU or a GPU that is memory traffic.
``FusedAdamW`` is ``torch.optim.AdamW`` whose ``step()`` runs the update, the prox of the
penalty whose ``attach_prox`` hook runs first after a step, and the update of an ``EMA``
whose hook runs first or right after that one, as one loop per step, ``torch.compile``d
(C++ on the CPU, Triton on CUDA): the prox adds no traffic to the update's, the EMA a read
and a write of its own copy. Each keeps its place in the order of the step hooks; the
EMA's hook still updates what the loop did not step (buffers, tensors without a
gradient). Its state (``step``, ``exp_avg``, ``exp_avg_sq``) is AdamW's, so a
``state_dict`` loads into either.

``fused`` follows ``torch.optim`` and ``regdial.blocks.fused``: ``None`` compiles on CUDA
once a group of at least ``fused.MIN_ELEMENTS`` elements has stepped ``fused.MIN_CALLS``
times (the compile takes a minute or two cold for a hundred tensors, and on the CPU it
saves about 3 ms a step on 6.3M parameters, see ``ADAMW_PROX``); ``True`` compiles at the first step
on any device (an ``InputError`` where it has no compiler); ``False`` is
``torch.optim.AdamW``'s own step followed by the hooks, the reference the tests compare
with. Until it compiles, and wherever the fused loop does not apply (AMSGrad,
``maximize``, ``capturable``, a tensor ``lr``, sparse or 16-bit tensors, tensors on
several devices, a penalty with no quotient form), a step is that reference: the fused
loop only ever replaces it with the same math, to rounding (``adamw_prox_``: a few ulp,
as torch's own ``fused=True`` step differs from its for-loop).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype
from torch.utils.hooks import RemovableHandle

from regdial._checks import Described, fail
from regdial.blocks import fused as kernels
from regdial.blocks.fused import FUSED_DTYPES, FusedKernel, check_fused
from regdial.blocks.fused_plans import AveragePlan, GroupProx, ProxPlan

__all__ = ["FusedAdamW", "Handles", "adamw_prox_", "fusing_optimizer"]

_Settings = tuple[float, float, float, float, float, float, float, float, int]
"""A group's ``(lr, weight decay, ε, β1, β2)`` and its prox's ``(strength, ratio, addition,
horizon)`` (zeros without one)."""


def adamw_prox_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scalars: Tensor,
    active: Tensor,
    averages: list[Tensor] | None,
) -> None:
    """One AdamW step, the prox in its metric and an EMA's update, in place, each tensor
    in one pass, with one division an element.

    ``scalars[i]`` holds tensor ``i``'s ``(1 - lr λ, 1 - β1, β2, 1 - β2, ε sqrt(c2),
    lr sqrt(c2) / c1, r τ, q τ, a)`` (``r τ`` and ``q τ`` 0 where the prox is off); the prox
    applies where ``active[i]``. With ``d = sqrt(v) + ε sqrt(c2)``, AdamW's update is
    ``w (1 - lr λ) - (lr sqrt(c2) / c1) m / d`` (its ``(lr / c1) m / (sqrt(v) / sqrt(c2) +
    ε)`` with the same ``d`` the prox's metric uses), so the update and the prox share a
    numerator and a denominator::

        n = w (1 - lr λ) d - (lr sqrt(c2) / c1) m;   w <- soft(n, r τ) / (d + q τ)   (else n / d)

    ``soft`` as ``aten.softshrink`` computes it, so the zeros are the eager path's. The
    numbers are torch's for-loop AdamW followed by the eager prox to rounding (a few ulp,
    as torch's own ``fused=True`` step is to its for-loop), in one third of the divisions:
    on this project's CPU, a division a float costs what the loop's memory traffic does.
    With ``averages`` each average moves to the new weight as ``torch.lerp`` computes it,
    ``e <- lerp(e, w, a)`` (``e + a (w - e)`` for ``a < 0.5``, ``w - (w - e)(1 - a)``
    above: ``a = 1`` is the first update's copy).
    """
    for i, (w, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        row = scalars[i]
        m_new = m + row[1] * (g - m)
        v_new = v * row[2] + g * g * row[3]
        d = torch.sqrt(v_new) + row[4]
        numerator = (w * row[0]) * d - row[5] * m_new
        final = torch.where(active[i], kernels._soft(numerator, row[6]), numerator) / (d + row[7])
        m.copy_(m_new)
        v.copy_(v_new)
        w.copy_(final)
        if averages is not None:
            e, a = averages[i], row[8]
            gap = final - e
            e.copy_(torch.where(a < 0.5, e + a * gap, final - gap * (1.0 - a)))


# On this project's 2-core CPU (benchmarks/trainer.py's 6.3M-parameter model, in the loop)
# the fused step with the prox and an EMA took 8.2-9.9 ms against 11.7-13.8 ms for torch's
# AdamW(fused=True) followed by their hooks (5.1-6.4 ms bare) in four runs: 3.5-3.9 ms a
# step saved. It compiles in 65-135 s cold for those 98 tensors (11 s from inductor's cache), which a
# run of the length fused=None waits for (100 steps) does not repay, so "pick for me"
# compiles it on CUDA only, where the passes it saves are HBM traffic (not measured here:
# no GPU); fused=True compiles it anywhere.
ADAMW_PROX = FusedKernel(adamw_prox_, pick_on=("cuda",))


class FusedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose step also runs an attached prox, fused; see the module.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable,
            differentiable: as ``torch.optim.AdamW``, for a drop-in replacement (``foreach``
            is its step's wherever the fused loop does not run; AMSGrad, ``maximize``,
            ``capturable`` and ``differentiable`` always take that step).
        fused: ``None``: compile where it repays; ``True``: always; ``False``: never.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
        )  # fmt: skip
        self.fuse = check_fused("FusedAdamW.fused", fused)
        if fused is True:  # said where it is asked for, not at the first step
            for kind in sorted({p.device.type for g in self.param_groups for p in g["params"]}):
                missing = kernels.compiler_missing(kind)
                if missing is not None:
                    fail("FusedAdamW.fused", f"False or None on {kind} ({missing})", fused)
        # weakref-able tables, as torch keeps its hooks: (hook id, plan, done) per handle
        self._prox_plans: OrderedDict[int, tuple[int, ProxPlan, set[int]]] = OrderedDict()
        self._average_plans: OrderedDict[int, tuple[int, AveragePlan, set[int]]] = OrderedDict()
        self._layout: _Layout | None = None

    def fuse_prox(self, hook_id: int, plan: ProxPlan, done: set[int]) -> RemovableHandle:
        """Register the prox of the step hook ``hook_id`` (``attach_prox`` calls this):
        where that hook is the first to run after a step, ``plan`` gives each group's prox
        to the fused loop, and the ids of the groups it ran for go into ``done`` (the hook
        skips those). ``handle.remove()`` unregisters it."""
        handle = RemovableHandle(self._prox_plans)
        self._prox_plans[handle.id] = (hook_id, plan, done)
        return handle

    def fuse_average(self, hook_id: int, plan: AveragePlan, done: set[int]) -> RemovableHandle:
        """Register the update of an average whose step hook is ``hook_id`` (``EMA.attach``
        calls this): where that hook runs first after a step, or right after a fused prox's,
        the loop updates the average of every tensor it steps and puts the tensors' ids in
        ``done`` (the hook updates the rest: buffers, tensors without a gradient)."""
        handle = RemovableHandle(self._average_plans)
        self._average_plans[handle.id] = (hook_id, plan, done)
        return handle

    def _fused_hooks(self) -> tuple[tuple[ProxPlan, set[int]] | None, tuple[AveragePlan, set[int]] | None]:
        """The registered prox and average whose hooks run first after a step (the prox's
        first, the average's first or right after it): fused into the step, each keeps its
        place in the order of the step hooks (an optimizer's own run before the global ones)."""
        order = list(self._optimizer_step_post_hooks)
        prox = next(
            ((plan, done) for hook, plan, done in self._prox_plans.values() if order[:1] == [hook]), None
        )
        after = order[1:2] if prox is not None else order[:1]
        average = next(
            ((plan, done) for hook, plan, done in self._average_plans.values() if after == [hook]), None
        )
        return prox, average

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if self.fuse is False or (self.fuse is None and not self._on_picked_device()):
            return self._reference(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layout = self._layout_now()
        grads = None if layout is None else self._grads(layout)
        if layout is None or grads is None:
            self._reference()  # the reference step: the prox and the average run in their hooks
            return loss
        prox, average = self._fused_hooks()
        planned = self._planned(prox)  # before the step count moves: a plan may raise
        if prox is not None and any(plan is None for plan in planned):
            # A group's prox is left to its hook, which runs after this loop: an average
            # updated in the loop would hold the weights before that prox (GroupLasso's,
            # L2-SP's, a tensor without a gradient yet), so it stays in its own hook too.
            average = None
        averages, weight = self._averages(average, layout)
        params, exp_avgs, exp_avg_sqs = layout.params, layout.exp_avgs, layout.exp_avg_sqs
        key = layout.kernel_key(averaged=averages is not None)
        if not ADAMW_PROX.wants(self.fuse, params, key=key):
            self._reference()
            return loss
        torch._foreach_add_(layout.steps, 1.0)
        try:
            scalars, active = self._scalars(layout, planned, weight)
            ran = ADAMW_PROX.run_(
                self.fuse, params, grads, exp_avgs, exp_avg_sqs, scalars, active, averages, key=key
            )
        except BaseException:
            torch._foreach_sub_(layout.steps, 1.0)  # the scalars or a call's guards: no tensor moved yet
            raise
        if not ran:
            torch._foreach_sub_(layout.steps, 1.0)  # a compile that failed: nothing else moved
            self._reference()
            return loss
        if prox is not None:
            prox[1].update(id(group) for group, plan in zip(self.param_groups, planned, strict=True) if plan)
        if average is not None and averages is not None:
            average[1].update(layout.ids)
        return loss

    def _on_picked_device(self) -> bool:
        """Whether ``fused=None`` may compile here (``ADAMW_PROX.pick_on``): else a step is
        the reference at once, without the fused path's bookkeeping."""
        return any(
            g["params"] and g["params"][0].device.type in ADAMW_PROX.pick_on for g in self.param_groups
        )

    def _reference(self, closure: Callable[[], float] | None = None) -> float | None:
        """``torch.optim.AdamW.step`` without the hooks' wrapper torch puts on it once an
        AdamW exists (``Optimizer.profile_hook_step``): this step's own wrapper runs them."""
        step = torch.optim.AdamW.step
        if getattr(step, "hooked", False):
            step = step.__wrapped__  # type: ignore[attr-defined]
        result: float | None = step(self, closure)
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._layout = None  # new state tensors: the kept lists would point at the old ones

    def _layout_now(self) -> _Layout | None:
        """The tensors this step moves, kept while the groups and which tensors have a
        gradient stay the same; None where the step must be the reference (see the module)."""
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                return None
            if isinstance(group["lr"], Tensor) or group.get("decoupled_weight_decay") is False:
                return None
        key = tuple((id(g), *(id(p) for p in g["params"] if p.grad is not None)) for g in self.param_groups)
        layout = self._layout
        if layout is not None and layout.key == key and layout.current(self.state):
            return layout
        layout = self._layout = _Layout.build(self, key)
        return layout

    @staticmethod
    def _grads(layout: _Layout) -> list[Tensor] | None:
        grads = [p.grad for p in layout.params]
        dtype, device, strided = layout.params[0].dtype, layout.params[0].device, torch.strided
        for g in grads:  # the layout's tensors share one dtype and device (dtypes are singletons)
            if g is None or g.dtype is not dtype or g.layout is not strided or g.device != device:
                return None
        return grads  # type: ignore[return-value]

    def _planned(self, prox: tuple[ProxPlan, set[int]] | None) -> list[GroupProx | None]:
        """Per param group, the fused prox's plan for this step, or None."""
        if prox is None:
            return [None] * len(self.param_groups)
        prox[1].clear()
        return [prox[0](group) for group in self.param_groups]

    @staticmethod
    def _averages(
        average: tuple[AveragePlan, set[int]] | None, layout: _Layout
    ) -> tuple[list[Tensor] | None, float]:
        """The fused average of each stepped tensor and the update's weight, or None where
        the average is not fused (every stepped tensor must have one of its own)."""
        if average is None:
            return None, 0.0
        average[1].clear()
        plan = average[0]()
        if plan is None:
            return None, 0.0
        table, weight = plan
        if layout.averaged is None or layout.averaged[0] is not table:
            found = [table.get(id(p)) for p in layout.params]
            usable = all(
                e is not None and e.shape == p.shape and e.dtype == p.dtype
                for e, p in zip(found, layout.params, strict=True)
            )
            layout.averaged = (table, [e for e in found if e is not None] if usable else None)
        return layout.averaged[1], weight

    def _scalars(
        self, layout: _Layout, planned: list[GroupProx | None], weight: float
    ) -> tuple[Tensor, Tensor]:
        """``adamw_prox_``'s scalars, a row a tensor, and where the prox is on. Each
        distinct (group, step, prox on) has one row, computed in Python's float64 as torch's
        for-loop AdamW computes its bias corrections from the step and ``attach_prox`` its
        threshold: a model's tensors step together, so a group's rows are one or a few,
        and the step costs a list of floats and one tensor, not a vector computation."""
        settings = [
            self._group_row(group, plan) for group, plan in zip(self.param_groups, planned, strict=True)
        ]
        on = layout.prox_on(planned)
        keys = list(zip(layout.groups, [t.item() for t in layout.steps], on, strict=True))
        rows = dict.fromkeys(keys, 0)  # each distinct (group, step, prox on), in order
        for number, key in enumerate(rows):
            rows[key] = number
        table = [_row(*settings[group], t, prox, weight) for group, t, prox in rows]
        index = [rows[key] for key in keys]
        where, active = layout.rows(index, on)
        dtype = layout.params[0].dtype
        return torch.tensor(table, dtype=torch.float64).to(dtype).to(where.device)[where], active

    @staticmethod
    def _group_row(group: dict[str, Any], plan: GroupProx | None) -> _Settings:
        b1, b2 = (float(b) for b in group["betas"])
        prox = (
            (0.0, 0.0, 0.0, 0) if plan is None else (plan.strength, plan.ratio, plan.addition, plan.horizon)
        )
        return (float(group["lr"]), float(group["weight_decay"]), float(group["eps"]), b1, b2, *prox)


def _row(
    lr: float, wd: float, eps: float, b1: float, b2: float,
    strength: float, ratio: float, addition: float, horizon: int,
    t: float, prox: bool, weight: float,
) -> list[float]:  # fmt: skip
    """One row of ``adamw_prox_``'s scalars at step ``t`` (after its increment), as torch's
    AdamW (``c1 = 1 - β1^t``, ``sqrt(c2)``) and ``attach_prox`` (``τ = s lr sqrt(c2) f_t``,
    ``f_t = min(1, t / horizon)``) compute them."""
    root = math.sqrt(1.0 - b2**t)
    tau = strength * (lr * root * (min(1.0, t / horizon) if horizon > 0 else 1.0)) if prox else 0.0
    return [1.0 - lr * wd, 1.0 - b1, b2, 1.0 - b2, eps * root, lr * root / (1.0 - b1**t),
            ratio * tau, addition * tau, weight]  # fmt: skip


class _Layout:
    """A ``FusedAdamW``'s tensors for the fused loop, in the groups' order: those with a
    gradient, their state (made as AdamW makes it), each one's group, and masks of the
    prox's selections (kept by the selection's identity)."""

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        self.params: list[Tensor] = []
        self.exp_avgs: list[Tensor] = []
        self.exp_avg_sqs: list[Tensor] = []
        self.steps: list[Tensor] = []
        self.groups: list[int] = []
        self.ids: list[int] = []
        self.states: list[dict[str, Any]] = []
        self.averaged: tuple[dict[int, Tensor], list[Tensor] | None] | None = None
        self._keys: dict[bool, tuple[Any, ...]] = {}
        self._on: tuple[tuple[tuple[object] | None, ...], list[bool]] | None = None
        self._rows: tuple[tuple[tuple[int, ...], tuple[bool, ...]], Tensor, Tensor] | None = None

    @staticmethod
    def build(optimizer: FusedAdamW, key: tuple[Any, ...]) -> _Layout | None:
        layout = _Layout(key)
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype not in FUSED_DTYPES:
                    return None
                state = optimizer.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())  # type: ignore[no-untyped-call]
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not isinstance(state["step"], Tensor) or state["step"].device.type != "cpu":
                    return None
                for name in ("exp_avg", "exp_avg_sq"):
                    if state[name].shape != p.shape:  # torch's step would fail on it too, less clearly
                        fail(f"FusedAdamW.state[param_groups[{index}] parameter {group['params'].index(p)}]"
                             f".{name}", f"of its parameter's shape {tuple(p.shape)} (after resizing a "
                             "parameter, drop its state: optimizer.state.pop(p))",
                             Described(f"shape {tuple(state[name].shape)}"))  # fmt: skip
                layout.params.append(p)
                layout.exp_avgs.append(state["exp_avg"])
                layout.exp_avg_sqs.append(state["exp_avg_sq"])
                layout.steps.append(state["step"])
                layout.groups.append(index)
                layout.ids.append(id(p))
                layout.states.append(state)
        if not layout.params or len({(p.device, p.dtype) for p in layout.params}) != 1:
            return None  # none, or tensors on several devices or of several dtypes
        return layout

    def prox_on(self, planned: list[GroupProx | None]) -> list[bool]:
        """Whether each tensor is under the prox ``planned`` for its group, kept while the
        groups' selections stay the same objects."""
        selections = tuple(None if plan is None else (plan.selected,) for plan in planned)
        kept = self._on
        if kept is not None and all(
            a is b or (a is not None and b is not None and a[0] is b[0])
            for a, b in zip(kept[0], selections, strict=True)
        ):
            return kept[1]
        on = [
            plan is not None and (plan.selected is None or i in plan.selected)
            for plan, i in zip((planned[g] for g in self.groups), self.ids, strict=True)
        ]
        self._on = (selections, on)
        return on

    def rows(self, index: list[int], on: list[bool]) -> tuple[Tensor, Tensor]:
        """The row of each tensor's scalars and where the prox is on, as tensors on the
        tensors' device, kept while they stay the same (a step's are its last's)."""
        signature = (tuple(index), tuple(on))
        if self._rows is None or self._rows[0] != signature:
            device = self.params[0].device
            self._rows = (signature, torch.tensor(index, device=device), torch.tensor(on, device=device))
        return self._rows[1], self._rows[2]

    def kernel_key(self, *, averaged: bool) -> tuple[Any, ...]:
        """``ADAMW_PROX``'s key for a step on these tensors, with or without averages, kept:
        a tuple of shapes a step saved. The key reads the group's shapes and which arguments
        are None; the lists stand in for ``adamw_prox_``'s (gradients, moments, scalars,
        mask, averages), of which only the averages may be None."""
        key = self._keys.get(averaged)
        if key is None:
            args = (self.exp_avgs,) * 5 + (self.exp_avgs if averaged else None,)
            key = self._keys[averaged] = FusedKernel.key(self.params, args)
        return key

    def current(self, state: Mapping[Tensor, Any]) -> bool:
        """Whether the optimizer's state is still the one these lists hold: a state cleared
        or replaced by hand (``optimizer.state.clear()`` to reset the moments) rebuilds."""
        for p, kept, m, v, t in zip(
            self.params, self.states, self.exp_avgs, self.exp_avg_sqs, self.steps, strict=True
        ):
            now = state.get(p)
            if (
                now is not kept
                or p.shape != m.shape  # p.data replaced by a resized tensor
                or now.get("exp_avg") is not m
                or now.get("exp_avg_sq") is not v
                or now.get("step") is not t
            ):
                return False
        return True


class Handles(RemovableHandle):
    """Removes a step hook and its fused form together."""

    def __init__(self, hook: RemovableHandle, fused: RemovableHandle) -> None:
        self.hook, self.fused = hook, fused
        self.id = hook.id

    def remove(self) -> None:
        self.hook.remove()
        self.fused.remove()


def fusing_optimizer(optimizer: object) -> FusedAdamW | None:
    """``optimizer`` where it fuses an attached prox into its step, else None."""
    if isinstance(optimizer, FusedAdamW) and optimizer.fuse is not False:
        return optimizer
    return None
