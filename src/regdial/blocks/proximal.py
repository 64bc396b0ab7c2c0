"""Run proximal steps and constraints after every ``optimizer.step()``, with any optimizer.

``attach_prox(optimizer, L1(1e-4))`` turns any torch optimizer into its proximal version:
after each ``step()`` (yours, Lightning's, Hugging Face's Trainer's), the weights of every
parameter group get ``penalty.prox_(weights, step_size)``.

The step size is what makes a strength mean the same thing whatever the optimizer. A
proximal gradient method stops where ``0`` is in ``grad f(w) + s * dR(w)``: for L1, a weight
is exactly zero when its gradient is below ``s``, which is the lasso. Its prox step must
be the step the optimizer actually takes for that weight:

- SGD: ``lr``, times ``(1 - dampening)/(1 - momentum)`` with momentum (the steady-state
  step of the momentum buffer), ``1 + momentum*(1 - dampening)/(1 - momentum)`` with Nesterov;
- Adam, AdamW, NAdam: ``lr / (sqrt(v_hat) + eps)`` per coordinate (AMSGrad: the max
  ``v``); RAdam: the same times its rectification ``r_t``; Adamax: ``lr / u``; Adagrad:
  ``lr_t / (sqrt(sum) + eps)``; RMSprop: ``lr / (sqrt(v) + eps)``, over
  ``1 - momentum`` with momentum.

Adaptive optimizers scale every weight's step to about ``lr``, so a prox at the plain
``lr`` compares ``lr*s`` to steps of size ``lr`` for useful and useless weights alike:
L1 then zeroes all or nothing. In the optimizer's metric (Yun, Lozano & Yang, 2021,
"Adaptive Proximal Gradient Methods for Structured Neural Networks") Adam with L1 reaches
scikit-learn's Lasso; the tests check it for each optimizer above. ``step_size="lr"``
gives the textbook decoupled prox with the group's ``lr``, in the sense of AdamW's decay.

The max-norm constraint (Srivastava et al., 2014, the dropout paper) caps the L2 norm of
each unit's incoming weights. A projection is the prox of an indicator function, so
``MaxNorm`` attaches the same way; it ignores the step size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from regdial._checks import Described, check_choice, check_int, check_range, fail
from regdial._tensors import tensor_list

__all__ = ["MaxNorm", "Prox", "attach_prox", "max_norm_", "optimizer_step_sizes"]

logger = logging.getLogger(__name__)

StepSize = Literal["auto", "optimizer", "lr"]


class Prox(Protocol):
    """Anything with an in-place proximal step: every penalty, ``MaxNorm``."""

    def prox_(self, params: Tensor | Iterable[Tensor], lr: float | Sequence[Tensor]) -> None: ...


Group = dict[str, Any]
StepSizes = Callable[[Optimizer, Group, list[Tensor]], "float | Sequence[Tensor]"]


class _LazySteps(Sequence[Tensor]):
    """Per-parameter step-size tensors, each computed when asked for.

    ``prox_`` takes them one tensor at a time, so each is used while still in cache and
    they are never all alive at once (allocating them all measured several times slower).
    """

    def __init__(self, params: list[Tensor], step: Callable[[Tensor], Tensor]) -> None:
        self._params, self._step = params, step

    def __len__(self) -> int:
        return len(self._params)

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        return self._step(self._params[index])


def _sgd(optimizer: Optimizer, group: Group, params: list[Tensor]) -> float:
    lr, momentum = float(group["lr"]), float(group.get("momentum", 0.0))
    if momentum == 0.0:
        return lr
    carried = momentum * (1.0 - float(group.get("dampening", 0.0))) / (1.0 - momentum)
    return lr * (1.0 + carried) if group.get("nesterov") else lr * carried / momentum


def _scalar(step: Any) -> Any:
    """A step count as a float when that costs no device sync."""
    return float(step) if not isinstance(step, Tensor) or step.device.type == "cpu" else step


def _adam_step(optimizer: Optimizer, group: Group) -> Callable[[Tensor], Tensor]:
    lr, beta2, eps = float(group["lr"]), float(group["betas"][1]), float(group["eps"])
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"

    def step(p: Tensor) -> Tensor:
        state = optimizer.state[p]
        bias_correction = 1.0 - beta2 ** _scalar(state["step"])
        result: Tensor = (state[key] / bias_correction).sqrt_().add_(eps).reciprocal_().mul_(lr)
        return result

    return step


def _adam(optimizer: Optimizer, group: Group, params: list[Tensor]) -> Sequence[Tensor]:
    return _LazySteps(params, _adam_step(optimizer, group))


def _radam(optimizer: Optimizer, group: Group, params: list[Tensor]) -> Sequence[Tensor]:
    """Adam's steps times the rectification ``r_t``, or plain ``lr`` while RAdam has none."""
    beta2, lr = float(group["betas"][1]), float(group["lr"])
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    adam_step = _adam_step(optimizer, group)

    def step(p: Tensor) -> Tensor:
        t = float(optimizer.state[p]["step"])
        rho_t = rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t)
        if rho_t <= 5.0:
            return torch.full_like(p, lr)
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        return adam_step(p).mul_(rect)

    return _LazySteps(params, step)


