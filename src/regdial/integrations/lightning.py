"""regdial inside a Lightning ``Trainer``: ``LightningCallback``.

::

    from regdial.integrations.lightning import LightningCallback

    trainer = lightning.Trainer(callbacks=[LightningCallback(Regularization(dropout=0.2, weight_decay=0.05,
                                                                          ema=0.99, early_stopping=5))])

What the callback applies itself: dropout rates (modules and the float rates attention
passes to ``scaled_dot_product_attention``; refused for a module with none), weight decay
(the module's optimizer is regrouped along ``param_groups`` before its first step, with a
warning where that replaces the decay ``configure_optimizers`` gave; a setting without
weight decay leaves the module's groups as they are), the penalties as proximal steps
on the weights, max-norm, NEFTune noise on an input embedding, the weight average (used
for validation, and the final weights), early stopping on ``monitor`` with the best
weights restored, and every schedule over ``global_step / estimated_stepping_batches``.

What needs the module's own training step, because a Lightning module computes its loss
itself: label smoothing, Mixup/CutMix, input noise and augmentation. The callback gives
the module ``self.regdial`` (an ``Applied``); a ``training_step`` that uses
``x, y = self.regdial.batch(x, y)`` and ``self.regdial.loss(logits, y)`` gets them. If a
setting with those knobs meets a module that never calls them, the first training batch
ends with a one-line error rather than ignoring them.

At each validation the callback records a ``History`` row (validation values from
``trainer.callback_metrics``: ``val_loss``, ``val_acc``...; the training loss is the mean
of the training steps' losses since the previous validation), and at the end it logs the
diagnosis and writes ``regdial_history.json`` and ``regdial_report.html`` into the
trainer's log directory. Given a ``regdial.Trial``, it reports each validation instead
(the search's study and report hold every trial), and a
pruned trial stops training by raising ``optuna.TrialPruned``. Its ``state_dict`` holds the
setting in force, the average, early stopping, L2-SP's anchors, the history and the
``online`` controller, so a run resumed from a Lightning checkpoint continues them. With an
average, a checkpoint's ``state_dict`` is the average that was validated (as Lightning's
``WeightAveraging`` saves it), and the live weights the resumed run trains on are in the
callback's state.

Needs the ``lightning`` extra: ``pip install 'regdial[lightning]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regdial._checks import Described, check_int, fail
from regdial.dial.hypergradient import HypergradientController
from regdial.dial.implicit import Training, classifier_loss
from regdial.dial.space import Space
from regdial.dial.trial import Trial
from regdial.integrations._common import Session
from regdial.integrations._online import Online
from regdial.setting import Regularization
from regdial.training.batches import forward, rebuild, split
from regdial.training.history import History
from regdial.training.logs import normalize

logger = logging.getLogger(__name__)

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "regdial.integrations.lightning needs lightning: pip install 'regdial[lightning]'"
    ) from error

__all__ = ["LightningCallback"]

MODULE_KNOBS = ("label_smoothing", "mixup", "cutmix", "noise", "augment")
"""Knobs that only the module's own training step can apply (through ``self.regdial``)."""


