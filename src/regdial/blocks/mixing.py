"""Mix samples and soften targets: Mixup, CutMix, label smoothing as soft targets.

- ``Mixup(alpha)`` (Zhang et al., 2018): ``x = lam*x_i + (1 - lam)*x_j`` and the same mix
  of their targets, with ``lam ~ Beta(alpha, alpha)`` drawn once per batch.
- ``CutMix(alpha)`` (Yun et al., 2019): paste a box from ``x_j`` into ``x_i``; the
  targets mix by the box's share of the area.
- ``MixupOrCutMix``: one or the other per batch, as in DeiT and timm's recipes.

Each returns the mixed inputs and *soft* targets, rows of class probabilities, which
``soft_cross_entropy`` (torch's own ``cross_entropy`` with probability targets) takes.
Label smoothing is not built into the mixing: ``smooth_targets`` makes smoothed soft
targets, and ``cross_entropy(..., label_smoothing=eps)`` composes with mixed targets
directly, so each knob stays separate on the dial.

Sample ``i`` is paired with sample ``N - 1 - i`` (the batch flipped): no extra random
draw, and an odd batch works (its middle sample pairs with itself). The random draws
use torch's global generator, so ``torch.manual_seed`` makes them repeatable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from regdial._checks import Described, check_int, check_range, fail

__all__ = ["CutMix", "Mixup", "MixupOrCutMix", "smooth_targets", "soft_cross_entropy", "soft_targets"]


def soft_targets(targets: Tensor, num_classes: int | None = None) -> Tensor:
    """Class labels ``(N,)`` as one-hot float rows ``(N, C)``; float targets pass through.

    Integer targets need ``num_classes``; float targets (already probabilities, or
    regression values) are returned as they are.
    """
    if targets.is_floating_point():
        return targets
    if num_classes is None:
        fail("num_classes", "the number of classes when targets are class labels", None)
    num_classes = check_int("num_classes", num_classes, low=1)
    return F.one_hot(targets.long(), num_classes).to(torch.get_default_dtype())


def smooth_targets(targets: Tensor, num_classes: int | None = None, smoothing: float = 0.0) -> Tensor:
    """``(1 - eps) * y + eps / C``: label smoothing as soft targets, for labels or rows.

    ``cross_entropy(logits, smooth_targets(y, C, eps))`` equals torch's
    ``cross_entropy(logits, y, label_smoothing=eps)``.
    """
    smoothing = check_range("smoothing", smoothing, low=0.0, high=1.0, high_open=True)
    rows = soft_targets(targets, num_classes)
    return rows * (1.0 - smoothing) + smoothing / rows.shape[-1]


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean over the batch of ``-sum_c y_c * log_softmax(logits)_c`` for soft targets ``y``.

    This is torch's ``F.cross_entropy`` with probability targets; ``label_smoothing``
    smooths the soft targets the same way as ``smooth_targets``.
    """
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def _beta(alpha: float) -> float:
    if alpha == 0.0:
        return 1.0
    concentration = torch.tensor([alpha, alpha])
    sample = torch.distributions.Beta(concentration[0], concentration[1]).sample()
    return float(sample)


