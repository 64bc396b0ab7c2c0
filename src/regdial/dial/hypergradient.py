"""``HypergradientController``: strengths that follow their validation gradient, step by step.

For a knob ``λ`` that enters training differentiably, the weights training converges to
are a function ``w*(λ)`` of it, the stationary point of the training objective
``F(w, λ)`` (the data loss ``f`` plus the penalties, in the form the optimizer actually
stops at). The validation loss ``V(w*(λ))`` then has the hypergradient (the implicit
function theorem; Lorraine, Vicol & Duvenaud, AISTATS 2020)::

    dV/dλ = -∇V(w)ᵀ (∇²_w F)⁻¹ ∂(∇_w F)/∂λ  =  -qᵀ c_λ,     q = H⁻¹ ∇V(w),  H = ∇²_w F

Every ``every`` optimizer steps the controller takes one validation batch's gradient
``∇V`` (eval mode, the plain loss: no smoothing, no noise), improves ``q`` by a few steps
of conjugate gradients on the training batch just trained on (Hessian-vector products by
double backward, preconditioned by the optimizer's own per-coordinate step,
``1 / (sqrt(v̂) + eps)`` for Adam's family), warm-started from the last ``q`` (as SOBA,
Dagréou et al. 2022, carries its linear system's solution across steps), and moves each
knob against its hypergradient. The cross terms ``c_λ``, per knob:

====================  ====================================================================
knob                  ``c_λ = ∂(∇_w F)/∂λ`` on the setting's weights (``Applied.weights``)
====================  ====================================================================
``l2``                ``w`` (the prox ``w/(1 + a·λ)`` stops where ``∇f + λw = 0``)
``weight_decay``      ``d ⊙ w``: ``d = 1`` where decay is coupled (SGD, Adam); ``sqrt(v̂) + eps``
                      for AdamW's decoupled decay, which stops where ``m̂/(sqrt(v̂)+eps) = -λw``
``l1``                ``sign(w)`` on the support: the soft-threshold's derivative in its
                      threshold is ``-sign(w)`` where ``w ≠ 0``; zeros stay zero (H and ``q``
                      are restricted to the support)
``elastic_net``       ``r·sign(w) + (1 - r)·w`` on the support
``label_smoothing``   ``∇_w (CE_uniform - CE_label)``, by autograd (smoothing is linear in ε)
``noise``             ``d/d(sigma) ∇_w f(x + sigma·ξ)``, by autograd through the reparameterized
                      input, over antithetic pairs ``±ξ`` (the term linear in ``ξ`` cancels; the
                      pass is over twice the batch)
====================  ====================================================================

The penalties' own Hessians (``λ₂``, ``λ_wd·d``, ``λ_en·(1 - r)`` on the diagonal) are added
to the data loss's Hessian-vector products analytically.

Short-horizon bias (Wu, Ren, Liao & Grosse, ICLR 2018): a one-step hypergradient (T1-T2,
Luketina et al., ICML 2016; hypergradient descent, Baydin et al., ICLR 2018) asks what a
strength does after the next step, and regularization pays off later. The implicit one
asks what it does at the weights training converges to, an infinite horizon; its error is
the linear solve's, and ``q`` improves across steps. On ridge regression with correlated
features its zero is the validation optimum, the one-step version's 44% below it
(``tests/test_hypergradient.py``). The theorem holds near a stationary point: on
``digits-small`` (a CNN, AdamW, 420 steps, five solve steps) weight decay's hypergradient
pointed weaker until step 300 and stronger from step 340 on. So by default nothing moves
before a quarter of the run (``warmup``), and strengths start mid-range (log scale), not
at the floor, where one that points weaker at first would hold them.

Each knob moves in log space, ``u = log λ``, by Adam's rule on ``λ·dV/dλ`` (momentum 0.9,
RMS over ~1000 hypergradients, step ``lr``): relative steps, the validation batches' noise
averaged, and steps that shrink with the hypergradient near the optimum. A strength stays
in its range in the space; a range that starts at 0 is floored at its top over 1000.
Every move is a row of ``moves``, ``{step, epoch, knob, value}``: the optimizer steps
taken when it was set and the first epoch whose setting at its end holds it.

The knobs that do not enter training differentiably (dropout, drop path, mixup,
augmentation...) are turned by an ``OnlineController`` over them, every ``epochs_every``
epochs, from the curves; the two share one setting. ``state_dict()`` holds the strengths,
the optimizer's moments, ``q`` (tensors, saved as safetensors by the checkpoint), the
validation batch's position and the moves, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from regdial._checks import check_int, check_range, fail
from regdial.blocks.schedules import resolve
from regdial.dial.online import OnlineController
from regdial.dial.space import Range, Space
from regdial.setting import Regularization
from regdial.training.batches import forward, rebuild, split, to_device
from regdial.training.history import History

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from regdial.applied import Applied
    from regdial.training.loop import Run

__all__ = ["DIFFERENTIABLE", "HypergradientController"]

DIFFERENTIABLE = ("weight_decay", "l2", "l1", "elastic_net", "label_smoothing", "noise")
"""The knobs whose hypergradient this controller computes; the others go to the curves."""

PENALTY_TERMS = ("weight_decay", "l2", "l1", "elastic_net")
BETAS = (0.9, 0.999)
AUTO_STEPS = 100
"""``every=None`` aims at this many hypergradient steps in a run (fewer when 1 in 5 steps
would not reach them)."""
VAL_ROWS = 4
"""A validation batch holds at most this many training batches' rows."""
MIN_LR = 0.05
"""The smallest step in log-strength that ``lr=None`` picks."""
FLOOR = 1e-3
"""A range that starts at 0 is floored at ``FLOOR * high``: in log space 0 is never reached."""


