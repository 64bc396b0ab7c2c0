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

In a network (not convex) the optimizer's step sizes need a warm-up. Adam's step size is
``lr / sqrt(v_hat)``, and at the first steps ``v_hat`` holds one or two squared gradients;
where those are tiny the proximal threshold ``s * lr / sqrt(v_hat)`` explodes. Measured on
a randomly initialized 2-layer BERT (``benchmarks/l1_bert.py``): the layer-0 query
gradients average 7e-7 at step 1, the threshold of ``L1(1e-5)`` comes out at 0.014, the
size of the weights themselves, and 67% of them are zeroed by the first step, all of
them within ten. So the proximal strength ramps up linearly over the horizon of the
second-moment estimate, ``1 / (1 - beta2)`` optimizer steps (1000 for Adam's defaults;
``1 / (1 - alpha)`` for RMSprop, 1000 for Adagrad), counted by the optimizer's own step
state (so it resumes exactly); ``warmup=`` sets it, ``warmup=0`` turns it off. Only the
path is changed, not the fixed point: after the warm-up the step is exact, and the
scikit-learn oracle tests land on the lasso as before. SGD's step sizes need no estimate,
so it has none by default.

An optimizer built by a trainer (Hugging Face's, Lightning's) does not mark which of its
parameters are weights; ``attach_prox(optimizer, penalty, model=model)`` applies
``param_groups``' rule (biases, normalization layers and embeddings are spared) to it.
On that same BERT, a prox over every parameter of the trainer's groups zeroed the query
and key weights and biases of both layers entirely. A tensor that becomes entirely zero
is logged once, with its name, and so is a weight a quarter of whose units (rows; columns
of transformers' ``(in, out)`` ``Conv1D``) have lost all their incoming weights: a
from-scratch GPT-2 under ``L1(1e-3)`` loses its queries and keys that way, blocks of one
fused ``c_attn``, and a query and key both at zero get no gradient to come back.

The max-norm constraint (Srivastava et al., 2014, the dropout paper) caps the L2 norm of
each unit's incoming weights. A projection is the prox of an indicator function, so
``MaxNorm`` attaches the same way; it ignores the step size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from regdial._checks import Described, check_choice, check_int, fail
from regdial._tensors import tensor_list
from regdial.blocks.fused_adamw import Handles, fusing_optimizer
from regdial.blocks.fused_plans import NO_PROX, GroupProx
from regdial.blocks.groups import transposed_ids, transposed_weights
from regdial.blocks.max_norm import MaxNorm, max_norm_
from regdial.blocks.prox_order import ATTACHED, anchored_first, has_anchored
from regdial.blocks.shrinkage import StepQuotients
from regdial.blocks.zeroed import report_dead_units, report_zeroed

__all__ = ["MaxNorm", "Prox", "attach_prox", "max_norm_", "optimizer_step_sizes", "warmup_steps"]

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
    """``lr / (sqrt(v / c2) + eps) = lr*sqrt(c2) / (sqrt(v) + eps*sqrt(c2))``, as a quotient."""
    lr, beta2, eps = float(group["lr"]), float(group["betas"][1]), float(group["eps"])
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    counts = [_scalar(optimizer.state[p]["step"]) for p in params]
    if eps <= 0.0 or any(isinstance(count, Tensor) for count in counts):
        return _LazySteps(params, _adam_step(optimizer, group))  # on a GPU step count: no sync
    # sqrt(c2) once a parameter and once a step count, not once a use: reading a step
    # tensor and the power cost about 3 us, three uses a parameter a step (0.3 ms on 96).
    roots = {count: float((1.0 - beta2**count) ** 0.5) for count in set(counts)}
    root_of = {id(p): roots[count] for p, count in zip(params, counts, strict=True)}

    def root_c2(p: Tensor) -> float:
        return root_of[id(p)]

    def denominator(p: Tensor) -> Tensor:
        result: Tensor = torch.sqrt(optimizer.state[p][key]).add_(eps * root_c2(p))
        return result

    return StepQuotients(
        params,
        denominator,
        lambda p: lr * root_c2(p),
        radicand=lambda p: optimizer.state[p][key],
        offset=lambda p: eps * root_c2(p),
    )


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
    """``lr_t / (sqrt(sum) + eps)``, as a quotient."""
    eps, lr_decay = float(group["eps"]), float(group["lr_decay"])

    def lr_at(p: Tensor) -> Any:
        return float(group["lr"]) / (1.0 + (_scalar(optimizer.state[p]["step"]) - 1.0) * lr_decay)

    def denominator(p: Tensor) -> Tensor:
        result: Tensor = optimizer.state[p]["sum"].sqrt().add_(eps)
        return result

    if eps > 0.0 and not any(isinstance(lr_at(p), Tensor) for p in params):
        return StepQuotients(
            params, denominator, lr_at, radicand=lambda p: optimizer.state[p]["sum"], offset=lambda p: eps
        )
    return _LazySteps(params, lambda p: denominator(p).reciprocal_().mul_(lr_at(p)))


def _rmsprop(optimizer: Optimizer, group: Group, params: list[Tensor]) -> Sequence[Tensor]:
    lr = float(group["lr"]) / (1.0 - float(group.get("momentum", 0.0)))
    eps, centered = float(group["eps"]), bool(group.get("centered"))

    def denominator(p: Tensor) -> Tensor:
        state = optimizer.state[p]
        variance: Tensor = state["square_avg"]
        if centered:
            variance = variance - state["grad_avg"].square()
        return variance.sqrt().add_(eps)

    if eps > 0.0 and centered:
        return StepQuotients(params, denominator, lambda p: lr)
    if eps > 0.0:
        return StepQuotients(
            params,
            denominator,
            lambda p: lr,
            radicand=lambda p: optimizer.state[p]["square_avg"],
            offset=lambda p: eps,
        )
    return _LazySteps(params, lambda p: denominator(p).reciprocal_().mul_(lr))


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


def warmup_steps(optimizer: Optimizer, group: Group) -> int:
    """The default warm-up of the prox: the horizon of the optimizer's second-moment
    estimate in steps (see the module docstring), 0 for SGD."""
    if isinstance(optimizer, torch.optim.SGD):
        return 0
    if "betas" in group:
        return round(1.0 / max(1.0 - float(group["betas"][1]), 1e-6))
    if "alpha" in group:
        return round(1.0 / max(1.0 - float(group["alpha"]), 1e-6))
    return 1000


def _warmed(
    sizes: float | Sequence[Tensor], optimizer: Optimizer, params: list[Tensor], horizon: int, calls: int
) -> float | Sequence[Tensor]:
    """Step sizes times ``min(1, t / horizon)``, ``t`` each parameter's optimizer step count
    (the hook's own count of steps where the optimizer keeps none)."""

    def factor(p: Tensor) -> Any:
        count = _scalar(optimizer.state.get(p, {}).get("step", calls))
        if isinstance(count, Tensor):  # on a GPU: stay there, no sync
            return (count / horizon).clamp(max=1.0)
        return min(1.0, float(count) / horizon)

    factors = [factor(p) for p in params]
    if all(isinstance(f, float) and f >= 1.0 for f in factors):
        return sizes  # past the warm-up: nothing to scale
    if isinstance(sizes, StepQuotients) and all(isinstance(f, float) for f in factors):
        return sizes.times(factors)
    if isinstance(sizes, Sequence):
        return [sizes[i].mul_(f) for i, f in enumerate(factors)] if not isinstance(sizes, _LazySteps | StepQuotients) else (
            _LazySteps(params, _scaled_by(sizes, params, factors)))  # fmt: skip
    return [
        torch.full((), float(sizes), device=p.device).mul_(f) for p, f in zip(params, factors, strict=True)
    ]


def _scaled_by(
    sizes: Sequence[Tensor], params: list[Tensor], factors: list[Any]
) -> Callable[[Tensor], Tensor]:
    index = {id(p): i for i, p in enumerate(params)}

    def step(p: Tensor) -> Tensor:
        i = index[id(p)]
        return sizes[i].mul_(factors[i])

    return step


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
    model: nn.Module | None = None,
    step_size: StepSize = "auto",
    warmup: int | None = None,
) -> RemovableHandle:
    """Apply ``penalty.prox_`` after every ``optimizer.step()``; ``handle.remove()`` stops it.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        penalty: a penalty (``L1``, ``GroupLasso``, ...) or a constraint (``MaxNorm``).
        params: the parameters to act on. ``None`` means every parameter of the optimizer
            except the groups that ``param_groups`` marked ``"regularize": False``
            (biases, normalization layers, embeddings); or, with ``model``, the weights
            ``param_groups(model)`` would decay, whatever the optimizer's groups.
        model: the model being trained: its parameter names label the log, and its
            biases, normalization layers and embeddings are spared (``param_groups``' rule)
            in an optimizer regdial did not build.
        step_size: ``"optimizer"``: each weight's step is the optimizer's own effective
            step for it (see the module docstring), so that the penalty's strength means
            the same with any optimizer; ``"lr"``: the group's ``lr``; ``"auto"``:
            ``"optimizer"`` for SGD, Adam, AdamW, NAdam, RAdam, Adamax, Adagrad and
            RMSprop (and their subclasses), ``"lr"`` for the others.
        warmup: optimizer steps over which the proximal strength ramps up from 0 (see the
            module docstring); None: the optimizer's second-moment horizon
            (``warmup_steps``), 0 with ``step_size="lr"``; 0 turns it off.

    Each group uses its current ``lr``, so schedulers are followed; a group at ``lr == 0``
    is skipped, as is any parameter without a gradient this step (the optimizer did not
    move it either, as with torch's own weight decay).
    """
    if not isinstance(optimizer, Optimizer):
        fail("optimizer", "a torch.optim.Optimizer", optimizer)
    if isinstance(penalty, type):  # the class passes the check below, and fails at the first step
        fail("penalty", f"a penalty made with its strength, such as {penalty.__name__}(1e-3)",
             Described(f"the class {penalty.__name__}"))  # fmt: skip
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
    if warmup is not None:
        warmup = check_int("warmup", warmup, low=0)
    selected, names = _selection(optimizer, penalty, params, model)
    _refuse_sharded(penalty, optimizer)
    zeroed: set[int] = set()
    dead: set[int] = set()
    transposed = frozenset() if model is None else transposed_ids(transposed_weights(model), "model")
    calls = [0]
    fused_groups: set[int] = set()  # the groups whose prox FusedAdamW ran in this step

    seen: set[int] = set()  # the tensors that have had a gradient other than 0

    def stepped(p: Tensor) -> bool:
        """Whether the optimizer has had a gradient other than 0 for ``p``. Before one, an
        adaptive optimizer's second moment is 0 and its step in the metric ``lr/eps``: the
        prox would then act at 10^5 times the rate its strength means (a LoRA adapter's
        ``A``, whose gradient is 0 while ``B`` starts at 0, lost 38% of its entries to L1
        at the first step). Checked once a tensor, until it has had one."""
        if id(p) in seen:
            return True
        assert p.grad is not None
        if bool(p.grad.any()):
            seen.add(id(p))
            return True
        return False

    def skipped(group: Group) -> bool:
        """A group at ``lr == 0``, or one ``param_groups`` marked not to regularize."""
        return float(group["lr"]) == 0.0 or (selected is None and group.get("regularize", True) is False)

    def sized(
        opt: Optimizer, group: Group, count: int
    ) -> tuple[list[Tensor], float | Sequence[Tensor]] | None:
        if skipped(group):
            return None
        lr = float(group["lr"])
        ps = [p for p in group["params"] if p.grad is not None and (selected is None or id(p) in selected)]
        if reader is not None and reader is not _sgd:
            ps = [p for p in ps if stepped(p)]
        if not ps:
            return None
        sizes: float | Sequence[Tensor] = lr if reader is None else reader(opt, group, ps)
        horizon = warmup if warmup is not None else (
            warmup_steps(opt, group) if reader is not None and getattr(penalty, "warmup", True) else 0)  # fmt: skip
        return ps, (_warmed(sizes, opt, ps, horizon, count) if horizon else sizes)

    def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        calls[0] += 1
        report, units = calls[0] % 16 == 1, calls[0] % 256 == 1
        for group in opt.param_groups:
            if id(group) in fused_groups and not (report or units):
                continue  # FusedAdamW ran this prox in its step, and nothing is reported now
            found = sized(opt, group, calls[0])
            if found is None:
                continue
            ps, sizes = found
            if id(group) not in fused_groups:
                penalty.prox_(ps, sizes)
            if report:  # a reduction over the weights every 16 steps: cheap
                report_zeroed(ps, zeroed, names, penalty)
            if units and getattr(penalty, "elementwise", False):  # a full pass: rarer
                report_dead_units(ps, dead, names, penalty, transposed)
        fused_groups.clear()

    handle = optimizer.register_step_post_hook(hook)
    attached = ATTACHED.setdefault(optimizer, {})
    attached[handle.id] = penalty
    anchored_first(optimizer, attached)
    fusing = fusing_optimizer(optimizer)
    coefficients = getattr(penalty, "quotient_coefficients", None)
    if fusing is not None and reader is _adam and callable(coefficients):

        def plan(group: Group) -> GroupProx | None:
            """``sized``'s choice of a group and tensors, and ``_adam``'s form of the steps
            (``eps > 0``), with the warm-up ``_warmed`` would apply."""
            if skipped(group):
                return NO_PROX  # nothing for the hook either: an average may follow in the loop
            if float(group["eps"]) <= 0.0:
                return None
            chosen = [
                p for p in group["params"] if p.grad is not None and (selected is None or id(p) in selected)
            ]
            if not all(stepped(p) for p in chosen):
                return None  # a tensor without a gradient yet: the hook's prox, which spares it, this step
            if getattr(penalty, "sparsifying", False) and has_anchored(fusing, attached):
                return None  # in the step it would run before L2-SP's pull: eager, after it
            found = coefficients()
            if found is None:  # at strength 0 (a schedule's start) the hook has nothing to do either
                return NO_PROX if getattr(penalty, "current_strength", None) == 0.0 else None
            horizon = warmup if warmup is not None else (
                warmup_steps(fusing, group) if getattr(penalty, "warmup", True) else 0)  # fmt: skip
            strength, ratio, addition = found
            return GroupProx(selected, strength, ratio, addition, horizon)

        fused_handle = fusing.fuse_prox(handle.id, plan, fused_groups)
        return Handles(handle, fused_handle)
    return handle


