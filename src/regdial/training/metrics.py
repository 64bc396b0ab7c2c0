"""Scoring a model on a split: the loss, the main metric and how uncertain it is.

The main metric of a kind of task, the one a search optimizes:

==============  =========  ==========  =====================================================
kind            metric     direction   standard error over the split's n samples
==============  =========  ==========  =====================================================
classification  accuracy   maximize    binomial: sqrt(p * (1 - p) / n)
regression      rmse       minimize    delta method: se(MSE) / (2 * RMSE), se(MSE) = sd(e_i^2) / sqrt(n)
==============  =========  ==========  =====================================================

Every score that decides something comes with that standard error (``accuracy_se``,
``rmse_se``), so a difference inside noise can be told from a real one. Regression also
reports R^2 (``1 - SSE/SST`` with the split's own mean). Token-level outputs ``(N, L, C)``
with labels ``(N, L)`` are scored per token, ignoring label -100 (Hugging Face's padding).

A user's own ``metrics={name: fn}`` are computed once per split on all its outputs and
targets (``fn(outputs, targets) -> float``), as Hugging Face's ``compute_metrics`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regdial._checks import Described, fail
from regdial.training.batches import Adapter, OutputFn, forward, split, to_device

__all__ = [
    "Direction",
    "LossFn",
    "MetricFn",
    "Tally",
    "check_labels",
    "check_logits",
    "checked_loss",
    "evaluate",
    "main_metric",
]

Direction = Literal["maximize", "minimize"]
LossFn = Callable[[Tensor, Any], Tensor]
"""``loss_fn(output, batch) -> scalar tensor``: the user's own loss."""
MetricFn = Callable[[Tensor, Tensor], float]
"""``fn(outputs, targets) -> float`` over a whole split."""

IGNORE = -100


def main_metric(kind: str | None) -> tuple[str, Direction]:
    """(the main metric's name, its direction) for a kind of task."""
    if kind == "classification":
        return "accuracy", "maximize"
    if kind == "regression":
        return "rmse", "minimize"
    return "loss", "minimize"


def check_logits(output: Tensor, targets: Tensor, num_classes: int, field: str = "model output") -> None:
    """Refuse, in one line, logits that do not fit ``num_classes`` and the targets' shape
    (a shape check: nothing is read from the device)."""
    if targets.dim() >= 2 and targets.shape == output.shape:
        fail(field.replace("model output", "batch") + " targets", "class indices, one per sample (not one row "
             "of C per sample: give labels.argmax(-1))", Described(f"shape {tuple(targets.shape)}, the logits' shape"))  # fmt: skip
    flat_out, flat_y = _flat(output, targets)
    width = flat_out.shape[-1] if flat_out.dim() >= 1 else 0
    if flat_out.dim() != 2 or flat_out.shape[0] != flat_y.shape[0] or flat_y.dim() != 1:
        wanted = f"(N, {num_classes})" if targets.dim() <= 1 else f"{(*targets.shape, num_classes)}"
        fail(field, f"logits of shape {wanted} for targets of shape {tuple(targets.shape)} (give output= to "
             "pick them from what the model returns)", Described(f"shape {tuple(output.shape)}"))  # fmt: skip
    if width != num_classes:
        fail("num_classes", f"the model's number of outputs ({width})", num_classes)


def check_labels(targets: Tensor, num_classes: int, field: str = "train batch targets") -> None:
    """Refuse, in one line, targets that are not class indices in ``[0, num_classes)``
    (-100, Hugging Face's padding, allowed): float, one-hot or out-of-range labels."""
    if targets.is_floating_point() or targets.dtype == torch.bool:
        fail(field, f"class indices (integers in [0, {num_classes})) for num_classes={num_classes}",
             Described(f"{targets.dtype} values (for regression, give kind='regression' and no num_classes)"))  # fmt: skip
    real = targets[targets != IGNORE]
    if real.numel() == 0:
        return
    low, high = int(real.min()), int(real.max())
    if low < 0 or high >= num_classes:
        one_hot = targets.dim() >= 2 and targets.shape[-1] == num_classes and low >= 0 and high <= 1
        what = (
            "one-hot rows (give the class index: labels.argmax(-1))" if one_hot else f"labels {low} to {high}"
        )
        fail(field, f"class indices in [0, {num_classes}) for num_classes={num_classes}", Described(what))