def _floor(r: Range) -> float:
    return r.low if r.low > 0 else r.high * FLOOR


def _sliceable(batch: Any) -> bool:
    return isinstance(batch, tuple | list) and len(batch) >= 2 and all(isinstance(t, Tensor) for t in batch)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()


class HypergradientController:
    """Turn the differentiable knobs of ``space`` by their implicit hypergradient during
    one run (see the module docstring); the others by an ``OnlineController``.

    Pass it to ``fit(task, c.start(), controller=c)``. Args:
        every: optimizer steps between hypergradient steps. Each costs one validation
            forward/backward and ``solve_steps + 1`` Hessian-vector products on the
            training batch: with one solve step, about 5 training steps of an MLP (7-8
            with the noise knob, whose antithetic pairs pass twice the batch;
            ``benchmarks/online_cost.py``), 23-25% (35-41%) of the step at 20, the default
            (T1-T2 reported about 30%). None: ``AUTO_STEPS`` of them in the run, every 5 to 20 steps.
        lr: the step in log-strength per hypergradient step (Adam's rule); None: enough for
            the run's hypergradient steps to cross the widest range twice, at least
            ``MIN_LR`` (set at the first hypergradient step from the run's length).
        solve_steps: conjugate-gradient iterations per hypergradient step on ``q``.
        warmup: steps before the first move (None: a quarter of the run, at least its first
            epoch; see the module docstring).
        start: the strengths to start from (default: the middle of each range on its log
            scale, from which the hypergradient can point either way).
        epochs_every: epochs between the curve controller's turns of the other knobs
            (default 2).
    """

    def __init__(
        self,
        space: Space,
        *,
        every: int | None = 20,
        lr: float | None = None,
        solve_steps: int = 1,
        warmup: int | None = None,
        start: Mapping[str, float] | None = None,
        epochs_every: int = 2,
    ) -> None:
        if not isinstance(space, Space):
            fail("space", "a regdial.Space", space)
        self.space = space
        self.every = None if every is None else check_int("every", every, low=1)
        self.lr = None if lr is None else check_range("lr", lr, low=0.0, high=10.0, low_open=True)
        self.solve_steps = check_int("solve_steps", solve_steps, low=0, high=100)
        self.warmup = None if warmup is None else check_int("warmup", warmup, low=0)
        self.ranges = {n: r for n, r in space.knobs.items() if n in DIFFERENTIABLE}
        if not self.ranges:
            fail("space", "at least one knob of " + ", ".join(DIFFERENTIABLE), repr(space))
        others = {n: r for n, r in space.knobs.items() if n not in self.ranges}
        self.curves = OnlineController(Space(others, space.base), every=epochs_every) if others else None
        self.values: dict[str, float] = {}
        for name, r in self.ranges.items():
            low, high = _floor(r), r.high
            value = (start or {}).get(name, math.sqrt(low * high))
            self.values[name] = check_range(
                f"start.{name}", value, low=low, high=high
            )  # 0 has no logarithm: the floor is the weakest start
        unknown = set(start or {}) - set(self.ranges)
        if unknown:
            fail("start", "strengths of the space's differentiable knobs (" + ", ".join(self.ranges) + ")",
                 sorted(unknown)[0])  # fmt: skip
        self.moment = dict.fromkeys(self.ranges, 0.0)
        self.square = dict.fromkeys(self.ranges, 0.0)
        self.updates = 0
        self.val_index = 0
        self.q: list[Tensor] | None = None
        self.moves: list[dict[str, Any]] = []
        self.last_step = 0
        self._val_count: int | None = None
        self._val_slices: list[tuple[int, int]] | None = None
        self.seconds = 0.0  # in hypergradient steps, in this process (not saved: a clock, not state)

    def cost(self, history: History) -> float:
        """The hypergradient steps' seconds as a share of the rest of the training steps',
        from ``history``'s ``seconds`` (which hold both); for a run this process trained
        from its start (nan when nothing was timed)."""
        training = sum(float(row.get("seconds", 0.0)) for row in history.rows) - self.seconds
        return self.seconds / training if training > 0 else math.nan

    # -- the setting ----------------------------------------------------------------------

    def _all_values(self) -> dict[str, float]:
        return {**(self.curves.values if self.curves else {}), **self.values}

    def start(self) -> Regularization:
        """The setting to start the run with."""
        return self.space.setting(self._all_values())

    @property
    def turns(self) -> list[dict[str, Any]]:
        """The curve controller's turns of the other knobs (``OnlineController.turns``)."""
        return self.curves.turns if self.curves else []

    def __call__(self, history: History, applied: Applied) -> Regularization | None:
        """After each epoch: the curve controller's turn of the knobs it holds."""
        if self.curves is None:
            return None
        before = dict(self.curves.values)
        turned = self.curves(history, applied)
        if turned is None:
            return None
        for name, value in self.curves.values.items():
            if value != before[name]:
                self.moves.append(
                    {"step": self.last_step, "epoch": len(history) + 1, "knob": name, "value": value}
                )
        return self.space.setting(self._all_values())

    # -- the step -------------------------------------------------------------------------

    def after_step(self, run: Run, inputs: Any, targets: Tensor) -> Regularization | None:
        """After optimizer step ``run.loop.step`` on the clean batch ``(inputs, targets)``."""
        if run.distributed is not None:
            fail("controller", "a curve controller under data parallelism (the hypergradient runs on one process)",
                 type(self).__name__)  # fmt: skip
        step = run.loop.step
        self.last_step = step
        warmup = self.warmup if self.warmup is not None else self._default_warmup(run)
        if self.every is None:
            self.every = self._auto_every(run, max(warmup, 1))
        if step % self.every or step < max(warmup, 1):
            return None
        if self.lr is None:
            self.lr = self._auto_lr(run, max(warmup, 1))
        started = time.perf_counter()
        grads = self._hypergradients(run, inputs, targets)
        self.seconds += time.perf_counter() - started
        self.updates += 1
        b1, b2 = BETAS
        lr = self.lr if self.lr is not None else MIN_LR
        for name, grad in grads.items():
            if not math.isfinite(grad):
                continue
            r = self.ranges[name]
            u_grad = grad * self.values[name]  # d/d(log λ)
            self.moment[name] = b1 * self.moment[name] + (1 - b1) * u_grad
            self.square[name] = b2 * self.square[name] + (1 - b2) * u_grad * u_grad
            m_hat = self.moment[name] / (1 - b1**self.updates)
            v_hat = self.square[name] / (1 - b2**self.updates)
            if v_hat <= 0:
                continue
            u = math.log(self.values[name]) - lr * m_hat / (math.sqrt(v_hat) + 1e-12)
            value = min(r.high, max(_floor(r), math.exp(u)))
            if value != self.values[name]:
                self.values[name] = value
                self.moves.append({"step": step, "epoch": run.loop.epoch + 1, "knob": name, "value": value})
        return self.space.setting(self._all_values())

    @staticmethod
    def _default_warmup(run: Run) -> int:
        """A quarter of the run's steps, at least one epoch's."""
        per_epoch = run.source.steps_per_epoch()
        return max(per_epoch, int(run.options.epochs or 1) * per_epoch // 4)

    @staticmethod
    def _auto_every(run: Run, warmup: int) -> int:
        """``AUTO_STEPS`` hypergradient steps after the warm-up, every 5 to 20 steps."""
        total = int(run.options.epochs or 1) * run.source.steps_per_epoch()
        return min(20, max(5, (total - warmup) // AUTO_STEPS))

    def _auto_lr(self, run: Run, warmup: int) -> float:
        """A step that lets the run's hypergradient steps cross the widest range twice."""
        total = int(run.options.epochs or 1) * run.source.steps_per_epoch()
        updates = max(1, (total - warmup) // (self.every or 20))
        widest = max(math.log(r.high / _floor(r)) for r in self.ranges.values())
        return max(MIN_LR, 2 * widest / updates)

    def _val_batch(self, run: Run, rows: int) -> Any:
        """The next validation batch; a long one (regdial's own, 1024 rows) in slices of
        ``rows``, so its forward/backward costs about what a few training batches cost."""
        batches = run.source.split("val")
        if batches is None:
            fail("val", "a validation split (the hypergradient's held-out batches)", None)
        if not isinstance(
            batches, Sequence
        ):  # the user's loader: counted once, then the batch at our position
            if self._val_count is None:
                self._val_count = sum(1 for _ in batches)
            self.val_index += 1
            return next(islice(iter(batches), (self.val_index - 1) % max(self._val_count, 1), None))
        if self._val_slices is None:
            self._val_slices = [(i, start) for i, b in enumerate(batches)
                                for start in (range(0, len(b[1]), rows) if _sliceable(b) else [0])]  # fmt: skip
        index, start = self._val_slices[self.val_index % len(self._val_slices)]
        self.val_index += 1
        batch = batches[index]
        if not _sliceable(batch):
            return batch
        return type(batch)(t[start : start + rows] if isinstance(t, Tensor) else t for t in batch)

    def _loss(self, run: Run, output: Tensor, batch: Any, inputs: Any, targets: Tensor,
              smoothing: Tensor | None) -> Tensor:  # fmt: skip
        if run.loss_fn is not None:
            return run.loss_fn(output, rebuild(batch, inputs, targets))
        if run.source.num_classes is None:
            return F.mse_loss(output.reshape(targets.shape).float(), targets.float())
        logits = output.float()
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

    def _hypergradients(self, run: Run, inputs: Any, targets: Tensor) -> dict[str, float]:
        net, applied = run.net, run.applied
        params: list[Tensor] = [p for p in net.parameters() if p.requires_grad]
        weight_ids = {id(p) for p in applied.weights}
        setting = applied.setting
        was_training = net.training
        net.eval()  # no dropout draw, no batch-norm statistics moved: the hypergradient is read-only
        try:
            batch = self._val_batch(run, VAL_ROWS * len(targets))
            v_inputs, v_targets = split(batch, run.adapter)
            v_inputs, v_targets = to_device(v_inputs, run.device), v_targets.to(run.device)
            v_loss = self._loss(run, forward(net, v_inputs, run.output_fn), batch, v_inputs, v_targets, None)
            v_grad = [g if g is not None else torch.zeros_like(p)
                      for g, p in zip(torch.autograd.grad(v_loss, params, allow_unused=True), params, strict=True)]  # fmt: skip

            leaves: dict[str, Tensor] = {}
            x = inputs
            if "noise" in self.ranges and isinstance(inputs, Tensor) and inputs.is_floating_point():
                sigma = torch.tensor(float(setting.noise), device=run.device, requires_grad=True)
                generator = torch.Generator(device=run.device).manual_seed(
                    run.options.seed * 1_000_003 + run.loop.step
                )
                # Antithetic pairs: the term linear in the noise, whose mean is zero and which
                # swamps the O(sigma) signal at small sigma, cancels exactly between +xi and -xi.
                # The whole batch, twice: on half of it, the Hessian of a ridge problem with
                # 2 rows per feature was so far off that the noise settled 9% low (the
                # inverse of a sampled Hessian is biased), against 2% above with the whole batch.
                xi = torch.randn(inputs.shape, generator=generator, device=run.device, dtype=inputs.dtype)
                x, leaves["noise"] = torch.cat([inputs + sigma * xi, inputs - sigma * xi]), sigma
                targets = torch.cat([targets, targets])
            smoothing = None
            if (
                "label_smoothing" in self.ranges
                and run.loss_fn is None
                and run.source.num_classes is not None
            ):
                smoothing = torch.tensor(
                    float(setting.label_smoothing), device=run.device, requires_grad=True
                )
                leaves["label_smoothing"] = smoothing
            # a user's loss_fn gets a batch of its own form
            form: dict[str, Any] | None = {} if isinstance(x, dict) else None
            # The Hessian-vector products differentiate this twice: fused attention cannot.
            with sdpa_kernel(SDPBackend.MATH):
                t_loss = self._loss(run, forward(net, x, run.output_fn), form, x, targets, smoothing)
                t_grad = torch.autograd.grad(t_loss, params, create_graph=True, allow_unused=True)
        finally:
            net.train(was_training)

        optimizer = applied.optimizer
        metric, precondition = _metrics(optimizer, params)
        l1_ratio = float(setting.l1_ratio)
        # A knob the space holds fixed may be on a schedule: its strength now.
        strengths = {name: float(resolve(getattr(setting, name), applied.progress)) for name in PENALTY_TERMS}
        sparse = strengths["l1"] > 0 or (strengths["elastic_net"] > 0 and l1_ratio > 0)
        mask = [(p.detach() != 0).to(p.dtype) if sparse and id(p) in weight_ids else None for p in params]
        diagonal: list[Tensor | float | None] = []  # the penalties' Hessian on each parameter's diagonal
        for p, d in zip(params, metric, strict=True):
            if id(p) not in weight_ids:
                diagonal.append(None)
                continue
            term = strengths["weight_decay"] * d if strengths["weight_decay"] else None
            flat = strengths["l2"] + strengths["elastic_net"] * (1 - l1_ratio)
            diagonal.append(term + flat if term is not None else (torch.full_like(p, flat) if flat else None))

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
            hv = [
                o.detach() if o is not None else torch.zeros_like(p)
                for o, p in zip(out, params, strict=False)
            ]
            hv = [h + dg * vv if dg is not None else h for h, dg, vv in zip(hv, diagonal, v, strict=True)]
            mixed = [float(o) if o is not None else 0.0 for o in out[len(params) :]]
            return masked(hv), mixed

        rhs = masked(v_grad)
        q = masked(self._warm_q(params))  # a weight that left the support leaves q too
        hq, mixed_q = hvp(q)
        residual = [b - a for b, a in zip(rhs, hq, strict=True)]
        z = [r * c for r, c in zip(residual, precondition, strict=True)]
        direction, rz = z, float(_dot(residual, z))
        for _ in range(self.solve_steps):
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
        self.q = [t.detach() for t in q]

        grads = {name: -mixed_q[names.index(name)] for name in names}
        weights = [(p.detach(), qq, d, m) for p, qq, d, m in zip(params, q, metric, mask, strict=True)
                   if id(p) in weight_ids]  # fmt: skip
        cross = {
            "l2": lambda w, d, m: w,
            "weight_decay": lambda w, d, m: d * w,
            "l1": lambda w, d, m: w.sign() if m is None else w.sign() * m,
            "elastic_net": lambda w, d, m: l1_ratio * w.sign() + (1 - l1_ratio) * w,
        }
        for name in self.ranges:
            if name in cross:
                grads[name] = -float(sum((qq * cross[name](w, d, m)).sum() for w, qq, d, m in weights))
        return grads

    def _warm_q(self, params: list[Tensor]) -> list[Tensor]:
        q = self.q
        if (
            q is None
            or len(q) != len(params)
            or any(a.shape != p.shape for a, p in zip(q, params, strict=True))
        ):
            return [torch.zeros_like(p) for p in params]
        return [a.to(device=p.device, dtype=p.dtype) for a, p in zip(q, params, strict=True)]

    # -- resuming -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain values, and ``q`` as tensors (the checkpoint writes them as safetensors)."""
        return {
            "values": dict(self.values), "moment": dict(self.moment), "square": dict(self.square),
            "lr": self.lr, "every": self.every, "updates": self.updates, "val_index": self.val_index, "last_step": self.last_step,
            "moves": [dict(m) for m in self.moves], "q": None if self.q is None else list(self.q),
            "curves": None if self.curves is None else self.curves.state_dict(),
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``."""
        self.values = {name: float(state["values"][name]) for name in self.ranges}
        self.moment = {name: float(state["moment"][name]) for name in self.ranges}
        self.square = {name: float(state["square"][name]) for name in self.ranges}
        self.updates, self.val_index = int(state["updates"]), int(state["val_index"])
        self.lr = None if state["lr"] is None else float(state["lr"])
        self.every = None if state["every"] is None else int(state["every"])
        self.last_step = int(state["last_step"])
        self.moves = [dict(m) for m in state["moves"]]
        q = state.get("q")
        if q is not None and not (isinstance(q, list) and all(isinstance(t, Tensor) for t in q)):
            raise ValueError("q: not a list of tensors")
        self.q = None if q is None else [t.clone() for t in q]
        if self.curves is not None:
            self.curves.load_state_dict(dict(state["curves"]))


def _metrics(optimizer: Optimizer, params: list[Tensor]) -> tuple[list[Tensor | float], list[Tensor | float]]:
    """Per parameter: ``d``, weight decay's metric at the optimizer's fixed point (1 where it
    is coupled), and the preconditioner, ``1/(sqrt(v̂) + eps)`` for Adam's family, else 1."""
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
            precondition[i] = root.reciprocal()
    return metric, precondition
