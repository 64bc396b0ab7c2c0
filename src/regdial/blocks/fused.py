"""Fused kernels: each penalty's per-step work as one compiled pass per (device, dtype) group.

Eager PyTorch runs a pointwise expression and its reduction as separate kernels, each a
full read (and write) of the weights: ``sum|w|`` is ``abs`` then ``sum``, elastic net's
value two reductions, the L1 prox in Adam's metric ``sqrt``, ``add``, ``mul``, a threshold
and ``div``. ``torch.compile`` (C++ on the CPU, Triton on CUDA) fuses each of those into
one loop over the tensors. The kernels here are plain functions of lists of tensors:

==========================  ===================================================================
kernel                      math, per tensor ``w`` (``x = w - w0`` with anchors, else ``x = w``)
==========================  ===================================================================
``penalty_sums``            ``(sum|x|, sum x^2)`` over the group (the ones asked for)
``penalty_gradients``       ``g = a*sign(x) + b*x``, the closed-form (sub)gradient
``elastic_prox_``           ``w <- soft(c*w, c*t)``: ``soft(w, t) / (1 + u)``, ``c = 1/(1 + u)``
``quotient_prox_``          ``d = sqrt(v) + e_i``; ``w <- soft(w*d, t_i) / (d + u_i)``
``max_norm_``               each row ``w_r <- w_r * min(1, c / (||w_r|| + 1e-7))`` (``renorm_``)
==========================  ===================================================================

``soft(x, t) = sign(x) * max(|x| - t, 0)``, written as ``aten.softshrink`` computes it,
so a fused step gives the eager path's numbers to rounding (the compiled ``sqrt`` and
division of the quotient form can differ in the last bit, on a few percent of the weights)
and the same exact zeros of the weights it is given. Over a run those last bits grow as
any two orders of floating-point operations do: a long run's weights differ by about the
training's own noise, and a weight at the threshold may land on the other side. Strengths,
thresholds and shrink factors enter as tensors, never as Python numbers a compiled graph
would guard on: a strength on a schedule does not recompile.

``FusedKernel`` wraps each with the policy (``fused=None`` picks, as in ``torch.optim``):

- ``fused=False``: never; the caller's eager code runs (the reference, bit for bit as before).
- ``fused=True``: compile at the first call of each shape set. A device with no compiler
  (no C++ compiler for the CPU, no Triton for CUDA, Python without dynamo) raises a
  one-line ``InputError``.
- ``fused=None``: compile once a group of at least ``MIN_ELEMENTS`` elements has been
  seen ``MIN_CALLS`` times: a small model or a short run never pays a compile it cannot
  repay (8.9 s cold, about 2 s from inductor's cache, for a kernel that saves a few ms a
  step on 6.3M parameters). Where compiling is impossible it logs one line and stays eager.
  A kernel measured slower than eager on a device type is not picked there
  (``pick_on``: L2's sum of squares stays eager on the CPU).

Either way a compile that fails logs one warning and that kernel stays eager from then
on; a kernel compiled for more shape sets than dynamo's ``recompile_limit`` takes the
eager path for new ones. Only float32 and float64 groups are fused: the eager path does
16-bit arithmetic in float32 and rounds once, in an order per penalty a generic kernel
would not reproduce. ``compile_seconds()`` reports what compiling cost.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from regdial._checks import fail

__all__ = [
    "MIN_CALLS",
    "MIN_ELEMENTS",
    "FusedKernel",
    "check_fused",
    "compile_seconds",
    "compiler_missing",
    "elastic_prox_",
    "max_norm_",
    "penalty_gradients",
    "penalty_sums",
    "quotient_prox_",
]

logger = logging.getLogger(__name__)

MIN_ELEMENTS = 1 << 20
"""With ``fused=None``, groups smaller than this stay eager (a compile costs seconds)."""
MIN_CALLS = 100
"""With ``fused=None``, a shape set is compiled at its ``MIN_CALLS``-th call: a run that
short would not repay the compile."""

FUSED_DTYPES = (torch.float32, torch.float64)

R = TypeVar("R")


def _soft(x: Tensor, threshold: Tensor) -> Tensor:
    """``sign(x) * max(|x| - t, 0)`` as ``aten.softshrink`` computes it (exact zeros)."""
    return torch.where(x > threshold, x - threshold, torch.where(x < -threshold, x + threshold, 0.0))


def penalty_sums(
    group: list[Tensor], anchors: list[Tensor] | None, absolute: bool, squares: bool
) -> list[Tensor]:
    """``[sum|x|]`` and/or ``[sum x^2]`` over the group, ``x = w - w0`` (or ``w``)."""
    xs = group if anchors is None else [w - a for w, a in zip(group, anchors, strict=True)]
    if absolute and squares:
        # A tensor's two sums side by side: inductor reduces them in one loop over it
        # (elastic net 1.65x the floor on the CPU, against 1.8x per-tensor pairs and 2.4x
        # as two lists of sums, benchmarks/penalties.py's model).
        both = torch.stack([s for x in xs for s in (_by_rows(x.abs()), _by_rows(x * x))]).view(-1, 2).sum(0)
        return [both[0], both[1]]
    if absolute:
        return [torch.stack([_by_rows(x.abs()) for x in xs]).sum()]
    return [torch.stack([_by_rows(x * x) for x in xs]).sum()]


def penalty_squares(
    group: list[Tensor], anchors: list[Tensor] | None, absolute: bool, squares: bool
) -> list[Tensor]:
    """``penalty_sums`` under a code object of its own: dynamo keeps its compiled entries,
    and counts them against ``recompile_limit``, per code object, so ``SQUARES`` and
    ``SUMS`` sharing one would each use up the other's shape sets."""
    return penalty_sums(group, anchors, absolute, squares)


