"""Built-in tasks and the loader for the user's own data.

Every task gives a ``Dataset``: train, validation and test tensors fixed by a seed. The
test split is for the final score only; nothing in regdial chooses anything with it.
Nothing is downloaded: the data ships with scikit-learn or is generated.

=================  ==============  =================================================
task               model (default) what it is
=================  ==============  =================================================
digits             cnn             sklearn's 8x8 digits, 1077/360/360 images
digits-small       cnn             the same with 200 training images: overfits hard
sparse-regression  linear          100 features, 10 informative (the support is known)
breast-cancer      mlp             sklearn's breast cancer, 30 features, 2 classes
wine               mlp             sklearn's wine, 13 features, 3 classes, 106 to train
waveforms          cnn1d           generated 1-D signals: sine, square or triangle
digits-transfer    cnn             fine-tuning: a CNN pre-trained on 1000 clean digits,
                                   then 30 digits of another look (lower contrast,
                                   noise) to fine-tune on; 300 to validate, 467 to test
friedman           mlp             generated nonlinear regression (Friedman #1): 10
                                   features, 5 used through sin, squares and products;
                                   200 rows to train, noise sd 1
=================  ==============  =================================================

A task with a ``source`` starts from pre-trained weights: its model is first trained on
the source data (by ``regdial.training.pretrained``, cached in the user's cache
directory), the way a user fine-tunes a downloaded checkpoint. ``L2SP`` then pulls
toward those weights.

The user's own files (``.npz``, ``.csv``) become a ``Dataset`` through
``regdial.training.data.load_data``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from regdial._checks import check_choice

__all__ = ["TASKS", "Dataset", "TaskSpec", "load_task", "split_arrays", "standardizer", "to_tensors"]

Kind = Literal["classification", "regression"]
InputKind = Literal["image", "signal", "tabular"]


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test tensors of one task, and what they are."""

    name: str
    kind: Kind
    input_kind: InputKind
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor | None
    y_test: Tensor | None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    true_support: tuple[int, ...] | None = None
    description: str = ""
    path: str | None = None  # the user's file, when it came from one
    target: str | None = None  # its target column (CSV)
    test_carved: bool = False  # the test split was carved from the training data

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def outputs(self) -> int:
        return self.num_classes if self.kind == "classification" and self.num_classes else 1

    def sizes(self) -> str:
        test = 0 if self.x_test is None else len(self.x_test)
        return f"{len(self.x_train)}/{len(self.x_val)}/{test}"


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its data and the defaults that suit it."""

    name: str
    description: str
    load: Callable[[int], Dataset]
    model: str
    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    augment_options: dict[str, Any] = field(default_factory=dict)
    source: Callable[[], Dataset] | None = None  # the data the model is pre-trained on
    pretrain_epochs: int = 20


def split_arrays(
    x: np.ndarray, y: np.ndarray, sizes: tuple[int | float, ...], seed: int, stratify: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split off parts of the given sizes (counts or fractions) in order; the rest last."""
    from sklearn.model_selection import train_test_split

    parts = []
    rest_x, rest_y = x, y
    for size in sizes:
        count = size if isinstance(size, int) else max(1, round(size * len(x)))
        rest_x, part_x, rest_y, part_y = train_test_split(
            rest_x, rest_y, test_size=count, random_state=seed, stratify=rest_y if stratify else None
        )
        parts.append((part_x, part_y))
    parts.append((rest_x, rest_y))
    return parts


def standardizer(train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Scale every feature by the training split's mean and std (never the other splits')."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    return lambda a: (a - mean) / std


def to_tensors(x: np.ndarray, y: np.ndarray, kind: Kind) -> tuple[Tensor, Tensor]:
    xt = torch.tensor(np.asarray(x), dtype=torch.float32)
    yt = torch.tensor(np.asarray(y), dtype=torch.long if kind == "classification" else torch.float32)
    return xt, yt


