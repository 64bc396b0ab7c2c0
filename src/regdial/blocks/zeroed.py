"""What a proximal step has zeroed that the user should hear of, logged once per tensor.

A prox gives exact zeros, which is the point of L1; two kinds are worth a line, because
nothing fails while the model loses what it cannot get back: a tensor that became entirely
zero, and a weight a quarter of whose units (rows; columns of a weight stored ``(in, out)``)
have lost all their incoming weights. ``attach_prox`` calls both on its own schedule: the
first every 16 steps (its first elements, then a full pass only where they are zero), the
second every 256 (a full pass).
"""

from __future__ import annotations

import logging

from torch import Tensor

__all__ = ["DEAD_UNITS", "report_dead_units", "report_zeroed"]

logger = logging.getLogger("regdial.blocks.proximal")  # the prox's own log, where users look


def report_zeroed(params: list[Tensor], zeroed: set[int], names: dict[int, str], penalty: object) -> None:
    """Log, once per tensor, a parameter that has become entirely zero."""
    for p in params:
        if id(p) in zeroed or p.numel() <= 1:
            continue
        # A live tensor shows a nonzero in its first elements: the full pass (6 ms over 6.3M
        # weights on one CPU core, benchmarks/trainer.py's model) only where those are all zero.
        flat = p.detach().reshape(-1)
        if not bool(flat[:64].any()) and not bool(flat.any()):
            zeroed.add(id(p))
            name = names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
            logger.warning("%s has become entirely zero under %r", name, penalty)


DEAD_UNITS = 0.25
"""The share of a weight's units whose incoming weights are all zero that is logged."""


def report_dead_units(
    params: list[Tensor], dead: set[int], names: dict[int, str], penalty: object, transposed: frozenset[int]
) -> None:
    """Log, once per tensor, a weight a quarter or more of whose units (rows; columns of a
    weight stored ``(in, out)``) have all their incoming weights at zero, short of the
    whole tensor (``report_zeroed``'s). A from-scratch GPT-2 under ``L1(1e-4)`` in Adam's
    metric loses its query and key projections so, two thirds of one fused ``c_attn``
    each: where a query and its key are both zero neither gets a gradient back, so those
    units are dead for good, and the tensor never became entirely zero to be said."""
    for p in params:
        if id(p) in dead or p.dim() < 2 or p.shape[0] < 2:
            continue
        axis = 1 if id(p) in transposed and p.dim() == 2 else 0
        zero = (p.detach() == 0).movedim(axis, 0).reshape(p.shape[axis], -1).all(dim=1)
        count, units = int(zero.sum()), int(zero.numel())
        if count == units or count < DEAD_UNITS * units:
            continue
        dead.add(id(p))
        name = names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
        logger.warning(
            "%s: %d of its %d units have all their incoming weights at zero under %r (units whose partners are "
            "zero too, as a query's key, get no gradient back); lower the strength or leave it out (exclude=)",
            name, count, units, penalty,
        )  # fmt: skip
