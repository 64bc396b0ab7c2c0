"""The training choices that are not regularization: one declarative table, checked once.

``RunOptions`` is that table (as scikit-learn's ``_parameter_constraints`` is for its
estimators): each field's type and legal range is declared here, once, and ``fit``, the
config file's ``[run]`` table and the command line all validate through it. Types are
strict: ``epochs = true``, ``seed = 1.0`` or ``lr = "fast"`` are errors, not conversions.
Every error is one line naming the field, the allowed values and the value received::

    run.epochs must be an integer in [1, 100000], got 0

``Options`` is the base for such tables (the dial's ``TuneOptions`` is another): strict
pydantic models whose errors ``Options.parse`` words in regdial's form.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from typing_extensions import Self

from regdial._checks import InputError, fail, number, unknown_key

__all__ = [
    "DEVICES",
    "OPTIMIZERS",
    "PRECISIONS",
    "Options",
    "RunOptions",
    "describe_field",
    "run_table",
]

OPTIMIZERS = ("adamw", "adam", "sgd", "nadam", "radam", "rmsprop", "adagrad")
"""Optimizers a config can name; in Python, ``fit`` also takes a class or a factory."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
MAX_EPOCHS = 100_000


class Options(BaseModel):
    """A strict, frozen table of options; ``parse`` turns its errors into one line."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def parse(cls, values: Mapping[str, Any], section: str) -> Self:
        """Validate ``values``; unknown keys and bad values fail as ``section.field`` lines."""
        if not isinstance(values, Mapping):
            fail(section, "a table of options", values)
        for key in values:
            if key not in cls.model_fields:
                raise unknown_key(section, str(key), cls.model_fields)
        try:
            return cls.model_validate(dict(values))
        except ValidationError as error:
            raise cls.one_line(error, section) from None

    @classmethod
    def one_line(cls, error: ValidationError, section: str) -> InputError:
        """The first of pydantic's errors, worded from the field's own declaration."""
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        field = f"{section}.{name}" if name else section
        if first["type"] == "value_error":  # a validator's own one-line message
            message = str(first.get("ctx", {}).get("error", first["msg"]))
            return InputError(f"{section}.{message}" if name and message.startswith(name) else message)
        info = cls.model_fields.get(name)
        allowed = describe_field(info.annotation, info.metadata) if info is not None else "valid"
        try:
            fail(field, allowed, first.get("input"))
        except InputError as message:
            return message
        raise AssertionError("unreachable")  # pragma: no cover


def _interval(metadata: list[Any]) -> str:
    low: Any = None
    high: Any = None
    low_open = high_open = False
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high, high_open = item.lt, True
    if low is None and high is None:
        return ""
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f" in {left}{number(low, '-inf')}, {number(high, 'inf')}{right}"


def describe_field(annotation: Any, metadata: list[Any] | None = None) -> str:
    """What a field accepts, in words: "an integer in [1, 100000]", "one of 'a', 'b'"."""
    metadata = list(metadata or [])
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        for item in extra:
            metadata += list(getattr(item, "metadata", [item]))  # a Field(...) carries its constraints
        return describe_field(inner, metadata)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_field(a, metadata) for a in get_args(annotation) if a is not type(None)]
        return " or ".join(parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(annotation))
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + _interval(metadata)
    if annotation is float:
        return "a number" + _interval(metadata)
    if origin is dict or annotation is dict:
        return "a table"
    if origin is list or annotation is list:
        return "a list"
    if annotation is str:
        pattern = next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)
        longest = next((m.max_length for m in metadata if getattr(m, "max_length", None)), None)
        if pattern:
            return f"text matching {pattern}"
        return f"text of at most {longest} characters" if longest else "text"
    return f"a {getattr(annotation, '__name__', annotation)}"


PositiveInt = Annotated[int, Field(ge=1)]


class RunOptions(Options):
    """How a model trains, apart from regularization; ``None`` means the task's default.

    Args:
        epochs: passes over the training data (default: the task's, else 30).
        batch_size: samples per step (default: the task's, else 32).
        optimizer: one of ``OPTIMIZERS``.
        lr: the learning rate (default: the task's, else 1e-3).
        lr_schedule: ``"cosine"`` (to 0 over the run, per step) or ``"constant"``.
        momentum: SGD's and RMSprop's momentum.
        seed: the data split, initial weights and batch order.
        checkpoint_seconds: the most seconds between checkpoints (one is always written
            after the first epoch and at the end).
        train_eval_size: training samples the per-epoch clean train metrics are measured on.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        precision: ``auto`` (bf16 on a CUDA device that supports it, else fp32), ``fp32``,
            ``bf16`` or ``fp16`` (with a gradient scaler); autocast only, weights stay fp32.
        deterministic: ask torch for deterministic kernels (slower on CUDA; CPU runs are
            deterministic already).
        monitor: what early stopping and the best weights follow: ``val_loss`` or
            ``val_<metric>`` (higher is better for accuracy-like names).
        restore_best: end with the best epoch's weights even without early stopping.
    """

    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=2**20)] | None = None
    optimizer: Literal["adamw", "adam", "sgd", "nadam", "radam", "rmsprop", "adagrad"] = "adamw"
    lr: Annotated[float, Field(gt=0.0, le=1e6)] | None = None
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    checkpoint_seconds: Annotated[float, Field(ge=0.0, le=86_400.0)] = 10.0
    train_eval_size: Annotated[int, Field(ge=1, le=10**7)] = 2048
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    deterministic: bool = False
    monitor: Annotated[str, Field(pattern=r"^(train|val)_[A-Za-z0-9_]+$", max_length=100)] = "val_loss"
    restore_best: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from regdial.training.devices import check_device_name

        return check_device_name("device", value)

    def resolved(self, epochs: int, batch_size: int, lr: float) -> RunOptions:
        """A copy with the unset defaults filled in (a task's own)."""
        return self.model_copy(
            update={
                "epochs": self.epochs if self.epochs is not None else epochs,
                "batch_size": self.batch_size if self.batch_size is not None else batch_size,
                "lr": self.lr if self.lr is not None else lr,
            }
        )

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate at ``step`` of ``total`` (cosine to 0, or constant)."""
        lr = float(self.lr if self.lr is not None else 1e-3)
        if self.lr_schedule == "constant" or total <= 0:
            return lr
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    def optimizer_factory(self) -> Callable[[list[dict[str, Any]]], Any]:
        """A function of ``param_groups`` building the named optimizer (no decay of its own:
        weight decay is the setting's, on ``param_groups``' split)."""
        import torch

        lr = float(self.lr if self.lr is not None else 1e-3)
        name, momentum = self.optimizer, self.momentum
        if name == "sgd":
            return lambda groups: torch.optim.SGD(groups, lr=lr, momentum=momentum)
        if name == "rmsprop":
            return lambda groups: torch.optim.RMSprop(groups, lr=lr, momentum=momentum)
        cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "nadam": torch.optim.NAdam,
               "radam": torch.optim.RAdam, "adagrad": torch.optim.Adagrad}[name]  # fmt: skip
        return lambda groups: cls(groups, lr=lr, weight_decay=0.0)

    def to_toml_dict(self) -> dict[str, Any]:
        """The set options, as a ``[run]`` table ``RunOptions.parse`` reads back."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def run_table(
    options: RunOptions,
    *,
    task: str | None = None,
    data: str | None = None,
    kind: str | None = None,
    target: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The ``[run]`` table of a config ``regdial run`` reads back: what to train on (a
    built-in ``task``, or a ``data`` file with its ``kind`` and ``target`` column), the
    ``model``'s name, and the options that were set (those given to ``RunOptions.parse``
    or filled in by ``resolved``; unset ones are left to their defaults).

    A run's ``config.toml`` and a search's ``best.toml`` both write it.
    """
    table: dict[str, Any] = {}
    if task is not None:
        table["task"] = task
    elif data is not None:
        table.update({"data": data, "kind": kind} | ({"target": target} if target else {}))
    if model is not None:
        table["model"] = model
    return table | options.model_dump(exclude_unset=True, exclude_none=True)
