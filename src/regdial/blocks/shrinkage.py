"""The arithmetic the penalties share: soft-thresholds, sums and step sizes.

Each function here is one pass (or as few as eager PyTorch allows) over a tensor or a
group of tensors of one device and dtype; ``regdial.blocks.penalties`` composes them into
each penalty's ``value`` and ``prox_``. Plain torch, no state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from regdial._checks import Described, fail
from regdial._tensors import accumulation_dtype

__all__ = [
    "StepQuotients",
    "combine",
    "distance_squared",
    "elastic_sums",
    "homogeneous",
    "l1_sum",
    "on_cpu_wide",
    "soft_threshold_",
    "soft_threshold_diagonal_",
    "soft_threshold_reference_",
    "squares_sum",
    "step_tensor",
    "write_rounded",
]


def soft_threshold_(tensor: Tensor, threshold: float) -> Tensor:
    """In place: ``w <- sign(w) * max(|w| - threshold, 0)``, the prox of ``threshold*|w|``.

    One fused kernel (``softshrink`` written back into its input) instead of the four
    passes of sign/abs/sub/clamp; the arithmetic is done in float32 for 16-bit tensors.
    """
    torch.ops.aten.softshrink.out(tensor, threshold, out=tensor)
    return tensor


class StepQuotients(Sequence[Tensor]):
    """Per-coordinate step sizes kept as a quotient: ``lr_i = scale / d_i`` for each parameter.

    An adaptive optimizer's step is such a quotient: Adam's ``lr / (sqrt(v_hat) + eps)``
    is ``lr*sqrt(c2) / (sqrt(v) + eps*sqrt(c2))`` with ``c2`` the bias correction. A
    positively homogeneous prox then needs no step tensor at all: soft-thresholding obeys
    ``soft(w, t*scale/d) = soft(w*d, t*scale) / d``, three in-place passes over ``w`` plus
    one to build ``d``, where building ``lr_i`` and dividing by it took about twenty
    (``benchmarks/penalties.py``). Indexing gives the plain step tensor, for every other
    prox. ``denominator(i)`` must be positive (the optimizers' ``eps > 0``).

    Where ``d = sqrt(v) + e`` (Adam's, Adagrad's, RMSprop's), ``radicand`` and ``offset``
    give ``v`` (the optimizer's own state, not a copy) and ``e``, so that a fused kernel
    builds ``d`` in the same pass as the prox (``regdial.blocks.fused.quotient_prox_``).
    """

    def __init__(
        self,
        params: list[Tensor],
        denominator: Callable[[Tensor], Tensor],
        scale: Callable[[Tensor], float],
        *,
        radicand: Callable[[Tensor], Tensor] | None = None,
        offset: Callable[[Tensor], float] | None = None,
    ) -> None:
        self._params, self._denominator, self._scale = params, denominator, scale
        self._radicand, self._offset = radicand, offset

    def __len__(self) -> int:
        return len(self._params)

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        return self.denominator(index).reciprocal_().mul_(self.scale(index))

    def denominator(self, index: int) -> Tensor:
        """``d`` for parameter ``index``: a fresh tensor the caller may overwrite."""
        return self._denominator(self._params[index])

    def scale(self, index: int) -> float:
        return self._scale(self._params[index])

    def radicand(self, index: int) -> Tensor | None:
        """``v`` with ``d = sqrt(v) + offset(index)``, or None where ``d`` has another form."""
        return None if self._radicand is None or self._offset is None else self._radicand(self._params[index])

    def offset(self, index: int) -> float:
        assert self._offset is not None
        return self._offset(self._params[index])

    def times(self, factors: Sequence[float]) -> StepQuotients:
        """The same steps, parameter ``i``'s times ``factors[i]`` (a warm-up)."""
        index = {id(p): i for i, p in enumerate(self._params)}
        return StepQuotients(
            self._params,
            self._denominator,
            lambda p: self._scale(p) * factors[index[id(p)]],
            radicand=self._radicand,
            offset=self._offset,
        )


def homogeneous(w: Tensor, d: Tensor) -> bool:
    """Whether ``w`` can take the quotient form in place: full precision, same shape."""
    return w.dtype in (torch.float32, torch.float64) and d.dtype == w.dtype and d.shape == w.shape


def combine(parts: Sequence[Tensor], device: torch.device) -> Tensor:
    """Sum per-group scalars that may live on different devices or dtypes."""
    if len(parts) == 1:
        return parts[0]
    dtype = parts[0].dtype
    for part in parts[1:]:
        dtype = torch.promote_types(dtype, part.dtype)
    return torch.stack([part.to(device=device, dtype=dtype) for part in parts]).sum()


def step_tensor(step: object, w: Tensor, index: int) -> Tensor:
    if not isinstance(step, Tensor) or not step.is_floating_point():
        fail(f"lr[{index}]", "a floating-point tensor of step sizes", step)
    if step.shape == w.shape:  # the usual case: skip the slower broadcast check
        return step
    try:
        fits = torch.broadcast_shapes(step.shape, w.shape) == w.shape  # type: ignore[no-untyped-call]
    except RuntimeError:
        fits = False
    if not fits:
        fail(
            f"lr[{index}]",
            f"a tensor that broadcasts to shape {tuple(w.shape)}",
            Described(f"shape {tuple(step.shape)}"),
        )
    return step


def write_rounded(w: Tensor, result: Tensor) -> None:
    """Store a float32-or-wider result into ``w``, rounding once for 16-bit weights."""
    if result.data_ptr() != w.data_ptr():
        w.copy_(result)


def soft_threshold_diagonal_(w: Tensor, step: Tensor, threshold: float, shrink: Tensor | None = None) -> None:
    """``w <- sign(w) * max(|w| - threshold*step_i, 0) [/ shrink_i]``, per coordinate.

    Soft-thresholding is positively homogeneous, ``soft(w, t*a) = a * soft(w/a, t)`` for
    ``a > 0``: three passes with one fused kernel, instead of building ``+-t*a`` to clamp.
    """
    scaled = w.to(step.dtype) / step
    soft_threshold_(scaled, threshold)
    scaled.mul_(step)
    if shrink is not None:
        scaled.div_(shrink)
    write_rounded(w, scaled)


# On the CPU the sums below take one temporary per tensor: the CPU's 1-norm reduction is
# scalar code, and eager PyTorch has no fused reduction of a pointwise expression. Measured
# against the floor (benchmarks/penalties.py, medians of interleaved runs): sum|w| 1.5-1.7x
# by abs-then-sum against 1.9-2.5x by the 1-norm; elastic net 2.2-2.4x against 3.4-3.5x;
# L2-SP 1.9-2.0x by the difference's dot product against 2.7-2.8x by its norm. On other
# devices the foreach norms are fused multi-tensor kernels.


def on_cpu_wide(group: list[Tensor], dtype: torch.dtype) -> bool:
    """Full-precision tensors on the CPU (16-bit ones accumulate in float32 via the norms)."""
    return group[0].device.type == "cpu" and group[0].dtype == dtype


def l1_sum(group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
    if fast and not on_cpu_wide(group, dtype):
        return torch.stack(torch._foreach_norm(group, 1, dtype=dtype)).sum()
    # The formula spelled out in the accumulation dtype: the reference, and on the CPU also
    # the fast path. No ``to`` where it is a no-op: a call per tensor costs a microsecond.
    if group[0].dtype == dtype:
        return torch.stack([w.abs().sum() for w in group]).sum()
    return torch.stack([w.to(dtype).abs().sum() for w in group]).sum()


def squares_sum(group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
    if fast:
        return torch.stack(torch._foreach_norm(group, 2, dtype=dtype)).square().sum()
    return torch.stack([w.to(dtype).square().sum() for w in group]).sum()


def elastic_sums(group: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(sum|w|, sum w^2)`` over full-precision CPU tensors with one read of the weights:
    ``|w|``, then its sum and its dot product with itself while it is in cache."""
    l1, squares = [], []
    for w in group:
        magnitude = w.abs().reshape(-1)
        l1.append(magnitude.sum())
        squares.append(torch.dot(magnitude, magnitude))
    return torch.stack(l1).sum(), torch.stack(squares).sum()


def distance_squared(group: list[Tensor], anchors: list[Tensor]) -> Tensor:
    """``sum (w - w0)^2`` over full-precision CPU tensors: the difference, then its dot
    product with itself (BLAS) while it is in cache."""
    parts = []
    for w, anchor in zip(group, anchors, strict=True):
        difference = torch.sub(w, anchor).reshape(-1)
        parts.append(torch.dot(difference, difference))
    return torch.stack(parts).sum()


def soft_threshold_reference_(w: Tensor, threshold: float, scale: float = 1.0) -> None:
    wide = w.to(accumulation_dtype(w.dtype))
    w.copy_(wide.sign() * (wide.abs() - threshold).clamp_min(0.0) * scale)
