"""Built-in models; input and output sizes come from the data.

Every model has ``nn.Dropout`` layers at rate 0 where dropout usually goes, so that a
setting's ``dropout`` has something to turn, and ``resnet`` has a ``DropPath`` on each
residual branch for ``drop_path``.

========  =====================================================================
model     what it is
========  =====================================================================
linear    one linear layer (lasso/ridge/elastic net on the inputs)
mlp       ``depth`` hidden layers of ``width`` units, ReLU, optional BatchNorm
cnn       2-D conv stages (``channels``), 3x3 convs, max-pool, a 128-unit head
cnn1d     1-D conv stages, kernel 5, max-pool, global average pool
resnet    residual blocks with DropPath: convolutional for images and signals,
          fully connected (pre-norm) for tabular rows
========  =====================================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from regdial._checks import Described, check_choice, check_int, fail
from regdial.blocks.noise import DropPath
from regdial.training.tasks import Dataset

__all__ = ["MAX_PARAMETERS", "MAX_WIDTH", "MODELS", "build_model", "model_from_factory"]

MAX_WIDTH = 65_536
"""The widest layer (units or channels) a built-in model may have."""
MAX_PARAMETERS = 2 * 10**9
"""The most parameters a built-in model may have (8 GB of float32 weights)."""


def _width(field: str, value: object) -> int:
    return check_int(field, value, low=1, high=MAX_WIDTH)


def _flag(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        fail(field, "true or false", value)
    return value


def _channels(value: object) -> list[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        fail("model.channels", "a non-empty list of channel counts, like [32, 64]", value)
    if len(value) > 16:
        fail("model.channels", "at most 16 stages", Described(f"{len(value)} stages"))
    return [_width(f"model.channels[{i}]", c) for i, c in enumerate(value)]


def _flat_size(shape: Sequence[int]) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


def linear(data: Dataset) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(data.input_shape), data.outputs))


def mlp(data: Dataset, *, depth: int = 2, width: int = 256, batchnorm: bool = False) -> nn.Module:
    depth = check_int("model.depth", depth, low=0, high=64)
    width = _width("model.width", width)
    batchnorm = _flag("model.batchnorm", batchnorm)
    layers: list[nn.Module] = [nn.Flatten()]
    size = _flat_size(data.input_shape)
    for _ in range(depth):
        layers += [nn.Linear(size, width)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.ReLU(), nn.Dropout(0.0)]
        size = width
    layers.append(nn.Linear(size, data.outputs))
    return nn.Sequential(*layers)


def _need(data: Dataset, kinds: tuple[str, ...], model: str) -> None:
    if data.input_kind not in kinds:
        fail("model", f"a model for {data.input_kind} inputs, not {model!r} (for {', '.join(kinds)})", model)


def cnn(
    data: Dataset, *, channels: Sequence[int] = (32, 64), batchnorm: bool = False, hidden: int = 128
) -> nn.Module:
    _need(data, ("image",), "cnn")
    channels = _channels(channels)
    batchnorm = _flag("model.batchnorm", batchnorm)
    hidden = _width("model.hidden", hidden)
    in_channels, height, width = data.input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        in_channels = out_channels
        if min(height, width) >= 16:  # halve large maps between stages, keep small ones
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
    if min(height, width) >= 8:
        layers.append(nn.MaxPool2d(2))
        height, width = height // 2, width // 2
    layers += [
        nn.Flatten(), nn.Dropout(0.0), nn.Linear(in_channels * height * width, hidden), nn.ReLU(),
        nn.Dropout(0.0), nn.Linear(hidden, data.outputs),
    ]  # fmt: skip
    return nn.Sequential(*layers)


def cnn1d(data: Dataset, *, channels: Sequence[int] = (32, 64), batchnorm: bool = True) -> nn.Module:
    _need(data, ("signal",), "cnn1d")
    channels = _channels(channels)
    batchnorm = _flag("model.batchnorm", batchnorm)
    in_channels, _ = data.input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers.append(nn.Conv1d(in_channels, out_channels, 5, padding=2))
        if batchnorm:
            layers.append(nn.BatchNorm1d(out_channels))
        layers += [nn.ReLU(), nn.MaxPool1d(2)]
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Dropout(0.0), nn.Linear(in_channels, data.outputs)]
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    """``x + DropPath(branch(x))``."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch
        self.drop_path = DropPath(0.0)

    def forward(self, x: Tensor) -> Tensor:
        branch: Tensor = self.drop_path(self.branch(x))
        return x + branch


