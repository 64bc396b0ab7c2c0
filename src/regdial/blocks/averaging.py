"""Weight averaging: EMA and SWA on ``torch.optim.swa_utils``.

Averaging the weights along the end of training lands in a flatter, better-generalizing
region than the last iterate (Izmailov et al., 2018, "Averaging Weights Leads to Wider
Optima and Better Generalization"); an exponential moving average (EMA) does the same
continuously, as timm and most modern recipes do.

Both are ``torch.optim.swa_utils.AveragedModel`` with two fixes on top:

- integer buffers (BatchNorm's ``num_batches_tracked``) are copied, not averaged: torch's
  EMA would compute ``int * decay + int * (1 - decay)`` and truncate it;
- ``attach(optimizer)`` updates the average after every ``optimizer.step()``, so it works
  inside any loop.

BatchNorm statistics of an average are not the average of statistics: call
``recompute_batchnorm(averaged, loader)`` (torch's ``update_bn``) before evaluating it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn, update_bn
from torch.utils.hooks import RemovableHandle

from regdial._checks import check_int, check_range, fail
from regdial.blocks.fused_adamw import Handles, fusing_optimizer

__all__ = ["EMA", "SWA", "recompute_batchnorm"]

TensorList = tuple[Tensor, ...] | list[Tensor]
MultiAvgFn = Callable[[TensorList, TensorList, Tensor | int], None]


def _floats_only(average: MultiAvgFn) -> MultiAvgFn:
    """Average floating tensors with ``average``; copy integer ones (counters)."""

    def update(averaged: TensorList, current: TensorList, num_averaged: Tensor | int) -> None:
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            average(averaged, current, num_averaged)
        else:
            torch._foreach_copy_(averaged, current)

    return update


def _members(modules: list[nn.Module]) -> tuple[Any, ...]:
    """What identifies the tensors of a module tree: every module's own parameters,
    buffers and children, each tensor with its dtype and device (``.data =`` moves one)."""
    return tuple(
        [
            None if tensor is None else (id(tensor), tensor.dtype, tensor.device)
            for module in modules
            for table in (module._parameters, module._buffers)
            for tensor in table.values()
        ]
        + [id(child) for module in modules for child in module._modules.values()]
    )


def _decay_at(decay: float, warmup: bool, count: int) -> float:
    """An EMA's decay at the update after ``count`` completed ones: ``min(decay, (1 + t) /
    (10 + t))`` with the warm-up, else ``decay``."""
    return min(decay, (1 + count) / (10 + count)) if warmup else decay


class _Averaged(AveragedModel):
    def attach(self, optimizer: Optimizer, model: nn.Module, *, every: int = 1) -> RemovableHandle:
        """Call ``update_parameters(model)`` after every ``every``-th ``optimizer.step()``."""
        if not isinstance(optimizer, Optimizer):
            fail("optimizer", "a torch.optim.Optimizer", optimizer)
        every = check_int("every", every, low=1)
        steps = [0]
        done: set[int] = set()  # the model's tensors a FusedAdamW averaged in its step

        def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
            steps[0] += 1
            if steps[0] % every == 0:
                self.update_parameters(model, done=done)
            done.clear()

        handle = optimizer.register_step_post_hook(hook)
        fusing = fusing_optimizer(optimizer)
        if fusing is None or every != 1 or not isinstance(self, EMA):
            return handle
        ema = self
        return Handles(handle, fusing.fuse_average(handle.id, lambda: ema.fused_plan(model), done))

    def update_parameters(self, model: nn.Module, *, done: set[int] | None = None) -> None:
        """torch's update (``done``: ids of the model's tensors already averaged this step,
        which only ``EMA`` knows how to skip)."""
        super().update_parameters(model)


class EMA(_Averaged):
    """``w_ema <- decay * w_ema + (1 - decay) * w`` after each update, buffers included.

    The first update copies the model. With ``warmup`` the decay used at update ``t`` is
    ``min(decay, (1 + t) / (10 + t))``, so the average forgets its random start quickly
    (as in timm and TensorFlow's ExponentialMovingAverage).

    Frozen parameters (``requires_grad=False`` when the average is made: a LoRA model's
    base, a frozen backbone) are shared with the model, not copied: their average is
    themselves, and a copy would double the memory of a model that trains adapters only.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        warmup: bool = False,
        device: torch.device | None = None,
    ) -> None:
        decay = check_range("EMA.decay", decay, low=0.0, high=1.0)
        updates = [0]  # completed updates, for the warm-up

        def ema(averaged: TensorList, current: TensorList, num_averaged: Tensor | int) -> None:
            torch._foreach_lerp_(averaged, current, 1.0 - _decay_at(decay, warmup, updates[0]))

        frozen: dict[int, Any] = {id(p): p for p in model.parameters() if not p.requires_grad}
        if frozen and device is None:
            super().__init__(nn.Module(), multi_avg_fn=_floats_only(ema), use_buffers=True)
            self.module = copy.deepcopy(model, frozen)  # the frozen parameters stay the model's own
        else:
            super().__init__(model, device=device, multi_avg_fn=_floats_only(ema), use_buffers=True)
        self.shares = bool(frozen) and device is None
        self.decay, self.warmup, self._updates = decay, bool(warmup), updates
        self._cache: tuple[nn.Module, list[nn.Module], tuple[Any, ...], Any] | None = None
        self._table: tuple[Any, dict[int, Tensor]] | None = None  # fused_plan's, with its groups

    @torch.no_grad()
    def update_parameters(self, model: nn.Module, *, done: set[int] | None = None) -> None:
        """torch's update over the tensors that are not shared, each (device, dtype) group in
        one foreach call; the groups are kept while neither model's tensors change. ``done``:
        the ids of the model's tensors a ``FusedAdamW`` step already averaged (this same
        update, in its loop), left out here; that step's ``fused_plan`` checked the kept
        groups a moment ago, within the same ``optimizer.step()``, so they are not checked
        again (a walk of both models' trees, 0.4 ms a step on 98 tensors)."""
        cached = self._cache
        groups = cached[3] if done and cached is not None and cached[0] is model else self._groups(model)
        if groups is None:  # the average lives elsewhere: torch's update moves the model's tensors
            super().update_parameters(model)
        else:
            if done:
                groups = [
                    ([a for a, c in zip(averaged, current, strict=True) if id(c) not in done],
                     [c for c in current if id(c) not in done])
                    for averaged, current in groups
                ]  # fmt: skip
            for averaged, current in groups:
                if not averaged:
                    continue
                if self._updates[0] == 0:  # counted in Python: no device sync a step
                    torch._foreach_copy_(averaged, current)
                elif self.multi_avg_fn is not None:
                    self.multi_avg_fn(averaged, current, self.n_averaged)
            self.n_averaged += 1
        self._updates[0] += 1

    def fused_plan(self, model: nn.Module) -> tuple[dict[int, Tensor], float] | None:
        """For ``FusedAdamW``: this average's floating tensor of each of the model's (by its
        id), and the weight ``a`` of the coming update, ``e <- lerp(e, w, a)`` (1 at the
        first: a copy); None where the average lives on another device."""
        groups = self._groups(model)
        if groups is None:
            return None
        kept = self._table
        if kept is None or kept[0] is not groups:  # the same table while the groups are kept
            table = {id(c): a for averaged, current in groups for a, c in zip(averaged, current, strict=True)
                     if a.is_floating_point()}  # fmt: skip
            kept = self._table = (groups, table)
        count = self._updates[0]
        return kept[1], 1.0 if count == 0 else 1.0 - self.decay_at(count)

    def decay_at(self, count: int) -> float:
        """The decay of the update after ``count`` completed ones (``_decay_at``)."""
        return _decay_at(self.decay, self.warmup, count)

    def _groups(self, model: nn.Module) -> list[tuple[list[Tensor], list[Tensor]]] | None:
        """The averaged and the model's tensors by (device, dtype), or None where a pair's
        devices differ. Walking both modules' trees (``parameters()``, ``buffers()``) cost
        0.4 ms a step on a 98-tensor model, a fifth of the average's own pass over its
        6.3M weights on one CPU core: the groups are kept, and rebuilt when a tensor or
        module is replaced, added or moved (``_members``: every module's own entries)."""
        cached = self._cache
        if cached is not None and cached[0] is model and cached[2] == _members(cached[1]):
            kept: list[tuple[list[Tensor], list[Tensor]]] | None = cached[3]
            return kept
        modules = list(model.modules()) + list(self.module.modules())
        by_kind: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        pairs = zip(
            itertools.chain(self.module.parameters(), self.module.buffers()),
            itertools.chain(model.parameters(), model.buffers()),
            strict=True,
        )
        groups: list[tuple[list[Tensor], list[Tensor]]] | None = []
        for a, c in pairs:
            if a is c:
                continue
            if a.device != c.device:
                groups = None
                break
            averaged, current = by_kind.setdefault((a.device, a.dtype), ([], []))
            averaged.append(a)
            current.append(c)
        if groups is not None:
            groups = list(by_kind.values())
        self._cache = (model, modules, _members(modules), groups)
        return groups

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]
        state["_cache"] = state["_table"] = (
            None  # this average's tensors and the model's: a copy builds its own
        )
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load the average and continue its warm-up where it was (``n_averaged`` updates)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._updates[0] = int(self.n_averaged)
        return result

    def extra_repr(self) -> str:
        return f"decay={self.decay}, warmup={self.warmup}"


class SWA(_Averaged):
    """The equal-weight average of the models it is updated with (stochastic weight averaging).

    Buffers are not averaged (they follow the model); recompute BatchNorm statistics with
    ``recompute_batchnorm`` before evaluating. Pair it with ``torch.optim.swa_utils.SWALR``
    for the usual constant or cyclic learning rate over the averaging phase.
    """

    def __init__(self, model: nn.Module, *, device: torch.device | None = None) -> None:
        average: MultiAvgFn = get_swa_multi_avg_fn()  # type: ignore[no-untyped-call]
        super().__init__(model, device=device, multi_avg_fn=_floats_only(average), use_buffers=False)


def recompute_batchnorm(
    averaged: nn.Module, loader: Iterable[Any], device: torch.device | None = None
) -> None:
    """Recompute BatchNorm running statistics of ``averaged`` with one pass over ``loader``."""
    update_bn(loader, averaged, device)
