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
at the floor, where one that points weaker at first would hold them (the ``online``
strategy and the callbacks start the knobs practitioners set at their recipe instead,
``recipe_start``).

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

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from regdial._checks import Described, check_int, check_range, fail
from regdial.dial.implicit import Training, check_knobs, check_outputs, hypergradients, of_loop
from regdial.dial.online import OnlineController
from regdial.dial.space import Range, Space
from regdial.setting import Regularization
from regdial.training.history import History

if TYPE_CHECKING:
    from regdial.applied import Applied
    from regdial.training.loop import Run

__all__ = ["DIFFERENTIABLE", "HypergradientController", "recipe_start"]

logger = logging.getLogger(__name__)

DIFFERENTIABLE = ("weight_decay", "l2", "l1", "elastic_net", "label_smoothing", "noise")
"""The knobs whose hypergradient this controller computes; the others go to the curves."""

BETAS = (0.9, 0.999)
STEP_COST = {"plain": 5, "noise": 8}
"""A hypergradient step's cost in training steps, with one solve step: measured 4.6-4.9 on an
MLP, 7.1-8.2 with the noise knob (``benchmarks/online_cost.py``)."""
SHARE = 1 / 3
"""``every=None`` spaces the hypergradient steps so that they cost this share of training."""
VAL_ROWS = 4
"""A validation batch holds at most this many training batches' rows."""
MIN_LR = 0.05
"""The smallest step in log-strength that ``lr=None`` picks."""
MAX_LR = math.log(10)
"""The largest: a strength moves at most tenfold a step. A run with few hypergradient steps
(4 in a 135-step fine-tuning) would otherwise take steps of 4.6 (a hundredfold), the first
of them a whole step whatever the hypergradient's size (Adam's rule), so a single noisy
sign would decide the setting; such a run says in one line that its knobs cannot cross
their ranges."""
FLOOR = 1e-3
"""A range that starts at 0 is floored at ``FLOOR * high``: in log space 0 is never reached."""


def recipe_start(space: Space) -> dict[str, float]:
    """Where the online dial starts the knobs practitioners set: ``timescale.RECIPE``'s
    strengths, inside each range (above a floored range's floor). Measured on
    ``benchmarks/online.py`` against mid-range (and weakest, for the curves' knobs) starts:
    better on five of eight tasks (digits-small 0.914 to 0.950, shifted-series 0.752 to
    0.810), the same on sparse-regression, worse on friedman (2.484 to 2.487 RMSE) and
    digits-transfer (0.927 to 0.857: dropout from the first epoch costs it 4 points)."""
    from regdial.dial.timescale import RECIPE

    return {
        name: min(max(RECIPE[name], _floor(r)), r.high) for name, r in space.knobs.items() if name in RECIPE
    }


def _floor(r: Range) -> float:
    return r.low if r.low > 0 else r.high * FLOOR


def _sliceable(batch: Any) -> bool:
    return isinstance(batch, tuple | list) and len(batch) >= 2 and all(isinstance(t, Tensor) for t in batch)


