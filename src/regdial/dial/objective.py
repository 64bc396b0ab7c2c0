"""What a trial trains: an objective ``(setting, trial) -> None``.

Two kinds, one protocol (``Objective``):

``FitObjective``
    regdial trains: a built-in task, a data file, or the user's model factory with their
    data (DataLoaders, or a ``"module:function"`` returning them). Each trial builds a fresh
    model (the same initial weights for every trial: only the setting differs), trains it
    with ``fit`` and keeps its best epoch on the validation metric.
``UserObjective``
    the user's own training code, any loop or trainer, called as ``fn(setting, trial)``;
    it reports each epoch to the trial (``regdial.Trial``).

Workers in other processes rebuild the objective from plain data: built-in names, file
paths and ``"package.module:function"`` import strings (as uvicorn and gunicorn name an
app). A lambda or a function defined inside another cannot be imported by name; with
``workers`` it is a one-line error that says so.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from regdial._checks import Described, fail, shorten
from regdial.applied import whole_setting
from regdial.dial.space import Space
from regdial.dial.trial import Trial
from regdial.setting import Regularization
from regdial.training.history import History, higher_is_better
from regdial.training.models import model_from_factory

__all__ = ["FitObjective", "Objective", "UserObjective", "import_name", "import_string"]

logger = logging.getLogger(__name__)


class Objective(Protocol):
    """Train one setting and report to its trial (a search calls it once per trial)."""

    @property
    def metric(self) -> str:
        """The main validation metric, e.g. ``val_accuracy``."""

    def __call__(self, setting: Regularization, trial: Trial) -> object: ...


def import_string(text: object, field: str) -> Any:
    """The object ``"package.module:attribute"`` names; a bad string is one line saying why."""
    if not isinstance(text, str) or text.count(":") != 1 or not all(text.split(":")):
        fail(field, "an import string 'package.module:function'", text)
    module_name, _, attribute = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any error while importing the user's module is theirs to see, on one line
        fail(
            field,
            "a module that imports",
            Described(f"{module_name!r}: {shorten(f'{type(error).__name__}: {error}', 100)}"),
        )
    found: Any = module
    for part in attribute.split("."):
        found = getattr(found, part, None)
        if found is None:
            fail(field, f"a name defined in {module_name}", Described(f"no {attribute!r} there"))
    return found


def import_name(obj: object, field: str) -> str:
    """``"module:qualname"`` for a function another process can import by name."""
    if isinstance(obj, str):
        import_string(obj, field)
        return obj
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not callable(obj) or not module or not qualname or "<" in qualname:
        what = (
            "a lambda"
            if qualname == "<lambda>"
            else "a function defined inside another"
            if qualname
            else "it"
        )
        fail(field, "a function importable by other processes (defined at module level, or give "
             "'package.module:function')", Described(f"{what} ({shorten(repr(obj), 40)})"))  # fmt: skip
    return f"{module}:{qualname}"


@dataclass
class FitObjective:
    """Train each trial with ``fit``. Plain data, so that it crosses to worker processes.

    Args:
        task: a built-in task's name; or ``data_path`` (``.npz``/``.csv``, with ``target``
            and ``kind``); or ``data``, a ``"module:function"`` returning the loaders
            ``(train, val)`` or ``(train, val, test)`` (or a dict with those keys).
        model: a built-in model's name, or a ``"module:function"`` factory. A factory is
            called with the keywords it takes among ``input_shape`` and ``num_classes``.
        num_classes, kind: for your own loaders: a classifier's classes, or "regression".
        epochs: each trial's epochs (default: the task's, else 30).
    """

    task: str | None = None
    data_path: str | None = None
    target: str | None = None
    kind: str = "auto"
    model: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    num_classes: int | None = None
    epochs: int | None = None
    seed: int = 0
    lr: float | None = None
    batch_size: int | None = None
    optimizer: str = "adamw"
    device: str = "auto"
    precision: str = "auto"
    deterministic: bool = False
    # In-process objects (not sent to workers): a factory and loaders given as Python objects.
    model_factory: Callable[..., nn.Module] | None = field(default=None, repr=False, compare=False)
    loaders: tuple[Any, Any, Any] | None = field(default=None, repr=False, compare=False)
    loss_fn: Any = field(default=None, repr=False, compare=False)
    metrics: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    output: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)
    metric_name: str | None = None

    def __post_init__(self) -> None:
        self._dataset: Any = None

    # -- what it trains on --------------------------------------------------------------

    @property
    def own_model(self) -> bool:
        return self.model_factory is not None or (self.model is not None and ":" in self.model)

    @property
    def dataset(self) -> Any:
        """The ``Dataset`` (built-in task or data file), or None for the user's loaders."""
        if self._dataset is None and (self.task is not None or self.data_path is not None):
            from regdial.training.data import load_data
            from regdial.training.tasks import load_task

            if self.task is not None:
                self._dataset = load_task(self.task, self.seed)
            else:
                self._dataset = load_data(
                    str(self.data_path), target=self.target, kind=self.kind, seed=self.seed
                )
        return self._dataset

    def on_device(self, device: str) -> FitObjective:
        """This objective training on ``device`` (a copy; the data it loaded is shared)."""
        moved = dataclasses.replace(self, device=device)
        moved._dataset = self._dataset
        return moved

    def user_loaders(self) -> tuple[Any, Any, Any]:
        if self.loaders is None:
            if self.data is None:
                fail("data", "loaders, a data file or a built-in task", None)
            made = import_string(self.data, "data")()
            self.loaders = _loaders(made)
        return self.loaders

    @property
    def task_kind(self) -> str | None:
        data = self.dataset
        if data is not None:
            return str(data.kind)
        if self.num_classes is not None:
            return "classification"
        return "regression" if self.kind == "regression" else None

    @property
    def metric(self) -> str:
        from regdial.training.metrics import main_metric

        name = self.metric_name or main_metric(self.task_kind)[0]
        return name if name.startswith("val_") else f"val_{name}"

    @property
    def direction(self) -> str:
        return "maximize" if higher_is_better(self.metric) else "minimize"

    @property
    def full_epochs(self) -> int:
        from regdial.training.fit import default_epochs

        return self.epochs if self.epochs is not None else default_epochs(self.task)

    @property
    def name(self) -> str:
        data = self.dataset
        if data is not None:
            return str(data.name)
        return self.model.split(":")[-1] if self.model else getattr(self.model_factory, "__name__", "model")

    def build_model(self) -> nn.Module:
        """A fresh model with the seed's initial weights (the same for every trial)."""
        import torch

        data = self.dataset
        if self.model_factory is not None or (self.model is not None and ":" in self.model):
            factory = self.model_factory or import_string(self.model, "model")
            return model_from_factory(
                factory, "model", seed=self.seed, input_shape=tuple(data.input_shape) if data is not None else None,
                num_classes=data.num_classes if data is not None else self.num_classes,
            )  # fmt: skip
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            from regdial.training.fit import default_model
            from regdial.training.pretrained import start_model

            name = self.model or default_model(self.task, data)
            return start_model(
                self.task, name, data, self.model_options, self.seed
            )  # pre-trained if it fine-tunes

    def default_space(self, base: Regularization | None = None, model: nn.Module | None = None) -> Space:
        """The space a search of this objective takes by default (``model``: a fresh one
        already built, used where the space is read off the user's model)."""
        data = self.dataset
        if data is not None and not self.own_model:
            from regdial.training.fit import default_model
            from regdial.training.tasks import TASKS

            spec = TASKS.get(self.task) if self.task is not None else None
            fine_tuning = spec is not None and spec.source is not None
            return Space.default(
                data, self.model or default_model(self.task, data), base, fine_tuning=fine_tuning
            )
        input_kind = data.input_kind if data is not None else None
        fresh = model if model is not None else self.build_model()
        return Space.for_model(fresh, self.task_kind, input_kind, base)

    # -- a trial ------------------------------------------------------------------------

    def fit(self, setting: Regularization, **kwargs: Any) -> History:
        """``fit`` this setting on this objective's data (a fresh model unless given)."""
        from regdial.training.fit import fit

        net = kwargs.pop("model", None) or self.build_model()
        options: dict[str, Any] = {
            "epochs": self.full_epochs, "seed": self.seed, "lr": self.lr, "batch_size": self.batch_size,
            "optimizer": self.optimizer, "device": self.device, "precision": self.precision, "progress": False,
            "deterministic": self.deterministic,
            "loss_fn": self.loss_fn, "metrics": self.metrics, "metric": self.metric_name, "output": self.output,
        }  # fmt: skip
        options.update(kwargs)
        data = self.dataset
        if data is not None:  # a built-in task by name: fit then uses its batch size and lr
            history = fit(self.task if self.task is not None else data, setting, model=net, **options)
        else:
            train, val, test = self.user_loaders()
            kind = "regression" if self.kind == "regression" else None
            history = fit(net, setting, train=train, val=val, test=test, num_classes=self.num_classes, kind=kind,
                          **options)  # fmt: skip
        if history.meta.get("status") == "interrupted":
            # fit turns Ctrl-C into a clean stop of its run; for a search it means stop the
            # search (the trial in progress is marked failed, the finished ones are kept).
            raise KeyboardInterrupt(history.meta.get("reason", "interrupted"))
        return history

    def __call__(self, setting: Regularization, trial: Trial) -> object:
        from optuna import TrialPruned

        net = self.build_model()
        if trial.initial_weights is not None:
            net.load_state_dict(trial.initial_weights)

        def report(row: Mapping[str, float]) -> bool:
            values = {k: v for k, v in row.items() if k != "epoch"}
            try:
                trial.report(int(row["epoch"]), **values)
            except TrialPruned:
                return True
            return False

        history = self.fit(setting, model=net, epochs=trial.epochs, on_epoch=report, monitor=self.metric,
                           restore_best=trial.role != "path", run_dir=trial.run_dir, resume=trial.resume)  # fmt: skip
        trial.history.meta.update(status=history.meta.get("status"), summary=history.meta.get("summary"),
                                  device=history.meta.get("device"))  # fmt: skip
        trial.save_weights(net)
        if trial.pruned and history.meta.get("status") == "stopped early":
            trial.pruned = False  # pruned at the epoch early stopping ended it on: a finished run
        if trial.pruned:
            raise TrialPruned(history.meta.get("reason", "pruned"))
        return None

    def to_dict(self) -> dict[str, Any]:
        """The plain fields another process rebuilds this objective from."""
        factory_unnamed = self.model_factory is not None and not (self.model and ":" in self.model)
        if (
            factory_unnamed
            or self.loaders is not None
            or self.loss_fn is not None
            or self.metrics
            or self.output
        ):
            fail("workers", "1 when the model, data, loss or metrics are Python objects (give "
                 "'package.module:function' strings to share them with other processes)", Described("more"))  # fmt: skip
        names = ("task", "data_path", "target", "kind", "model", "model_options", "data", "num_classes", "epochs",
                 "seed", "lr", "batch_size", "optimizer", "device", "precision", "deterministic", "metric_name")  # fmt: skip
        return {name: getattr(self, name) for name in names}


