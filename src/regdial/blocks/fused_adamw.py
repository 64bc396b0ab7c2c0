"""AdamW with the proximal step in its own metric, the two in one compiled pass a step.

``torch.optim.AdamW``'s update of a weight ``w`` with gradient ``g`` at step ``t``
(decoupled decay ``λ``, ``c1 = 1 - β1^t``, ``c2 = 1 - β2^t``)::

    w <- w (1 - lr λ)
    m <- m + (1 - β1) (g - m)
    v <- β2 v + (1 - β2) g²
    w <- w - (lr / c1) m / (sqrt(v) / sqrt(c2) + ε)

and ``attach_prox``'s proximal step after it, in Adam's metric (``regdial.blocks.proximal``,
``StepQuotients``)::

    d = sqrt(v) + ε sqrt(c2);   w <- soft(w d, r τ) / (d + q τ),   τ = s lr sqrt(c2) f_t

(``s`` the penalty's strength, ``f_t`` the prox's warm-up factor; L1: ``r = 1, q = 0``,
L2: ``r = 0, q = 1``, elastic net ``r = l1_ratio, q = 1 - l1_ratio``). One after the other, the two
read and write every weight twice and read ``v`` again: on a CPU or a GPU that is
memory traffic, and the second pass costs as much as the update's own arithmetic.
``FusedAdamW`` is ``torch.optim.AdamW`` whose ``step()`` runs the update and the prox of
the first proximal penalty attached to it (``attach_prox``) as one loop per (device,
dtype) group, ``torch.compile``d (C++ on the CPU, Triton on CUDA): the prox then adds no
traffic to the update's. Its state (``step``, ``exp_avg``, ``exp_avg_sq``) is AdamW's, so a
``state_dict`` loads into either.

``fused`` follows ``torch.optim`` and ``regdial.blocks.fused``: ``None`` compiles once a
group of at least ``fused.MIN_ELEMENTS`` elements has stepped ``fused.MIN_CALLS`` times
(the compile, tens of seconds cold for a hundred tensors, is not paid by a short run or
a small model); ``True`` compiles at the first step (an ``InputError`` where the device
has no compiler); ``False`` is ``torch.optim.AdamW``'s own step followed by the eager
prox, the reference the tests compare with. Until it compiles, and wherever the fused
loop does not apply (AMSGrad, ``maximize``, ``capturable``, sparse or 16-bit tensors, a
penalty with no quotient form, a prox that is not the first step hook), a step is that
reference: the fused loop only ever replaces it with the same arithmetic.
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

__all__ = ["FusedAdamW", "Handles", "ProxPlan", "adamw_prox_", "fusing_optimizer"]

ProxPlan = Callable[[dict[str, Any]], "list[tuple[Tensor, float, float, float]] | None"]
"""What ``attach_prox`` gives a ``FusedAdamW`` for one param group, after the step count's
increment: ``(weight, offset, threshold, addition)`` per weight it acts on (``d = sqrt(v)
+ offset``, ``w <- soft(w d, threshold) / (d + addition)``), or None to leave the group's
prox to its step hook."""

_COLUMNS = 10  # decay, 1-β1, β2, 1-β2, ε, lr/c1, sqrt(c2), offset, threshold, addition


def adamw_prox_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scalars: Tensor,
    active: Tensor,
) -> None:
    """One AdamW step and the prox in its metric, in place, each tensor in one pass.

    ``scalars[i]`` holds tensor ``i``'s ``(1 - lr λ, 1 - β1, β2, 1 - β2, ε, lr / c1,
    sqrt(c2), offset, threshold, addition)``; the prox applies where ``active[i]``. The
    arithmetic is torch's for-loop AdamW's, operation for operation (``mul_``, ``lerp_``,
    ``mul_``/``addcmul_``, ``sqrt``/``div``/``add_``, ``addcdiv_``), then the eager prox's
    (``fused.quotient_prox_``).
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
        m.copy_(m_new)
        v.copy_(v_new)
        w.copy_(torch.where(active[i], proxed, stepped))


