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
saved a ms or two a step at most, see ``ADAMW_PROX``); ``True`` compiles at the first step
on any device (an ``InputError`` where it has no compiler); ``False`` is
``torch.optim.AdamW``'s own step followed by the hooks, the reference the tests compare
with. Until it compiles, and wherever the fused loop does not apply (AMSGrad,
``maximize``, ``capturable``, a tensor ``lr``, sparse or 16-bit tensors, tensors on
several devices, a penalty with no quotient form), a step is that reference: the fused
loop only ever replaces it with the same arithmetic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype
from torch.utils.hooks import RemovableHandle

from regdial._checks import fail
from regdial.blocks import fused as kernels
from regdial.blocks.fused import FUSED_DTYPES, FusedKernel, check_fused

__all__ = ["AveragePlan", "FusedAdamW", "Handles", "ProxPlan", "adamw_prox_", "fusing_optimizer"]

ProxPlan = Callable[[dict[str, Any]], "list[tuple[Tensor, float, float, float]] | None"]
"""What ``attach_prox`` gives a ``FusedAdamW`` for one param group, after the step count's
increment: ``(weight, offset, threshold, addition)`` per weight it acts on (``d = sqrt(v)
+ offset``, ``w <- soft(w d, threshold) / (d + addition)``), or None to leave the group's
prox to its step hook."""

_COLUMNS = 11  # decay, 1-β1, β2, 1-β2, ε, lr/c1, sqrt(c2), offset, threshold, addition, EMA weight