def _by_rows(x: Tensor) -> Tensor:
    """``x.sum()``, a matrix's rows first: inductor's CPU loop over the rows' sums of
    ``|w|`` vectorizes where one flat reduction of it does not, and a row is short of the
    4096 elements past which inductor sums in cascades (L1's sums in 0.67 of the time,
    elastic net's both in 0.87, on benchmarks/penalties.py's model; the squares, called
    under ``no_grad`` on the tensors themselves, 1.5x the floor against 1.9x flat)."""
    return x.sum(-1).sum() if x.dim() > 1 else x.sum()


def penalty_gradients(
    group: list[Tensor], anchors: list[Tensor] | None, sign: Tensor | None, linear: Tensor | None
) -> list[Tensor]:
    """New tensors ``sign * sign(x) + linear * x`` (a term is left out where it is None)."""
    xs = group if anchors is None else [w - a for w, a in zip(group, anchors, strict=True)]
    grads = []
    for x in xs:
        if sign is not None and linear is not None:
            grads.append(torch.sign(x) * sign + x * linear)
        elif sign is not None:
            grads.append(torch.sign(x) * sign)
        else:
            assert linear is not None
            grads.append(x * linear)
    return grads


def elastic_prox_(group: list[Tensor], threshold: Tensor, shrink: Tensor) -> None:
    """In place ``w <- soft(w*c, t)``, with ``c = shrink`` and ``t = threshold`` (already
    times ``c``): the order of the eager path's shrink-then-threshold."""
    for w in group:
        w.copy_(_soft(w * shrink, threshold))


def quotient_prox_(
    group: list[Tensor], radicands: list[Tensor], offsets: Tensor, thresholds: Tensor, additions: Tensor
) -> None:
    """In place ``w <- soft(w*d, t_i) / (d + u_i)``, ``d = sqrt(v) + e_i``: the prox in a
    diagonal metric with steps ``scale_i / d`` (``StepQuotients``), for L1 (``u = 0``),
    L2 (``t = 0``) and elastic net, in one pass over ``w`` and ``v``."""
    for i, (w, v) in enumerate(zip(group, radicands, strict=True)):
        d = torch.sqrt(v) + offsets[i]
        w.copy_(_soft(w * d, thresholds[i]) / (d + additions[i]))


def max_norm_(group: list[Tensor], max_norm: Tensor) -> None:
    """In place, each row (slice along dim 0) ``w_r <- w_r * c / (||w_r|| + 1e-7)`` where
    ``||w_r|| > c``: ``torch.renorm_(2, 0, c)``'s arithmetic, the norm and the scaling in
    one kernel per tensor."""
    for w in group:
        rows = w.reshape(w.shape[0], -1)
        norms = torch.sqrt((rows * rows).sum(dim=1, keepdim=True))
        factor = torch.where(norms > max_norm, max_norm / (norms + 1e-7), 1.0)
        w.copy_((rows * factor).reshape(w.shape))


_compile_seconds: dict[str, float] = {}


def compile_seconds() -> dict[str, float]:
    """Seconds spent compiling so far, per kernel (the first call of each shape set)."""
    return dict(_compile_seconds)