def resnet(data: Dataset, *, depth: int = 4, width: int = 64, batchnorm: bool = True) -> nn.Module:
    depth = check_int("model.depth", depth, low=1, high=64)
    width = _width("model.width", width)
    batchnorm = _flag("model.batchnorm", batchnorm)
    if data.input_kind == "tabular" or len(data.input_shape) == 1:
        size = _flat_size(data.input_shape)
        blocks: list[nn.Module] = [
            _Residual(nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.0), nn.Linear(width, width),
            ))
            for _ in range(depth)
        ]  # fmt: skip
        return nn.Sequential(
            nn.Flatten(), nn.Linear(size, width), *blocks, nn.LayerNorm(width), nn.Linear(width, data.outputs)
        )
    conv = nn.Conv2d if data.input_kind == "image" else nn.Conv1d
    norm = nn.BatchNorm2d if data.input_kind == "image" else nn.BatchNorm1d
    pool = nn.AdaptiveAvgPool2d(1) if data.input_kind == "image" else nn.AdaptiveAvgPool1d(1)

    def branch() -> nn.Module:
        parts: list[nn.Module] = [conv(width, width, 3, padding=1)]
        if batchnorm:
            parts.append(norm(width))
        parts += [nn.ReLU(), conv(width, width, 3, padding=1)]
        if batchnorm:
            parts.append(norm(width))
        return nn.Sequential(*parts)

    stem = nn.Sequential(conv(data.input_shape[0], width, 3, padding=1), nn.ReLU())
    layers: list[nn.Module] = [nn.Sequential(_Residual(branch()), nn.ReLU()) for _ in range(depth)]
    return nn.Sequential(stem, *layers, pool, nn.Flatten(), nn.Dropout(0.0), nn.Linear(width, data.outputs))


MODELS = {"linear": linear, "mlp": mlp, "cnn": cnn, "cnn1d": cnn1d, "resnet": resnet}


def build_model(
    name: str, data: Dataset, options: dict[str, Any] | None = None, *, seed: int = 0
) -> nn.Module:
    """The built-in model ``name`` sized for ``data``, initialized from ``seed``."""
    builder = MODELS[check_choice("model", name, MODELS)]
    if options is not None and not isinstance(options, dict):
        fail("model", "a table of model options", options)
    options = dict(options or {})
    known = [p for p in inspect.signature(builder).parameters if p != "data"]
    for key in options:
        if key not in known:
            fail(
                f"model.{key}",
                f"an option of {name} ({', '.join(known) or 'none'})",
                Described("an unknown option"),
            )
    _check_size(name, builder, data, options)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model: nn.Module = builder(data, **options)
    return model


def _check_size(name: str, builder: Any, data: Dataset, options: dict[str, Any]) -> None:
    """Refuse a model larger than ``MAX_PARAMETERS`` before allocating it: build it on the
    ``meta`` device (shapes only, no memory) and count."""
    with torch.device("meta"):
        probe: nn.Module = builder(data, **options)
    count = sum(p.numel() for p in probe.parameters())
    if count > MAX_PARAMETERS:
        fail(
            "model", f"a model of at most {MAX_PARAMETERS:,} parameters", Described(f"{name} with {count:,}")
        )


def model_from_factory(
    factory: Callable[..., Any],
    field: str,
    *,
    seed: int,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
) -> nn.Module:
    """The user's ``factory()`` called with what it names of ``input_shape`` and
    ``num_classes`` (both, when it takes ``**kwargs``), initialized from ``seed``.

    A factory whose parameters cannot be bound that way (one it requires is neither) is
    one line naming ``field``; what the factory's own body raises keeps its type.
    """
    offered = {"input_shape": input_shape, "num_classes": num_classes}
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable without one: offer nothing
        kwargs: dict[str, Any] = {}
    else:
        parameters = signature.parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        kwargs = {k: v for k, v in offered.items() if takes_all or k in parameters}
        try:
            signature.bind(**kwargs)
        except TypeError as error:
            fail(field, "a function of input_shape and/or num_classes (or none) returning an nn.Module",
                 Described(f"{getattr(factory, '__name__', 'a factory')}{signature} ({error})"))  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        fail(field, "a function returning a fresh nn.Module", Described(type(model).__name__))
    return model
