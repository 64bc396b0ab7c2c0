"""Weight penalties, each with its exact proximal step.

Every penalty ``R`` has two faces:

``value(params)``
    ``R(w)`` as a differentiable scalar: add it to the loss and let the optimizer follow
    its (sub)gradient.
``prox_(params, lr)``
    The proximal step, in place::

        w <- prox_{lr*R}(w) = argmin_u  1/(2*lr) * ||u - w||^2 + R(u)

    Taken after each gradient step on the loss alone (``attach_prox`` does it after every
    ``optimizer.step()``), this is proximal gradient descent (ISTA; Parikh & Boyd, 2014,
    "Proximal Algorithms"). Unlike a subgradient, it puts weights *exactly* at zero for L1
    and group lasso: the dial's lasso really selects features.

Use one face or the other for a given penalty, not both: that would count it twice.

The strengths follow ``../DESIGN.md`` and match the libraries users compare against:

=====================  ===========================================  ==========================
penalty                R(w)                                         equals
=====================  ===========================================  ==========================
``L1(s)``              s * sum|w|                                   sklearn ``Lasso(alpha=s)``
``L2(s)``              s/2 * sum w^2                                torch ``weight_decay=s``
``ElasticNet(s, r)``   s * (r * sum|w| + (1 - r)/2 * sum w^2)       sklearn ``ElasticNet(s, r)``
``GroupLasso(s)``      s * sum_g sqrt(|g|) * ||w_g||_2              Yuan & Lin (2006)
``L2SP(s, w0)``        s/2 * sum (w - w0)^2                         Li et al. (2018)
=====================  ===========================================  ==========================

Fast and reference paths: with ``foreach=None`` (the default) or ``True``, tensors are
grouped by device and dtype and handled by ``torch._foreach_*`` kernels or a single fused
kernel per tensor, whichever measured fastest (``benchmarks/penalties.py``); with
``foreach=False`` a plain per-tensor loop that spells the formula out is used. On top of
the fast path, ``fused`` (``None``: pick) runs ``value``, its gradient, elastic net's prox
and the prox in an adaptive optimizer's metric as one ``torch.compile``d pass per group
(``regdial.blocks.fused``, which says when it compiles). The tests check that all three
give the same numbers to rounding and the same exact zeros, call by call (over a run the
last bits grow as any two orders of floating-point operations do).

16-bit parameters work: thresholds and shrink factors stay Python floats, so the kernels
apply them in float32 (a threshold of 1e-8 is not rounded to zero in float16), and sums
are accumulated in float32.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from regdial._checks import Described, check_range, fail
from regdial._tensors import accumulation_dtype, group_by_device_and_dtype, tensor_list
from regdial.blocks import fused as kernels
from regdial.blocks.schedules import Scheduled, Strength
from regdial.blocks.shrinkage import (
    StepQuotients,
    combine,
    elastic_sums,
    homogeneous,
    l1_sum,
    on_cpu_wide,
    soft_threshold_,
    soft_threshold_diagonal_,
    soft_threshold_reference_,
    squares_sum,
    step_tensor,
    write_rounded,
)

__all__ = ["L1", "L2", "ElasticNet", "Penalty"]

logger = logging.getLogger(__name__)


class Penalty(Scheduled, ABC):
    """A weight penalty ``R(w)`` with its proximal step; see the module docstring.

    Args:
        strength: ``s >= 0``, or a ``Schedule`` of strengths over training (then call
            ``set_progress`` as training goes). 0 makes ``value`` zero and ``prox_`` the
            identity.
        foreach: ``None`` or ``True`` for the fast path, ``False`` for the reference loop.
        fused: ``None``: compiled kernels where they repay their compile; ``True``: always
            (an ``InputError`` where the device has no compiler); ``False``: never. See
            ``regdial.blocks.fused``.
    """

    warmup: ClassVar[bool] = True
    """Whether ``attach_prox`` warms this penalty up in an adaptive optimizer's metric (see
    ``regdial.blocks.proximal``): a shrink toward zero at an exploding step size destroys
    weights; L2-SP's pull toward the starting point does not, and has none."""

    elementwise: ClassVar[bool] = True
    """Whether the prox acts on each element alone (exact on FSDP's sharded parameters)."""

    sparsifying: ClassVar[bool] = False
    """Whether the prox sets weights exactly to zero (L1, elastic net, group lasso)."""

    anchored: ClassVar[bool] = False
    """Whether the prox pulls toward a point other than zero (L2-SP). ``attach_prox`` runs
    its step before the sparsifying ones on the same optimizer, whatever order they were
    attached in: after them it would move every exact zero off zero."""

    def __init__(self, strength: Strength, *, foreach: bool | None = None, fused: bool | None = None) -> None:
        self.strength = strength
        self.foreach = foreach
        self._fused_field = f"{type(self).__name__}.fused"  # named so in a refusal
        self.fused = kernels.check_fused(self._fused_field, fused, foreach)
        self.progress = 0.0

    def value(self, params: Tensor | Iterable[Tensor]) -> Tensor:
        """``R(params)`` as a differentiable scalar (float32 or wider) to add to the loss.

        The fast path is one autograd node: the forward runs without building a graph and
        the backward applies the closed-form (sub)gradient (``s*sign(w)``, ``s*w``, ...)
        with foreach kernels. The reference path (``foreach=False``) lets autograd
        differentiate the formula, and the tests check the two agree.
        """
        given = tensor_list(params)
        tensors = self._select(given)
        strength = self.current_strength
        if strength == 0.0 or not tensors:
            return torch.zeros((), device=given[0].device)
        if self.foreach is False:
            return strength * self._total(tensors, fast=False)
        value: Tensor = _PenaltyValue.apply(self, strength, *tensors)  # type: ignore[no-untyped-call]
        return value

    def _total(self, tensors: Sequence[Tensor], fast: bool) -> Tensor:
        parts = []
        for indices in group_by_device_and_dtype(tensors).values():
            group = [tensors[i] for i in indices]
            part = self._fused_sum(group) if fast else None
            parts.append(self._sum(group, accumulation_dtype(group[0].dtype), fast) if part is None else part)
        return combine(parts, tensors[0].device)

    def _fused_terms(self) -> tuple[float, float] | None:
        """``(a, b)`` with ``R(w)/s = a*sum|x| + b*sum x^2`` (``x = w - w0`` with anchors),
        or None where no fused kernel has this penalty's form."""
        return None

    def _fused_anchors(self, group: list[Tensor]) -> list[Tensor] | None:
        return None

    def _fused_sum(self, group: list[Tensor]) -> Tensor | None:
        terms = self._fused_terms()
        if terms is None:
            return None
        a, b = terms
        anchors = self._fused_anchors(group)
        kernel = kernels.SQUARES if a == 0.0 and anchors is None else kernels.SUMS
        sums = kernel(self.fused, group, anchors, a != 0.0, b != 0.0, field=self._fused_field)
        if sums is None:
            return None
        return a * sums[0] + b * sums[-1] if a and b else (a * sums[0] if a else b * sums[0])

    def _fused_gradient(self, group: list[Tensor], scale: Tensor) -> list[Tensor] | None:
        terms = self._fused_terms()
        if terms is None:
            return None
        a, b = terms
        sign, linear = (scale * a if a else None), (scale * (2.0 * b) if b else None)
        return kernels.GRADIENTS(
            self.fused, group, self._fused_anchors(group), sign, linear, field=self._fused_field
        )

    def _quotient_terms(self) -> tuple[float, float] | None:
        """``(r, q)`` with this prox in the metric ``lr_i = scale/d_i`` equal to
        ``soft(w*d, r*t) / (d + q*t)``, ``t = s*scale``; None where it has no such form."""
        return None

    def quotient_coefficients(self) -> tuple[float, float, float] | None:
        """``(s, r, q)``: this prox in the metric ``lr_i = scale/d_i`` is ``soft(w*d, r*t) /
        (d + q*t)`` with ``t = s*scale``, for a loop that builds ``d`` and ``scale`` itself
        (``FusedAdamW``); None where it has no such form, must stay eager, or is off."""
        terms = self._quotient_terms()
        if terms is None or self.fused is False or self.foreach is False:
            return None
        strength = self.current_strength
        return None if strength == 0.0 else (strength, *terms)

    def _fused_quotient(
        self, tensors: list[Tensor], kept: list[int], steps: StepQuotients, strength: float
    ) -> bool:
        """The prox in the metric of ``steps`` by ``fused.quotient_prox_``; False where
        the caller's per-tensor path must run instead (nothing was changed then)."""
        if self.quotient_coefficients() is None:
            return False
        groups = group_by_device_and_dtype([tensors[i] for i in kept])
        plans = []
        for indices in groups.values():
            index = [kept[i] for i in indices]
            group = [tensors[i] for i in index]
            radicands = [steps.radicand(i) for i in index]
            if any(v is None or not homogeneous(w, v) for w, v in zip(group, radicands, strict=True)):
                return False
            plans.append((index, group, radicands))
        ratio, addition = self._quotient_terms() or (0.0, 0.0)  # checked above
        for index, group, radicands in plans:
            t = [strength * steps.scale(i) for i in index]
            done = kernels.QUOTIENT_PROX.run_(
                self.fused, group, radicands,
                kernels.scalars([steps.offset(i) for i in index], group[0]),
                kernels.scalars([ratio * u for u in t], group[0]),
                kernels.scalars([addition * u for u in t], group[0]), field=self._fused_field,
            )  # fmt: skip
            if not done:
                for i in index:
                    self._prox_quotient(tensors[i], steps, i, strength)
        return True

    @torch.no_grad()
    def prox_(self, params: Tensor | Iterable[Tensor], lr: float | Sequence[Tensor]) -> None:
        """The proximal step ``w <- prox_{lr*R}(w)``, in place.

        ``lr`` is a step size ``> 0``, or one tensor of per-coordinate step sizes per
        parameter (the prox in a diagonal metric, as ``attach_prox`` uses for Adam):
        each coordinate ``i`` then gets the step ``lr_i`` in place of ``lr``. Such tensors
        must be positive and broadcast to their parameter's shape; they are not checked
        element by element, to keep the step cheap.
        """
        tensors = tensor_list(params)
        kept = [i for i, w in enumerate(tensors) if self._acts_on(w)]
        strength = self.current_strength
        given: object = lr  # checked at run time whatever the annotation says
        if isinstance(given, Sequence) and not isinstance(given, str):
            if len(given) != len(tensors):
                fail(
                    "lr",
                    f"a number or one step-size tensor per parameter ({len(tensors)})",
                    Described(f"{len(given)} tensors"),
                )
            if strength == 0.0:
                return
            # One tensor at a time, so lazily computed step sizes (attach_prox's for Adam)
            # are used while they are still in cache and are never all alive at once.
            if isinstance(given, StepQuotients):
                if self._fused_quotient(tensors, kept, given, strength):
                    return
                for i in kept:
                    self._prox_quotient(tensors[i], given, i, strength)
                return
            for i in kept:
                w = tensors[i]
                steps = step_tensor(given[i], w, i).to(accumulation_dtype(w.dtype))
                self._prox_diagonal(w, steps, strength)
            return
        step = check_range("lr", given, low=0.0, low_open=True) * strength
        if step == 0.0 or not kept:
            return
        fast = self.foreach is not False
        for indices in group_by_device_and_dtype([tensors[i] for i in kept]).values():
            self._prox([tensors[kept[i]] for i in indices], step, fast)

    def _select(self, tensors: list[Tensor]) -> list[Tensor]:
        return [w for w in tensors if self._acts_on(w)]

    def _acts_on(self, tensor: Tensor) -> bool:
        """Whether this penalty acts on ``tensor`` (L2SP: only if it has an anchor)."""
        return True

    @abstractmethod
    def _sum(self, group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
        """``R(w) / s`` over one device/dtype group, accumulated in ``dtype``."""

    @abstractmethod
    def _gradient(self, group: list[Tensor], scale: Tensor) -> list[Tensor]:
        """New tensors ``scale * dR/dw / s`` for one device/dtype group."""

    @abstractmethod
    def _prox(self, group: list[Tensor], step: float, fast: bool) -> None:
        """The proximal step with ``step = lr * s`` on one device/dtype group."""

    @abstractmethod
    def _prox_diagonal(self, w: Tensor, step: Tensor, strength: float) -> None:
        """The proximal step of one tensor with per-coordinate step sizes ``lr_i``."""

    def _prox_quotient(self, w: Tensor, steps: StepQuotients, index: int, strength: float) -> None:
        """The same with ``lr_i = scale / d_i`` (``StepQuotients``); by default through
        the step tensor, faster where a penalty's prox allows it."""
        self._prox_diagonal(w, step_tensor(steps[index], w, index).to(accumulation_dtype(w.dtype)), strength)

    def _fields(self) -> str:
        return f"strength={self._strength!r}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fields()})"


class _PenaltyValue(torch.autograd.Function):
    """``s * R(w)`` as a single autograd node with a closed-form backward."""

    @staticmethod
    def forward(ctx: Any, penalty: Penalty, strength: float, *tensors: Tensor) -> Tensor:
        ctx.penalty, ctx.strength = penalty, strength
        ctx.save_for_backward(*tensors)
        return strength * penalty._total(tensors, fast=True)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        tensors = ctx.saved_tensors
        grads: list[Tensor | None] = [None] * len(tensors)
        wanted = ctx.needs_input_grad[2:]
        for (device, dtype), indices in group_by_device_and_dtype(tensors).items():
            indices = [i for i in indices if wanted[i]]
            if not indices:
                continue
            scale = (grad_output * ctx.strength).to(device=device, dtype=dtype)
            group = [tensors[i] for i in indices]
            fused = ctx.penalty._fused_gradient(group, scale)
            for i, grad in zip(
                indices, ctx.penalty._gradient(group, scale) if fused is None else fused, strict=True
            ):
                grads[i] = grad
        return (None, None, *grads)


class L1(Penalty):
    """Lasso: ``R(w) = s * sum|w|``.

    Prox (soft-thresholding): ``w <- sign(w) * max(|w| - lr*s, 0)``; every weight with
    ``|w| <= lr*s`` becomes exactly 0. With the mean squared error halved,
    ``(1/2n)||y - Xw||^2 + R(w)`` is scikit-learn's ``Lasso(alpha=s)`` objective.
    """

    sparsifying: ClassVar[bool] = True

    def _sum(self, group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
        return l1_sum(group, dtype, fast)

    def _fused_terms(self) -> tuple[float, float]:
        return 1.0, 0.0

    def _quotient_terms(self) -> tuple[float, float]:
        return 1.0, 0.0

    def _gradient(self, group: list[Tensor], scale: Tensor) -> list[Tensor]:
        grads = list(torch._foreach_sign(group))  # the subgradient 0 at w = 0, as torch.abs
        torch._foreach_mul_(grads, scale)
        return grads

    def _prox(self, group: list[Tensor], step: float, fast: bool) -> None:
        for w in group:
            if fast:
                soft_threshold_(w, step)
            else:
                soft_threshold_reference_(w, step)

    def _prox_diagonal(self, w: Tensor, step: Tensor, strength: float) -> None:
        soft_threshold_diagonal_(w, step, strength)

    def _prox_quotient(self, w: Tensor, steps: StepQuotients, index: int, strength: float) -> None:
        d = steps.denominator(index)
        if not homogeneous(w, d):
            return super()._prox_quotient(w, steps, index, strength)
        # soft(w, s*scale/d) = soft(w*d, s*scale) / d
        soft_threshold_(w.mul_(d), strength * steps.scale(index)).div_(d)


class L2(Penalty):
    """Ridge: ``R(w) = (s/2) * sum w^2``.

    Its gradient ``s*w`` is what torch's ``weight_decay=s`` adds for SGD. Prox (shrink):
    ``w <- w / (1 + lr*s)``, equal to decoupled decay ``w*(1 - lr*s)`` to first order but
    stable for any ``lr*s``. ``(1/2n)||y - Xw||^2 + R(w)`` is scikit-learn's
    ``Ridge(alpha=n*s)`` objective, scaled by ``1/(2n)``.
    """

    def _sum(self, group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
        return 0.5 * squares_sum(group, dtype, fast)

    def _fused_terms(self) -> tuple[float, float]:
        return 0.0, 0.5

    def _quotient_terms(self) -> tuple[float, float]:
        return 0.0, 1.0

    def _gradient(self, group: list[Tensor], scale: Tensor) -> list[Tensor]:
        return list(torch._foreach_mul(group, scale))

    def _prox(self, group: list[Tensor], step: float, fast: bool) -> None:
        shrink = 1.0 / (1.0 + step)
        if fast:
            torch._foreach_mul_(group, shrink)
        else:
            for w in group:
                w.mul_(shrink)

    def _prox_diagonal(self, w: Tensor, step: Tensor, strength: float) -> None:
        write_rounded(w, w.to(step.dtype) / (step * strength).add_(1.0))

    def _prox_quotient(self, w: Tensor, steps: StepQuotients, index: int, strength: float) -> None:
        d = steps.denominator(index)
        if not homogeneous(w, d):
            return super()._prox_quotient(w, steps, index, strength)
        w.mul_(d).div_(d.add_(strength * steps.scale(index)))  # w / (1 + t/d) = w*d / (d + t)


class ElasticNet(Penalty):
    """Elastic net: ``R(w) = s * (r * sum|w| + (1 - r)/2 * sum w^2)``, ``r = l1_ratio``.

    The same parametrization as scikit-learn's ``ElasticNet(alpha=s, l1_ratio=r)``:
    ``r = 1`` is ``L1(s)``, ``r = 0`` is ``L2(s)``. Prox (soft-threshold, then shrink)::

        w <- sign(w) * max(|w| - lr*s*r, 0) / (1 + lr*s*(1 - r))
    """

    sparsifying: ClassVar[bool] = True

    def __init__(
        self,
        strength: Strength,
        l1_ratio: float = 0.5,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(strength, foreach=foreach, fused=fused)
        self.l1_ratio = check_range("ElasticNet.l1_ratio", l1_ratio, low=0.0, high=1.0)

    def _sum(self, group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
        ratio = self.l1_ratio
        if fast and on_cpu_wide(group, dtype):
            l1, squares = elastic_sums(group)
            return ratio * l1 + 0.5 * (1.0 - ratio) * squares
        return ratio * l1_sum(group, dtype, fast) + 0.5 * (1.0 - ratio) * squares_sum(group, dtype, fast)

    def _fused_terms(self) -> tuple[float, float]:
        return self.l1_ratio, 0.5 * (1.0 - self.l1_ratio)

    def _quotient_terms(self) -> tuple[float, float]:
        return self.l1_ratio, 1.0 - self.l1_ratio

    def _gradient(self, group: list[Tensor], scale: Tensor) -> list[Tensor]:
        grads = list(torch._foreach_sign(group))
        torch._foreach_mul_(grads, self.l1_ratio)
        torch._foreach_add_(grads, group, alpha=1.0 - self.l1_ratio)
        torch._foreach_mul_(grads, scale)
        return grads

    def _prox(self, group: list[Tensor], step: float, fast: bool) -> None:
        threshold = step * self.l1_ratio
        shrink = 1.0 / (1.0 + step * (1.0 - self.l1_ratio))
        if fast and kernels.ELASTIC_PROX.run_(
            self.fused,
            group,
            kernels.scalar(threshold * shrink, group[0]),
            kernels.scalar(shrink, group[0]),
            field=self._fused_field,
        ):
            return
        if fast and group[0].dtype in (torch.float16, torch.bfloat16):
            # Two in-place passes would round twice in 16 bits: compute wide, round once.
            for w in group:
                w.copy_(torch.nn.functional.softshrink(w.float(), threshold).mul_(shrink))
        elif fast:
            # Soft-thresholding is positively homogeneous, soft(w, t)*c = soft(c*w, c*t):
            # one foreach shrink, then one fused kernel per tensor.
            torch._foreach_mul_(group, shrink)
            for w in group:
                soft_threshold_(w, threshold * shrink)
        else:
            for w in group:
                soft_threshold_reference_(w, threshold, shrink)

    def _prox_diagonal(self, w: Tensor, step: Tensor, strength: float) -> None:
        shrink = (step * (strength * (1.0 - self.l1_ratio))).add_(1.0)
        soft_threshold_diagonal_(w, step, strength * self.l1_ratio, shrink)

    def _prox_quotient(self, w: Tensor, steps: StepQuotients, index: int, strength: float) -> None:
        d = steps.denominator(index)
        if not homogeneous(w, d):
            return super()._prox_quotient(w, steps, index, strength)
        # soft(w, r*t/d) / (1 + (1-r)*t/d) = soft(w*d, r*t) / (d + (1-r)*t), t = s*scale
        t = strength * steps.scale(index)
        soft_threshold_(w.mul_(d), self.l1_ratio * t).div_(d.add_((1.0 - self.l1_ratio) * t))

    def _fields(self) -> str:
        return f"{super()._fields()}, l1_ratio={self.l1_ratio!r}"