class LightningCallback(pl.Callback):
    """Apply a ``Regularization`` to a Lightning ``Trainer`` run (see the module docstring).

    Args:
        setting: the setting to apply.
        trial: a ``regdial.Trial`` to report each validation to.
        monitor: the logged validation value early stopping watches (``val_loss``).
        num_classes: a classifier's classes, for mixing and label smoothing.
        data_kind: the inputs' kind for augmentation ("image", "signal", "tabular"),
            inferred from the batch when not given.
        online: a ``Space`` (or a ``HypergradientController`` on one) whose knobs this
            one run turns itself (``regdial.integrations._online``); ``setting`` is then
            None, the space's base holding the fixed knobs. The hypergradient reads a
            batch as ``fit`` does (``(x, y)`` or a dict with ``labels``), runs
            ``pl_module(x)`` and takes cross-entropy (``num_classes`` given) or MSE, or
            ``loss_fn(output, batch)``.
        online_data: the hypergradient's held-out batches (a DataLoader). None: the
            Trainer's validation data, from its first validation on.
        loss_fn: the module's data loss for the hypergradient, as ``fit``'s ``loss_fn``.
    """

    def __init__(
        self,
        setting: Regularization | None = None,
        trial: Trial | None = None,
        *,
        monitor: str = "val_loss",
        num_classes: int | None = None,
        data_kind: str | None = None,
        online: Space | HypergradientController | None = None,
        online_data: Iterable[Any] | None = None,
        loss_fn: Callable[[Tensor, Any], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.online, setting = Online.of(setting, trial, online, online_data)
        if loss_fn is not None and online is None:
            fail("loss_fn", "None without online= (it is the hypergradient's)", loss_fn)
        if loss_fn is not None and not callable(loss_fn):
            fail("loss_fn", "a function (output, batch) -> loss", loss_fn)
        self.loss_fn = loss_fn
        self._last_step = 0
        self._restored: dict[str, Any] | None = None  # a checkpoint's state, until the fit it resumes starts
        if not isinstance(monitor, str):
            fail("monitor", "the name of a logged validation value (val_loss, val_acc...)", monitor)
        self.session = Session(setting, trial, normalize(monitor))
        num_classes = None if num_classes is None else check_int("num_classes", num_classes, low=2)
        self.setting, self.num_classes, self.data_kind = setting, num_classes, data_kind
        self._checked = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.setting.dropout is not None:
            from regdial.blocks.noise import set_dropout

            set_dropout(pl_module, self.setting.dropout)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            fail("trainer", "one optimizer (regdial regroups it)", len(trainer.optimizers))
        if sum(isinstance(c, LightningCallback) for c in getattr(trainer, "callbacks", ())) > 1:
            fail("trainer", "one regdial callback (each would regroup the optimizer and apply its own setting)",
                 Described("two"))  # fmt: skip
        if self.session.applied is not None or self.session.ended:  # fitted before: a new run, its own record
            self.session = self.session.fresh()
            self._checked = False
        # The state of the checkpoint this fit resumes (not one a trainer.test(ckpt_path=...) loaded).
        self._restored = self._restored if trainer.ckpt_path else None
        if self._restored is not None:
            self.session.load_record(
                self._restored, "the Lightning checkpoint", same_start=self.online is None
            )
            if self.online is not None and self._restored.get("online") is not None:
                self.online.controller.load_state_dict(self._restored["online"])
                self.session.setting = self.online.controller.start()  # resumed: the saved strengths
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        if self.online is not None:
            from lightning.pytorch.utilities.model_helpers import is_overridden

            evaluates = bool(trainer.limit_val_batches) and is_overridden("validation_step", pl_module)
            self.online.check_evaluates(
                evaluates, "a Trainer that validates (a validation_step and val_dataloaders)"
            )
            self.online.say_data("the Trainer's validation data (val_dataloaders)")
            self._last_step = trainer.global_step
        spaced = () if self.online is None else self.online.controller.space.knobs
        applied = self.session.start(
            pl_module, trainer.optimizers[0], self.num_classes, self.data_kind, schedulers, spaced=spaced
        )
        object.__setattr__(pl_module, "regdial", applied)  # a plain attribute, not a submodule

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            # Lightning hands this hook the loss it backpropagates: divided by the accumulation
            # (automatic optimization), which is not the training_step's loss.
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self.session.add_train_loss(loss.detach() * scale)
        applied = self.session.applied
        if applied is None:
            return
        if not self._checked:
            self._checked = True
            spaced = () if self.online is None else self.online.controller.space.knobs  # at 0 now, may rise
            unused = [k for k in MODULE_KNOBS if getattr(self.setting, k) or k in spaced]
            calls = applied.calls
            needs_loss = [k for k in unused if k == "label_smoothing"]
            needs_batch = [k for k in unused if k != "label_smoothing"]
            if (needs_loss and not calls.get("loss")) or (needs_batch and not calls.get("batch")):
                name = (needs_batch if needs_batch and not calls.get("batch") else needs_loss)[0]
                if self.online is not None and name in self.online.controller.space.knobs:  # the Space set it
                    fail(f"online.{name}", "a knob the training_step applies: use self.regdial.batch(x, y) and "
                         f"self.regdial.loss(logits, y) there, or leave {name} out of the Space (a Lightning "
                         "module computes its own loss)", Described(f"{name} in the Space"))  # fmt: skip
                fail(f"regularization.{name}", "0, or a training_step that uses self.regdial.batch(x, y) and "
                     "self.regdial.loss(logits, y) (a Lightning module computes its own loss)",
                     getattr(self.setting, name))  # fmt: skip
        total = max(1, int(trainer.estimated_stepping_batches or 1))
        applied.set_progress(min(1.0, trainer.global_step / total))
        if self.online is not None and trainer.global_step > self._last_step:  # an optimizer step was taken
            self._last_step = trainer.global_step
            self._online_step(trainer, pl_module, batch, total)

    def _online_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, total: int
    ) -> None:
        assert self.online is not None and self.session.applied is not None
        inputs, targets = split(batch)
        val = self.online.data
        if val is None:
            val = trainer.val_dataloaders
            if isinstance(val, Mapping):
                val = next(iter(val.values()), None)
            elif isinstance(val, Sequence):
                val = val[0] if val else None
        loss_fn, num_classes = self.loss_fn, self.num_classes

        def loss(x: Any, y: Tensor, smoothing: Tensor | None, form: Any) -> Tensor:
            output = forward(pl_module, x)
            if loss_fn is not None:
                return loss_fn(output, rebuild({} if form is None and isinstance(x, dict) else form, x, y))
            if num_classes is not None:
                return classifier_loss(output, y, smoothing)
            return F.mse_loss(output.reshape(y.shape).float(), y.float())

        epochs = max(1, int(trainer.max_epochs or 1)) if (trainer.max_epochs or 0) > 0 else 1
        training = Training(
            net=pl_module, applied=self.session.applied, device=pl_module.device, step=int(trainer.global_step),
            epoch=len(self.session.history), total_steps=total, steps_per_epoch=max(1, total // epochs),
            seed=int(torch.initial_seed() % 2**31), val=val, split=split, loss=loss,
            smooths=loss_fn is None and num_classes is not None, val_pending=val is None and len(self.history) == 0,
            logits=(lambda x, y: (forward(pl_module, x), y)) if loss_fn is None and num_classes is not None else None,
        )  # fmt: skip
        self.session.retune(self.online.step(training, inputs, targets))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.session.use_average(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.session.ended:  # trainer.validate() after fit: the user's own
            return
        metrics = _first_dataloader({
            normalize(k): float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("val", "valid"))
        })  # fmt: skip
        try:
            stop = self.session.evaluated(float(trainer.current_epoch + 1), metrics, pl_module)
        finally:
            self.session.use_live(pl_module)
        if stop:
            trainer.should_stop = True
        if self.online is not None and self.session.applied is not None:
            self.session.retune(self.online.controller(self.session.history, self.session.applied))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = trainer.log_dir or trainer.default_root_dir
        if self.online is not None:
            self.online.finish(self.session.history.meta)
        self.session.finish(
            pl_module, directory if trainer.is_global_zero else None, num_classes=self.num_classes
        )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.is_global_zero:
            self.session.record_unfinished(trainer.log_dir or trainer.default_root_dir, exception)

    @property
    def history(self) -> History:
        """The run's ``History`` so far (one row per validation)."""
        return self.session.history

    def state_dict(self) -> dict[str, Any]:
        online = None if self.online is None else self.online.controller.state_dict()
        return {**self.session.state_dict(), "online": online}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The checkpoint's model is the one validated, the average where there is one (as
        Lightning's ``WeightAveraging`` saves it: ``load_from_checkpoint`` and
        ``ckpt_path="best"`` get the weights its score is of); the live weights go in the
        callback's state, from which a resumed run trains on."""
        live = self.session.swap_in_average(checkpoint.get("state_dict"), pl_module)
        if live is not None:
            ours = checkpoint.get("callbacks", {}).get(self.state_key)  # absent from a weights-only one
            if isinstance(ours, dict):
                ours["live"] = live

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict  # applied when the fit it resumes starts (on_fit_start)

    def on_train_start(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        if self._restored is not None:
            self.session.load_applied(self._restored, pl_module)
            self._restored = None  # this fit's: a later fit without a checkpoint starts afresh


_FIRST = "_dataloader_idx_0"
_SAID: set[str] = set()


def _first_dataloader(metrics: dict[str, float]) -> dict[str, float]:
    """With several val dataloaders Lightning names each one's metrics ``val_loss/dataloader_idx_0``
    and so on, and no ``val_loss``: the record (early stopping's, the online controller's)
    read NaN and said the run diverged. The first dataloader's are now the record's, under
    their plain names (the others' stay as columns of their own). Said once."""
    if "val_loss" in metrics or "val_loss" + _FIRST not in metrics:
        return metrics
    if "first" not in _SAID:
        _SAID.add("first")
        logger.warning("regdial: several val dataloaders: the record, early stopping and the online controller "
                       "read the first (val_loss/dataloader_idx_0)")  # fmt: skip
    return metrics | {k.removesuffix(_FIRST): v for k, v in metrics.items() if k.endswith(_FIRST)}
