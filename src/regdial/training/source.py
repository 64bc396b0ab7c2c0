"""Where ``fit``'s batches come from: a ``Dataset`` of tensors, or the user's own loaders.

``TensorSource`` (built-in tasks and data files) orders each epoch's samples by a
permutation that depends only on the seed and the epoch, so a resumed run sees the same
batches; under data parallelism every rank walks that same order and takes its own rows
of each global batch. Its clean train metrics use a fixed, seeded subset of the training
data.

``LoaderSource`` walks the user's DataLoaders (or any re-iterable of batches) as they
are. A DataLoader that shuffles with its own ``generator`` has it seeded from ``seed`` at
the start of the run (and its state checkpointed), so every trial of a search sees the
same batches and a resumed run continues the same order; one without a generator
shuffles with torch's global generator, which ``fit`` seeds. A sampler with
``set_epoch`` (a ``DistributedSampler``) is told the epoch first. Its clean train metrics
use the first ``train_eval_size`` samples of the training loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regdial.training.batches import check_reiterable
from regdial.training.distributed import Distributed
from regdial.training.tasks import Dataset

__all__ = ["LoaderSource", "Source", "TensorSource"]

EVAL_BATCH = 1024


@dataclass
class Source:
    """What a run trains and scores on, and how its samples are split into batches."""

    name: str
    kind: str | None  # "classification", "regression", or None (the user's loss decides)
    num_classes: int | None
    input_kind: str | None
    train_eval_size: int

    def seed(self, seed: int) -> None:
        """Seed whatever draws the batch order (nothing for tensors: their order is seeded)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``."""

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[int, Any, float]]:
        """(index, batch, weight) from batch ``skip`` on; ``weight`` scales the local loss
        so that data-parallel ranks with unequal shares average to the global mean."""
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def split(self, name: str) -> Iterable[Any] | None:
        """The batches of ``train`` (its evaluation subset), ``val`` or ``test`` (None if absent)."""
        raise NotImplementedError

    @property
    def train_limit(self) -> int | None:
        """How many training samples a clean train evaluation reads (None: ``split`` is sized)."""
        return None

    @property
    def true_support(self) -> tuple[int, ...] | None:
        return None


def _chunks(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


class TensorSource(Source):
    """Batches of a ``Dataset``'s tensors in a seeded order (sharded across ranks)."""

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        seed: int,
        train_eval_size: int,
        distributed: Distributed | None = None,
    ) -> None:
        kind_classes = data.num_classes if data.kind == "classification" else None
        super().__init__(data.name, data.kind, kind_classes, data.input_kind, train_eval_size)
        self.data, self.batch_size, self.order_seed, self.distributed = data, batch_size, seed, distributed
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(len(data.x_train), generator=generator)[:train_eval_size]
        self._train_eval = (data.x_train[subset], data.y_train[subset])

    def _shard(self, rows: Tensor) -> Tensor:
        if self.distributed is None:
            return rows
        return rows[self.distributed.rank :: self.distributed.world]

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[int, Any, float]]:
        generator = torch.Generator().manual_seed(self.order_seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data.x_train), generator=generator)
        chunks = torch.split(order, self.batch_size)
        world = 1 if self.distributed is None else self.distributed.world
        for index in range(skip, len(chunks)):
            rows = self._shard(chunks[index])
            weight = len(rows) * world / len(chunks[index])
            if len(rows) == 0:  # a last global batch smaller than the ranks: this one sits it out
                rows = chunks[index][:1]
                weight = 0.0
            yield index, (self.data.x_train[rows], self.data.y_train[rows]), weight

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.x_train) / self.batch_size)

    def split(self, name: str) -> Iterable[Any] | None:
        d = self.data
        x, y = {"train": self._train_eval, "val": (d.x_val, d.y_val), "test": (d.x_test, d.y_test)}[name]
        if x is None or y is None:
            return None
        if self.distributed is not None:
            rank, world = self.distributed.rank, self.distributed.world
            x, y = x[rank::world], y[rank::world]
        return _chunks(x, y, EVAL_BATCH)

    @property
    def true_support(self) -> tuple[int, ...] | None:
        return self.data.true_support


class LoaderSource(Source):
    """The user's own DataLoaders (or any re-iterables of batches)."""

    def __init__(
        self,
        name: str,
        train: Iterable[Any],
        val: Iterable[Any],
        test: Iterable[Any] | None,
        kind: str | None,
        num_classes: int | None,
        train_eval_size: int,
    ) -> None:
        super().__init__(name, kind, num_classes, None, train_eval_size)
        self.train = check_reiterable("train", train)
        self.val = check_reiterable("val", val)
        self.test = None if test is None else check_reiterable("test", test)

    def _generator(self) -> torch.Generator | None:
        found = getattr(self.train, "generator", None)
        return found if isinstance(found, torch.Generator) else None

    def seed(self, seed: int) -> None:
        generator = self._generator()
        if generator is not None:
            generator.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        generator = self._generator()
        return {} if generator is None else {"generator": generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        generator = self._generator()
        if generator is not None and "generator" in state:
            saved = state["generator"]
            if not isinstance(saved, torch.Tensor):
                raise TypeError(f"generator must be a tensor of bytes, got a {type(saved).__name__}")
            generator.set_state(saved.to("cpu", torch.uint8))

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[int, Any, float]]:
        sampler = getattr(self.train, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        for index, batch in enumerate(self.train):
            if index >= skip:
                yield index, batch, 1.0

    def steps_per_epoch(self) -> int:
        try:
            return len(self.train)  # type: ignore[arg-type]
        except TypeError:
            return 0

    def split(self, name: str) -> Iterable[Any] | None:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def train_limit(self) -> int | None:
        return self.train_eval_size