def _selection(
    optimizer: Optimizer, penalty: Prox, params: Tensor | Iterable[Tensor] | None, model: nn.Module | None
) -> tuple[set[int] | None, dict[int, str]]:
    """The ids of the parameters the prox acts on (None: every group not marked
    ``"regularize": False``), and the model's parameter names by id for the log."""
    names: dict[int, str] = {}
    if model is not None:
        from regdial.blocks.groups import param_groups

        if not isinstance(model, nn.Module):
            fail("model", "the nn.Module being trained", model)
        names = {id(p): name for name, p in model.named_parameters()}
        if params is None:
            params = [p for g in param_groups(model, 0.0) if g["regularize"] for p in g["params"]]
    selected: set[int] | None = None
    if params is None and not any("regularize" in g for g in optimizer.param_groups):
        logger.warning(
            "attach_prox: the optimizer's groups do not say which parameters are weights, so %s acts on all of "
            "them, biases and normalization layers included; pass model= to spare them",
            type(penalty).__name__,
        )
    if params is not None:
        selected = {id(p) for p in tensor_list(params)}
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = len(selected - known)
        if missing:
            fail(
                "params", "parameters the optimizer updates", Described(f"{missing} tensors it does not hold")
            )

    return selected, names


def _refuse_sharded(penalty: Prox, optimizer: Optimizer) -> None:
    """Group lasso and max-norm act on whole rows: refuse FSDP's sharded parameters.

    FSDP keeps each rank's shard of a parameter (a ``DTensor`` under FSDP2, a flattened
    ``FlatParameter`` under FSDP1): a row's norm would be one shard's, not the row's.
    Element-wise penalties (L1, L2, elastic net) are exact on shards and stay allowed.
    """
    if getattr(penalty, "elementwise", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            kind = type(p).__name__
            if kind in ("DTensor", "FlatParameter") or getattr(p, "_is_flat_param", False):
                fail("penalty", f"an element-wise penalty (L1, L2, ElasticNet) on FSDP's sharded parameters "
                     f"(a row's norm spans shards; train {type(penalty).__name__} data-parallel with DDP)",
                     Described(f"{type(penalty).__name__} on a {kind}"))  # fmt: skip