def _flat(output: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Token-level logits (N, L, C) and labels (N, L) as (N*L, C) and (N*L,)."""
    if output.dim() == 3 and targets.dim() == 2 and output.shape[:2] == targets.shape:
        return output.reshape(-1, output.shape[-1]), targets.reshape(-1)
    return output, targets


@dataclass
class Tally:
    """Running sums over a split; ``scores`` turns them into the loss and metrics.

    Sums, not means, so that data-parallel ranks can add theirs (``reduce``) before any
    score is computed: every rank then sees the same numbers.
    """

    loss: float = 0.0
    count: float = 0.0
    correct: float = 0.0
    squared: float = 0.0
    squared_sq: float = 0.0
    target_sum: float = 0.0
    target_sq: float = 0.0

    def reduce(self, reducer: Callable[[list[float]], list[float]]) -> Tally:
        names = [f.name for f in fields(self)]
        return Tally(*reducer([getattr(self, n) for n in names]))

    def scores(self, classification: bool, field: str = "data") -> dict[str, float]:
        count = self.count
        if count == 0:
            fail(field, "at least one sample to evaluate (a label other than -100, for token outputs)",
                 Described("an empty split"))  # fmt: skip
        scores: dict[str, float] = {"loss": self.loss / count, "count": count}
        if classification:
            accuracy = self.correct / count
            return scores | {
                "accuracy": accuracy,
                "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / count),
            }
        mse = self.squared / count
        rmse = math.sqrt(mse)
        se_mse = math.sqrt(max(self.squared_sq / count - mse * mse, 0.0) / count)
        spread = self.target_sq - self.target_sum**2 / count
        return scores | {
            "rmse": rmse,
            "rmse_se": se_mse / (2 * rmse) if rmse > 0 else 0.0,
            "r2": 1.0 - self.squared / spread if spread > 1e-12 * max(self.target_sq, 1.0) else math.nan,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Any],
    num_classes: int | None,
    device: torch.device,
    *,
    loss_fn: LossFn | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    adapter: Adapter | None = None,
    output_fn: OutputFn | None = None,
    autocast: Callable[[], Any] | None = None,
    limit: int | None = None,
    reducer: Callable[[list[float]], list[float]] | None = None,
    field: str = "data",
) -> dict[str, float]:
    """Loss and metrics of ``model`` in eval mode over ``batches``, with standard errors.

    Classification: mean cross-entropy, ``accuracy`` and ``accuracy_se``. Regression: mean
    squared error, ``rmse``, ``rmse_se`` and ``r2``. ``loss_fn`` replaces the loss (its
    batch mean, weighted by batch size); ``metrics`` add the user's own. ``count`` is the
    number of samples (tokens, for token-level outputs). ``limit`` stops after the batch
    that reaches that many samples; ``reducer`` adds the sums of data-parallel ranks.
    ``field`` names the split in the error an empty one raises.
    """
    was_training = model.training
    model.eval()
    tally = Tally()
    kept: tuple[list[Tensor], list[Tensor]] = ([], [])
    try:
        for batch in batches:
            inputs, targets = split(batch, adapter, "val batch")
            inputs, targets = to_device(inputs, device), targets.to(device)
            with autocast() if autocast is not None else nullcontext():
                output = forward(model, inputs, output_fn)
            output = output.float()
            if metrics:
                kept[0].append(output.cpu())
                kept[1].append(targets.cpu())
            n, batch_loss = _tally(tally, output, targets, num_classes)
            if loss_fn is not None:  # the user's loss replaces the built-in one in the sum
                tally.loss += float(checked_loss(loss_fn(output, batch))) * n - batch_loss
            if limit is not None and tally.count >= limit:
                break
    finally:
        model.train(was_training)
    if reducer is not None:
        tally = tally.reduce(reducer)
    scores = tally.scores(num_classes is not None, field)
    for name, fn in (metrics or {}).items():
        scores[name] = float(fn(torch.cat(kept[0]), torch.cat(kept[1])))
    return scores


def checked_loss(loss: object) -> Tensor:
    """The user's ``loss_fn`` result if it is a one-element tensor (the batch's loss)."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        fail("loss_fn", "a function returning the batch's loss as a one-element tensor (to backpropagate)",
             Described(f"one returning {shape}"))  # fmt: skip
    return loss


def _tally(tally: Tally, output: Tensor, targets: Tensor, num_classes: int | None) -> tuple[int, float]:
    """Add one batch to ``tally``; return its number of samples and its summed loss."""
    if num_classes is None:
        if output.numel() != targets.numel():
            fail("num_classes", "the number of classes for a classifier (one output per sample "
                 "means regression)", Described(f"None with outputs of shape {tuple(output.shape)}"))  # fmt: skip
        y = targets.float().reshape(-1)
        errors = (output.reshape(-1) - y).square()
        batch_loss = float(errors.sum())
        tally.squared += batch_loss
        tally.squared_sq += float(errors.square().sum())
        tally.target_sum += float(y.double().sum())
        tally.target_sq += float(y.double().square().sum())
        n = y.numel()
    else:
        check_labels(targets, num_classes, "val batch targets")
        check_logits(output, targets, num_classes)
        flat_out, flat_y = _flat(output, targets)
        mask = flat_y != IGNORE
        n = int(mask.sum())
        batch_loss = float(F.cross_entropy(flat_out, flat_y.long(), reduction="sum", ignore_index=IGNORE))
        tally.correct += int(((flat_out.argmax(dim=-1) == flat_y) & mask).sum())
    tally.loss += batch_loss
    tally.count += n
    return n, batch_loss