def _adamax(optimizer: Optimizer, group: Group, params: list[Tensor]) -> Sequence[Tensor]:
    lr = float(group["lr"])

    def step(p: Tensor) -> Tensor:
        result: Tensor = optimizer.state[p]["exp_inf"].reciprocal().mul_(lr)
        return result

    return _LazySteps(params, step)


def _adagrad(optimizer: Optimizer, group: Group, params: list[Tensor]) -> Sequence[Tensor]:
    eps, lr_decay = float(group["eps"]), float(group["lr_decay"])

    def step(p: Tensor) -> Tensor:
        state = optimizer.state[p]
        lr = float(group["lr"]) / (1.0 + (_scalar(state["step"]) - 1.0) * lr_decay)
        result: Tensor = state["sum"].sqrt().add_(eps).reciprocal_().mul_(lr)
        return result

    return _LazySteps(params, step)


def _rmsprop(optimizer: Optimizer, group: Group, params: list[Tensor]) -> Sequence[Tensor]:
    lr = float(group["lr"]) / (1.0 - float(group.get("momentum", 0.0)))
    eps, centered = float(group["eps"]), bool(group.get("centered"))

    def step(p: Tensor) -> Tensor:
        state = optimizer.state[p]
        variance: Tensor = state["square_avg"]
        if centered:
            variance = variance - state["grad_avg"].square()
        return variance.sqrt().add_(eps).reciprocal_().mul_(lr)

    return _LazySteps(params, step)


_STEP_SIZES: dict[type[Optimizer], StepSizes] = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
    torch.optim.NAdam: _adam,
    torch.optim.RAdam: _radam,
    torch.optim.Adamax: _adamax,
    torch.optim.Adagrad: _adagrad,
    torch.optim.RMSprop: _rmsprop,
}


def optimizer_step_sizes(optimizer: Optimizer) -> StepSizes | None:
    """How to read ``optimizer``'s per-weight step sizes, or None if regdial cannot."""
    for cls in type(optimizer).__mro__:
        if cls in _STEP_SIZES:
            return _STEP_SIZES[cls]
    return None


