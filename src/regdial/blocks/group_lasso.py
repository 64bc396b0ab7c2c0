"""Group lasso: whole groups of weights (units, channels, input features) set to zero.

Yuan & Lin (2006), "Model selection and estimation in regression with grouped variables";
for networks, Scardapane et al. (2017), "Group sparse regularization for deep neural
networks". A ``Penalty`` like the others (``regdial.blocks.penalties``): ``value`` and the
exact ``prox_`` (block soft-thresholding).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor

from regdial._checks import check_choice, fail
from regdial._tensors import accumulation_dtype
from regdial.blocks.groups import transposed_ids
from regdial.blocks.penalties import Penalty
from regdial.blocks.schedules import Strength
from regdial.blocks.shrinkage import soft_threshold_, soft_threshold_diagonal_, write_rounded
from regdial.knobs import GROUP_LAYOUTS

__all__ = ["GroupLasso"]


class GroupLasso(Penalty):
    """Group lasso: ``R(w) = s * sum_g sqrt(|g|) * ||w_g||_2``.

    Groups never mix tensors. ``groups`` picks them inside each tensor:

    - ``"rows"`` (default): one group per output unit, the slices along dim 0 (the rows of
      a Linear weight, the output channels of a conv kernel ``(out, in, *k)``). Zeroing a
      group removes a unit or channel: structured pruning.
    - ``"columns"``: one group per input feature, the slices along dim 1 (input channels
      of a conv kernel). On the first layer this selects input features.
    - ``"tensor"``: the whole tensor is one group.

    A 1-D tensor (a bias) with ``"rows"`` has one group per element, i.e. plain L1.
    ``transposed``: 2-D weights stored ``(in, out)`` (transformers' ``Conv1D``,
    ``regdial.blocks.groups.transposed_weights``), where a unit's incoming weights are a
    column: their rows and columns swap. ``fused``: False or None only (no fused kernel).
    ``sqrt(|g|)``, with ``|g|`` the group's size, keeps large groups from being favoured
    (Yuan & Lin, 2006; for networks, Scardapane et al., 2017). Prox (block
    soft-thresholding), exactly zero for every group with ``||w_g|| <= lr*s*sqrt(|g|)``::

        w_g <- max(0, 1 - lr*s*sqrt(|g|) / ||w_g||_2) * w_g
    """

    elementwise: ClassVar[bool] = False
    sparsifying: ClassVar[bool] = True

    def __init__(
        self, strength: Strength, groups: str = "rows", *, foreach: bool | None = None,
        transposed: Iterable[Tensor] = (), fused: bool | None = None,
    ) -> None:  # fmt: skip
        if (
            fused is not None and fused is not False
        ):  # the flag every penalty takes, said where it cannot be kept
            fail("GroupLasso.fused", "False or None (GroupLasso has no fused kernel: its value and prox are eager)",
                 fused)  # fmt: skip
        super().__init__(strength, foreach=foreach)
        self.groups = check_choice("GroupLasso.groups", groups, GROUP_LAYOUTS)
        self._transposed = transposed_ids(transposed, "GroupLasso.transposed")

    def _kept(self, w: Tensor) -> int:
        """The dim a ``"rows"`` or ``"columns"`` group is one index of (rows and columns
        swap on a weight stored ``(in, out)``, ``transposed``)."""
        keep = 0 if self.groups == "rows" else 1
        return 1 - keep if id(w) in self._transposed else keep

    def _layout(self, w: Tensor) -> tuple[tuple[int, ...] | None, int]:
        """(the dims a group spans, or None for a whole tensor; the group size)."""
        if self.groups == "tensor" or w.dim() == 0:
            return None, w.numel()
        if self.groups == "columns" and w.dim() < 2:
            fail(
                "GroupLasso.groups",
                f"'rows' or 'tensor' for a 1-D parameter (shape {tuple(w.shape)})",
                self.groups,
            )
        keep = self._kept(w)
        dims = tuple(d for d in range(w.dim()) if d != keep)
        return dims, w.numel() // max(w.shape[keep], 1)

    def _group_norms(self, w: Tensor, dtype: torch.dtype, dims: tuple[int, ...] | None) -> Tensor:
        norms: Tensor
        if dims is None:
            norms = torch.linalg.vector_norm(w, dtype=dtype)
        elif not dims:  # 1-D rows: each element is a group, and its norm is |w|
            norms = w.to(dtype).abs()
        else:
            norms = torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=dtype)
        return norms

    def _sum(self, group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
        sums, roots = [], []
        for w in group:
            dims, size = self._layout(w)
            if not fast:
                sums.append(torch.stack([g.to(dtype).norm() for g in self._slices(w, dims)]).sum())
            elif dims is not None and not dims:  # 1-D rows: sum |w| in one reduction
                sums.append(torch.linalg.vector_norm(w, ord=1, dtype=dtype))
            else:
                sums.append(self._group_norms(w, dtype, dims).sum())
            roots.append(math.sqrt(size))
        # The sqrt(size) weights as one vector: a multiply per tensor cost 5 us each (0.5
        # ms of 1.8 on benchmarks/penalties.py's 96 tensors, slower than the naive loop).
        return torch.dot(torch.stack(sums), torch.tensor(roots, dtype=sums[0].dtype, device=sums[0].device))

    def _slices(self, w: Tensor, dims: tuple[int, ...] | None) -> list[Tensor]:
        if dims is None:
            return [w]
        return list(w.unbind(self._kept(w)))

    def _gradient(self, group: list[Tensor], scale: Tensor) -> list[Tensor]:
        grads = []
        for w in group:
            dims, size = self._layout(w)
            norms = self._group_norms(w, accumulation_dtype(w.dtype), dims)
            # d||w_g||/dw_g = w_g/||w_g||, and the subgradient 0 for an all-zero group.
            factor = torch.where(norms > 0, math.sqrt(size) / norms, 0.0)
            grads.append((w * factor).to(w.dtype).mul_(scale))
        return grads

    def _prox(self, group: list[Tensor], step: float, fast: bool) -> None:
        for w in group:
            dims, size = self._layout(w)
            threshold = step * math.sqrt(size)
            if not fast:
                for g in self._slices(w, dims):
                    norm = g.to(accumulation_dtype(g.dtype)).norm().item()
                    g.mul_(max(0.0, 1.0 - threshold / norm) if norm > 0 else 0.0)
                continue
            if dims == ():  # 1-D rows: one-element groups, block soft-threshold is L1's
                soft_threshold_(w, threshold)
                continue
            norms = self._group_norms(w, accumulation_dtype(w.dtype), dims)
            # 1 - t/0 = -inf clamps to 0: an all-zero group stays zero, without NaN.
            scale = (1.0 - threshold / norms).clamp_min_(0.0)
            if scale.dtype == w.dtype:
                w.mul_(scale)
            else:  # 16-bit weights: scale in float32, round once
                w.copy_(w * scale)

    def _prox_diagonal(self, w: Tensor, step: Tensor, strength: float) -> None:
        # In a diagonal metric the block prox has no closed form; each group takes its
        # mean step, which is exact when the step is constant within the group (and for
        # the one-element groups of 1-D rows) and keeps whole groups exactly at zero.
        dims, size = self._layout(w)
        if dims == ():
            soft_threshold_diagonal_(w, step, strength)
            return
        step = step.expand(w.shape)
        mean_step = step.mean() if dims is None else step.mean(dim=dims, keepdim=True)
        norms = self._group_norms(w, step.dtype, dims)
        scale = (1.0 - mean_step * (strength * math.sqrt(size)) / norms).clamp_min_(0.0)
        write_rounded(w, w * scale)

    def _fields(self) -> str:
        return f"{super()._fields()}, groups={self.groups!r}"
