"""Small helpers for lists of tensors: input checking and device/dtype grouping."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from regdial._checks import Described, fail

__all__ = ["accumulation_dtype", "group_by_device_and_dtype", "tensor_list"]

Params = Tensor | Iterable[Tensor]


def tensor_list(params: object, field: str = "params") -> list[Tensor]:
    """Return ``params`` as a non-empty list of tensors, or raise a one-line ValueError.

    A single tensor counts as a list of one: iterating it would silently yield its rows.
    Each tensor must appear once: a penalty over ``[w, w]`` would count ``w`` twice.
    """
    if isinstance(params, Tensor):
        tensors = [params]
    elif isinstance(params, str | bytes) or not isinstance(params, Iterable):
        fail(field, "a tensor or an iterable of tensors (model.parameters())", params)
    else:
        tensors = list(params)
    if not tensors:
        fail(field, "a non-empty iterable of tensors", Described("an empty list"))
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            fail(f"{field}[{i}]", "a torch.Tensor", tensor)
        if not tensor.is_floating_point():
            fail(f"{field}[{i}]", "a floating-point tensor", Described(f"dtype {tensor.dtype}"))
    if len({id(t) for t in tensors}) != len(tensors):
        # A tensor listed twice would be penalized, shrunk or thresholded twice, silently.
        first: dict[int, int] = {}
        for i, tensor in enumerate(tensors):
            j = first.setdefault(id(tensor), i)
            if j != i:
                fail(f"{field}[{i}]", "each tensor once (a tied weight, as GPT-2's wte and lm_head, is one "
                     "tensor: model.parameters() lists it once)", Described(f"{field}[{j}] again"))  # fmt: skip
    return tensors


def group_by_device_and_dtype(
    tensors: Sequence[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), for one foreach call per group."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype)].append(i)
    return dict(groups)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to sum in: float32 for 16-bit floats (their sums lose the small terms)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
