"""regdial inside Hugging Face's ``Trainer``: ``HuggingFaceCallback``, and ``hp_space`` for its search.

::

    from regdial.integrations.huggingface import HuggingFaceCallback

    setting = Regularization(dropout=0.1, weight_decay=0.01, l1=1e-6, label_smoothing=0.1,
                             embedding_noise=5.0, early_stopping=3, ema=0.999)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=..., eval_dataset=...,
                                   callbacks=[HuggingFaceCallback(setting)])

Every knob of the setting is applied, or refused with one line (never silently ignored):

===============  ==============================================================================
knob             how it reaches the Trainer
===============  ==============================================================================
dropout          the model's dropout modules, the float rates its attention passes to
                 ``scaled_dot_product_attention`` (``attention_dropout``, ``dropout``), and its
                 ``config`` (a saved model reloads with it); refused for a model with none
weight_decay     the Trainer's optimizer, regrouped along ``param_groups`` (biases, norms and
                 embeddings spared) before its first step; a warning where it replaces
                 ``TrainingArguments.weight_decay``. Unset (0), the Trainer's own decay stays
l1 ... l2sp      proximal steps after every optimizer step, on the weights only (``attach_prox``
                 with ``model=``); max_norm likewise
label_smoothing  transformers' own ``LabelSmoother`` on the model's output in training, with
                 the labels shifted exactly for the models the Trainer's own smoother shifts
                 (its ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; seq2seq models and classifiers
                 are not shifted); ``causal_lm=`` says it for a model transformers does not
                 know. The Trainer's ``label_smoothing_factor`` must then be 0: one place decides
embedding_noise  NEFTune noise on the input embeddings (the Trainer's ``neftune_noise_alpha``
                 must then be unset)
noise, mixup,    on the float input the batch passes (``pixel_values``, ``input_values``,
cutmix, augment  ``inputs_embeds``, ``input_features``), in a hook on the model's forward;
                 refused for token ids
ema              the average is evaluated at each evaluation, saved in each checkpoint, and is the
                 final model (with ``load_best_model_at_end``: the best checkpoint's, which the
                 Trainer loads and which stays)
early_stopping   on the evaluation's ``monitor`` (``eval_loss``); the best weights are restored
                 (with ``load_best_model_at_end``, the Trainer's best checkpoint is what stays)
schedules        every strength follows ``global_step / max_steps``
===============  ==============================================================================

A LoRA (``peft``) model works as any other: the frozen base gets no decay, no proximal
step, no L2-SP anchor and no averaged copy (the EMA shares it); the dropout knob sets the
adapters' ``lora_dropout`` with the base's dropout (peft builds no dropout module when
``lora_dropout=0``: then only the base's follow); L2-SP pulls the adapters toward where
they started, which for ``lora_B`` (zero at the start) is plain L2.

Each ``train()`` starts afresh: under ``Trainer.hyperparameter_search`` every trial gets a
new record and early-stopping counter, and the callback applies the trial's
``label_smoothing_factor`` and ``neftune_noise_alpha`` (the Trainer reads them only when it
is built) as its label smoothing and embedding noise; see ``hp_space``.

``train(resume_from_checkpoint=...)`` continues as if the run had never stopped (the same
weights to the bit, where the Trainer evaluates before it saves). Each checkpoint gets a
``regdial/`` folder (safetensors and JSON) with the record, early stopping, the average,
L2-SP's anchors, the live weights (the Trainer saves the model it evaluated: the average)
and the ``online`` controller; the optimizer and scheduler are saved in the groups the
Trainer built (``AsBuilt``), which its new optimizer loads before the callback regroups it.
A checkpoint without that folder resumes with one warning (its record starts afresh);
``online`` refuses it in one line.

At each evaluation the callback records a ``History`` row (the training loss: the mean of
the batches' since the previous evaluation) and writes ``regdial_history.json`` so far,
status ``unfinished`` (the Trainer tells callbacks of no Ctrl-C or error); at the end it
logs the diagnosis and writes the whole record and ``regdial_report.html`` into the output
directory. Given a ``regdial.Trial`` (an objective of ``regdial.tune``), it reports each
evaluation instead, and a pruned trial stops training by raising ``optuna.TrialPruned``.

Needs the ``huggingface`` extra: ``pip install 'regdial[huggingface]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sized
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from regdial._checks import Described, check_int, fail
from regdial.blocks.mixing import soft_cross_entropy
from regdial.dial.hypergradient import HypergradientController
from regdial.dial.implicit import Training
from regdial.dial.space import Space
from regdial.dial.trial import Trial
from regdial.integrations._common import Session, unwrap
from regdial.integrations._hp_space import BUILT_ARGUMENTS, TRAINING_ARGUMENTS, suggester
from regdial.integrations._online import Online, smoothed
from regdial.integrations._resume import (
    STATE_DIR,
    AsBuilt,
    Patched,
    evaluation_loader,
    resume_online,
    resume_record,
    save_state,
    saved_state,
)
from regdial.integrations._transformers import labelled, one_dataset, shifts_labels, trial_setting
from regdial.setting import Regularization
from regdial.training.logs import normalize

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "regdial.integrations.huggingface needs transformers: pip install 'regdial[huggingface]'"
    ) from error

__all__ = ["FLOAT_INPUTS", "STATE_DIR", "TRAINING_ARGUMENTS", "HuggingFaceCallback", "hp_space"]

logger = logging.getLogger("regdial.integrations")

FLOAT_INPUTS = ("pixel_values", "input_values", "inputs_embeds", "input_features")
"""The model inputs that batch-level knobs (noise, mixup, cutmix, augment) act on."""

BATCH_KNOBS = ("noise", "mixup", "cutmix", "augment")


class HuggingFaceCallback(TrainerCallback):
    """Apply a ``Regularization`` to a Hugging Face ``Trainer`` run (see the module docstring).

    Args:
        setting: the setting to apply.
        trial: a ``regdial.Trial`` to report each evaluation to (the objective form of
            ``regdial.tune``).
        monitor: the evaluation metric early stopping watches (``eval_loss``, or
            ``eval_accuracy`` and the like).
        num_classes: for mixing and label smoothing of a classifier (default: the
            config's ``num_labels``).
        causal_lm: whether label smoothing shifts the labels by one (a causal language
            model). None: as transformers' Trainer decides (its causal-LM mapping); give it
            for a model transformers does not know that returns token-level logits.
        online: a ``Space`` (or a ``HypergradientController`` on one) whose knobs this
            one run turns itself (``regdial.integrations._online``); ``setting`` is then
            None, the space's base holding the fixed knobs. The hypergradient's loss is
            the model's own (``model(**inputs, labels=labels).loss``), label-smoothed as
            transformers' ``LabelSmoother`` smooths it.
        online_data: the held-out batches of the hypergradient (a DataLoader of the
            Trainer's batch form, on any device). None: the Trainer's evaluation data,
            from its first evaluation on (no hypergradient step before it).
    """

    def __init__(
        self,
        setting: Regularization | None = None,
        trial: Trial | None = None,
        *,
        monitor: str = "eval_loss",
        num_classes: int | None = None,
        causal_lm: bool | None = None,
        online: Space | HypergradientController | None = None,
        online_data: Iterable[Any] | None = None,
    ) -> None:
        self.online, setting = Online.of(setting, trial, online, online_data)
        if not isinstance(monitor, str):
            fail("monitor", "the name of an evaluation metric (eval_loss, eval_accuracy...)", monitor)
        self.session = Session(setting, trial, normalize(monitor))
        self.setting = setting
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes, low=2)
        if causal_lm is not None and not isinstance(causal_lm, bool):
            fail("causal_lm", "True, False or None (ask transformers)", causal_lm)
        self.causal_lm = causal_lm
        self._hooks: list[RemovableHandle | Patched] = []
        self._soft: Tensor | None = None
        self._max_steps = 1
        self._built: dict[str, Any] = {}  # the TrainingArguments the Trainer read when it was built
        self._shift: bool | None = None
        self._eval_loader: Any = None  # the Trainer's evaluation loader, made at the run's start
        self._checked_inputs = False
        self._eval_name: str | None = None  # of eval_dataset's datasets (a dict), the one the record reads
        self._batch: dict[str, Any] | None = None  # the last training batch's clean inputs, for online
        self._after: tuple[AsBuilt, RemovableHandle] | None = None  # the regrouping, after training
        self._step_loss: Tensor | None = None  # an accumulated step's loss, its micro-batches' shares summed

    # -- before training ----------------------------------------------------------------

    def on_init_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        s = self.setting
        for knob, argument in (
            ("label_smoothing", "label_smoothing_factor"),
            ("embedding_noise", "neftune_noise_alpha"),
        ):
            given = getattr(args, argument, None)
            if not getattr(s, knob) or not given:
                continue
            if self.online is not None and knob in self.online.controller.space.knobs:  # the Space set it
                fail(f"online.{knob}", f"a knob the Trainer does not also set (one place decides): leave {knob} "
                     f"out of the Space, or TrainingArguments.{argument} unset",
                     Described(f"{knob} in the Space and {argument}={given}"))  # fmt: skip
            fail(f"regularization.{knob}", f"0 when TrainingArguments.{argument} is set (one place decides; the "
                 "Trainer's is already on)", getattr(s, knob))  # fmt: skip
        self._built = {name: getattr(args, name, None) for name in BUILT_ARGUMENTS}
        if model is not None and s.dropout is not None:
            from regdial.blocks.noise import set_dropout
            from regdial.integrations._common import resolve_float, set_config_dropout

            set_dropout(model, s.dropout)  # now, so that a model saved before training has it too
            set_config_dropout(model, resolve_float(s.dropout))

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None or optimizer is None:
            fail("trainer", "a Trainer that passes its model and optimizer to callbacks", Described("none"))
        other = getattr(model, "_regdial_callback", None)
        if other is not None and other is not self:
            fail("trainer", "one regdial callback (each would regroup the optimizer and apply its own setting)",
                 Described("two on the same model"))  # fmt: skip
        object.__setattr__(model, "_regdial_callback", self)
        if self._after is not None:  # trained before: that optimizer, if it is this one, as it was built
            previous, handle = self._after
            handle.remove()
            if previous.optimizer is unwrap(
                optimizer
            ):  # a new Trainer, or a search's next trial, built its own
                previous.restore()
            self._after = None
        resumed = state.global_step > 0
        saved = saved_state(args, state) if resumed else None
        if self.online is not None:
            strategy = getattr(args, "eval_strategy", "no")
            evaluates = getattr(strategy, "value", strategy) != "no"
            self.online.check_evaluates(
                evaluates, "a Trainer that evaluates (eval_strategy 'steps' or 'epoch', with an eval_dataset)"
            )
            self.online.say_data("the Trainer's evaluation data (eval_dataset)")
            self._eval_loader = evaluation_loader() if self.online.data is None else None
            if resumed:
                resume_online(self.online, saved, state.global_step, waits=self._eval_loader is None)
            self.setting = self.online.start()  # resumed: the strengths it saved
        # A new run (a search's next trial): its own setting, record and early stopping.
        self.session = self.session.fresh(trial_setting(self.setting, self._built, args))
        if resumed:
            resume_record(self.session, saved, state.global_step, online=self.online is not None)
        setting = self.session.setting
        config = getattr(model, "config", None)
        num_classes = self.num_classes or getattr(config, "num_labels", None)
        num_classes = num_classes if isinstance(num_classes, int) and num_classes > 1 else None
        if (setting.mixup or setting.cutmix) and num_classes is None:
            fail(
                "num_classes", "the number of classes for mixing (HuggingFaceCallback(num_classes=...))", None
            )
        self._main_input = getattr(model, "main_input_name", "input_ids")
        kind = {"pixel_values": "image", "input_values": "signal"}.get(self._main_input)
        spaced = () if self.online is None else self.online.controller.space.knobs
        self.session.start(model, optimizer, num_classes, kind, [kwargs.get("lr_scheduler")], resumed=resumed,
                           spaced=spaced)  # fmt: skip
        built = self.session.built
        if built is not None:  # saved as the Trainer built them, so that a resumed run loads them
            self._hooks.append(built.optimizer.register_state_dict_post_hook(built))
            self._hooks.extend(built.save_schedulers())
        if saved is not None:
            self.session.load_applied(saved, model)
        self._max_steps = max(1, int(getattr(state, "max_steps", 0) or 1))
        self._hooks.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._after_forward, with_kwargs=True))
        self._shift = self.causal_lm if self.causal_lm is not None else shifts_labels(model)
        self._checked_inputs, self._eval_name = False, None

    # -- the model's forward, in training -------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        applied = self.session.applied
        if applied is None or not module.training:
            return None
        if self.online is not None:
            self._batch = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
        active = [k for k in BATCH_KNOBS if getattr(applied.setting, k)]
        spaced = [] if self._checked_inputs or self.online is None else [  # a Space's knob at 0 now may rise
            k for k in BATCH_KNOBS if k in self.online.controller.space.knobs]  # fmt: skip
        self._checked_inputs = True
        if not active and not spaced:
            return None
        name = next((k for k in FLOAT_INPUTS if isinstance(kwargs.get(k), Tensor)), None)
        if name is None or not kwargs[name].is_floating_point():
            given = name or next(
                (k for k, v in kwargs.items() if isinstance(v, Tensor) and k != "labels"), self._main_input
            )
            knob = (active or spaced)[0]
            if self.online is not None and knob in self.online.controller.space.knobs:  # the Space set it
                fail(f"online.{knob}", f"a knob of a model whose inputs are floats, not {given} (token ids: "
                     f"nothing to add noise to or mix): leave {knob} out of the Space, or use embedding_noise",
                     Described(f"{knob} in the Space"))  # fmt: skip
            fail(f"regularization.{knob}", f"0 for a model whose inputs are {given} (token ids: there is "
                 "nothing to add noise to or mix; use embedding_noise)", getattr(applied.setting, knob))  # fmt: skip
        if not active:
            return None
        x = kwargs[name]
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor):
            mixed, targets = applied.batch(x, labels)
            kwargs[name] = mixed
            self._soft = targets if targets.is_floating_point() and targets.dim() == 2 else None
            return args, kwargs
        return None

    def _after_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if not module.training or self.session.applied is None:
            return output
        labels, logits = kwargs.get("labels"), getattr(output, "logits", None)
        smoothing = float(self.session.applied.setting.label_smoothing)
        if (
            isinstance(logits, Tensor)
            and isinstance(labels, Tensor)
            and (smoothing or self._soft is not None)
        ):
            if self._soft is not None:
                output["loss"] = soft_cross_entropy(logits.float(), self._soft, label_smoothing=smoothing)
                self._soft = None
            elif not labels.is_floating_point():
                from transformers.trainer_pt_utils import LabelSmoother

                if self._shift is None and logits.dim() > 2:
                    fail("causal_lm", "True or False for a model transformers does not know (token-level logits: "
                         "shift the labels by one for label smoothing, or not?)", None)  # fmt: skip
                output["loss"] = LabelSmoother(epsilon=smoothing)(
                    output,
                    labels,
                    shift_labels=bool(self._shift),
                    num_items_in_batch=kwargs.get("num_items_in_batch"),
                )
        loss = output.get("loss") if hasattr(output, "get") else None
        if isinstance(loss, Tensor) and kwargs.get("num_items_in_batch") is not None:
            # Each micro-batch's loss is its share of the accumulated batch's (its sum over the
            # whole batch's items): summed over the step, recorded once at its end.
            self._step_loss = loss.detach() + (0.0 if self._step_loss is None else self._step_loss)
        elif isinstance(loss, Tensor):
            self.session.add_train_loss(loss.detach())
        return output

    # -- during training --------------------------------------------------------------------

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if self._step_loss is not None:
            self.session.add_train_loss(self._step_loss)
            self._step_loss = None
        applied = self.session.applied
        if applied is not None:
            applied.set_progress(min(1.0, state.global_step / self._max_steps))
            if self.online is not None and model is not None and self._batch is not None:
                self._online_step(args, state, model, kwargs)
        if model is not None and (control.should_evaluate or control.should_save):
            self.session.use_average(model)

    def _online_step(self, args: Any, state: Any, model: nn.Module, kwargs: dict[str, Any]) -> None:
        assert self.online is not None and self.session.applied is not None and self._batch is not None
        batch = self._batch
        self._batch = None
        if "labels" not in batch:
            fail("online", "a Trainer whose batches have labels (the hypergradient's loss is the model's own)",
                 Described(f"keys {sorted(batch)[:6]}"))  # fmt: skip
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets: Tensor = batch["labels"]
        loader = kwargs.get("train_dataloader")
        accumulation = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        epochs = max(1.0, float(getattr(args, "num_train_epochs", 1) or 1))
        per_epoch = (
            len(loader) // accumulation if isinstance(loader, Sized) else int(self._max_steps / epochs)
        )
        val = next(
            (
                v
                for v in (self.online.data, self._eval_loader, kwargs.get("eval_dataloader"))
                if v is not None
            ),
            None,
        )
        shift = bool(self._shift)

        def loss(x: Any, y: Tensor, smoothing: Tensor | None, _: Any) -> Tensor:
            output = model(**x, labels=y)
            return smoothed(output["loss"], output["logits"], y, smoothing, shift)

        def logits(x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
            # With the labels: a seq2seq model builds its decoder inputs from them, and its
            # logits then line up with them; a causal LM's are every position's, shifted here.
            z = model(**x, labels=y)["logits"]
            return (z[..., :-1, :], y[..., 1:]) if shift else (z, y)

        training = Training(
            net=model, applied=self.session.applied, device=targets.device, step=int(state.global_step),
            epoch=len(self.session.history), total_steps=self._max_steps, steps_per_epoch=max(1, per_epoch),
            seed=int(getattr(args, "seed", 0)), val=val, split=labelled, loss=loss,
            smooths=not targets.is_floating_point(), val_pending=val is None,
            logits=None if targets.is_floating_point() else logits,
        )  # fmt: skip
        self.session.retune(self.online.step(training, inputs, targets))

    def on_epoch_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is not None and control.should_evaluate:
            self.session.use_average(model)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        if model is None or self.session.ended:  # trainer.evaluate() after training: the user's own
            return
        named, self._eval_name = one_dataset(
            {normalize(k): v for k, v in (metrics or {}).items()}, self._eval_name
        )
        if named is None:  # another of eval_dataset's datasets: the record reads the first
            return
        try:
            stop = self.session.evaluated(float(state.epoch or 0.0), named, model)
        finally:
            if not control.should_save:
                self.session.use_live(model)
        if stop:
            control.should_training_stop = True
        if self.online is not None and self.session.applied is not None:
            self.session.retune(self.online.controller(self.session.history, self.session.applied))
        self.session.record_so_far(getattr(args, "output_dir", None), main=getattr(args, "should_save", True))

    def on_save(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is None:
            return
        if self.session.applied is not None and getattr(args, "should_save", True):
            online = None if self.online is None else self.online.controller.state_dict()
            save_state(args, state, {**self.session.state_dict(), "online": online})
        self.session.use_live(model)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        built = self.session.built
        if built is not None:  # the Trainer keeps its optimizer: a later train() may load into it
            self._after = (built, built.restore_when_loaded())
        if model is not None:
            if getattr(model, "_regdial_callback", None) is self:
                object.__delattr__(model, "_regdial_callback")
            if self.online is not None:
                self.online.finish(self.session.history.meta)
            # load_best_model_at_end: the best checkpoint's model (the average it evaluated) stays
            chosen = bool(getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint)
            self.session.finish(
                model, getattr(args, "output_dir", None), chosen=chosen, num_classes=self.num_classes
            )

    @property
    def history(self) -> Any:
        """The run's ``History`` so far (one row per evaluation)."""
        return self.session.history


def hp_space(space: Space, callback: HuggingFaceCallback | None = None) -> Callable[[Any], dict[str, float]]:
    """The ``hp_space`` function ``Trainer.hyperparameter_search(backend="optuna")`` expects,
    with regdial's ranges::

        callback = HuggingFaceCallback(Regularization())
        trainer = Trainer(model_init=make_model, args=args, ..., callbacks=[callback])
        trainer.hyperparameter_search(backend="optuna", n_trials=20,
                                      hp_space=hp_space(Space({"weight_decay": ..., "label_smoothing": ...}), callback))

    Only knobs with a ``TrainingArguments`` field can be searched this way (weight decay,
    label smoothing, NEFTune noise); another knob in the space is refused with one line:
    tune it with ``regdial.tune`` and an objective around your Trainer instead. The Trainer
    reads ``weight_decay`` at each trial (it builds a new optimizer), but the other two only
    when it is built: a trial's values of those reach training only through ``callback``
    (on that Trainer, its setting leaving both knobs unset), which applies them and starts
    each trial afresh; without it, searching them is refused (it would never apply them).
    """
    if not isinstance(space, Space):
        fail("space", "a regdial.Space", space)
    if callback is not None and not isinstance(callback, HuggingFaceCallback):
        fail("callback", "the HuggingFaceCallback on the Trainer, or None", callback)
    return suggester(space, None if callback is None else callback.setting)
