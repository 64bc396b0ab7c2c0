"""``Applied``: a ``Regularization`` wired into a model and optimizer, for any loop.

``Applied(setting, model, optimizer)`` does everything that happens once, and gives the
few calls a training loop makes::

    applied = Applied(setting, model, lambda groups: torch.optim.AdamW(groups, lr=1e-3), num_classes=10)
    for epoch in range(epochs):
        model.train()
        for x, y in train_loader:
            x, y = applied.batch(x, y)                                 # noise, augmentation, mixing
            loss = applied.loss(model(x), y) + applied.penalty()      # smoothing, soft targets
            applied.optimizer.zero_grad(); loss.backward(); applied.optimizer.step()
        val_loss = evaluate(applied.eval_model)                       # the EMA model when on
        if applied.end_epoch(epoch + 1, epochs, val_loss):            # schedules, early stopping
            break
    applied.finish()                                                  # best weights back

Once, when it is built: parameter groups with weight decay on the weights only (for an
optimizer factory), the proximal steps of the penalties (or loss terms), the max-norm
constraint, dropout and drop-path rates, NEFTune noise on the input embeddings, the EMA.
Nothing here is needed to use one technique alone: each lives in its own module.

``fused=`` (``None``: pick) is handed to every penalty and the max-norm constraint built
here: their per-step passes as compiled kernels where those repay their compile
(``regdial.blocks.fused``). The EMA's update is ``torch._foreach_lerp_``, already one pass.

Which knob does what is ``regdial.knobs.KNOBS``'s to say; this module reads it.
``state_dict()`` holds everything that changes as training goes (the setting in force
after a ``retune``, the schedules' progress, the weight average and its warm-up count,
early stopping's counters and best weights), so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from regdial._checks import Described, check_int, check_range, fail
from regdial.blocks.augment import KINDS, Augment, EmbeddingNoise, augmentation
from regdial.blocks.averaging import EMA
from regdial.blocks.fused import check_fused
from regdial.blocks.group_lasso import GroupLasso
from regdial.blocks.groups import param_groups, transposed_weights
from regdial.blocks.l2sp import L2SP
from regdial.blocks.mixing import MixupOrCutMix
from regdial.blocks.noise import GaussianNoise, dropout_sites, set_drop_path, set_dropout
from regdial.blocks.penalties import L1, L2, ElasticNet, Penalty
from regdial.blocks.proximal import MaxNorm, attach_prox
from regdial.blocks.schedules import Schedule, Strength, resolve
from regdial.blocks.stopping import EarlyStopping
from regdial.knobs import PENALTIES, retunable
from regdial.setting import Regularization

__all__ = ["Applied", "OptimizerSpec", "infer_data_kind", "input_embedding"]

OptimizerSpec = Optimizer | Callable[[list[dict[str, Any]]], Optimizer]
"""A built optimizer, or a function of ``param_groups`` that builds one."""

logger = logging.getLogger(__name__)

_WHOLE_SETTING: ContextVar[bool] = ContextVar("regdial_whole_setting", default=False)


@contextmanager
def whole_setting() -> Iterator[None]:
    """Inside, a setting is a search trial's whole setting: its ``weight_decay=0`` means
    off, and an ``Applied`` built on an optimizer with its own decay turns that off (outside,
    0 leaves the optimizer's decay alone). The search runs each objective under it."""
    token = _WHOLE_SETTING.set(True)
    try:
        yield
    finally:
        _WHOLE_SETTING.reset(token)


def infer_data_kind(x: Tensor) -> str:
    """The augmentation kind a batch looks like: image, signal, tabular or tokens."""
    if not x.is_floating_point():
        return "tokens"
    return {4: "image", 3: "signal", 2: "tabular"}.get(x.dim(), "tabular")


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input embedding: Hugging Face's ``get_input_embeddings()``, else its
    first ``nn.Embedding``; None when it has none."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Module):
            return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _make_penalty(
    name: str, strength: Strength, setting: Regularization, model: nn.Module, fused: bool | None
) -> Penalty:
    if name == "l1":
        return L1(strength, fused=fused)
    if name == "l2":
        return L2(strength, fused=fused)
    if name == "elastic_net":
        return ElasticNet(strength, l1_ratio=setting.l1_ratio, fused=fused)
    if name == "group_lasso":
        return GroupLasso(strength, groups=setting.groups, transposed=transposed_weights(model))
    return L2SP(strength, model, fused=fused)


class Applied:
    """The live side of a setting: hooks installed, helpers for the loop. See the module."""

    def __init__(
        self,
        setting: Regularization,
        model: nn.Module,
        optimizer: OptimizerSpec,
        *,
        num_classes: int | None = None,
        data_kind: str | None = None,
        augment_options: Mapping[str, Any] | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
        fused: bool | None = None,
    ) -> None:
        if not isinstance(setting, Regularization):
            fail("setting", "a regdial.Regularization", setting)
        if not isinstance(model, nn.Module):
            fail("model", "an nn.Module", model)
        self.setting, self.model = setting, model
        self.fused = check_fused("fused", fused)
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes, low=2)
        if data_kind is not None and data_kind not in KINDS:
            fail("data_kind", "one of " + ", ".join(map(repr, KINDS)), data_kind)
        self.data_kind = data_kind
        self._augment_options = dict(augment_options or {})
        self.handles: list[RemovableHandle] = []
        self.progress = 0.0
        self.calls = {"batch": 0, "loss": 0}  # lets a trainer callback check that a loop uses them

        initial_decay = resolve(setting.weight_decay, 0.0)
        groups = param_groups(model, initial_decay, exclude=setting.exclude, include=setting.include)
        self.weights = [p for g in groups if g["regularize"] for p in g["params"]]
        if isinstance(optimizer, Optimizer):
            self.optimizer = optimizer
            if initial_decay or isinstance(setting.weight_decay, Schedule):
                self._set_weight_decay(initial_decay, strict=True)
            elif _WHOLE_SETTING.get():
                self._turn_off_own_decay()
        elif callable(optimizer):
            self.optimizer = optimizer(groups)
            if not isinstance(self.optimizer, Optimizer):
                fail(
                    "optimizer",
                    "a torch optimizer or a function of param groups returning one",
                    self.optimizer,
                )
        else:
            fail("optimizer", "a torch optimizer or a function of param groups returning one", optimizer)

        self._penalty_by_knob: dict[str, Penalty] = {}
        for name in PENALTIES:
            self._turn_penalty(name, getattr(setting, name))
        if self.weights and setting.max_norm > 0:
            cap = MaxNorm(setting.max_norm, fused=self.fused, transposed=transposed_weights(model))
            self.handles.append(attach_prox(self.optimizer, cap, params=self.weights, model=model))

        self._set_rates(0.0)
        self.embedding_noise: EmbeddingNoise | None = None
        self._turn_embedding_noise(setting.embedding_noise)
        self.ema: EMA | None = None
        if setting.ema > 0:
            self.ema = EMA(model, decay=setting.ema, warmup=True)
            self.handles.append(self.ema.attach(self.optimizer, model))
        self.early_stopping: EarlyStopping | None = None
        if setting.early_stopping > 0:
            self.early_stopping = EarlyStopping(
                patience=setting.early_stopping, min_delta=setting.min_delta, mode=mode, monitor=monitor
            )
        self.noise = GaussianNoise(setting.noise) if setting.noise > 0 else None
        self.mixer = self._mixer(setting)
        self.augment: Augment | None = None

    @property
    def penalties(self) -> list[Penalty]:
        """The penalties in use (strength may be 0 after a retune)."""
        return list(self._penalty_by_knob.values())

    def _turn_penalty(self, name: str, strength: Strength) -> None:
        """Set a penalty's strength, creating (and attaching) it the first time it is on."""
        penalty = self._penalty_by_knob.get(name)
        if penalty is not None:
            penalty.strength = strength
            penalty.set_progress(self.progress)
            return
        if not strength:
            return
        made = _make_penalty(name, strength, self.setting, self.model, self.fused)
        made.set_progress(self.progress)
        self._penalty_by_knob[name] = made
        if self.weights and self.setting.penalties_in == "prox":
            # A model that is one linear layer is convex: the exact prox from the first step,
            # as the lasso; a network gets attach_prox's warm-up (see regdial.blocks.proximal).
            warmup = 0 if _is_linear(self.model) else None
            self.handles.append(
                attach_prox(self.optimizer, made, params=self.weights, model=self.model, warmup=warmup)
            )  # the model: its names in the log, its (in, out) weights' units

    def _turn_embedding_noise(self, alpha: float) -> None:
        if self.embedding_noise is not None:
            self.embedding_noise.max_alpha = alpha
            return
        if not alpha:
            return
        embedding = input_embedding(self.model)
        if embedding is None:
            fail(
                "regularization.embedding_noise",
                "0 for a model without an input embedding (nn.Embedding or get_input_embeddings())",
                alpha,
            )
        self.embedding_noise = EmbeddingNoise(1.0, max_alpha=alpha)
        self.handles.append(self.embedding_noise.attach(embedding))

    def _mixer(self, setting: Regularization) -> MixupOrCutMix | None:
        if setting.mixup > 0 or setting.cutmix > 0:
            return MixupOrCutMix(setting.mixup, setting.cutmix, num_classes=self.num_classes)
        return None

    def _set_weight_decay(self, value: float, strict: bool = False) -> None:
        marked = [g for g in self.optimizer.param_groups if "regularize" in g]
        if not marked and strict:
            fail(
                "optimizer",
                "built from regdial.param_groups(...) (or pass a factory) when weight_decay is set",
                Described("an optimizer whose groups do not say which parameters are weights"),
            )
        for group in marked:
            if group["regularize"]:
                group["weight_decay"] = value

    def _turn_off_own_decay(self) -> None:
        """A search trial's weight decay 0 is off (the unregularized baseline's, a trial
        without the knob): a decay the optimizer was built with would train where the
        trial's record says 0. Its groups marked by ``param_groups`` lose it on the
        weights; an optimizer without marks, on every group (it cannot tell the weights)."""
        marked = [g for g in self.optimizer.param_groups if "regularize" in g]
        groups = [g for g in marked if g["regularize"]] if marked else self.optimizer.param_groups
        own = sorted({float(g.get("weight_decay", 0.0)) for g in groups} - {0.0})
        if own:
            logger.warning("regdial: a search trial's weight_decay=0 turns the optimizer's own (%s) off%s",
                           ", ".join(f"{v:g}" for v in own),
                           "" if marked else " in every group (build it from regdial.param_groups to spare "
                           "biases and norms, or pass a factory)")  # fmt: skip
        for group in groups:
            group["weight_decay"] = 0.0

    def _set_rates(self, progress: float) -> None:
        s = self.setting
        if s.dropout is not None:
            changed = set_dropout(self.model, s.dropout, progress=progress)
            if (
                progress == 0.0
                and resolve(s.dropout, 0.0) > 0
                and not changed
                and not dropout_sites(self.model)
            ):
                logger.warning("dropout=%s: the model has no dropout layers to set", s.dropout)
        if s.drop_path is not None:
            set_drop_path(self.model, s.drop_path, progress=progress)

    # -- in the loop ------------------------------------------------------------------

    def batch(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """A training batch through input noise, augmentation and Mixup/CutMix.

        Returns the inputs and targets to train on: soft targets (class probabilities)
        when mixing is on, else the targets as given.
        """
        self.calls["batch"] += 1
        if self.setting.augment:
            x = self._augmenter(x)(x)
        if self.noise is not None:
            if not x.is_floating_point():
                fail("regularization.noise", "0 for integer inputs (token ids)", self.setting.noise)
            x = self.noise.train()(x)
        if self.mixer is not None:
            if not x.is_floating_point():
                fail("regularization.mixup/cutmix", "0 for integer inputs (token ids)", Described("on"))
            if self.setting.cutmix > 0 and x.dim() not in (3, 4):
                fail(
                    "regularization.cutmix",
                    "0 for inputs that are not sequences or images",
                    self.setting.cutmix,
                )
            x, targets = self.mixer(x, targets)
        return x, targets

    def _augmenter(self, x: Tensor) -> Augment:
        if self.augment is None:
            kind = self.data_kind or infer_data_kind(x)
            self.augment = augmentation(kind, self.setting.augment, **self._augment_options)
            self.augment.set_progress(self.progress)
        return self.augment.train()

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy with label smoothing (labels or soft targets) for classification,
        mean squared error for regression (no ``num_classes``).

        Token-level logits ``(N, L, C)`` with labels ``(N, L)`` are scored per token, and
        label -100 (Hugging Face's padding) is ignored.
        """
        self.calls["loss"] += 1
        if self.num_classes is None:
            if output.numel() != targets.numel():
                fail(
                    "num_classes",
                    "the number of classes for a classifier (one output per sample means regression)",
                    Described(f"None with outputs of shape {tuple(output.shape)}"),
                )
            if self.setting.label_smoothing:  # it would be recorded as trained, and do nothing
                fail("regularization.label_smoothing", "0 for regression (the mean squared error has no "
                     "labels to smooth; give num_classes for a classifier)", self.setting.label_smoothing)  # fmt: skip
            return F.mse_loss(output.reshape(targets.shape), targets.to(output.dtype))
        if output.dim() == 3 and targets.dim() == 2 and output.shape[:2] == targets.shape:
            output, targets = output.reshape(-1, output.shape[-1]), targets.reshape(-1)
        try:
            return F.cross_entropy(
                output, targets, label_smoothing=self.setting.label_smoothing, ignore_index=-100
            )
        except IndexError:  # the CPU's "Target -1 is out of bounds" (CUDA asserts in the kernel)
            classes = output.shape[-1] if output.dim() > 1 else 0
            outside = targets[(targets != -100) & ((targets < 0) | (targets >= classes))]
            if not targets.dtype.is_floating_point and outside.numel():
                fail("targets", f"class ids in [0, {classes}) or -100 (ignored; nanoGPT's -1: map it, "
                     "y[y == -1] = -100)", int(outside[0]))  # fmt: skip
            raise

    def penalty(self) -> Tensor:
        """The penalties' values when they go in the loss (``penalties_in="loss"``), else 0."""
        device = self.weights[0].device if self.weights else torch.device("cpu")
        total = torch.zeros((), device=device)
        if self.setting.penalties_in != "loss" or not self.weights:
            return total
        for penalty in self.penalties:
            total = total + penalty.value(self.weights)
        return total

    @property
    def eval_model(self) -> nn.Module:
        """The model to evaluate: the weight average when EMA is on, else the model. The
        average is in the model's mode: after ``model.eval()`` it is in eval mode too (it
        stayed in training mode, so its dropout and BatchNorm's batch statistics stayed on)."""
        if self.ema is None:
            return self.model
        average: nn.Module = self.ema.module
        if average.training != self.model.training:
            average.train(self.model.training)
        return average

    def set_progress(self, progress: float) -> None:
        """Move every schedule (strengths, rates, weight decay, augmentation) to ``progress``."""
        self.progress = check_range("progress", progress, low=0.0, high=1.0)
        for penalty in self.penalties:
            penalty.set_progress(self.progress)
        if self.augment is not None:
            self.augment.set_progress(self.progress)
        if isinstance(self.setting.weight_decay, Schedule):
            self._set_weight_decay(resolve(self.setting.weight_decay, self.progress))
        self._set_rates(self.progress)

    def end_epoch(
        self, epoch: int, epochs: int, val_metric: float | None = None, *, tiebreak: float | None = None
    ) -> bool:
        """After epoch ``epoch`` of ``epochs``: move the schedules; True if early stopping says stop.

        ``val_metric`` (the monitored value, in the ``mode`` given at construction) feeds
        early stopping when it is on; the model whose weights it keeps is ``eval_model``.
        ``tiebreak`` (lower is better: the validation loss beside an accuracy) decides an
        exact tie with the best epoch (``EarlyStopping.step``).
        """
        epoch = check_int("epoch", epoch, low=1)
        epochs = check_int("epochs", epochs, low=epoch)
        self.set_progress(epoch / epochs)
        if self.early_stopping is not None and val_metric is not None:
            return self.early_stopping.step(val_metric, self.eval_model, tiebreak=tiebreak)
        return False

    def finish(self, *, check_applied: bool = True) -> bool:
        """End of training: put early stopping's best weights back; True if it did. A knob
        the loop never applied (label smoothing without ``loss``, noise, mixing or
        augmentation without ``batch``) is said in one line: it did not train (``fit``, whose
        loop applies them, passes ``check_applied=False``: a run resumed at its end trains
        no batch)."""
        s = self.setting
        unapplied = [k for k, call in (("label_smoothing", "loss"), ("noise", "batch"), ("mixup", "batch"),
                                       ("cutmix", "batch"), ("augment", "batch"))
                     if check_applied and getattr(s, k) and not self.calls[call]]  # fmt: skip
        if unapplied:
            logger.warning("regdial: %s did not train: the loop never called applied.%s", ", ".join(
                f"{k}={getattr(s, k)}" for k in unapplied), " or applied.".join(sorted(
                {"loss" if k == "label_smoothing" else "batch" for k in unapplied})))  # fmt: skip
        if self.early_stopping is None:
            return False
        return self.early_stopping.restore(self.eval_model)

    def retune(self, setting: Regularization) -> None:
        """Turn knobs during training: strengths, rates, smoothing, mixing, noise, augmentation.

        What was built at the start stays: the knobs that ``regdial.knobs`` marks as not
        retunable (``ema``, ``early_stopping``, ``max_norm``, ``l1_ratio``) and the options
        ``groups``, ``penalties_in``, ``exclude``, ``include``, ``min_delta``; a change to
        one is an InputError naming it. ``l2sp`` turns while it was on at the start: its
        anchor is the weights at that time, which a later start would not have.
        """
        if not isinstance(setting, Regularization):
            fail("setting", "a regdial.Regularization", setting)
        if setting.l2sp and "l2sp" not in self._penalty_by_knob:
            fail("regularization.l2sp", "0 during training when it was off at the start (its anchor is "
                 "the weights at apply time)", setting.l2sp)  # fmt: skip
        for name in setting.names():
            if not retunable(name) and getattr(setting, name) != getattr(self.setting, name):
                fail(
                    f"regularization.{name}",
                    f"unchanged during training ({getattr(self.setting, name)!r})",
                    getattr(setting, name),
                )
        self.setting = setting
        self._set_weight_decay(resolve(setting.weight_decay, self.progress))
        for name in PENALTIES:
            self._turn_penalty(name, getattr(setting, name))
        self._set_rates(self.progress)
        self._turn_embedding_noise(setting.embedding_noise)
        self.noise = GaussianNoise(setting.noise) if setting.noise > 0 else None
        self.mixer = self._mixer(setting)
        if self.augment is not None:
            self.augment.strength = setting.augment

    # -- resuming ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes during training: the setting in force, the schedules'
        progress, the weight average (with its update count), early stopping, and L2-SP's
        anchors (a run resumed in a trainer starts from its trained weights, not its anchor)."""
        l2sp = self._penalty_by_knob.get("l2sp")
        return {
            "setting": self.setting.to_dict(),
            "progress": self.progress,
            "ema": None if self.ema is None else self.ema.state_dict(),
            "early_stopping": None if self.early_stopping is None else self.early_stopping.state_dict(),
            "l2sp_anchors": l2sp.anchors(self.model) if isinstance(l2sp, L2SP) else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``: the same setting, schedules, average and counters."""
        in_force = type(self.setting).from_dict(state["setting"])
        if in_force != self.setting:
            self.retune(in_force)
        self.set_progress(float(state["progress"]))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.early_stopping is not None and state.get("early_stopping") is not None:
            self.early_stopping.load_state_dict(state["early_stopping"])
        l2sp = self._penalty_by_knob.get("l2sp")
        if isinstance(l2sp, L2SP) and state.get("l2sp_anchors") is not None:
            l2sp.load_anchors(self.model, state["l2sp_anchors"])

    def remove(self) -> None:
        """Detach every hook this setting installed (proximal steps, EMA updates, noise)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __repr__(self) -> str:
        return f"Applied({self.setting!r}, optimizer={type(self.optimizer).__name__})"


def _is_linear(model: nn.Module) -> bool:
    """Whether the model's only parameters are those of one ``nn.Linear`` (a convex problem)."""
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    return len(owners) == 1 and isinstance(owners[0], nn.Linear)
