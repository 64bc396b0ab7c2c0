"""The implicit hypergradient of the differentiable knobs, on the training it rides on.

``hypergradients`` computes, for each knob ``λ`` of ``ranges``::

    dV/dλ = -qᵀ c_λ,     q ≈ H⁻¹ ∇V(w),  H = ∇²_w F

(see ``regdial.dial.hypergradient`` for the derivation and the table of cross terms
``c_λ``): one validation batch's gradient ``∇V`` (eval mode, the plain loss), ``q``
improved by ``solve_steps`` preconditioned conjugate-gradient steps from its last value,
with Hessian-vector products by double backward on the training batch just trained on.

``Training`` is what a hypergradient step reads of that training, so that one controller
serves regdial's own loop (``Training.of_run``) and a trainer's callbacks
(``regdial.integrations``): the model, the applied setting, where the run stands, its
held-out batches and its loss as a function of the inputs, the targets and a label
smoothing strength.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from regdial._checks import Described, check_int, fail
from regdial.blocks.schedules import resolve
from regdial.training.batches import forward, rebuild, split, to_device
from regdial.training.batches import forward as _forward

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from regdial.applied import Applied
    from regdial.training.loop import Run

__all__ = [
    "FLOAT_INPUTS",
    "LossOf",
    "Training",
    "calibrated_cross_entropy",
    "check_knobs",
    "classifier_loss",
    "hypergradients",
    "of_loop",
]

PENALTY_TERMS = ("weight_decay", "l2", "l1", "elastic_net")
FLOAT_INPUTS = ("pixel_values", "input_values", "inputs_embeds", "input_features")
"""The keys of a dict of inputs that the noise knob perturbs (as the trainers' callbacks do)."""

HORIZON_DAMPING = 0.5
"""``c``: along a direction of curvature ``κ``, gradient flow for a time ``τ`` responds to a
strength by ``(1 - e^(-κτ))/κ``, not the theorem's ``1/κ``; ``1/(κ + c/τ)`` is within 10% of
it from ``κτ = 1`` to ``κτ = 4`` and at most ``τ/c`` where ``κ = 0``."""
PRECONDITION_FLOOR = 0.01
"""A weight that gets no training gradient has ``sqrt(v̂) + eps ≈ 1e-8``: unfloored, the
conjugate gradients' preconditioner is 1e8 there and ``q`` grew to 1e10 in a few steps on
friedman. The floor changes the path of the solve, not its solution."""

LossOf = Callable[[Any, Tensor, "Tensor | None", Any], Tensor]
"""``loss(inputs, targets, smoothing, batch)``: the data loss of the model on ``inputs``,
differentiable; with ``smoothing`` (a 0-d tensor) the label-smoothed cross-entropy
``(1 - ε)·CE + ε·CE_uniform``. ``batch`` is the batch's own form, or None."""


@dataclass
class Training:
    """Where a hypergradient step stands in the training it rides on.

    ``val`` holds the held-out batches (a sequence, or a loader walked in order), read
    with ``split``; ``smooths`` says whether ``loss`` takes a smoothing strength (a
    classifier's cross-entropy); ``seed`` seeds the noise knob's draws, with the step.
    """

    net: nn.Module
    applied: Applied
    device: torch.device
    step: int
    epoch: int
    total_steps: int
    steps_per_epoch: int
    seed: int
    val: Iterable[Any] | None
    split: Callable[[Any], tuple[Any, Tensor]]
    loss: LossOf
    smooths: bool
    logits: Callable[[Any, Tensor], tuple[Tensor, Tensor]] | None = None
    """A classifier's logits on a batch's inputs and the targets they predict (a causal
    language model's shifted by one): then the validation objective is the calibrated
    cross-entropy (``calibrated_cross_entropy``), not ``loss``. Every classifier should give
    it: the plain cross-entropy's hypergradient walks the knobs that shrink the logits
    (weight decay, label smoothing) to their floors (``calibrated_cross_entropy``)."""
    val_pending: bool = False
    """No held-out batches yet, but there will be (a trainer builds its evaluation data at
    its first evaluation): the step waits."""

    @classmethod
    def of_run(cls, run: Run) -> Training:
        """regdial's own loop (``fit``)."""
        net, source = run.net, run.source

        def loss(inputs: Any, targets: Tensor, smoothing: Tensor | None, batch: Any) -> Tensor:
            output = forward(net, inputs, run.output_fn)
            if run.loss_fn is not None:
                return run.loss_fn(output, rebuild({} if batch is None and isinstance(inputs, dict) else batch,
                                                   inputs, targets))  # fmt: skip
            return classifier_loss(output, targets, smoothing) if source.num_classes is not None else (
                F.mse_loss(output.reshape(targets.shape).float(), targets.float()))  # fmt: skip

        return cls(
            net=net, applied=run.applied, device=run.device, step=run.loop.step, epoch=run.loop.epoch,
            total_steps=int(run.options.epochs or 1) * source.steps_per_epoch(),
            steps_per_epoch=source.steps_per_epoch(), seed=run.options.seed, val=source.split("val"),
            split=lambda batch: split(batch, run.adapter), loss=loss,
            smooths=run.loss_fn is None and source.num_classes is not None,
            logits=(lambda x, y: (forward(net, x, run.output_fn), y)) if run.loss_fn is None and source.num_classes is not None else None,
        )  # fmt: skip


def of_loop(
    applied: Applied,
    *,
    step: int,
    total_steps: int,
    val: Iterable[Any],
    forward: Callable[[Any, Tensor], Tensor] | None = None,
    steps_per_epoch: int | None = None,
    epoch: int = 0,
    seed: int = 0,
) -> Training:
    """A ``Training`` for your own loop (``HypergradientController.turn``): the model is
    ``applied``'s, a classifier's loss the cross-entropy (``applied.num_classes``), else the
    mean squared error; ``forward(inputs, targets)`` gives the logits (default: the model
    on the inputs; nanoGPT's ``lambda x, y: model(x, y)[0]``, whose forward gives every
    position's logits only when given the targets). ``val``: held-out batches, ``(x, y)``
    or dicts with ``labels``, walked in order. ``steps_per_epoch`` (None: unknown) bounds
    the warm-up from below: a quarter of the run, at least an epoch's steps."""
    step = check_int("step", step, low=1)
    total_steps = check_int("total_steps", total_steps, low=1)
    if val is None or isinstance(val, Tensor):
        fail("val", "held-out batches, (inputs, targets) or dicts with labels", val)
    net = applied.model
    classes = applied.num_classes

    def logits_of(x: Any, y: Tensor) -> Tensor:
        return forward(x, y) if forward is not None else _forward(net, x, None)

    def loss(x: Any, y: Tensor, smoothing: Tensor | None, _: Any) -> Tensor:
        output = logits_of(x, y)
        if classes is not None:
            return classifier_loss(output, y, smoothing)
        return F.mse_loss(output.reshape(y.shape).float(), y.float())

    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    return Training(
        net=net, applied=applied, device=device, step=step, epoch=check_int("epoch", epoch, low=0),
        total_steps=total_steps, steps_per_epoch=check_int("steps_per_epoch", steps_per_epoch or 1, low=1),
        seed=int(seed), val=val, split=split, loss=loss, smooths=classes is not None,
        logits=(lambda x, y: (logits_of(x, y), y)) if classes is not None else None,
    )  # fmt: skip


def classifier_loss(logits: Tensor, targets: Tensor, smoothing: Tensor | None) -> Tensor:
    """Cross-entropy over the labels that are not -100 (token-level logits flattened; soft
    targets as they are), label-smoothed by ``smoothing`` when given."""
    logits = logits.float()
    if logits.dim() == 3 and targets.dim() == 2:
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if targets.is_floating_point():  # soft targets
        return -(targets * logits.log_softmax(-1)).sum(-1).mean()
    keep = targets != -100
    logp = logits[keep].log_softmax(-1)
    hard = F.nll_loss(logp, targets[keep])
    if smoothing is None:
        return hard
    return (1 - smoothing) * hard + smoothing * (-logp.mean(-1)).mean()


def positions(z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Logits ``(B, T, C)`` with targets ``(B, T)``, or flattened ones ``(B*T, C)``, as one
    row per target: a classifier's shapes, whatever its sequence form."""
    if z.dim() == 3 and targets.dim() == 2:
        return z.reshape(-1, z.shape[-1]), targets.reshape(-1)
    if z.dim() == 2 and targets.dim() > 1 and targets.numel() == z.shape[0]:  # a model that flattens them
        return z, targets.reshape(-1)
    return z, targets


def check_outputs(
    applied: Applied, inputs: Any, targets: Tensor, forward: Callable[[Any, Tensor], Tensor] | None
) -> None:
    """At a loop's first turn: the model's outputs on the batch just trained on must match
    its targets, one line naming ``forward`` where not (nanoGPT's ``model(x)`` gives the last
    position's logits: it failed a quarter of the run later, naming the held-out batches).
    Without gradients, on a forked random state (a dropout mask drawn here would move a
    resumed run's)."""
    device = next((p.device for p in applied.model.parameters()), torch.device("cpu"))
    devices = [] if device.type == "cpu" else [device]
    with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=device.type):
        output: object = (
            forward(inputs, targets) if forward is not None else _forward(applied.model, inputs, None)
        )
    if not isinstance(output, Tensor):  # a forward of the user's may return anything
        fits = False
    elif applied.num_classes is not None:
        z, y = positions(output, targets)
        fits = z.shape[:-1] == y.shape
    else:
        fits = output.numel() == targets.numel()
    if (
        not fits
        and applied.num_classes is None
        and isinstance(output, Tensor)
        and not targets.is_floating_point()
        and output.shape[: targets.dim()] == targets.shape
        and output.dim() == targets.dim() + 1
    ):  # logits of every target, class labels, and a setting built without the classes
        fail("num_classes", f"the classes of the model's logits: Applied(..., num_classes={output.shape[-1]}) (the "
             "hypergradient's loss reads the outputs as a classifier's only then)",
             Described(f"None with logits of shape {tuple(output.shape)} for {targets.dtype} targets"))  # fmt: skip
    if not fits:
        shape = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
        fail("forward", "a function (inputs, targets) -> the logits of every target, where the model's output "
             "is not (nanoGPT: forward=lambda x, y: model(x, y)[0])",
             Described(f"outputs of {shape} for targets of shape {tuple(targets.shape)}"))  # fmt: skip


def calibrated_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``CE(z / T*, y)``, ``T* = argmin_T CE(z / T, y)`` (temperature scaling; Guo et al.,
    ICML 2017), ``T*`` found on the detached logits (golden-section search on ``log T`` in
    [-3, 3]) and held fixed: at the optimum the derivative in ``T`` is zero, so this
    gradient is the calibrated loss's.

    Why not the plain cross-entropy: the knobs that shrink the logits (label smoothing,
    weight decay) raise it while they raise accuracy. On digits-small, label smoothing 0.2
    took test accuracy from 0.930 to 0.960 and the test loss from 0.256 to 0.431, and the
    plain loss's hypergradient pointed weaker at every step of the run. The calibrated
    loss ranks the logits, not their scale."""
    z, targets = positions(logits.float(), targets)
    if z.shape[:-1] != targets.shape:
        fail("val", "held-out batches shaped as the training ones: targets that match the model's logits "
             f"(one per row of shape {tuple(z.shape[:-1])})", Described(f"targets of shape {tuple(targets.shape)}"))  # fmt: skip
    keep = targets != -100
    z, targets = z[keep], targets[keep]
    fixed = z.detach()

    def ce(u: float) -> float:
        return float(F.cross_entropy(fixed * math.exp(-u), targets))

    low, high = -3.0, 3.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = ce(a), ce(b)
    for _ in range(24):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = ce(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = ce(b)
    return F.cross_entropy(z * math.exp(-(low + high) / 2), targets)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()


def _noised(inputs: Any) -> tuple[str | None, Tensor]:
    """The key of the float input the noise knob perturbs (None: ``inputs`` itself), and it."""
    key = None
    if isinstance(inputs, dict):
        key = next((k for k in FLOAT_INPUTS if isinstance(inputs.get(k), Tensor)), None)
    x = inputs[key] if key is not None else inputs
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        fail("online.noise", "a knob of a model whose inputs are a float tensor (or " + ", ".join(FLOAT_INPUTS)
             + "): its hypergradient perturbs them", Described(f"inputs {type(x).__name__}"))  # fmt: skip
    return key, x


def check_knobs(training: Training, inputs: Any, knobs: Iterable[str]) -> None:
    """One line, at the first step, for a knob whose hypergradient this training cannot give."""
    if "label_smoothing" in knobs and not training.smooths:
        fail("online.label_smoothing", "a knob of a classifier trained on regdial's cross-entropy (through "
             "another loss, its strength has no derivative regdial can take)", Described("another loss"))  # fmt: skip
    if "noise" in knobs:
        _noised(inputs)
    penalties = [k for k in PENALTY_TERMS if k in knobs]
    if penalties and float(training.applied.setting.max_norm or 0.0) > 0:
        logging.getLogger("regdial.dial.hypergradient").warning(
            "regdial: online: max_norm caps the weights, and %s's hypergradient takes the uncapped fixed point: where "
            "the cap binds it is not the validation loss's derivative (a GPT-2 under max_norm=0.1 walked weight decay "
            "to its floor); turn max_norm off to tune %s online", ", ".join(penalties), penalties[0],
        )  # fmt: skip


def _perturbed(inputs: Any, training: Training) -> tuple[Any, Tensor]:
    """``inputs`` twice, ``+sigmaξ`` and ``-sigmaξ`` (antithetic pairs: the term linear in the noise,
    whose mean is zero and which swamps the O(sigma) signal at small sigma, cancels exactly), and
    the leaf ``sigma``. The whole batch, twice: on half of it, the Hessian of a ridge problem
    with 2 rows per feature was so far off that the noise settled 9% low (the inverse of a
    sampled Hessian is biased), against 2% above with the whole batch."""
    key, x = _noised(inputs)
    sigma = torch.tensor(float(training.applied.setting.noise), device=x.device, requires_grad=True)
    generator = torch.Generator(device=x.device).manual_seed(training.seed * 1_000_003 + training.step)
    xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    both = torch.cat([x + sigma * xi, x - sigma * xi])
    if key is None:
        return both, sigma
    doubled = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.shape[:1] == x.shape[:1] else v
               for k, v in inputs.items()}  # fmt: skip
    doubled[key] = both
    return doubled, sigma


def hypergradients(
    training: Training, inputs: Any, targets: Tensor, val_batch: Any, knobs: Iterable[str],
    q: list[Tensor] | None, solve_steps: int, horizon: float = math.inf,
) -> tuple[dict[str, float], list[Tensor]]:  # fmt: skip
    """``dV/dλ`` for each of ``knobs`` (the differentiable ones), and the improved ``q``.

    ``horizon``: the training time so far, ``τ = Σ_t η_t`` (the learning rates summed). The
    system solved is ``(H + c·M/τ) q = ∇V``, ``c = HORIZON_DAMPING``, with ``M`` the optimizer's metric (``sqrt(v̂) + eps``
    for Adam's family, 1 for SGD): a direction whose curvature ``κ`` in that metric is
    below ``1/τ`` has not settled in the time training had (gradient flow closes a gap
    ``e^(-κτ)``), so the stationary point of the theorem does not hold along it, and the
    undamped ``q`` grows without bound there (measured on friedman: ``|dV/dλ|`` to 1e10,
    its sign set by the preconditioner's floor)."""
    knobs = list(knobs)
    net, applied = training.net, training.applied
    params: list[Tensor] = [p for p in net.parameters() if p.requires_grad]
    weight_ids = {id(p) for p in applied.weights}
    setting = applied.setting
    was_training = net.training
    net.eval()  # no dropout draw, no batch-norm statistics moved: the hypergradient is read-only
    try:
        v_inputs, v_targets = training.split(val_batch)
        v_inputs, v_targets = to_device(v_inputs, training.device), v_targets.to(training.device)
        if training.logits is not None and not v_targets.is_floating_point():
            v_loss = calibrated_cross_entropy(*training.logits(v_inputs, v_targets))
        else:
            v_loss = training.loss(v_inputs, v_targets, None, val_batch)
        v_grad = [g if g is not None else torch.zeros_like(p)
                  for g, p in zip(torch.autograd.grad(v_loss, params, allow_unused=True), params, strict=True)]  # fmt: skip

        leaves: dict[str, Tensor] = {}
        x = inputs
        if "noise" in knobs:
            x, leaves["noise"] = _perturbed(inputs, training)
            targets = torch.cat([targets, targets])
        smoothing = None
        if "label_smoothing" in knobs:
            smoothing = torch.tensor(
                float(setting.label_smoothing), device=training.device, requires_grad=True
            )
            leaves["label_smoothing"] = smoothing
        # The Hessian-vector products differentiate this twice: fused attention cannot.
        with sdpa_kernel(SDPBackend.MATH):
            t_loss = training.loss(x, targets, smoothing, None)
            t_grad = torch.autograd.grad(t_loss, params, create_graph=True, allow_unused=True)
    finally:
        net.train(was_training)

    metric, precondition = _metrics(applied.optimizer, params)
    l1_ratio = float(setting.l1_ratio)
    # A knob the space holds fixed may be on a schedule: its strength now.
    strengths = {name: float(resolve(getattr(setting, name), applied.progress)) for name in PENALTY_TERMS}
    sparse = strengths["l1"] > 0 or (strengths["elastic_net"] > 0 and l1_ratio > 0)
    mask = [(p.detach() != 0).to(p.dtype) if sparse and id(p) in weight_ids else None for p in params]
    # The penalties' Hessian on each parameter's diagonal, and the horizon's damping.
    damping = HORIZON_DAMPING / horizon if math.isfinite(horizon) and horizon > 0 else 0.0
    diagonal: list[Tensor | float | None] = []
    for p, d, c in zip(params, metric, precondition, strict=True):
        damped = damping / c if damping else None
        if id(p) not in weight_ids:
            diagonal.append(damped)
            continue
        flat = strengths["l2"] + strengths["elastic_net"] * (1 - l1_ratio)
        term = strengths["weight_decay"] * d + flat if strengths["weight_decay"] else (flat or None)
        diagonal.append(term if damped is None else (damped if term is None else term + damped))

    names = list(leaves)
    inputs_of_hvp = [*params, *leaves.values()]

    def masked(vectors: Sequence[Tensor]) -> list[Tensor]:
        return [v if m is None else v * m for v, m in zip(vectors, mask, strict=True)]

    def hvp(v: Sequence[Tensor]) -> tuple[list[Tensor], list[float]]:
        terms = [(g * vv).sum() for g, vv in zip(t_grad, v, strict=True) if g is not None]
        if not terms:
            return [torch.zeros_like(vv) for vv in v], [0.0] * len(names)
        dot = torch.stack(terms).sum()
        out = torch.autograd.grad(dot, inputs_of_hvp, retain_graph=True, allow_unused=True)
        hv = [o.detach() if o is not None else torch.zeros_like(p) for o, p in zip(out, params, strict=False)]
        hv = [h if dg is None else h + dg * vv for h, dg, vv in zip(hv, diagonal, v, strict=True)]
        mixed = [float(o) if o is not None else 0.0 for o in out[len(params) :]]
        return masked(hv), mixed

    rhs = masked(v_grad)
    q = masked(_warm(q, params))  # a weight that left the support leaves q too
    hq, mixed_q = hvp(q)
    residual = [b - a for b, a in zip(rhs, hq, strict=True)]
    z = [r * c for r, c in zip(residual, precondition, strict=True)]
    direction, rz = z, float(_dot(residual, z))
    for _ in range(solve_steps):
        if rz <= 0:
            break
        hp, mixed_p = hvp(direction)
        curvature = float(_dot(direction, hp))
        if not curvature > 0:  # negative curvature: not a minimum along it; keep q
            break
        alpha = rz / curvature
        q = [a + alpha * b for a, b in zip(q, direction, strict=True)]
        mixed_q = [a + alpha * b for a, b in zip(mixed_q, mixed_p, strict=True)]
        residual = [r - alpha * h for r, h in zip(residual, hp, strict=True)]
        z = [r * c for r, c in zip(residual, precondition, strict=True)]
        rz_new = float(_dot(residual, z))
        direction = [a + (rz_new / rz) * b for a, b in zip(z, direction, strict=True)]
        rz = rz_new

    grads = {name: -mixed_q[names.index(name)] for name in names}
    weights = [(p.detach(), qq, d, m) for p, qq, d, m in zip(params, q, metric, mask, strict=True)
               if id(p) in weight_ids]  # fmt: skip
    cross = {
        "l2": lambda w, d, m: w,
        "weight_decay": lambda w, d, m: d * w,
        "l1": lambda w, d, m: w.sign() if m is None else w.sign() * m,
        "elastic_net": lambda w, d, m: l1_ratio * w.sign() + (1 - l1_ratio) * w,
    }
    for name in knobs:
        if name in cross:
            grads[name] = -float(sum((qq * cross[name](w, d, m)).sum() for w, qq, d, m in weights))
    return grads, [t.detach() for t in q]


def _warm(q: list[Tensor] | None, params: list[Tensor]) -> list[Tensor]:
    if q is None or len(q) != len(params) or any(a.shape != p.shape for a, p in zip(q, params, strict=True)):
        return [torch.zeros_like(p) for p in params]
    return [a.to(device=p.device, dtype=p.dtype) for a, p in zip(q, params, strict=True)]


def _metrics(optimizer: Optimizer, params: list[Tensor]) -> tuple[list[Tensor | float], list[Tensor | float]]:
    """Per parameter: ``d``, weight decay's metric at the optimizer's fixed point (1 where it
    is coupled), and the preconditioner, ``1/(sqrt(v̂) + eps)`` for Adam's family (its
    denominator floored at ``PRECONDITION_FLOOR`` times the tensor's mean), else 1."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    metric: list[Tensor | float] = [1.0] * len(params)
    precondition: list[Tensor | float] = [1.0] * len(params)
    for i, p in enumerate(params):
        group, state = group_of.get(id(p), {}), optimizer.state.get(p, {})
        if "exp_avg_sq" in state and "betas" in group:
            correction = 1 - group["betas"][1] ** float(state["step"])
            root = (state["exp_avg_sq"] / correction).sqrt().add_(float(group["eps"]))
            if isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay"):
                metric[i] = root
            precondition[i] = root.clamp_min(PRECONDITION_FLOOR * float(root.mean())).reciprocal()
    return metric, precondition
