"""What a batch is: ``(x, y)`` tuples, dicts with a ``labels`` key, or anything an adapter reads.

``fit`` and ``evaluate`` take batches in the forms people's code already produces:

- a tuple or list ``(inputs, targets)`` (a ``TensorDataset``'s DataLoader);
- a dict with a ``labels`` key (Hugging Face style): the other keys are the model's
  keyword arguments, ``model(**inputs)``;
- anything else, through a ``batch_to_inputs(batch) -> (inputs, targets)`` adapter the
  user gives, where ``inputs`` is a tensor or a dict of keyword arguments.

A dict of inputs goes to the model the way its ``forward`` takes it (asked of
``inspect.signature``, never guessed from names): as keyword arguments when ``forward``
names them all or takes ``**kwargs``, else whole, as its one positional argument
(``forward(self, batch)``).

A model's output may be a tensor, an object or dict with ``logits`` (Hugging Face's
``ModelOutput``), or a tuple or list whose first item is the logits (nanoGPT's
``(logits, loss)``, ``(logits, aux)``); the first time a run reads a tuple or a dict it says
so in one line. ``output=`` (a function of the model's output returning the logits)
chooses for any other form.

``check_reiterable`` refuses a one-time iterator (a generator, ``iter(loader)``): ``fit``
walks the training data once per epoch and the validation data after each, so a source
that is empty the second time would silently train on nothing.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from regdial._checks import Described, fail

__all__ = [
    "Adapter",
    "Inputs",
    "OutputFn",
    "check_reiterable",
    "first_batch",
    "forward",
    "rebuild",
    "split",
    "takes_whole_dict",
    "to_device",
]

logger = logging.getLogger(__name__)

Inputs = Tensor | dict[str, Any]
Adapter = Callable[[Any], tuple[Inputs, Tensor]]


def check_reiterable(field: str, batches: object) -> Iterable[Any]:
    """``batches`` if it can be walked again and again (a DataLoader, a list); else one line."""
    if batches is None or isinstance(batches, str | bytes | Tensor) or not isinstance(batches, Iterable):
        fail(field, "a DataLoader or another re-iterable of batches", batches)
    if isinstance(batches, Iterator):
        fail(
            field,
            "a DataLoader or another re-iterable of batches (a list, or a Dataset's loader)",
            Described(
                f"a one-time iterator ({type(batches).__name__}): it would be empty after the first epoch"
            ),
        )
    return batches


def split(batch: Any, adapter: Adapter | None = None, field: str = "batch") -> tuple[Inputs, Tensor]:
    """The model's inputs and the targets of one batch."""
    if adapter is not None:
        got = adapter(batch)
        if not (isinstance(got, tuple | list) and len(got) == 2):
            fail("batch_to_inputs", "a function returning (inputs, targets)", got)
        inputs, targets = got
    elif isinstance(batch, Mapping):
        if "labels" not in batch:
            fail(field, "a dict with a 'labels' key (or give batch_to_inputs)",
                 Described(f"keys {sorted(map(str, batch))[:8]}"))  # fmt: skip
        inputs = {str(k): v for k, v in batch.items() if k != "labels"}
        targets = batch["labels"]
    elif isinstance(batch, tuple | list) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
    else:
        fail(field, "(inputs, targets), a dict with 'labels', or something batch_to_inputs reads",
             Described(type(batch).__name__))  # fmt: skip
    if not isinstance(targets, Tensor):
        fail(f"{field} targets", "a tensor", Described(type(targets).__name__))
    if not isinstance(inputs, Tensor | dict):
        fail(f"{field} inputs", "a tensor or a dict of the model's keyword arguments",
             Described(type(inputs).__name__))  # fmt: skip
    return inputs, targets


def rebuild(batch: Any, inputs: Inputs, targets: Tensor) -> Any:
    """``batch`` in its own form with new inputs and targets (for a user's ``loss_fn``)."""
    if isinstance(batch, Mapping):
        rebuilt = dict(inputs) if isinstance(inputs, dict) else {"inputs": inputs}
        rebuilt["labels"] = targets
        return rebuilt
    if isinstance(batch, tuple | list):
        return (inputs, targets, *batch[2:])
    return (inputs, targets)


def to_device(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors (alone or in a dict) moved to ``device``; the rest as it is."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    return value


OutputFn = Callable[[Any], Tensor]
"""``output(model_output) -> Tensor``: the logits (or predictions) in the user's model's output."""

_WHOLE: dict[tuple[type, frozenset[str]], bool] = {}
_SAID: set[tuple[type, str]] = set()


def takes_whole_dict(model: nn.Module, keys: Iterable[str]) -> bool:
    """Whether ``model``'s forward takes a dict batch whole (``forward(self, batch)``) rather
    than as keyword arguments: its signature names not every key, has no ``**kwargs``, and
    has a positional parameter to take it."""
    inner = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
    names = frozenset(keys)
    key = (type(inner), names)
    if key not in _WHOLE:
        try:
            parameters = list(inspect.signature(inner.forward).parameters.values())
        except (TypeError, ValueError):  # no signature to ask: keyword arguments, as before
            parameters = []
        keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        var_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters)
        positional = [
            p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
        _WHOLE[key] = bool(parameters) and not var_keyword and not names <= keywords and bool(positional)
    return _WHOLE[key]


def forward(model: nn.Module, inputs: Inputs, output: OutputFn | None = None) -> Tensor:
    """The model's logits (or predictions) for ``inputs`` (see the module docstring)."""
    if isinstance(inputs, dict):
        raw = model(inputs) if takes_whole_dict(model, inputs) else model(**inputs)
    else:
        raw = model(inputs)
    if output is not None:
        picked = output(raw)
        if not isinstance(picked, Tensor):
            fail("output", "a function returning the logits (a tensor) from the model's output",
                 Described(f"one returning {type(picked).__name__}"))  # fmt: skip
        return picked
    if isinstance(raw, Tensor):
        return raw
    logits = raw.get("logits") if isinstance(raw, Mapping) else getattr(raw, "logits", None)
    if isinstance(logits, Tensor):
        _say_once(model, f"a {type(raw).__name__}: regdial reads its logits (give output= to choose another)")
        return logits
    if isinstance(raw, tuple | list) and raw and isinstance(raw[0], Tensor):
        _say_once(model, f"a {type(raw).__name__} of {len(raw)}: regdial reads its first item as the logits "
                  "(give output= to choose another)")  # fmt: skip
        return raw[0]
    fail("model output", "a tensor, a ModelOutput or dict with logits, or a tuple starting with the logits "
         "(or give output= to pick them)", Described(type(raw).__name__))  # fmt: skip


def _say_once(model: nn.Module, what: str) -> None:
    key = (type(model), what)
    if key not in _SAID:
        _SAID.add(key)
        logger.warning("%s returns %s", type(model).__name__, what)


def first_batch(
    batches: Iterable[Any], adapter: Adapter | None = None, field: str = "train"
) -> tuple[Inputs, Tensor]:
    """The first batch of ``batches`` split into inputs and targets; an empty source is one line."""
    for batch in batches:
        return split(batch, adapter, field)
    fail(field, "at least one batch", Described("an empty source"))
