"""The max-norm constraint: cap the L2 norm of each unit's incoming weights.

Srivastava et al. (2014, the dropout paper): after each update, every slice ``w_i`` along
``dim`` (a row of a Linear weight, an output channel of a conv kernel) with
``||w_i|| > c`` is rescaled to ``w_i <- w_i * c / ||w_i||``. A projection is the prox of an
indicator function, so ``MaxNorm`` attaches as a penalty does (``attach_prox``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from regdial._checks import check_int, check_range
from regdial._tensors import group_by_device_and_dtype, tensor_list
from regdial.blocks import fused as kernels
from regdial.blocks.groups import transposed_ids

__all__ = ["MaxNorm", "max_norm_"]


@torch.no_grad()
def max_norm_(
    params: Tensor | Iterable[Tensor], max_norm: float, dim: int = 0, *, fused: bool | None = None
) -> None:
    """Rescale, in place, every slice along ``dim`` whose L2 norm exceeds ``max_norm``.

    With the default ``dim=0`` each slice is one output unit's incoming weights (a row of
    a Linear weight, an output channel of a conv kernel), as in the dropout paper. Slices
    within the bound are untouched; the projection is ``w_i <- w_i * min(1, c/||w_i||)``.
    Tensors with fewer than two dimensions (biases, normalization gains) have no incoming
    weight vectors and are left alone. ``fused`` (``None``: pick) takes the norms and the
    scaling of a (device, dtype) group in one compiled pass (``regdial.blocks.fused``) for
    ``dim=0``; else ``renorm_`` per tensor.
    """
    tensors = tensor_list(params)
    max_norm = check_range("max_norm", max_norm, low=0.0, low_open=True)
    fused = kernels.check_fused("fused", fused)
    if dim == 0 and fused is not False:
        matrices = [w for w in tensors if w.dim() >= 2]
        left = []
        for indices in group_by_device_and_dtype(matrices).values():
            group = [matrices[i] for i in indices]
            if not kernels.MAX_NORM.run_(fused, group, kernels.scalar(max_norm, group[0])):
                left += group
        tensors = left
    for w in tensors:
        if w.dim() < 2:
            continue
        axis = check_int("dim", dim, low=-w.dim(), high=w.dim() - 1)
        w.renorm_(2, axis, max_norm)


class MaxNorm:
    """The max-norm constraint as a ``Prox``: ``attach_prox(optimizer, MaxNorm(3.0))``.

    ``prox_`` ignores ``lr``: a projection does not depend on the step size.
    ``transposed``: 2-D weights stored ``(in, out)`` (transformers' ``Conv1D``,
    ``regdial.blocks.groups.transposed_weights``), whose slices are taken along the other
    axis: with ``dim=0`` each unit's incoming weights are a column of these.
    """

    def __init__(
        self, max_norm: float, dim: int = 0, *, fused: bool | None = None, transposed: Iterable[Tensor] = ()
    ) -> None:
        self.max_norm = check_range("MaxNorm.max_norm", max_norm, low=0.0, low_open=True)
        self.dim = check_int("MaxNorm.dim", dim)
        self.fused = kernels.check_fused("MaxNorm.fused", fused)
        self._transposed = transposed_ids(transposed, "MaxNorm.transposed")

    def prox_(self, params: Tensor | Iterable[Tensor], lr: float | Sequence[Tensor]) -> None:
        tensors = tensor_list(params)
        flipped = [w for w in tensors if id(w) in self._transposed]
        if flipped:
            tensors = [w for w in tensors if id(w) not in self._transposed]
            max_norm_(flipped, self.max_norm, 1 - self.dim % 2, fused=self.fused)
        if tensors:
            max_norm_(tensors, self.max_norm, self.dim, fused=self.fused)

    def __repr__(self) -> str:
        return f"MaxNorm(max_norm={self.max_norm!r}, dim={self.dim})"
