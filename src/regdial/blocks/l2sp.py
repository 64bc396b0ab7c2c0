"""L2-SP: a pull toward the pretrained weights, a ``Penalty`` like the others.

Li, Grandvalet & Davoine (2018), "Explicit Inductive Bias for Transfer Learning with
Convolutional Networks". The formula, the prox and the anchors are in the class docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from regdial._checks import Described, fail
from regdial.blocks.penalties import Penalty
from regdial.blocks.schedules import Strength
from regdial.blocks.shrinkage import distance_squared, on_cpu_wide

__all__ = ["L2SP"]

logger = logging.getLogger(__name__)


class L2SP(Penalty):
    """L2-SP: ``R(w) = (s/2) * sum (w - w0)^2``, toward the starting point ``w0``.

    For fine-tuning: instead of pulling weights toward zero, which erases what
    pre-training learned, pull them toward the pretrained weights ``w0`` (Li, Grandvalet &
    Davoine, 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks"). Prox (shrink toward the anchor)::

        w <- w0 + (w - w0) / (1 + lr*s)

    Args:
        strength: ``s >= 0`` or a schedule.
        anchor: the pretrained weights: a module (a copy of the pretrained model, or the
            model itself before fine-tuning starts) or a state dict.
        model: the model being trained, whose parameters are matched to the anchor by
            name and shape. Omit it to anchor ``anchor``'s own parameters at their current
            values: ``L2SP(0.01, model)`` right after loading pretrained weights.

    Parameters with no anchor of the same name and shape (a new classification head) are
    left alone by ``value`` and ``prox_``; give them an ``L2`` of their own. The anchor is
    copied, so it costs one more copy of the anchored weights in memory; frozen parameters
    (``requires_grad=False``, a LoRA model's base) are not anchored. Its proximal step
    has no warm-up: at the start the weights are the anchor, so a large early step can only
    hold them there.
    """

    warmup: ClassVar[bool] = False
    anchored: ClassVar[bool] = True

    def __init__(
        self,
        strength: Strength,
        anchor: nn.Module | Mapping[str, Tensor],
        *,
        model: nn.Module | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(strength, foreach=foreach, fused=fused)
        if isinstance(anchor, nn.Module):
            reference: Mapping[str, Tensor] = dict(anchor.named_parameters())
            model = anchor if model is None else model
        elif isinstance(anchor, Mapping):
            reference = anchor
            if model is None:
                fail("L2SP.model", "the model being trained when anchor is a state dict", None)
        else:
            fail("L2SP.anchor", "an nn.Module or a state dict of tensors", anchor)
        if not isinstance(model, nn.Module):
            fail("L2SP.model", "an nn.Module", model)
        self._anchors: dict[int, tuple[Tensor, Tensor]] = {}
        unanchored = []
        for name, param in model.named_parameters():
            if (
                not param.requires_grad
            ):  # frozen (a LoRA base): it never moves, and a copy would cost its size
                continue
            source = reference.get(name)
            if not isinstance(source, Tensor) or source.shape != param.shape:
                unanchored.append(name)
                continue
            anchor_copy = source.detach().to(device=param.device, dtype=param.dtype, copy=True)
            self._anchors[id(param)] = (param, anchor_copy)
        if not self._anchors:
            fail(
                "L2SP.anchor",
                "weights sharing names and shapes with the model's parameters",
                Described("none that match"),
            )
        if unanchored:
            logger.info(
                "L2SP: %d parameters have no anchor and are left alone: %s", len(unanchored), unanchored
            )

    def parameters(self) -> list[Tensor]:
        """The anchored parameters, e.g. for ``attach_prox(optimizer, l2sp, params=...)``."""
        return [param for param, _ in self._anchors.values()]

    def anchors(self, model: nn.Module) -> dict[str, Tensor]:
        """The anchors under ``model``'s parameter names, for a checkpoint: a run resumed
        from one starts with its trained weights, which are not its anchor."""
        return {
            name: self._anchors[id(param)][1]
            for name, param in model.named_parameters()
            if self._acts_on(param)
        }

    def load_anchors(self, model: nn.Module, anchors: Mapping[str, Tensor]) -> None:
        """Restore what ``anchors(model)`` returned: every anchored parameter's, by name."""
        for name, param in model.named_parameters():
            if not self._acts_on(param):
                continue
            saved = anchors.get(name)
            if not isinstance(saved, Tensor) or saved.shape != param.shape:
                fail(f"L2SP.anchors.{name}", f"a tensor of shape {tuple(param.shape)}",
                     Described("none" if saved is None else f"shape {tuple(getattr(saved, 'shape', ()))}"))  # fmt: skip
            self._anchors[id(param)][1].copy_(saved)

    def _acts_on(self, tensor: Tensor) -> bool:
        entry = self._anchors.get(id(tensor))
        return entry is not None and entry[0] is tensor

    def _anchors_for(self, group: list[Tensor]) -> list[Tensor]:
        anchors = []
        for w in group:
            param, anchor = self._anchors[id(w)]
            if anchor.device != w.device or anchor.dtype != w.dtype:  # the model moved
                anchor = anchor.to(device=w.device, dtype=w.dtype)
                self._anchors[id(w)] = (param, anchor)
            anchors.append(anchor)
        return anchors

    def _fused_terms(self) -> tuple[float, float]:
        return 0.0, 0.5

    def _fused_anchors(self, group: list[Tensor]) -> list[Tensor]:
        return self._anchors_for(group)

    def _sum(self, group: list[Tensor], dtype: torch.dtype, fast: bool) -> Tensor:
        anchors = self._anchors_for(group)
        if fast and on_cpu_wide(group, dtype):
            return 0.5 * distance_squared(group, anchors)
        if fast:  # other devices, 16-bit weights: the norm of the difference, accumulated wide
            distances = [
                torch.linalg.vector_norm(w - a, dtype=dtype) for w, a in zip(group, anchors, strict=True)
            ]
            return 0.5 * torch.stack(distances).square().sum()
        return (
            0.5
            * torch.stack(
                [(w.to(dtype) - a.to(dtype)).square().sum() for w, a in zip(group, anchors, strict=True)]
            ).sum()
        )

    def _gradient(self, group: list[Tensor], scale: Tensor) -> list[Tensor]:
        grads = list(torch._foreach_sub(group, self._anchors_for(group)))
        torch._foreach_mul_(grads, scale)
        return grads

    def _prox(self, group: list[Tensor], step: float, fast: bool) -> None:
        anchors = self._anchors_for(group)
        if fast:
            # w0 + (w - w0)/(1 + t) = lerp(w, w0, t/(1 + t)): one pass over w and w0.
            torch._foreach_lerp_(group, anchors, step / (1.0 + step))
        else:
            for w, anchor in zip(group, anchors, strict=True):
                w.copy_(anchor + (w - anchor) / (1.0 + step))

    def _prox_diagonal(self, w: Tensor, step: Tensor, strength: float) -> None:
        (anchor,) = self._anchors_for([w])
        t = step * strength
        weight = t.div_(t + 1.0)  # t/(1 + t): w0 + (w - w0)/(1 + t) = lerp(w, w0, t/(1 + t))
        if w.dtype == weight.dtype:
            w.lerp_(anchor, weight)
        else:
            w.copy_(torch.lerp(w.to(weight.dtype), anchor.to(weight.dtype), weight))