class HypergradientController:
    """Turn the differentiable knobs of ``space`` by their implicit hypergradient during
    one run (see the module docstring); the others by an ``OnlineController``.

    Pass it to ``fit(task, c.start(), controller=c)``. Args:
        every: optimizer steps between hypergradient steps. Each costs one validation
            forward/backward and ``solve_steps + 1`` Hessian-vector products on the
            training batch: with one solve step, about 5 training steps of an MLP (7-8
            with the noise knob, whose antithetic pairs pass twice the batch;
            ``benchmarks/online_cost.py``), 23-25% (35-41%) of the step at 20, the default
            (T1-T2 reported about 30%). None: ``STEP_COST / SHARE`` steps, a third of the
            training's cost (15, or 24 with the noise knob).
        lr: the step in log-strength per hypergradient step (Adam's rule); None: enough for
            the run's hypergradient steps to cross the widest range twice, in
            [``MIN_LR``, ``MAX_LR``] (set at the first hypergradient step from the run's
            length; a run too short to cross a range at ``MAX_LR`` says so in one line).
        solve_steps: conjugate-gradient iterations per hypergradient step on ``q``.
        warmup: steps before the first move (None: a quarter of the run, at least its first
            epoch; see the module docstring).
        start: the strengths to start from, of any of the space's knobs (default: a
            differentiable knob at the middle of its range on its log scale, from which the
            hypergradient can point either way; another at its weakest). ``regdial tune
            --strategy online`` and the trainers' callbacks given ``online=Space(...)``
            start the knobs of ``timescale.RECIPE`` at the recipe (weight decay 0.05,
            dropout and label smoothing 0.1; ``recipe_start``); give a callback this
            controller to start elsewhere.
        epochs_every: epochs between the curve controller's turns of the other knobs
            (default 2).
        epochs_first: the curve controller's first turn no sooner than this epoch (None:
            at ``2 * epochs_every``, its own rule); ``regdial tune --strategy online`` waits
            a quarter of the run, as the hypergradient's own ``warmup`` does.
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
        epochs_first: int | None = None,
    ) -> None:
        if not isinstance(space, Space):
            fail("space", "a regdial.Space", space)
        self.space = space
        every = None if every is None else check_int("every", every, low=1)
        self.lr = None if lr is None else check_range("lr", lr, low=0.0, high=10.0, low_open=True)
        self.solve_steps = check_int("solve_steps", solve_steps, low=0, high=100)
        self.warmup = None if warmup is None else check_int("warmup", warmup, low=0)
        epochs_first = None if epochs_first is None else check_int("epochs_first", epochs_first, low=1)
        self.ranges = {n: r for n, r in space.knobs.items() if n in DIFFERENTIABLE}
        if not self.ranges:
            fail("space", "at least one knob of " + ", ".join(DIFFERENTIABLE), repr(space))
        self.every: int = every or round(STEP_COST["noise" if "noise" in self.ranges else "plain"] / SHARE)
        others = {n: r for n, r in space.knobs.items() if n not in self.ranges}
        self.curves = (
            OnlineController(
                Space(others, space.base), every=epochs_every, start=dict(start or {}), rise_only=True,
                first=epochs_first
            )
            if others else None
        )  # fmt: skip
        self.values: dict[str, float] = {}
        for name, r in self.ranges.items():
            low, high = _floor(r), r.high
            value = (start or {}).get(name, math.sqrt(low * high))
            self.values[name] = check_range(
                f"start.{name}", value, low=low, high=high
            )  # 0 has no logarithm: the floor is the weakest start
        unknown = set(start or {}) - set(space.knobs)
        if unknown:
            fail("start", "strengths of the space's knobs (" + ", ".join(space.knobs) + ")",
                 sorted(unknown)[0])  # fmt: skip
        self.moment = dict.fromkeys(self.ranges, 0.0)
        self.square = dict.fromkeys(self.ranges, 0.0)
        self.updates = 0
        self.val_index = 0
        self.q: list[Tensor] | None = None
        self.moves: list[dict[str, Any]] = []
        self.checked = False  # the knobs against the training, at the first step
        self.horizon = 0.0  # the learning rates summed over the steps so far
        self.last_hypergradients: dict[str, float] = {}  # dV/dλ per knob at the last hypergradient step
        self.last_step = 0
        self._val_source: Any = None  # a loader of held-out batches, walked in order
        self._val_iter: Iterator[Any] | None = None
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
        """After optimizer step ``run.loop.step`` of ``fit`` on the clean batch ``(inputs, targets)``."""
        if run.distributed is not None:
            fail("controller", "a curve controller under data parallelism (the hypergradient runs on one process)",
                 type(self).__name__)  # fmt: skip
        return self.step(Training.of_run(run), inputs, targets)

    def turn(
        self,
        applied: Applied,
        inputs: Any,
        targets: Tensor,
        *,
        step: int,
        total_steps: int,
        val: Iterable[Any],
        forward: Callable[[Any, Tensor], Tensor] | None = None,
        steps_per_epoch: int | None = None,
        epoch: int = 0,
    ) -> Regularization | None:
        """Your own loop: call it after ``optimizer.step()`` number ``step`` (from 1) of
        ``total_steps``, with the clean batch ``(inputs, targets)`` just trained on and
        held-out batches ``val``. A move is applied (``applied.retune``) and the new setting
        returned; else None. ``forward(inputs, targets)`` gives the logits where calling
        the model on the inputs does not (nanoGPT: ``lambda x, y: model(x, y)[0]``).

        Only the differentiable knobs turn here; the curves' knobs (dropout, augmentation...)
        turn in ``fit`` and the trainers' callbacks, which read the learning curves::

            c = HypergradientController(Space({"weight_decay": (1e-4, 1.0)}))
            applied = Applied(c.start(), model, lambda groups: torch.optim.AdamW(groups, lr=3e-4),
                              num_classes=vocab_size)  # a classifier's (a language model's) logits
            for step, (x, y) in enumerate(batches, start=1):
                ...  # forward, applied.loss, backward, applied.optimizer.step()
                c.turn(applied, x, y, step=step, total_steps=len(batches), val=val_batches)
        """
        if not self.checked:
            self._check_own_loop(applied)
            check_outputs(applied, inputs, targets, forward)
        training = of_loop(applied, step=step, total_steps=total_steps, val=val, forward=forward,
                           steps_per_epoch=steps_per_epoch, epoch=epoch)  # fmt: skip
        turned = self.step(training, inputs, targets)
        if turned is None or turned == applied.setting:
            return None
        applied.retune(turned)
        return turned

    def _check_own_loop(self, applied: Applied) -> None:
        """At the first ``turn``: a knob it would move without effect is one line. The
        curves' knobs never move here (it held a nanoGPT's dropout at the range's start), and
        label smoothing and input noise reach training only through ``applied.loss`` and
        ``applied.batch`` (a model's own loss is not smoothed: its turns would be recorded,
        and their hypergradients taken, for a loss that never trained)."""
        if self.curves is not None:
            name = next(iter(self.curves.space.knobs))
            fail(f"online.{name}", "a knob turn() moves (" + ", ".join(DIFFERENTIABLE) + "): the curves' knobs "
                 "turn in fit and the trainers' callbacks; leave it out of the Space (its base may fix it)",
                 Described("a knob read from the learning curves"))  # fmt: skip
        for name, call in (("label_smoothing", "loss"), ("noise", "batch")):
            if name in self.ranges and not applied.calls[call]:
                fail(f"online.{name}", f"a knob your loop applies: train on applied.{call}"
                     + ("(logits, y), not the model's own loss" if call == "loss" else "(x, y)'s batch")
                     + ", or leave it out of the Space",
                     Described(f"a loop that has not called applied.{call} by the first turn"))  # fmt: skip

    def step(self, training: Training, inputs: Any, targets: Tensor) -> Regularization | None:
        """After optimizer step ``training.step`` on the clean batch ``(inputs, targets)``:
        the new setting when this step moved a strength (regdial's loop or a trainer's
        callback applies it from the next step on), else None."""
        step = training.step
        if not self.checked:
            check_knobs(training, inputs, self.ranges)
            self.checked = True
        self.last_step = step
        self.horizon += float(training.applied.optimizer.param_groups[0]["lr"])  # τ = Σ η_t, the damping's
        warmup = max(self.warmup if self.warmup is not None else self._default_warmup(training), 1)
        if step % self.every or step < warmup:
            return None
        if self.lr is None:
            updates = max(
                1, training.total_steps // self.every - (warmup - 1) // self.every
            )  # in [warmup, total]
            widest = max(math.log(r.high / _floor(r)) for r in self.ranges.values())
            wanted = 2 * widest / updates  # the run's steps cross the widest range twice
            self.lr = min(MAX_LR, max(MIN_LR, wanted))
            if updates * self.lr < widest:
                logger.warning(
                    "regdial: online: %d hypergradient steps fit in this run (%d steps, every %d after %d): "
                    "at most tenfold each, the knobs cannot cross their ranges; train longer or pass every=",
                    updates, training.total_steps, self.every, warmup,
                )  # fmt: skip
        started = time.perf_counter()
        val_batch = self._val_batch(training, VAL_ROWS * len(targets))
        if val_batch is None:  # a trainer that has not built its evaluation data yet
            return None
        grads, self.q = hypergradients(
            training, inputs, targets, val_batch, self.ranges, self.q, self.solve_steps, self.horizon
        )
        self.seconds += time.perf_counter() - started
        self.last_hypergradients = grads
        self.updates += 1
        for name, grad in grads.items():
            value = self._move(name, grad)
            if value != self.values[name]:
                self.values[name] = value
                self.moves.append({"step": step, "epoch": training.epoch + 1, "knob": name, "value": value})
        return self.space.setting(self._all_values())

    def _move(self, name: str, grad: float) -> float:
        """Knob ``name``'s strength after hypergradient ``grad`` (``dV/dλ``): Adam's rule on
        ``log λ`` (the module docstring), inside the knob's range."""
        value = self.values[name]
        if not math.isfinite(grad):
            return value
        b1, b2 = BETAS
        u_grad = grad * value  # d/d(log λ)
        self.moment[name] = b1 * self.moment[name] + (1 - b1) * u_grad
        self.square[name] = b2 * self.square[name] + (1 - b2) * u_grad * u_grad
        m_hat = self.moment[name] / (1 - b1**self.updates)
        v_hat = self.square[name] / (1 - b2**self.updates)
        if v_hat <= 0:
            return value
        assert self.lr is not None
        u = math.log(value) - self.lr * m_hat / (math.sqrt(v_hat) + 1e-12)
        r = self.ranges[name]
        return min(r.high, max(_floor(r), math.exp(u)))

    @staticmethod
    def _default_warmup(training: Training) -> int:
        """A quarter of the run's steps, at least one epoch's."""
        return max(training.steps_per_epoch, training.total_steps // 4)

    def _val_batch(self, training: Training, rows: int) -> Any:
        """The next validation batch; a long one (regdial's own, 1024 rows) in slices of
        ``rows``, so its forward/backward costs about what a few training batches cost. A
        loader is walked in order, round and round (on resuming, to the saved position)."""
        batches = training.val
        if batches is None:
            if training.val_pending:
                return None
            fail("val", "a validation split (the hypergradient's held-out batches)", None)
        if not isinstance(batches, Sequence):
            # A DataLoader draws from the global generator as it starts an iterator (its seed)
            # and, shuffled, as it walks: apart from it, the held-out walk leaves training's
            # random stream as it found it, and a resumed walk (a new iterator) does too.
            with torch.random.fork_rng(devices=[]):
                return self._next_loaded(batches)
        if self._val_slices is None:
            self._val_slices = [(i, start) for i, b in enumerate(batches)
                                for start in (range(0, len(b[1]), rows) if _sliceable(b) else [0])]  # fmt: skip
        index, start = self._val_slices[self.val_index % len(self._val_slices)]
        self.val_index += 1
        batch = batches[index]
        if not _sliceable(batch):
            return batch
        return type(batch)(t[start : start + rows] if isinstance(t, Tensor) else t for t in batch)

    def _next_loaded(self, batches: Any) -> Any:
        """A loader's next batch, walked in order, round and round (on resuming, from the
        saved position)."""
        if self._val_iter is None or self._val_source is not batches:
            self._val_source, self._val_iter = batches, iter(batches)
            position = self.val_index
            self.val_index = 0
            for _ in range(position):
                if next(self._val_iter, None) is None:
                    self._val_iter = iter(batches)
                    break
                self.val_index += 1
        batch = next(self._val_iter, None)
        if batch is None:
            self._val_iter, self.val_index = iter(batches), 0
            batch = next(self._val_iter, None)
            if batch is None:
                fail("val", "held-out batches for the hypergradient", Described("an empty loader"))
        self.val_index += 1
        return batch

    # -- resuming -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain values, and ``q`` as tensors (the checkpoint writes them as safetensors)."""
        return {
            "values": dict(self.values), "moment": dict(self.moment), "square": dict(self.square),
            "lr": self.lr, "every": self.every, "horizon": self.horizon, "updates": self.updates, "val_index": self.val_index, "last_step": self.last_step,
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
        self.every = int(state["every"])
        self.horizon = float(state.get("horizon", 0.0))
        self.last_step = int(state["last_step"])
        self.moves = [dict(m) for m in state["moves"]]
        q = state.get("q")
        if q is not None and not (isinstance(q, list) and all(isinstance(t, Tensor) for t in q)):
            raise ValueError("q: not a list of tensors")
        self.q = None if q is None else [t.clone() for t in q]
        self._val_iter = None  # a held-out loader is walked again to val_index at the next step
        if self.curves is not None:
            self.curves.load_state_dict(dict(state["curves"]))