ADAMW_PROX = FusedKernel(adamw_prox_)


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
        self._prox_plans: OrderedDict[int, tuple[int, ProxPlan, set[int]]] = OrderedDict()  # weakref-able

    def fuse_prox(self, hook_id: int, plan: ProxPlan, done: set[int]) -> RemovableHandle:
        """Register the prox of the step hook ``hook_id`` (``attach_prox`` calls this):
        where that hook is the first to run after a step, ``plan`` gives each group's prox
        to the fused loop, and the ids of the groups it ran for go into ``done`` (the hook
        skips those). ``handle.remove()`` unregisters it."""
        handle = RemovableHandle(self._prox_plans)
        self._prox_plans[handle.id] = (hook_id, plan, done)
        return handle

    def _first_plan(self) -> tuple[ProxPlan, set[int]] | None:
        """The registered prox whose hook runs first after a step, if one does: fused
        into the step, it keeps its place in the order of the step hooks (torch runs an
        optimizer's own post hooks before the global ones)."""
        if not self._optimizer_step_post_hooks:
            return None
        first = next(iter(self._optimizer_step_post_hooks))
        for hook_id, plan, done in self._prox_plans.values():
            if hook_id == first:
                return plan, done
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if self.fuse is False:
            return self._reference(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._work()
        if work is None:
            self._reference()  # the reference step: the prox runs in its hook
            return loss
        first = self._first_plan()
        steps = [self.state[p]["step"] for params, *_ in work.values() for p in params]
        torch._foreach_add_(steps, 1.0)
        planned = self._planned(first)
        ((params, grads, exp_avgs, exp_avg_sqs),) = work.values()
        (rows,) = self._rows(work, planned)
        scalars = torch.tensor([r[0] for r in rows], dtype=params[0].dtype).to(params[0].device)
        active = torch.tensor([r[1] for r in rows]).to(params[0].device)
        if not ADAMW_PROX.run_(self.fuse, params, grads, exp_avgs, exp_avg_sqs, scalars, active):
            torch._foreach_sub_(steps, 1.0)  # a compile that failed: nothing else moved
            self._reference()
            return loss
        if first is not None:
            first[1].update(key for key, plan in planned.items() if plan)
        return loss

    def _reference(self, closure: Callable[[], float] | None = None) -> float | None:
        """``torch.optim.AdamW.step`` without the hooks' wrapper torch puts on it once an
        AdamW exists (``Optimizer.profile_hook_step``): this step's own wrapper runs them."""
        step = torch.optim.AdamW.step
        if getattr(step, "hooked", False):
            step = step.__wrapped__  # type: ignore[attr-defined]
        result: float | None = step(self, closure)
        return result

    def _work(self) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] | None:
        """Each (device, dtype) group's tensors for the fused loop, or None where this
        step must be the reference (see the module) or the loop is not yet wanted."""
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
        for params, grads, exp_avgs, exp_avg_sqs in work.values():
            probe = torch.empty(len(params), _COLUMNS)
            if not ADAMW_PROX.wants(self.fuse, params, grads, exp_avgs, exp_avg_sqs, probe, probe):
                return None
        return work

    def _planned(self, first: tuple[ProxPlan, set[int]] | None) -> dict[int, Any]:
        """Per param group (by id), the first prox's plan for this step, or None."""
        if first is None:
            return {}
        first[1].clear()
        return {id(group): first[0](group) for group in self.param_groups}

    def _rows(
        self, work: dict[Any, tuple[list[Tensor], ...]], planned: dict[int, Any]
    ) -> list[list[tuple[list[float], bool]]]:
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
        rows = []
        for params, *_ in work.values():
            group_rows = []
            for p in params:
                on = id(p) in prox
                group_rows.append((of[id(p)] + list(prox.get(id(p), (0.0, 0.0, 0.0))), on))
            rows.append(group_rows)
        return rows


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