AveragePlan = Callable[[], "tuple[dict[int, Tensor], float] | None"]
"""What an ``EMA`` attached to a ``FusedAdamW`` gives it each step: its average of each
model tensor (by the tensor's id) and this update's weight ``a`` (1 for the first, a
copy), or None to leave the update to its step hook."""


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
    in one pass.

    ``scalars[i]`` holds tensor ``i``'s ``(1 - lr λ, 1 - β1, β2, 1 - β2, ε, lr / c1,
    sqrt(c2), offset, threshold, addition, a)``; the prox applies where ``active[i]``, and
    with ``averages`` each average moves to the new weight, ``e <- lerp(e, w, a)``. The
    arithmetic is torch's for-loop AdamW's, operation for operation (``mul_``, ``lerp_``,
    ``mul_``/``addcmul_``, ``sqrt``/``div``/``add_``, ``addcdiv_``), then the eager prox's
    (``fused.quotient_prox_``), then ``torch.lerp``'s (``e + a (w - e)`` for ``a < 0.5``,
    ``w - (w - e)(1 - a)`` above: ``a = 1`` is the first update's copy).
    """
    for i, (w, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        row = scalars[i]
        decayed = w * row[0]
        m_new = m + row[1] * (g - m)
        v_new = v * row[2] + g * g * row[3]
        root = torch.sqrt(v_new)
        stepped = decayed + (-row[5]) * (m_new / (root / row[6] + row[4]))
        d = root + row[7]
        proxed = kernels._soft(stepped * d, row[8]) / (d + row[9])
        final = torch.where(active[i], proxed, stepped)
        m.copy_(m_new)
        v.copy_(v_new)
        w.copy_(final)
        if averages is not None:
            e, a = averages[i], row[10]
            gap = final - e
            e.copy_(torch.where(a < 0.5, e + a * gap, final - gap * (1.0 - a)))


# On this project's 2-core CPU (benchmarks/trainer.py's 6.3M-parameter model, in the loop)
# the fused step with the prox and an EMA took 12.0-12.8 ms against 14.3-14.6 ms for torch's
# AdamW(fused=True) followed by their hooks (6.1-6.4 ms bare), and 11.4 against 10.2 ms in
# another session's timing; it compiles in 65-135 s cold for those 98 tensors. Saving a ms
# or two a step does not repay that in a run of the length fused=None waits for, so "pick
# for me" compiles it on CUDA only, where the passes it saves are HBM traffic (not measured
# here: no GPU); fused=True compiles it anywhere.
ADAMW_PROX = FusedKernel(adamw_prox_, pick_on=("cuda",))


class FusedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose step also runs an attached prox, fused; see the module.

    Args:
        params, lr, betas, eps, weight_decay, foreach: as ``torch.optim.AdamW`` (``foreach``
            is its step's wherever the fused loop does not run).
        fused: ``None``: compile where it repays; ``True``: always; ``False``: never.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
        self.fuse = check_fused("FusedAdamW.fused", fused)
        if fused is True:  # said where it is asked for, not at the first step
            for kind in sorted({p.device.type for g in self.param_groups for p in g["params"]}):
                missing = kernels.compiler_missing(kind)
                if missing is not None:
                    fail("FusedAdamW.fused", f"False or None on {kind} ({missing})", fused)
        # weakref-able tables, as torch keeps its hooks: (hook id, plan, done) per handle
        self._prox_plans: OrderedDict[int, tuple[int, ProxPlan, set[int]]] = OrderedDict()
        self._average_plans: OrderedDict[int, tuple[int, AveragePlan, set[int]]] = OrderedDict()

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
        work = self._work()
        prox, average = self._fused_hooks()
        if work is not None:
            ((params, grads, exp_avgs, exp_avg_sqs),) = work.values()
            averages, weight = self._averages(average, params)
            probe = torch.empty(len(params), _COLUMNS)
            wanted = ADAMW_PROX.wants(self.fuse, params, grads, exp_avgs, exp_avg_sqs, probe, probe, averages)
        if work is None or not wanted:
            self._reference()  # the reference step: the prox and the average run in their hooks
            return loss
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1.0)
        planned = self._planned(prox)
        rows = self._rows(params, planned, weight)
        scalars = torch.tensor([r[0] for r in rows], dtype=params[0].dtype).to(params[0].device)
        active = torch.tensor([r[1] for r in rows]).to(params[0].device)
        if not ADAMW_PROX.run_(self.fuse, params, grads, exp_avgs, exp_avg_sqs, scalars, active, averages):
            torch._foreach_sub_(steps, 1.0)  # a compile that failed: nothing else moved
            self._reference()
            return loss
        if prox is not None:
            prox[1].update(key for key, plan in planned.items() if plan)
        if average is not None and averages is not None:
            average[1].update(id(p) for p in params)
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

    def _work(self) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] | None:
        """The tensors for the fused loop, by (device, dtype), or None where this step must
        be the reference (see the module)."""
        work: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = {}
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                return None
            if isinstance(group["lr"], Tensor) or group.get("decoupled_weight_decay") is False:
                return None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.dtype not in FUSED_DTYPES or p.grad.dtype != p.dtype:
                    return None
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())  # type: ignore[no-untyped-call]
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].device.type != "cpu":
                    return None
                lists = work.setdefault((p.device, p.dtype), ([], [], [], []))
                for where, tensor in zip(
                    lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"]), strict=True
                ):
                    where.append(tensor)
        if len(work) != 1:
            return None  # none, or tensors on several devices or of several dtypes
        return work

    def _planned(self, prox: tuple[ProxPlan, set[int]] | None) -> dict[int, Any]:
        """Per param group (by id), the fused prox's plan for this step, or None."""
        if prox is None:
            return {}
        prox[1].clear()
        return {id(group): prox[0](group) for group in self.param_groups}

    @staticmethod
    def _averages(
        average: tuple[AveragePlan, set[int]] | None, params: list[Tensor]
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
        found = [table.get(id(p)) for p in params]
        if any(
            e is None or e.shape != p.shape or e.dtype != p.dtype for e, p in zip(found, params, strict=True)
        ):
            return None, 0.0
        return [e for e in found if e is not None], weight

    def _rows(
        self, params: list[Tensor], planned: dict[int, Any], weight: float
    ) -> list[tuple[list[float], bool]]:
        """Each tensor's row of ``adamw_prox_``'s scalars and whether its prox is on."""
        prox: dict[int, tuple[float, float, float]] = {}
        for plan in planned.values():
            for w, offset, threshold, addition in plan or ():
                prox[id(w)] = (offset, threshold, addition)
        of: dict[int, list[float]] = {}
        for group in self.param_groups:
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            beta1, beta2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                step = float(self.state[p]["step"])
                c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
                of[id(p)] = [1.0 - lr * wd, 1.0 - beta1, beta2, 1.0 - beta2, eps, lr / c1, c2**0.5]
        return [(of[id(p)] + [*prox.get(id(p), (0.0, 0.0, 0.0)), weight], id(p) in prox) for p in params]


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