def _loaders(made: Any) -> tuple[Any, Any, Any]:
    if isinstance(made, Mapping):
        if "train" not in made or "val" not in made:
            fail("data", "a function returning (train, val[, test]) or a dict with train and val",
                 Described(f"keys {sorted(made)}"))  # fmt: skip
        return made["train"], made["val"], made.get("test")
    if isinstance(made, tuple | list) and len(made) in (2, 3):
        return made[0], made[1], made[2] if len(made) == 3 else None
    fail("data", "a function returning (train, val[, test]) or a dict with train and val",
         Described(type(made).__name__))  # fmt: skip


@dataclass
class UserObjective:
    """The user's own training code: ``fn(setting, trial)`` reports to ``trial``.

    ``fn`` may also return its score (a number) instead of reporting epochs; the trial's
    score is then that number.
    """

    fn: Callable[[Regularization, Trial], object]
    metric: str = "val_loss"
    epochs: int = 30
    import_path: str | None = None
    _said: bool = field(default=False, repr=False, compare=False)

    def __call__(self, setting: Regularization, trial: Trial) -> object:
        with whole_setting():  # the trial's weight_decay=0 is off, in an optimizer built with its own too
            returned = self.fn(setting, trial)
        if returned is None:
            return None
        is_number = isinstance(returned, int | float) and not isinstance(returned, bool)
        if not is_number:
            fail(f"the objective's return value (trial {trial.number})",
                 "its score (a number) or None (it reported to the trial)", returned)  # fmt: skip
        score = float(returned)  # type: ignore[arg-type]
        if not math.isfinite(score):
            trial.history.meta["no_score"] = f"the objective returned {score}"
        elif not trial.history.rows:
            row = {"train_loss": math.nan, "val_loss": math.nan} | {trial.metric: score}
            trial.report(trial.epochs, **row)
        elif not self._said:  # a final score (an average's, say) beside the epochs reported for pruning
            self._said = True
            logger.warning("regdial: the objective returned %g and reported its epochs to the trial: the trial's "
                           "score is the epochs' %s, the return is not used (report the final score as the last "
                           "epoch, or return it without reporting)", score, trial.metric)  # fmt: skip
        return returned

    def to_dict(self) -> dict[str, Any]:
        return {"fn": self.import_path or import_name(self.fn, "objective"), "metric": self.metric,
                "epochs": self.epochs}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserObjective:
        return cls(import_string(data["fn"], "objective"), data["metric"], data["epochs"], data["fn"])
