"""Noise during training: drop paths, blocks, weights; add noise; turn existing dropout.

Each technique is a plain function plus a thin ``nn.Module``. Every one is the identity in
eval mode and at rate 0, and makes its masks on the input's device and dtype
(``x.new_empty(shape).bernoulli_(keep)``), so nothing crosses to the host.

- ``drop_path`` / ``DropPath``: stochastic depth (Huang et al., 2016, "Deep Networks
  with Stochastic Depth"): drop a residual branch for a whole sample.
- ``drop_block`` / ``DropBlock2d`` / ``DropBlock1d``: drop contiguous regions of feature
  maps (Ghiasi, Lin & Le, 2018, "DropBlock").
- ``DropConnect``: drop weights of a wrapped layer, not activations (Wan et al., 2013).
- ``GaussianNoise`` (additive) and ``GaussianDropout`` (multiplicative, Srivastava et al.,
  2014).
- ``set_dropout`` / ``set_drop_path``: turn the dial on a model's own dropout modules,
  Hugging Face models included, optionally following a schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regdial._checks import Described, check_choice, check_int, check_range, fail
from regdial.blocks.schedules import Strength, check_strength, resolve

__all__ = [
    "DropBlock1d",
    "DropBlock2d",
    "DropConnect",
    "DropPath",
    "GaussianDropout",
    "GaussianNoise",
    "drop_block",
    "drop_path",
    "drop_path_rates",
    "dropout_sites",
    "set_drop_path",
    "set_dropout",
    "unturned_rates",
]

logger = logging.getLogger(__name__)


def _rate(field: str, value: object) -> float:
    return check_range(field, value, low=0.0, high=1.0, high_open=True)


def drop_path(x: Tensor, p: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """Zero whole samples of ``x`` (a residual branch) with probability ``p``.

    Survivors are scaled by ``1/(1 - p)`` when ``scale_by_keep``, so the expectation is
    unchanged. Works for any rank of tensor: the mask is per sample, shape
    ``(N, 1, 1, ...)``. Identity when not training or ``p == 0``. ``p`` must be in
    ``[0, 1)``, as ``DropPath`` requires: at 1 every branch would be dropped and the
    survivors' scale ``1/(1 - p)`` is undefined.
    """
    if p != 0.0:  # checked where the rate is given as well, so a bad one fails in eval mode too
        _rate("drop_path.p", p)
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Stochastic depth on a residual branch: ``x + DropPath(p)(branch(x))``."""

    def __init__(self, p: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.p = _rate("DropPath.p", p)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(depth: int, max_rate: float) -> list[float]:
    """The usual stochastic-depth schedule: rates rising linearly from 0 to ``max_rate``.

    Block ``i`` of ``depth`` gets ``max_rate * i / (depth - 1)``: early blocks, which the
    rest build on, are rarely dropped.
    """
    depth = check_int("depth", depth, low=1)
    max_rate = _rate("max_rate", max_rate)
    if depth == 1:
        return [max_rate]
    return [max_rate * i / (depth - 1) for i in range(depth)]


def drop_block(
    x: Tensor, p: float = 0.0, block_size: int = 7, training: bool = False, scale_by_keep: bool = True
) -> Tensor:
    """Zero contiguous ``block_size``-wide regions of each feature map of ``x``.

    ``x`` is ``(N, C, L)`` (1-D) or ``(N, C, H, W)`` (2-D). Block seeds are drawn only
    where a whole block fits, with the paper's rate correction::

        gamma = p / block_size^d * prod(size) / prod(size - block_size + 1)

    so that about a fraction ``p`` of each map is dropped (a little less, where blocks
    overlap). With ``scale_by_keep`` the survivors are scaled by
    ``count(mask) / count_ones(mask)``, as in the paper. Identity when not training or
    ``p == 0``.
    """
    if p == 0.0 or not training:
        return x
    if x.dim() not in (3, 4):
        fail("x", "a (N, C, L) or (N, C, H, W) tensor", Described(f"shape {tuple(x.shape)}"))
    spatial = x.shape[2:]
    size = min(block_size, *spatial)
    valid = [n - size + 1 for n in spatial]
    numel, valid_numel = 1, 1
    for n, v in zip(spatial, valid, strict=True):
        numel, valid_numel = numel * n, valid_numel * v
    gamma = min(1.0, p * numel / (size ** len(spatial) * valid_numel))
    # Seeds are sparse: rand() < gamma measured faster than bernoulli_ on CPU.
    seeds = (torch.rand((*x.shape[:2], *valid), device=x.device) < gamma).to(x.dtype)
    # A seed at (i, j) drops [i, i + size) x [j, j + size): pad by size - 1 on every side
    # and take the max over each window, so each output sees the seeds whose block covers it.
    blocks = _window_max(F.pad(seeds, [size - 1] * (2 * len(spatial))), size)
    keep = blocks.neg_().add_(1.0)
    if scale_by_keep:
        keep.mul_(keep.numel() / keep.sum().clamp_min(1.0))
    return x * keep


def _window_max(mask: Tensor, size: int) -> Tensor:
    """The max over every ``size``-wide window along each spatial dim (stride 1).

    A k x k max pool is separable into a 1-D max along each dim: 2k comparisons per
    element instead of k^2 (CPU's stride-1 max_pool2d measured 20x slower).
    """
    for dim in range(2, mask.dim()):
        moved = mask.movedim(dim, -1)
        pooled = F.max_pool1d(moved.reshape(-1, 1, moved.shape[-1]), size, stride=1)
        mask = pooled.view(*moved.shape[:-1], pooled.shape[-1]).movedim(-1, dim)
    return mask


class _DropBlock(nn.Module):
    _dims: int

    def __init__(self, p: float = 0.0, block_size: int = 7, scale_by_keep: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        self.p = _rate(f"{name}.p", p)
        self.block_size = check_int(f"{name}.block_size", block_size, low=1)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self._dims + 2:
            fail(
                "x",
                f"a {self._dims + 2}-D batch for {type(self).__name__}",
                Described(f"shape {tuple(x.shape)}"),
            )
        return drop_block(x, self.p, self.block_size, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}"


class DropBlock2d(_DropBlock):
    """DropBlock on ``(N, C, H, W)`` feature maps; see ``drop_block``."""

    _dims = 2


class DropBlock1d(_DropBlock):
    """DropBlock on ``(N, C, L)`` sequences; see ``drop_block``."""

    _dims = 1


class DropConnect(nn.Module):
    """Drop weights of a wrapped ``nn.Linear`` or ``nn.ConvNd``, not its activations.

    In training each forward pass draws one mask over the weight (shared by the batch, as
    in AWD-LSTM's weight drop) and uses ``W * mask / (1 - p)``; the bias is kept. The
    wrapped layer's parameters stay where they are (``dropconnect.module.weight``).
    """

    def __init__(self, module: nn.Module, p: float = 0.0) -> None:
        super().__init__()
        if not isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            fail("DropConnect.module", "an nn.Linear or nn.ConvNd", type(module).__name__)
        self.module = module
        self.p = _rate("DropConnect.p", p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            output: Tensor = self.module(x)
            return output
        weight = self.module.weight
        keep = 1.0 - self.p
        dropped = weight * weight.new_empty(weight.shape).bernoulli_(keep).div_(keep)
        if isinstance(self.module, nn.Linear):
            return F.linear(x, dropped, self.module.bias)
        result: Tensor = self.module._conv_forward(x, dropped, self.module.bias)
        return result

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GaussianNoise(nn.Module):
    """Additive noise in training: ``x + std * N(0, 1)``, a classic input regularizer."""

    def __init__(self, std: float = 0.0) -> None:
        super().__init__()
        self.std = check_range("GaussianNoise.std", std, low=0.0)

    def forward(self, x: Tensor) -> Tensor:
        if self.std == 0.0 or not self.training:
            return x
        return x + torch.randn_like(x) * self.std

    def extra_repr(self) -> str:
        return f"std={self.std}"


class GaussianDropout(nn.Module):
    """Multiplicative noise in training: ``x * N(1, p/(1 - p))``.

    The Gaussian counterpart of dropout at rate ``p``: the same mean and variance as
    ``Dropout(p)``'s scaled Bernoulli mask (Srivastava et al., 2014, section 10).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = _rate("GaussianDropout.p", p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        std = (self.p / (1.0 - self.p)) ** 0.5
        return x * torch.randn_like(x).mul_(std).add_(1.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# Float attributes through which models apply functional dropout, read at each forward:
# torch's MultiheadAttention and RNNs (``dropout``), Hugging Face attention classes
# (LlamaAttention's ``attention_dropout``, passed to scaled_dot_product_attention; T5's and
# BART's ``dropout``), nanoGPT's CausalSelfAttention (``dropout``, passed as ``dropout_p``).
_ATTENTION_RATES = ("attention_dropout", "dropout", "attn_dropout", "dropout_p", "dropout_rate")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _patterns(modules: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(modules, str):
        return (modules,)
    patterns = tuple(modules)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        fail("modules", "fnmatch patterns over module names", modules)
    return patterns


def set_dropout(
    model: nn.Module, p: Strength, *, progress: float = 0.0, modules: str | Iterable[str] = "*"
) -> int:
    """Set the rate of ``model``'s own dropout, in place; return how many modules changed.

    Turned: every ``nn.Dropout``/``Dropout1d/2d/3d``/``AlphaDropout`` and regdial's
    ``GaussianDropout``/``DropConnect`` (their ``p``), and the float rates a module keeps
    for functional dropout: ``dropout`` (``nn.MultiheadAttention``, RNNs, nanoGPT's and
    T5's attention), ``attention_dropout`` (Hugging Face's Llama-style attention),
    ``attn_dropout``, ``dropout_p``, ``dropout_rate``. Other float attributes whose name
    says dropout are not turned: ``unturned_rates`` names them.
    ``p`` may be a schedule: the rate set is its value at ``progress`` (call again as
    training goes). ``modules`` restricts the change to module names matching the
    fnmatch patterns (``"classifier.*"``).
    """
    if not isinstance(model, nn.Module):
        fail("model", "an nn.Module", model)
    p = check_strength("dropout", p, _rate)
    rate = resolve(p, check_range("progress", progress, low=0.0, high=1.0))
    patterns = _patterns(modules)
    changed = 0
    for name, module in model.named_modules():
        if not _matches(name, patterns):
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd | GaussianDropout | DropConnect):
            changed += module.p != rate
            module.p = rate
        for attribute in _ATTENTION_RATES:
            if isinstance(getattr(module, attribute, None), float):
                changed += getattr(module, attribute) != rate
                setattr(module, attribute, rate)
    return int(changed)


def dropout_sites(model: nn.Module) -> int:
    """How many dropout modules and float rates ``set_dropout`` would turn in ``model``."""
    sites = 0
    for module in model.modules():
        sites += isinstance(module, nn.modules.dropout._DropoutNd | GaussianDropout | DropConnect)
        sites += sum(isinstance(getattr(module, a, None), float) for a in _ATTENTION_RATES)
    return sites


def unturned_rates(model: nn.Module) -> list[str]:
    """Float attributes named like a dropout rate (``*drop*``) that ``set_dropout`` leaves alone."""
    found = []
    for name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if (
                isinstance(value, float)
                and "drop" in attribute.lower()
                and "path" not in attribute.lower()
                and attribute not in _ATTENTION_RATES
                and not (isinstance(module, nn.modules.dropout._DropoutNd) and attribute == "p")
            ):
                found.append(f"{name}.{attribute}" if name else attribute)
    return found


def _is_drop_path(module: nn.Module) -> bool:
    # regdial's and timm's DropPath, torchvision's StochasticDepth: by name, so neither
    # package needs to be imported.
    return isinstance(module, DropPath) or type(module).__name__ in ("DropPath", "StochasticDepth")


def set_drop_path(
    model: nn.Module,
    rate: Strength,
    *,
    progress: float = 0.0,
    profile: str = "linear",
    modules: str | Iterable[str] = "*",
) -> int:
    """Set ``model``'s stochastic-depth rates, in place; return how many modules changed.

    Turned: regdial's and timm's ``DropPath`` and torchvision's ``StochasticDepth``. With
    ``profile="linear"`` the modules, in the order they appear, get
    ``drop_path_rates(n, rate)`` (deeper blocks dropped more, the usual recipe); with
    ``"uniform"`` every one gets ``rate``. ``rate`` may be a schedule, evaluated at
    ``progress``.
    """
    if not isinstance(model, nn.Module):
        fail("model", "an nn.Module", model)
    rate = check_strength("drop_path", rate, _rate)
    value = resolve(rate, check_range("progress", progress, low=0.0, high=1.0))
    profile = check_choice("profile", profile, ("linear", "uniform"))
    patterns = _patterns(modules)
    found = [m for name, m in model.named_modules() if _is_drop_path(m) and _matches(name, patterns)]
    if not found:
        return 0
    rates = drop_path_rates(len(found), value) if profile == "linear" else [value] * len(found)
    changed = 0
    for module, new in zip(found, rates, strict=True):
        attribute = "drop_prob" if hasattr(module, "drop_prob") else "p"
        changed += getattr(module, attribute) != new
        setattr(module, attribute, new)
    return int(changed)