class _Mixer:
    """Shared by Mixup and CutMix: argument checks, the probability of applying."""

    def __init__(self, alpha: float, *, num_classes: int | None = None, prob: float = 1.0) -> None:
        name = type(self).__name__
        self.alpha = check_range(f"{name}.alpha", alpha, low=0.0)
        self.num_classes = (
            None if num_classes is None else check_int(f"{name}.num_classes", num_classes, low=1)
        )
        self.prob = check_range(f"{name}.prob", prob, low=0.0, high=1.0)
        self.last_lam = 1.0

    def __call__(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Mix a batch: ``(mixed_x, soft_targets)``; targets may be labels or soft rows."""
        if x.shape[0] != targets.shape[0]:
            fail("targets", f"one per sample ({x.shape[0]})", Described(f"{targets.shape[0]}"))
        rows = soft_targets(targets, self.num_classes)
        if self.alpha == 0.0 or x.shape[0] < 2 or (self.prob < 1.0 and float(torch.rand(())) >= self.prob):
            self.last_lam = 1.0
            return x, rows
        mixed, lam = self._mix(x, _beta(self.alpha))
        self.last_lam = lam
        return mixed, rows * lam + rows.flip(0) * (1.0 - lam)

    def _mix(self, x: Tensor, lam: float) -> tuple[Tensor, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}, prob={self.prob})"


class Mixup(_Mixer):
    """``x = lam*x + (1 - lam)*x.flip(0)``, targets likewise, ``lam ~ Beta(alpha, alpha)``.

    ``alpha`` 0 is the identity; 0.2 to 0.4 is usual for images, larger mixes harder.
    Works for inputs of any shape (images, sequences, tabular rows, embeddings).
    """

    def _mix(self, x: Tensor, lam: float) -> tuple[Tensor, float]:
        return x * lam + x.flip(0) * (1.0 - lam), lam


class CutMix(_Mixer):
    """Paste a box of ``x.flip(0)`` into ``x``; targets mix by area.

    The box covers a share ``1 - lam`` of the ``(H, W)`` image (or ``L``-long segment for
    ``(N, C, L)`` sequences), ``lam ~ Beta(alpha, alpha)``, centred uniformly; where it is
    clipped by the border, ``lam`` is corrected to the area actually pasted.
    """

    def _mix(self, x: Tensor, lam: float) -> tuple[Tensor, float]:
        if x.dim() not in (3, 4):
            fail(
                "x",
                "(N, C, L) sequences or (N, C, H, W) images for CutMix",
                Described(f"shape {tuple(x.shape)}"),
            )
        spatial = x.shape[2:]
        cut = math.sqrt(1.0 - lam) if len(spatial) == 2 else 1.0 - lam
        slices = []
        for size in spatial:
            length = round(size * cut)
            centre = int(torch.randint(0, size, ()))
            start, stop = max(centre - length // 2, 0), min(centre + length - length // 2, size)
            slices.append(slice(start, stop))
        area = 1
        for s in slices:
            area *= s.stop - s.start
        mixed = x.clone()
        region = (slice(None), slice(None), *slices)
        mixed[region] = x.flip(0)[region]
        total = 1
        for size in spatial:
            total *= size
        return mixed, 1.0 - area / total


class MixupOrCutMix:
    """Per batch, CutMix with probability ``switch_prob``, else Mixup; applied with ``prob``."""

    def __init__(
        self,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 1.0,
        *,
        switch_prob: float = 0.5,
        prob: float = 1.0,
        num_classes: int | None = None,
    ) -> None:
        self.mixup = Mixup(mixup_alpha, num_classes=num_classes)
        self.cutmix = CutMix(cutmix_alpha, num_classes=num_classes)
        self.switch_prob = check_range("MixupOrCutMix.switch_prob", switch_prob, low=0.0, high=1.0)
        self.prob = check_range("MixupOrCutMix.prob", prob, low=0.0, high=1.0)
        self.num_classes = num_classes
        self.last_lam = 1.0

    def __call__(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.prob < 1.0 and float(torch.rand(())) >= self.prob:
            self.last_lam = 1.0
            return x, soft_targets(targets, self.num_classes)
        use_cutmix = self.cutmix.alpha > 0 and (
            self.mixup.alpha == 0 or float(torch.rand(())) < self.switch_prob
        )
        mixer: _Mixer = self.cutmix if use_cutmix else self.mixup
        result = mixer(x, targets)
        self.last_lam = mixer.last_lam
        return result

    def __repr__(self) -> str:
        return (
            f"MixupOrCutMix(mixup_alpha={self.mixup.alpha}, cutmix_alpha={self.cutmix.alpha}, "
            f"switch_prob={self.switch_prob}, prob={self.prob})"
        )
