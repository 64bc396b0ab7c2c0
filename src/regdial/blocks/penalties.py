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
``foreach=False`` a plain per-tensor loop that spells the formula out is used. The tests
check that both give the same numbers.

16-bit parameters work: thresholds and shrink factors stay Python floats, so the kernels
apply them in float32 (a threshold of 1e-8 is not rounded to zero in float16), and sums
are accumulated in float32.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from regdial._checks import Described, check_range, fail
from regdial._tensors import accumulation_dtype, group_by_device_and_dtype, tensor_list
from regdial.blocks.schedules import Scheduled, Strength
from regdial.blocks.shrinkage import (
    StepQuotients,
    combine,
    distance_squared,
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

__all__ = ["L1", "L2", "L2SP", "ElasticNet", "Penalty"]

logger = logging.getLogger(__name__)


class Penalty(Scheduled, ABC):
    """A weight penalty ``R(w)`` with its proximal step; see the module docstring.

    Args:
        strength: ``s >= 0``, or a ``Schedule`` of strengths over training (then call
            ``set_progress`` as training goes). 0 makes ``value`` zero and ``prox_`` the
            identity.
        foreach: ``None`` or ``True`` for the fast path, ``False`` for the reference loop.
    """

    warmup: ClassVar[bool] = True
    """Whether ``attach_prox`` warms this penalty up in an adaptive optimizer's metric (see
    ``regdial.blocks.proximal``): a shrink toward zero at an exploding step size destroys
    weights; L2-SP's pull toward the starting point does not, and has none."""

    elementwise: ClassVar[bool] = True
    """Whether the prox acts on each element alone (exact on FSDP's sharded parameters)."""

    def __init__(self, strength: Strength, *, foreach: bool | None = None) -> None:
        self.strength = strength
        self.foreach = foreach
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
            parts.append(self._sum(group, accumulation_dtype(group[0].dtype), fast))
        return combine(parts, tensors[0].device)

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
            for i, grad in zip(
                indices, ctx.penalty._gradient([tensors[i] for i in indices], scale), strict=True
            ):
                grads[i] = grad
        return (None, None, *grads)


class L1(Penalty):
    """Lasso: ``R(w) = s * sum|w|``.

    Prox (soft-thresholding): ``w <- sign(w) * max(|w| - lr*s, 0)``; every weight with
    ``|w| <= lr*s`` becomes exactly 0. With the mean squared error halved,
    ``(1/2n)||y - Xw||^2 + R(w)`` is scikit-learn's ``Lasso(alpha=s)`` objective.
    """

    def _sum(self, group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
        return l1_sum(group, dtype, fast)

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

    def __init__(self, strength: Strength, l1_ratio: float = 0.5, *, foreach: bool | None = None) -> None:
        super().__init__(strength, foreach=foreach)
        self.l1_ratio = check_range("ElasticNet.l1_ratio", l1_ratio, low=0.0, high=1.0)

    def _sum(self, group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
        ratio = self.l1_ratio
        if fast and on_cpu_wide(group, dtype):
            l1, squares = elastic_sums(group)
            return ratio * l1 + 0.5 * (1.0 - ratio) * squares
        return ratio * l1_sum(group, dtype, fast) + 0.5 * (1.0 - ratio) * squares_sum(group, dtype, fast)

    def _gradient(self, group: list[Tensor], scale: Tensor) -> list[Tensor]:
        grads = list(torch._foreach_sign(group))
        torch._foreach_mul_(grads, self.l1_ratio)
        torch._foreach_add_(grads, group, alpha=1.0 - self.l1_ratio)
        torch._foreach_mul_(grads, scale)
        return grads

    def _prox(self, group: list[Tensor], step: float, fast: bool) -> None:
        threshold = step * self.l1_ratio
        shrink = 1.0 / (1.0 + step * (1.0 - self.l1_ratio))
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


class L2SP(Penalty):
    """L2-SP: ``R(w) = (s/2) * sum (w - w0)^2``, toward the starting point ``w0``.

    For fine-tuning: instead of pulling weights toward zero, which erases what
    pre-training learned, pull them toward the pretrained weights ``w0`` (Li, Grandvalet &
    Davoine, 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks"). Prox (shrink toward the anchor)::

        w <- w0 + (w - w0) / (1 + lr*s)

    Args:
        strength: ``s >= 0`` or a schedule.
        anchor: the pretrained weights: a module (a copy of the pretrained model, or the
            model itself before fine-tuning starts) or a state dict.
        model: the model being trained, whose parameters are matched to the anchor by
            name and shape. Omit it to anchor ``anchor``'s own parameters at their current
            values: ``L2SP(0.01, model)`` right after loading pretrained weights.

    Parameters with no anchor of the same name and shape (a new classification head) are
    left alone by ``value`` and ``prox_``; give them an ``L2`` of their own. The anchor is
    copied, so it costs one more copy of the anchored weights in memory; frozen parameters
    (``requires_grad=False``, a LoRA model's base) are not anchored. Its proximal step
    has no warm-up: at the start the weights are the anchor, so a large early step can only
    hold them there.
    """

    warmup: ClassVar[bool] = False

    def __init__(
        self,
        strength: Strength,
        anchor: nn.Module | Mapping[str, Tensor],
        *,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(strength, foreach=foreach)
        if isinstance(anchor, nn.Module):
            reference: Mapping[str, Tensor] = dict(anchor.named_parameters())
            model = anchor if model is None else model
        elif isinstance(anchor, Mapping):
            reference = anchor
            if model is None:
                fail("L2SP.model", "the model being trained when anchor is a state dict", None)
        else:
            fail("L2SP.anchor", "an nn.Module or a state dict of tensors", anchor)
        if not isinstance(model, nn.Module):
            fail("L2SP.model", "an nn.Module", model)
        self._anchors: dict[int, tuple[Tensor, Tensor]] = {}
        unanchored = []
        for name, param in model.named_parameters():
            if (
                not param.requires_grad
            ):  # frozen (a LoRA base): it never moves, and a copy would cost its size
                continue
            source = reference.get(name)
            if not isinstance(source, Tensor) or source.shape != param.shape:
                unanchored.append(name)
                continue
            anchor_copy = source.detach().to(device=param.device, dtype=param.dtype, copy=True)
            self._anchors[id(param)] = (param, anchor_copy)
        if not self._anchors:
            fail(
                "L2SP.anchor",
                "weights sharing names and shapes with the model's parameters",
                Described("none that match"),
            )
        if unanchored:
            logger.info(
                "L2SP: %d parameters have no anchor and are left alone: %s", len(unanchored), unanchored
            )

    def parameters(self) -> list[Tensor]:
        """The anchored parameters, e.g. for ``attach_prox(optimizer, l2sp, params=...)``."""
        return [param for param, _ in self._anchors.values()]

    def _acts_on(self, tensor: Tensor) -> bool:
        entry = self._anchors.get(id(tensor))
        return entry is not None and entry[0] is tensor

    def _anchors_for(self, group: list[Tensor]) -> list[Tensor]:
        anchors = []
        for w in group:
            param, anchor = self._anchors[id(w)]
            if anchor.device != w.device or anchor.dtype != w.dtype:  # the model moved
                anchor = anchor.to(device=w.device, dtype=w.dtype)
                self._anchors[id(w)] = (param, anchor)
            anchors.append(anchor)
        return anchors

    def _sum(self, group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
        anchors = self._anchors_for(group)
        if fast and on_cpu_wide(group, dtype):
            return 0.5 * distance_squared(group, anchors)
        if fast:  # other devices, 16-bit weights: the norm of the difference, accumulated wide
            distances = [
                torch.linalg.vector_norm(w - a, dtype=dtype) for w, a in zip(group, anchors, strict=True)
            ]
            return 0.5 * torch.stack(distances).square().sum()
        return (
            0.5
            * torch.stack(
                [(w.to(dtype) - a.to(dtype)).square().sum() for w, a in zip(group, anchors, strict=True)]
            ).sum()
        )

    def _gradient(self, group: list[Tensor], scale: Tensor) -> list[Tensor]:
        grads = list(torch._foreach_sub(group, self._anchors_for(group)))
        torch._foreach_mul_(grads, scale)
        return grads

    def _prox(self, group: list[Tensor], step: float, fast: bool) -> None:
        anchors = self._anchors_for(group)
        if fast:
            # w0 + (w - w0)/(1 + t) = lerp(w, w0, t/(1 + t)): one pass over w and w0.
            torch._foreach_lerp_(group, anchors, step / (1.0 + step))
        else:
            for w, anchor in zip(group, anchors, strict=True):
                w.copy_(anchor + (w - anchor) / (1.0 + step))

    def _prox_diagonal(self, w: Tensor, step: Tensor, strength: float) -> None:
        (anchor,) = self._anchors_for([w])
        t = step * strength
        weight = t.div_(t + 1.0)  # t/(1 + t): w0 + (w - w0)/(1 + t) = lerp(w, w0, t/(1 + t))
        if w.dtype == weight.dtype:
            w.lerp_(anchor, weight)
        else:
            w.copy_(torch.lerp(w.to(weight.dtype), anchor.to(weight.dtype), weight))