def _digits(seed: int, train: int | None) -> Dataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    if train is None:  # 60/20/20
        (xt, yt), (xv, yv), (xtr, ytr) = split_arrays(x, y, (0.2, 0.2), seed, stratify=True)
    else:
        (xt, yt), (xv, yv), (rest_x, rest_y) = split_arrays(x, y, (500, 400), seed, stratify=True)
        (xtr, ytr), _ = split_arrays(rest_x, rest_y, (train,), seed, stratify=True)
    name = "digits" if train is None else "digits-small"
    parts = [to_tensors(a, b, "classification") for a, b in ((xtr, ytr), (xv, yv), (xt, yt))]
    return Dataset(
        name, "classification", "image", *parts[0], *parts[1], *parts[2], num_classes=10,
        description="sklearn's 8x8 handwritten digits, pixels scaled to [0, 1]",
    )  # fmt: skip


def _sparse_regression(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    features, informative = 100, 10
    coef = np.zeros(features)
    support = rng.choice(features, informative, replace=False)
    coef[support] = rng.uniform(1.0, 3.0, informative) * rng.choice([-1.0, 1.0], informative)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = rng.standard_normal((n, features))
        return to_tensors(x, x @ coef + rng.standard_normal(n), "regression")

    train, val, test = draw(150), draw(300), draw(1000)
    return Dataset(
        "sparse-regression", "regression", "tabular", *train, *val, *test,
        true_support=tuple(sorted(int(i) for i in support)),
        description="y = x . w + N(0, 1) with 10 of 100 weights non-zero; 150 training rows",
    )  # fmt: skip


def _friedman(seed: int) -> Dataset:
    """Friedman (1991) #1: ``y = 10 sin(pi x1 x2) + 20 (x3 - 1/2)^2 + 10 x4 + 5 x5 + N(0, 1)``,
    ``x`` uniform on ``[0, 1]^10`` (five features are noise), via scikit-learn."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=1500, n_features=10, noise=1.0, random_state=seed)
    (xv, yv), (xt, yt), (xtr, ytr) = split_arrays(x, y, (300, 1000), seed, stratify=False)
    scale = standardizer(xtr)
    parts = [to_tensors(scale(a), b, "regression") for a, b in ((xtr, ytr), (xv, yv), (xt, yt))]
    return Dataset(
        "friedman", "regression", "tabular", *parts[0], *parts[1], *parts[2],
        description="Friedman #1: 10 features, 5 used nonlinearly; 200 training rows",
    )  # fmt: skip


def _sklearn_tabular(name: str, loader: str, seed: int) -> Dataset:
    import sklearn.datasets

    x, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    (xt, yt), (xv, yv), (xtr, ytr) = split_arrays(x, y, (0.2, 0.2), seed, stratify=True)
    scale = standardizer(xtr)
    xtr, xv, xt = scale(xtr), scale(xv), scale(xt)
    parts = [to_tensors(a, b, "classification") for a, b in ((xtr, ytr), (xv, yv), (xt, yt))]
    return Dataset(
        name, "classification", "tabular", *parts[0], *parts[1], *parts[2], num_classes=int(y.max()) + 1,
        description=f"sklearn's {name.replace('-', ' ')} data, standardized on the training split",
    )  # fmt: skip


def _waveforms(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    length = 128
    t = np.linspace(0.0, 1.0, length, endpoint=False)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        labels = rng.integers(0, 3, n)
        cycles = rng.uniform(2.0, 6.0, (n, 1))
        phase = rng.uniform(0.0, 1.0, (n, 1))
        amplitude = rng.uniform(0.5, 1.5, (n, 1))
        position = (cycles * t + phase) % 1.0
        sine = np.sin(2 * math.pi * position)
        square = np.where(position < 0.5, 1.0, -1.0)
        triangle = 4 * np.abs(position - 0.5) - 1.0
        wave = np.choose(labels[:, None], [sine, square, triangle])
        x = amplitude * wave + 0.6 * rng.standard_normal((n, length))
        return to_tensors(x[:, None, :], labels, "classification")

    train, val, test = draw(150), draw(300), draw(600)
    return Dataset(
        "waveforms", "classification", "signal", *train, *val, *test, num_classes=3,
        class_names=("sine", "square", "triangle"),
        description="noisy sine, square and triangle waves, 128 samples each",
    )  # fmt: skip


def _transfer_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split once, by a fixed permutation: 1000 source images, clean, and the
    other 797 in the target's look (contrast 0.6 on a 0.2 floor, and a fixed noise field
    of std 0.1), so that pre-training never sees a target image."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(123).permutation(len(x))
    source, target = order[:1000], order[1000:]
    shifted = x[target] * 0.6 + 0.2 + 0.1 * np.random.default_rng(7).normal(size=x[target].shape)
    return x[source], y[source], shifted, y[target]


def _digits_source() -> Dataset:
    xs, ys, _, _ = _transfer_arrays()
    (xv, yv), (xt, yt) = split_arrays(xs, ys, (100,), 0, stratify=True)
    parts = [to_tensors(a, b, "classification") for a, b in ((xt, yt), (xv, yv))]
    return Dataset("digits-source", "classification", "image", *parts[0], *parts[1], None, None, num_classes=10,
                   description="1000 clean digits, the source of digits-transfer's pre-training")  # fmt: skip


def _digits_transfer(seed: int) -> Dataset:
    _, _, xt, yt = _transfer_arrays()
    (xtr, ytr), (xv, yv), (xte, yte) = split_arrays(xt, yt, (30, 300), seed, stratify=True)
    parts = [to_tensors(a, b, "classification") for a, b in ((xtr, ytr), (xv, yv), (xte, yte))]
    return Dataset(
        "digits-transfer", "classification", "image", *parts[0], *parts[1], *parts[2], num_classes=10,
        description="fine-tune a CNN pre-trained on clean digits to 30 digits of another look",
    )  # fmt: skip


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("digits", "sklearn 8x8 digits, 60/20/20 split", lambda s: _digits(s, None), "cnn", 30,
                 augment_options={"flip": False, "color": False, "erase": False}),
        TaskSpec("digits-small", "the digits with 200 training images (overfits)", lambda s: _digits(s, 200), "cnn",
                 60, augment_options={"flip": False, "color": False, "erase": False}),
        TaskSpec("sparse-regression", "generated: 100 features, 10 informative", _sparse_regression, "linear", 300,
                 batch_size=150, lr=0.1),  # full batch: the lasso's fixed point is exact
        TaskSpec("breast-cancer", "sklearn breast cancer, 2 classes", lambda s: _sklearn_tabular(
            "breast-cancer", "load_breast_cancer", s), "mlp", 40),
        TaskSpec("wine", "sklearn wine, 3 classes, 106 training rows", lambda s: _sklearn_tabular(
            "wine", "load_wine", s), "mlp", 60, batch_size=16),
        TaskSpec("waveforms", "generated 1-D signals, 3 shapes", _waveforms, "cnn1d", 100, lr=3e-3),
        TaskSpec("digits-transfer", "fine-tuning: pre-trained on clean digits, 30 shifted ones to adapt to",
                 _digits_transfer, "cnn", 60, batch_size=16, lr=3e-3,
                 augment_options={"flip": False, "color": False, "erase": False}, source=_digits_source),
        TaskSpec("friedman", "generated nonlinear regression, 10 features, 200 training rows", _friedman, "mlp",
                 150),
    )
}  # fmt: skip


def load_task(name: str, seed: int = 0) -> Dataset:
    """The built-in task ``name`` with splits fixed by ``seed``."""
    return TASKS[check_choice("task", name, TASKS)].load(seed)
