"""What a batch is: ``(x, y)`` tuples, dicts with a ``labels`` key, or anything an adapter reads.

``fit`` and ``evaluate`` take batches in the forms people's code already produces:

- a tuple or list ``(inputs, targets)`` (a ``TensorDataset``'s DataLoader);
- a dict with a ``labels`` key (Hugging Face style): the other keys are the model's
  keyword arguments, ``model(**inputs)``;
- anything else, through a ``batch_to_inputs(batch) -> (inputs, targets)`` adapter the
  user gives, where ``inputs`` is a tensor or a dict of keyword arguments.

A model's output may be a tensor, an object with ``.logits`` (Hugging Face's
``ModelOutput``) or a tuple whose first item is the logits.

``check_reiterable`` refuses a one-time iterator (a generator, ``iter(loader)``): ``fit``
walks the training data once per epoch and the validation data after each, so a source
that is empty the second time would silently train on nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from regdial._checks import Described, fail

__all__ = [
    "Adapter",
    "Inputs",
    "check_reiterable",
    "first_batch",
    "forward",
    "rebuild",
    "split",
    "to_device",
]

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


def forward(model: nn.Module, inputs: Inputs) -> Tensor:
    """The model's logits (or predictions) for ``inputs``."""
    output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    if not isinstance(output, Tensor):
        fail("model output", "a tensor, an object with .logits, or a tuple starting with one",
             Described(type(output).__name__))  # fmt: skip
    return output


def first_batch(
    batches: Iterable[Any], adapter: Adapter | None = None, field: str = "train"
) -> tuple[Inputs, Tensor]:
    """The first batch of ``batches`` split into inputs and targets; an empty source is one line."""
    for batch in batches:
        return split(batch, adapter, field)
    fail(field, "at least one batch", Described("an empty source"))