def attach_prox(
    optimizer: Optimizer,
    penalty: Prox,
    params: Tensor | Iterable[Tensor] | None = None,
    *,
    step_size: StepSize = "auto",
) -> RemovableHandle:
    """Apply ``penalty.prox_`` after every ``optimizer.step()``; ``handle.remove()`` stops it.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        penalty: a penalty (``L1``, ``GroupLasso``, ...) or a constraint (``MaxNorm``).
        params: the parameters to act on. ``None`` means every parameter of the optimizer
            except the groups that ``param_groups`` marked ``"regularize": False``
            (biases, normalization layers, embeddings).
        step_size: ``"optimizer"``: each weight's step is the optimizer's own effective
            step for it (see the module docstring), so that the penalty's strength means
            the same with any optimizer; ``"lr"``: the group's ``lr``; ``"auto"``:
            ``"optimizer"`` for SGD, Adam, AdamW, NAdam, RAdam, Adamax, Adagrad and
            RMSprop (and their subclasses), ``"lr"`` for the others.

    Each group uses its current ``lr``, so schedulers are followed; a group at ``lr == 0``
    is skipped, as is any parameter without a gradient this step (the optimizer did not
    move it either, as with torch's own weight decay).
    """
    if not isinstance(optimizer, Optimizer):
        fail("optimizer", "a torch.optim.Optimizer", optimizer)
    if not callable(getattr(penalty, "prox_", None)):
        fail("penalty", "a penalty or constraint with a prox_(params, lr) method", penalty)
    check_choice("step_size", step_size, ("auto", "optimizer", "lr"))
    reader = optimizer_step_sizes(optimizer) if step_size != "lr" else None
    if step_size == "optimizer" and reader is None:
        supported = "SGD, Adam, AdamW, NAdam, RAdam, Adamax, Adagrad, RMSprop"
        fail("step_size", f"'lr' or 'auto' for {type(optimizer).__name__} (readable: {supported})", step_size)
    if step_size == "auto" and reader is None:
        logger.info(
            "attach_prox: %s's steps are not read; the prox uses each group's lr", type(optimizer).__name__
        )
    selected: set[int] | None = None
    if params is not None:
        selected = {id(p) for p in tensor_list(params)}
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = len(selected - known)
        if missing:
            fail(
                "params", "parameters the optimizer updates", Described(f"{missing} tensors it does not hold")
            )

    def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            lr = float(group["lr"])
            if lr == 0.0 or (selected is None and group.get("regularize", True) is False):
                continue
            ps = [
                p for p in group["params"] if p.grad is not None and (selected is None or id(p) in selected)
            ]
            if ps:
                penalty.prox_(ps, lr if reader is None else reader(opt, group, ps))

    return optimizer.register_step_post_hook(hook)


@torch.no_grad()
def max_norm_(params: Tensor | Iterable[Tensor], max_norm: float, dim: int = 0) -> None:
    """Rescale, in place, every slice along ``dim`` whose L2 norm exceeds ``max_norm``.

    With the default ``dim=0`` each slice is one output unit's incoming weights (a row of
    a Linear weight, an output channel of a conv kernel), as in the dropout paper. Slices
    within the bound are untouched; the projection is ``w_i <- w_i * min(1, c/||w_i||)``.
    Tensors with fewer than two dimensions (biases, normalization gains) have no incoming
    weight vectors and are left alone.
    """
    tensors = tensor_list(params)
    max_norm = check_range("max_norm", max_norm, low=0.0, low_open=True)
    for w in tensors:
        if w.dim() < 2:
            continue
        axis = check_int("dim", dim, low=-w.dim(), high=w.dim() - 1)
        w.renorm_(2, axis, max_norm)


class MaxNorm:
    """The max-norm constraint as a ``Prox``: ``attach_prox(optimizer, MaxNorm(3.0))``.

    ``prox_`` ignores ``lr``: a projection does not depend on the step size.
    """

    def __init__(self, max_norm: float, dim: int = 0) -> None:
        self.max_norm = check_range("MaxNorm.max_norm", max_norm, low=0.0, low_open=True)
        self.dim = check_int("MaxNorm.dim", dim)

    def prox_(self, params: Tensor | Iterable[Tensor], lr: float | Sequence[Tensor]) -> None:
        max_norm_(params, self.max_norm, self.dim)

    def __repr__(self) -> str:
        return f"MaxNorm(max_norm={self.max_norm!r}, dim={self.dim})"