@functools.cache
def compiler_missing(device_type: str) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device_type`` here, or None."""
    from torch._dynamo.eval_frame import is_dynamo_supported

    if not is_dynamo_supported():
        return "torch.compile is not supported on this Python or platform"
    if device_type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:  # inductor's InvalidCxxCompiler, or whatever its search raises
            return "no C++ compiler found"
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    return f"regdial compiles fused kernels for cpu and cuda only, not {device_type}"


def check_fused(field: str, fused: object, foreach: bool | None = None) -> bool | None:
    """Validate a ``fused`` flag (and its ``foreach``) where it enters (a constructor)."""
    if fused is not None and not isinstance(fused, bool):
        fail(field, "True, False or None (pick)", fused)
    if foreach is not None and not isinstance(foreach, bool):
        fail(field.rsplit(".", 1)[0] + ".foreach", "True, False or None (pick)", foreach)
    if fused is True and foreach is False:
        fail(field, "False or None with foreach=False (the reference loop)", fused)
    return fused


class FusedKernel(Generic[R]):
    """A kernel above, compiled on demand under the policy of the module docstring.

    ``kernel(fused, group, *args)`` returns the kernel's result, or None where the caller
    should take its eager path; ``kernel.run_(...)``, for the in-place kernels, whether it
    ran. ``group`` is one (device, dtype) group; it picks the shape
    set. Arguments other than tensors must be constant for a given caller (they are
    guarded on: ``absolute``, ``squares``, whether there are anchors).
    """

    def __init__(self, function: Callable[..., R], pick_on: tuple[str, ...] = ("cpu", "cuda")) -> None:
        self.function = function
        self.pick_on = pick_on  # the device types where fused=None may compile it
        self.name = function.__name__
        self._compiled: Callable[..., R] | None = None
        self._calls: dict[tuple[Any, ...], int] = {}
        self._ready: set[tuple[Any, ...]] = set()
        self._scalar_keys: set[tuple[Any, ...]] = set()  # keys of groups with a 0-dim tensor
        self._broken = False

    def __call__(self, fused: bool | None, group: list[Tensor], *args: Any, field: str = "fused") -> R | None:
        return self._apply(fused, group, args, field=field)[1]

    def run_(
        self,
        fused: bool | None,
        group: list[Tensor],
        *args: Any,
        key: tuple[Any, ...] | None = None,
        field: str = "fused",
    ) -> bool:
        """Whether the in-place kernel ran on these arguments (``key``: their ``key``, where
        the caller keeps it; ``field``: the flag's name in a refusal, ``L1.fused``)."""
        return self._apply(fused, group, args, key, field, in_place=True)[0]

    def wants(self, fused: bool | None, group: list[Tensor], *, key: tuple[Any, ...]) -> bool:
        """Whether a call with arguments of this ``key`` would run compiled (a call
        ``fused=None`` has not yet compiled for counts toward ``MIN_CALLS``): a caller that
        must choose its path before it changes any state (``FusedAdamW``) asks first."""
        if not self._eligible(fused, group):
            return False
        return key in self._ready or self._wanted(fused, group, key)

    def _eligible(self, fused: bool | None, group: list[Tensor]) -> bool:
        """Whether this group may run compiled at all: checked before the key, whose
        building costs a tuple per tensor a call."""
        if fused is False or self._broken or group[0].dtype not in FUSED_DTYPES:
            return False
        return fused is not None or group[0].device.type in self.pick_on

    @staticmethod
    def key(group: list[Tensor], args: tuple[Any, ...]) -> tuple[Any, ...]:
        """What a call is compiled for: the group's device, dtype and shapes, and which
        arguments are None (and the flags)."""
        variant = tuple(arg if isinstance(arg, bool) else arg is None for arg in args)
        return (group[0].device, group[0].dtype, variant, *(tuple(w.shape) for w in group))

    def _apply(
        self,
        fused: bool | None,
        group: list[Tensor],
        args: tuple[Any, ...],
        key: tuple[Any, ...] | None = None,
        field: str = "fused",
        *,
        in_place: bool = False,
    ) -> tuple[bool, R | None]:
        if not self._eligible(fused, group):
            return False, None
        key = self.key(group, args) if key is None else key
        if key not in self._ready and not self._wanted(fused, group, key, field):
            return False, None
        # Without autograd (every caller's own context: a value's forward, its backward, a
        # step): the compiled graph and its guards skip autograd's. The tensors themselves,
        # not detached views: a view a call costs 0.9 us a tensor, and new tensor objects
        # each call cost dynamo's guards about as much again (0.2 ms of 1.9 on 96 tensors).
        with torch.no_grad():
            if in_place:
                if key not in self._ready and any(w.dim() == 0 for w in group):
                    self._scalar_keys.add(key)
                if self._scalar_keys and key in self._scalar_keys:
                    group, args = _as_vectors(group, args)
            if key not in self._ready:
                return self._first_call(key, group, args)
            compiled = self._compiled
            assert compiled is not None
            return True, compiled(group, *args)

    def _wanted(
        self, fused: bool | None, group: list[Tensor], key: tuple[Any, ...], field: str = "fused"
    ) -> bool:
        device_type = group[0].device.type
        if fused is None and device_type not in self.pick_on:
            return False  # measured slower than the eager path there
        missing = compiler_missing(device_type)
        if missing is not None:
            if fused is True:
                fail(field, f"False or None on {device_type} ({missing})", fused)
            self._say_once(device_type, f"regdial: fused kernels off on {device_type}: {missing}; eager path")
            return False
        import torch._dynamo.config

        limit = int(torch._dynamo.config.recompile_limit)
        if len(self._ready) >= limit:
            self._say_once("limit", f"regdial: {self.name} compiled for {limit} shape sets; eager for more")
            return False
        if fused is True:
            return True
        if sum(w.numel() for w in group) < MIN_ELEMENTS:
            return False
        calls = self._calls.get(key, 0) + 1
        self._calls[key] = calls
        return calls >= MIN_CALLS

    def _first_call(
        self, key: tuple[Any, ...], group: list[Tensor], args: tuple[Any, ...]
    ) -> tuple[bool, R | None]:
        if self._compiled is None:
            # dynamo's guards already check every input's size and stride (static shapes):
            # inductor's own asserts would check them again, 1 us a tensor a call.
            self._compiled = torch.compile(
                self.function, fullgraph=True, dynamic=False, options={"size_asserts": False}
            )
        start = time.perf_counter()
        try:
            result = self._compiled(group, *args)
        except Exception as error:  # inductor's errors have no common base; eager is always right
            self._broken = True
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            logger.warning(
                "regdial: compiling %s failed (%s: %s); eager path from now on",
                self.name,
                type(error).__name__,
                first,
            )
            return False, None
        seconds = time.perf_counter() - start
        _compile_seconds[self.name] = _compile_seconds.get(self.name, 0.0) + seconds
        self._ready.add(key)
        logger.info("regdial: compiled %s for %d tensors in %.1f s", self.name, len(group), seconds)
        return True, result

    @staticmethod
    def _say_once(what: str, message: str) -> None:
        if what not in _SAID:
            _SAID.add(what)
            logger.warning(message)


def _as_vectors(group: list[Tensor], args: tuple[Any, ...]) -> tuple[list[Tensor], tuple[Any, ...]]:
    """The 0-dim tensors of ``group`` and of the list arguments as 1-element views of
    themselves. Inductor's CPU code loses in-place writes into 0-dim float64 tensors (torch
    2.13: ``w.copy_(w * c)`` compiled leaves a 0-dim ``w`` as it was, float32 and 1-D alike
    are written): a learned temperature stood still under ``FusedAdamW``."""

    def vector(t: Any) -> Any:
        return t.view(1) if isinstance(t, Tensor) and t.dim() == 0 else t

    return [vector(w) for w in group], tuple(
        [vector(t) for t in a] if isinstance(a, list) else a for a in args
    )


_SAID: set[str] = set()
"""Reasons already logged: a missing compiler is said once per process, not per kernel."""

# The sums as written here beat eager on the CPU where eager takes a temporary per tensor
# (``benchmarks/penalties.py``, 6.3M parameters, 1 thread, --fused on vs off: L1's value
# 1.7x the floor against 1.9x, elastic net's 2.1x against 2.4x, L2-SP's 2.0x against
# 2.9x), but not the plain squares, L2's, which eager takes in one foreach 2-norm (1.3x
# against 1.5x compiled): on the CPU "pick for me" keeps those eager (``SQUARES``).
SUMS = FusedKernel(penalty_sums)
SQUARES = FusedKernel(penalty_squares, pick_on=("cuda",))
GRADIENTS = FusedKernel(penalty_gradients)
ELASTIC_PROX = FusedKernel(elastic_prox_)
QUOTIENT_PROX = FusedKernel(quotient_prox_)
MAX_NORM = FusedKernel(max_norm_)


def scalar(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype where a kernel can read it: on the
    CPU for CPU tensors (no transfer), on the device otherwise."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def scalars(values: list[float], like: Tensor) -> Tensor:
    """Per-tensor values as one 1-D tensor (one transfer, not one per tensor)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)
