"""Data augmentation presets, one per kind of data, each with one ``strength`` knob.

Every preset is an ``nn.Module`` applied to a training batch: ``strength`` in [0, 1]
scales all of its transforms together (0 is the identity; each preset lists what 1
means), it is the identity in eval mode, and the strength may follow a ``Schedule``
(call ``set_progress``). ``augmentation(kind, strength)`` builds one by name.

============  =================  ==================================================
kind          input              transforms (at strength 1)
============  =================  ==================================================
image         (N, C, H, W) 0..1  flip (p 0.5), shifted crop (zero pad H/8), colour jitter
                                 (brightness/contrast 0.4, saturation 0.4, hue 0.1
                                 when C = 3, p 0.8), random erasing (p 0.5), optional
                                 RandAugment (2 ops, magnitude 10), through Kornia
signal        (N, C, L), (N, L)  circular shift (10% of L), amplitude scale (+-20%),
                                 noise (5% of each sample's std), time mask (10% of L)
tabular       (N, F)             Gaussian noise (10% of each feature's std), feature
                                 dropout (10% of entries set to 0, the mean of
                                 standardized data)
tokens        (N, L) integer     token dropout to ``mask_id`` (10%), random
                                 replacement (10%); padding untouched
embeddings    (N, L, D)          NEFTune noise (Jain et al., 2023): uniform, scaled
                                 ``alpha / sqrt(L * D)`` with alpha 15
============  =================  ==================================================
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from regdial._checks import Described, check_choice, check_int, check_range, fail
from regdial.blocks.schedules import Scheduled, Strength

__all__ = [
    "KINDS",
    "Augment",
    "EmbeddingNoise",
    "ImageAugment",
    "SignalAugment",
    "TabularAugment",
    "TokenAugment",
    "augmentation",
    "option_names",
]


class Augment(Scheduled, nn.Module):
    """Base preset: identity in eval mode or at strength 0, else ``_augment``."""

    strength_range: ClassVar[tuple[float, float | None, bool]] = (0.0, 1.0, False)
    ndims: ClassVar[tuple[int, ...]]

    def __init__(self, strength: Strength = 0.5) -> None:
        nn.Module.__init__(self)
        self.strength = strength
        self.progress = 0.0

    def forward(self, x: Tensor) -> Tensor:
        strength = self.current_strength
        if not self.training or strength == 0.0:
            return x
        if x.dim() not in self.ndims:
            dims = " or ".join(f"{d}-D" for d in self.ndims)
            fail("x", f"a {dims} batch for {type(self).__name__}", Described(f"shape {tuple(x.shape)}"))
        return self._augment(x, strength)

    def _augment(self, x: Tensor, strength: float) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"strength={self.strength!r}"


class ImageAugment(Augment):
    """Flip, shifted crop, colour jitter, random erasing (and RandAugment), via Kornia.

    Images are float ``(N, C, H, W)`` in [0, 1]. Each transform can be switched off;
    horizontal flips are wrong for data whose meaning is not mirror-symmetric (digits,
    text), so ``flip=False`` there.
    """

    ndims = (4,)

    def __init__(
        self,
        strength: Strength = 0.5,
        *,
        flip: bool = True,
        crop: bool = True,
        color: bool = True,
        erase: bool = True,
        rand_augment: bool = False,
    ) -> None:
        super().__init__(strength)
        self.flip, self.crop, self.color, self.erase, self.rand_augment = (
            flip,
            crop,
            color,
            erase,
            rand_augment,
        )
        self._pipelines: dict[tuple[int, int, int, float], nn.Module] = {}

    def _pipeline(self, channels: int, height: int, width: int, strength: float) -> nn.Module:
        key = (channels, height, width, round(strength, 6))
        if key not in self._pipelines:
            import kornia.augmentation as K  # imported only when an image preset runs

            ops: list[Any] = []
            if self.flip:
                ops.append(K.RandomHorizontalFlip(p=0.5))
            padding = math.ceil(strength * max(height, width) / 8)
            if self.crop and padding > 0:
                ops.append(K.RandomCrop((height, width), padding=padding, padding_mode="constant"))
            if self.color:
                chroma = 0.4 * strength if channels == 3 else 0.0
                hue = 0.1 * strength if channels == 3 else 0.0
                ops.append(K.ColorJitter(0.4 * strength, 0.4 * strength, chroma, hue, p=0.8))
            if self.rand_augment and channels == 3:
                from kornia.augmentation.auto import RandAugment

                ops.append(RandAugment(n=2, m=max(1, round(10 * strength))))
            if self.erase:
                ops.append(K.RandomErasing(scale=(0.02, 0.33), p=0.5 * strength))
            self._pipelines[key] = K.AugmentationSequential(*ops) if ops else nn.Identity()
        return self._pipelines[key]

    def _augment(self, x: Tensor, strength: float) -> Tensor:
        channels, height, width = x.shape[1:]
        result: Tensor = self._pipeline(channels, height, width, strength)(x)
        return result


class SignalAugment(Augment):
    """Circular shift, amplitude scaling, additive noise and time masking for 1-D signals."""

    ndims = (2, 3)

    def __init__(
        self,
        strength: Strength = 0.5,
        *,
        shift: float = 0.1,
        scale: float = 0.2,
        noise: float = 0.05,
        mask: float = 0.1,
    ) -> None:
        super().__init__(strength)
        self.shift = check_range("SignalAugment.shift", shift, low=0.0, high=1.0)
        self.scale = check_range("SignalAugment.scale", scale, low=0.0, high=1.0)
        self.noise = check_range("SignalAugment.noise", noise, low=0.0)
        self.mask = check_range("SignalAugment.mask", mask, low=0.0, high=1.0)

    def _augment(self, x: Tensor, strength: float) -> Tensor:
        flat = x.dim() == 2
        if flat:
            x = x.unsqueeze(1)
        n, _, length = x.shape
        positions = torch.arange(length, device=x.device)
        max_shift = int(strength * self.shift * length)
        if max_shift > 0:
            shifts = torch.randint(-max_shift, max_shift + 1, (n, 1, 1), device=x.device)
            x = x.gather(2, ((positions - shifts) % length).expand_as(x))
        if self.scale > 0:
            x = x * (
                1.0 + strength * self.scale * (2 * torch.rand(n, 1, 1, device=x.device, dtype=x.dtype) - 1)
            )
        if self.noise > 0:
            std = x.flatten(1).std(dim=1).view(n, 1, 1)
            x = x + torch.randn_like(x) * (strength * self.noise) * std
        max_mask = int(strength * self.mask * length)
        if max_mask > 0:
            widths = torch.randint(0, max_mask + 1, (n, 1, 1), device=x.device)
            starts = (torch.rand(n, 1, 1, device=x.device) * (length - widths + 1)).long()
            masked = (positions >= starts) & (positions < starts + widths)
            x = x.masked_fill(masked, 0.0)
        return x.squeeze(1) if flat else x


class TabularAugment(Augment):
    """Per-feature Gaussian noise and feature dropout for standardized tabular rows.

    The noise for feature ``j`` has standard deviation ``strength * noise * std_j``, with
    ``std_j`` from ``feature_std`` (for example the training set's) or else the batch.
    """

    ndims = (2,)

    def __init__(
        self,
        strength: Strength = 0.5,
        *,
        noise: float = 0.1,
        feature_dropout: float = 0.1,
        feature_std: Tensor | None = None,
    ) -> None:
        super().__init__(strength)
        self.noise = check_range("TabularAugment.noise", noise, low=0.0)
        self.feature_dropout = check_range(
            "TabularAugment.feature_dropout", feature_dropout, low=0.0, high=1.0
        )
        self.feature_std = feature_std

    def _augment(self, x: Tensor, strength: float) -> Tensor:
        if self.noise > 0:
            std = self.feature_std if self.feature_std is not None else x.std(dim=0, keepdim=True)
            x = x + torch.randn_like(x) * (strength * self.noise) * std.to(x)
        rate = strength * self.feature_dropout
        if rate > 0:
            x = x.masked_fill(torch.rand_like(x) < rate, 0.0)
        return x


class TokenAugment(Augment):
    """Token dropout (to ``mask_id``) and random replacement for ``(N, L)`` token ids.

    At strength ``s`` each non-padding token is replaced by ``mask_id`` with probability
    ``s * dropout`` (skipped when there is no mask token) and by a uniformly random
    token with probability ``s * replace``.
    """

    ndims = (2,)

    def __init__(
        self,
        strength: Strength = 0.5,
        *,
        vocab_size: int,
        mask_id: int | None = None,
        pad_id: int | None = None,
        dropout: float = 0.1,
        replace: float = 0.1,
    ) -> None:
        super().__init__(strength)
        self.vocab_size = check_int("TokenAugment.vocab_size", vocab_size, low=1)
        self.mask_id = None if mask_id is None else check_int("TokenAugment.mask_id", mask_id, low=0)
        self.pad_id = None if pad_id is None else check_int("TokenAugment.pad_id", pad_id, low=0)
        self.dropout = check_range("TokenAugment.dropout", dropout, low=0.0, high=1.0)
        self.replace = check_range("TokenAugment.replace", replace, low=0.0, high=1.0)

    def _augment(self, x: Tensor, strength: float) -> Tensor:
        if x.is_floating_point():
            fail("x", "integer token ids", Described(f"dtype {x.dtype}"))
        draw = torch.rand(x.shape, device=x.device)
        editable = torch.ones_like(x, dtype=torch.bool) if self.pad_id is None else x != self.pad_id
        result = x.clone()
        replace = editable & (draw < strength * self.replace)
        random_tokens = torch.randint(0, self.vocab_size, x.shape, device=x.device, dtype=x.dtype)
        result = torch.where(replace, random_tokens, result)
        if self.mask_id is not None:
            low = strength * self.replace
            masked = editable & (draw >= low) & (draw < low + strength * self.dropout)
            result = result.masked_fill(masked, self.mask_id)
        return result


class EmbeddingNoise(Augment):
    """NEFTune: uniform noise on embeddings, ``U(-1, 1) * alpha / sqrt(L * D)``.

    ``alpha = strength * max_alpha``; NEFTune (Jain et al., 2023, "NEFTune: Noisy
    Embeddings Improve Instruction Finetuning") uses alpha 5 to 15. ``attach(embedding)``
    applies it to an embedding layer's output with a forward hook, the way Hugging Face
    enables NEFTune, so the model's code needs no change.
    """

    ndims = (3,)

    def __init__(self, strength: Strength = 0.5, *, max_alpha: float = 15.0) -> None:
        super().__init__(strength)
        self.max_alpha = check_range("EmbeddingNoise.max_alpha", max_alpha, low=0.0)

    def _augment(self, x: Tensor, strength: float) -> Tensor:
        _, length, dim = x.shape
        scale = strength * self.max_alpha / math.sqrt(length * dim)
        return x + torch.empty_like(x).uniform_(-scale, scale)

    def attach(self, embedding: nn.Module) -> RemovableHandle:
        """Add the noise to ``embedding``'s output while this module is in training mode."""

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            return self(output) if module.training else output

        return embedding.register_forward_hook(hook)


KINDS: dict[str, type[Augment]] = {
    "image": ImageAugment,
    "signal": SignalAugment,
    "tabular": TabularAugment,
    "tokens": TokenAugment,
    "embeddings": EmbeddingNoise,
}


def option_names() -> set[str]:
    """Every option a preset takes (``augment_options``' keys), across the kinds of data."""
    import inspect

    return {
        name
        for preset in KINDS.values()
        for name, parameter in inspect.signature(preset).parameters.items()
        if parameter.kind == parameter.KEYWORD_ONLY
    }


def augmentation(kind: str, strength: Strength = 0.5, **options: Any) -> Augment:
    """The preset for ``kind`` ("image", "signal", "tabular", "tokens", "embeddings")."""
    return KINDS[check_choice("augment kind", kind, KINDS)](strength, **options)
