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
dropout          the model's dropout modules and its ``config`` (a saved model reloads with it)
weight_decay     the Trainer's optimizer, regrouped along ``param_groups`` (biases, norms and
                 embeddings spared) before its first step
l1 ... l2sp      proximal steps after every optimizer step, on the weights only (``attach_prox``
                 with ``model=``); max_norm likewise
label_smoothing  transformers' own ``LabelSmoother`` on the model's output in training (the
                 Trainer's ``label_smoothing_factor`` must then be 0: one place decides)
embedding_noise  NEFTune noise on the input embeddings (the Trainer's ``neftune_noise_alpha``
                 must then be unset)
noise, mixup,    on float inputs (``pixel_values``, ``input_values``, ``inputs_embeds``), in a
cutmix, augment  hook on the model's forward; refused for token ids
ema              the average is evaluated at each evaluation and is the final model
early_stopping   on the evaluation's ``monitor`` (``eval_loss``); the best weights are restored
schedules        every strength follows ``global_step / max_steps``
===============  ==============================================================================

At each evaluation the callback records a ``History`` row (the training loss is the mean
of the training batches' losses since the previous evaluation), and at the end it logs
the diagnosis and writes ``regdial_history.json`` and ``regdial_report.html`` into the
output directory. Given a ``regdial.Trial`` (an objective of ``regdial.tune``), it reports
each evaluation instead (the search's study and report hold every trial), and a pruned
trial stops training by raising ``optuna.TrialPruned``.

Needs the ``huggingface`` extra: ``pip install 'regdial[huggingface]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from regdial._checks import Described, fail
from regdial.blocks.mixing import soft_cross_entropy
from regdial.dial.space import Space
from regdial.dial.trial import Trial
from regdial.integrations._common import Session
from regdial.setting import Regularization
from regdial.training.logs import normalize

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "regdial.integrations.huggingface needs transformers: pip install 'regdial[huggingface]'"
    ) from error

__all__ = ["FLOAT_INPUTS", "HuggingFaceCallback", "hp_space"]

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
    """

    def __init__(
        self,
        setting: Regularization,
        trial: Trial | None = None,
        *,
        monitor: str = "eval_loss",
        num_classes: int | None = None,
    ) -> None:
        self.session = Session(setting, trial, normalize(monitor))
        self.setting = setting
        self.num_classes = num_classes
        self._hooks: list[RemovableHandle] = []
        self._soft: Tensor | None = None
        self._max_steps = 1

    # -- before training ----------------------------------------------------------------

    def on_init_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        s = self.setting
        if s.label_smoothing and getattr(args, "label_smoothing_factor", 0.0):
            fail("regularization.label_smoothing", "0 when TrainingArguments.label_smoothing_factor is set (one place "
                 "decides; the Trainer's is already on)", s.label_smoothing)  # fmt: skip
        if s.embedding_noise and getattr(args, "neftune_noise_alpha", None):
            fail("regularization.embedding_noise", "0 when TrainingArguments.neftune_noise_alpha is set",
                 s.embedding_noise)  # fmt: skip
        if getattr(args, "weight_decay", 0.0) and s.weight_decay and args.weight_decay != s.weight_decay:
            fail("regularization.weight_decay", f"the TrainingArguments' ({args.weight_decay}) or 0 (the setting's "
                 "decay replaces the Trainer's)", s.weight_decay)  # fmt: skip
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
        config = getattr(model, "config", None)
        num_classes = self.num_classes or getattr(config, "num_labels", None)
        num_classes = num_classes if isinstance(num_classes, int) and num_classes > 1 else None
        main_input = getattr(model, "main_input_name", "input_ids")
        active = [k for k in BATCH_KNOBS if getattr(self.setting, k)]
        if active and main_input not in FLOAT_INPUTS:
            fail(f"regularization.{active[0]}", f"0 for a model whose inputs are {main_input} (token ids: there is "
                 "nothing to add noise to or mix; use embedding_noise)", getattr(self.setting, active[0]))  # fmt: skip
        if (self.setting.mixup or self.setting.cutmix) and num_classes is None:
            fail(
                "num_classes", "the number of classes for mixing (HuggingFaceCallback(num_classes=...))", None
            )
        kind = {"pixel_values": "image", "input_values": "signal"}.get(main_input)
        self.session.start(model, optimizer, num_classes, kind, [kwargs.get("lr_scheduler")])
        self._max_steps = max(1, int(getattr(state, "max_steps", 0) or 1))
        self._hooks.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._after_forward, with_kwargs=True))
        self._main_input = main_input
        self._causal = type(model).__name__.endswith("ForCausalLM")

    # -- the model's forward, in training -------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        applied = self.session.applied
        if applied is None or not module.training:
            return None
        x = kwargs.get(self._main_input)
        labels = kwargs.get("labels")
        if (
            isinstance(x, Tensor)
            and x.is_floating_point()
            and isinstance(labels, Tensor)
            and any(getattr(self.setting, k) for k in BATCH_KNOBS)
        ):
            mixed, targets = applied.batch(x, labels)
            kwargs[self._main_input] = mixed
            self._soft = targets if targets.is_floating_point() and targets.dim() == 2 else None
            return args, kwargs
        return None

    def _after_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if not module.training or self.session.applied is None:
            return output
        labels, logits = kwargs.get("labels"), getattr(output, "logits", None)
        smoothing = float(self.setting.label_smoothing)
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

                output["loss"] = LabelSmoother(epsilon=smoothing)(output, labels, shift_labels=self._causal)
        loss = output.get("loss") if hasattr(output, "get") else None
        if isinstance(loss, Tensor):
            self.session.add_train_loss(loss.detach())
        return output

    # -- during training --------------------------------------------------------------------

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        applied = self.session.applied
        if applied is not None:
            applied.set_progress(min(1.0, state.global_step / self._max_steps))
        if model is not None and (control.should_evaluate or control.should_save):
            self.session.use_average(model)

    def on_epoch_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is not None and control.should_evaluate:
            self.session.use_average(model)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        if model is None:
            return
        named = {normalize(k): v for k, v in (metrics or {}).items()}
        try:
            stop = self.session.evaluated(float(state.epoch or 0.0), named, model)
        finally:
            if not control.should_save:
                self.session.use_live(model)
        if stop:
            control.should_training_stop = True

    def on_save(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is not None:
            self.session.use_live(model)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if model is not None:
            self.session.finish(model, getattr(args, "output_dir", None))

    @property
    def history(self) -> Any:
        """The run's ``History`` so far (one row per evaluation)."""
        return self.session.history


# -- Trainer.hyperparameter_search ---------------------------------------------------------

TRAINING_ARGUMENTS = {"weight_decay": "weight_decay", "label_smoothing": "label_smoothing_factor",
                      "embedding_noise": "neftune_noise_alpha"}  # fmt: skip
"""The knobs that a ``TrainingArguments`` field holds, and that field."""


def hp_space(space: Space) -> Callable[[Any], dict[str, float]]:
    """The ``hp_space`` function ``Trainer.hyperparameter_search(backend="optuna")`` expects,
    with regdial's ranges.

    Only knobs with a ``TrainingArguments`` field can be searched this way (weight decay,
    label smoothing, NEFTune noise); another knob in the space is refused with one line:
    tune it with ``regdial.tune`` and an objective around your Trainer instead.
    """
    if not isinstance(space, Space):
        fail("space", "a regdial.Space", space)
    for name in space.knobs:
        if name not in TRAINING_ARGUMENTS:
            fail(f"tune.space.{name}", "a knob with a TrainingArguments field (" + ", ".join(TRAINING_ARGUMENTS)
                 + "); search the others with regdial.tune(objective)", Described("not one"))  # fmt: skip

    def suggest(trial: Any) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, r in space.knobs.items():
            if r.optional and not trial.suggest_categorical(f"{name}_on", [True, False]):
                values[TRAINING_ARGUMENTS[name]] = 0.0
                continue
            values[TRAINING_ARGUMENTS[name]] = trial.suggest_float(name, r.low, r.high, log=r.log)
        return values

    return suggest
