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
=================  ==============  =================================================

User data: ``load_data("file.npz")`` with arrays ``x``, ``y`` and optionally ``x_val``,
``y_val``, ``x_test``, ``y_test`` (no validation split: a seeded, stratified 20% of
train), or ``load_data("file.csv", target="label")``. Whether the task is classification
or regression is inferred from the targets (integers or strings: classes; other floats:
values) and can be forced with ``kind``. A malformed file gets a one-line error saying
what is wrong.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from regdial._checks import Described, check_choice, fail

__all__ = ["TASKS", "Dataset", "TaskSpec", "load_data", "load_task"]

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


def _split(
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


def _standardizer(train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Scale every feature by the training split's mean and std (never the other splits')."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    return lambda a: (a - mean) / std


def _tensors(x: np.ndarray, y: np.ndarray, kind: Kind) -> tuple[Tensor, Tensor]:
    xt = torch.tensor(np.asarray(x), dtype=torch.float32)
    yt = torch.tensor(np.asarray(y), dtype=torch.long if kind == "classification" else torch.float32)
    return xt, yt


def _digits(seed: int, train: int | None) -> Dataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    if train is None:  # 60/20/20
        (xt, yt), (xv, yv), (xtr, ytr) = _split(x, y, (0.2, 0.2), seed, stratify=True)
    else:
        (xt, yt), (xv, yv), (rest_x, rest_y) = _split(x, y, (500, 400), seed, stratify=True)
        (xtr, ytr), _ = _split(rest_x, rest_y, (train,), seed, stratify=True)
    name = "digits" if train is None else "digits-small"
    parts = [_tensors(a, b, "classification") for a, b in ((xtr, ytr), (xv, yv), (xt, yt))]
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
        return _tensors(x, x @ coef + rng.standard_normal(n), "regression")

    train, val, test = draw(150), draw(300), draw(1000)
    return Dataset(
        "sparse-regression", "regression", "tabular", *train, *val, *test,
        true_support=tuple(sorted(int(i) for i in support)),
        description="y = x . w + N(0, 1) with 10 of 100 weights non-zero; 150 training rows",
    )  # fmt: skip


def _sklearn_tabular(name: str, loader: str, seed: int) -> Dataset:
    import sklearn.datasets

    x, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    (xt, yt), (xv, yv), (xtr, ytr) = _split(x, y, (0.2, 0.2), seed, stratify=True)
    scale = _standardizer(xtr)
    xtr, xv, xt = scale(xtr), scale(xv), scale(xt)
    parts = [_tensors(a, b, "classification") for a, b in ((xtr, ytr), (xv, yv), (xt, yt))]
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
        return _tensors(x[:, None, :], labels, "classification")

    train, val, test = draw(150), draw(300), draw(600)
    return Dataset(
        "waveforms", "classification", "signal", *train, *val, *test, num_classes=3,
        class_names=("sine", "square", "triangle"),
        description="noisy sine, square and triangle waves, 128 samples each",
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
    )
}  # fmt: skip


def load_task(name: str, seed: int = 0) -> Dataset:
    """The built-in task ``name`` with splits fixed by ``seed``."""
    return TASKS[check_choice("task", name, TASKS)].load(seed)


# -- user data ------------------------------------------------------------------------


def _where(path: Path) -> str:
    return path.name


def _labels(
    y: np.ndarray, path: Path, kind: str, array: str
) -> tuple[np.ndarray, Kind, tuple[str, ...] | None]:
    """Targets as class indices (with names) or float values, by ``kind`` or inference."""
    is_text = y.dtype.kind in "USO"
    integral = (
        is_text
        or y.dtype.kind in "iub"
        or (y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(np.mod(y, 1) == 0))
    )
    if kind == "auto":
        kind = "classification" if is_text or y.dtype.kind in "iub" else "regression"
    if kind == "regression":
        if is_text:
            fail(f"{_where(path)}: {array}", "numbers for regression", Described("text labels"))
        return y.astype(np.float32), "regression", None
    if not integral:
        example = next(v for v in y.ravel() if np.mod(v, 1) != 0)
        fail(
            f"{_where(path)}: {array}",
            "integer class labels for classification",
            Described(f"values like {float(example)!r}"),
        )
    classes, indices = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        fail(f"{_where(path)}: {array}", "at least 2 classes", len(classes))
    return indices.reshape(y.shape), "classification", tuple(str(c) for c in classes)


def _features(x: np.ndarray, path: Path, array: str) -> np.ndarray:
    if x.dtype.kind not in "iufb":
        fail(f"{_where(path)}: {array}", "numeric features", Described(f"dtype {x.dtype}"))
    if x.ndim < 2:
        fail(
            f"{_where(path)}: {array}",
            "one row per sample, with features (2-D or more)",
            Described(f"shape {x.shape}"),
        )
    bad = np.argwhere(~np.isfinite(x.astype(np.float64)))
    if len(bad):
        fail(f"{_where(path)}: {array}", "finite numbers", Described(f"NaN or inf at row {int(bad[0][0])}"))
    return x.astype(np.float32)


def _input_kind(x: np.ndarray) -> InputKind:
    return {2: "tabular", 3: "signal", 4: "image"}.get(x.ndim, "tabular")  # type: ignore[return-value]


def load_data(path: str | Path, *, target: str | None = None, kind: str = "auto", seed: int = 0) -> Dataset:
    """The user's data from ``.npz`` or ``.csv``; see the module docstring."""
    path = Path(path)
    kind = check_choice("kind", kind, ("auto", "classification", "regression"))
    if not path.is_file():
        fail("data", "an existing .npz or .csv file", str(path))
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = _read_npz(path)
    elif suffix == ".csv":
        arrays = _read_csv(path, target)
    else:
        fail("data", "a .npz or .csv file", str(path))
    for x_name, y_name in (("x", "y"), ("x_val", "y_val"), ("x_test", "y_test")):
        if (x_name in arrays) != (y_name in arrays):
            present, missing = (x_name, y_name) if x_name in arrays else (y_name, x_name)
            fail(f"{path.name}: {missing}", f"given together with {present}", Described("missing"))
        if x_name in arrays and len(arrays[x_name]) != len(arrays[y_name]):
            fail(
                f"{path.name}: {y_name}",
                f"one target per row of {x_name} ({len(arrays[x_name])})",
                Described(f"{len(arrays[y_name])}"),
            )
    xs = {name: _features(arrays[name], path, name) for name in ("x", "x_val", "x_test") if name in arrays}
    shapes = {name: x.shape[1:] for name, x in xs.items()}
    if len(set(shapes.values())) > 1:
        fail(
            f"{path.name}: x_val/x_test", f"the same feature shape as x {shapes['x']}", Described(str(shapes))
        )
    all_y = np.concatenate([arrays[n].ravel() for n in ("y", "y_val", "y_test") if n in arrays])
    labels, task_kind, class_names = _labels(all_y, path, kind, "y")
    offsets = np.cumsum([0] + [len(arrays[n]) for n in ("y", "y_val", "y_test") if n in arrays])
    ys = {}
    for i, name in enumerate(n for n in ("y", "y_val", "y_test") if n in arrays):
        ys[name] = labels[offsets[i] : offsets[i + 1]]
    x, y = xs["x"], ys["y"]
    if "x_val" in xs:
        x_val, y_val = xs["x_val"], ys["y_val"]
    else:
        stratify = task_kind == "classification" and np.bincount(y).min() >= 2
        (x_val, y_val), (x, y) = _split(x, y, (0.2,), seed, stratify=stratify)
    x_test, y_test = xs.get("x_test"), ys.get("y_test")
    input_kind = _input_kind(x)
    if input_kind == "tabular":
        scale = _standardizer(x)
        x, x_val = scale(x), scale(x_val)
        x_test = None if x_test is None else scale(x_test)
    num_classes = len(class_names) if class_names else None
    (x_train, y_train), (x_v, y_v) = _tensors(x, y, task_kind), _tensors(x_val, y_val, task_kind)
    x_t = y_t = None
    if x_test is not None and y_test is not None:
        x_t, y_t = _tensors(x_test, y_test, task_kind)
    return Dataset(
        name=path.stem, kind=task_kind, input_kind=input_kind, x_train=x_train, y_train=y_train, x_val=x_v,
        y_val=y_v, x_test=x_t, y_test=y_t, num_classes=num_classes, class_names=class_names,
        description=f"user data from {path.name}",
    )  # fmt: skip


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:  # object arrays need pickle, which is never allowed
        fail(
            "data",
            "a .npz of plain numeric arrays (no pickled objects)",
            Described(str(error).split("\n")[0]),
        )
    except (OSError, EOFError) as error:
        fail("data", "a readable .npz file", Described(str(error).split("\n")[0]))
    for required in ("x", "y"):
        if required not in arrays:
            found = ", ".join(sorted(arrays)) or "no arrays"
            fail(f"{path.name}: {required}", "an array in the file", Described(f"missing (found: {found})"))
    return arrays


def _read_csv(path: Path, target: str | None) -> dict[str, np.ndarray]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        fail(f"{path.name}", "a header row and at least one data row", Described(f"{len(rows)} rows"))
    header, body = rows[0], rows[1:]
    if target is None:
        target = "target" if "target" in header else None
    if target is None or target not in header:
        fail("target", f"a column of {path.name} ({', '.join(header)})", target)
    column = header.index(target)
    features, labels = [], []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            fail(f"{path.name}: line {line}", f"{len(header)} fields like the header", len(row))
        values = []
        for name, cell in zip(header, row, strict=True):
            if name == target:
                continue
            try:
                values.append(float(cell))
            except ValueError:
                fail(f"{path.name}: column {name!r} line {line}", "a number", cell)
        features.append(values)
        labels.append(row[column])
    y = np.array(labels)
    with contextlib.suppress(ValueError):  # text labels stay text: they are classes
        y = y.astype(np.int64) if all(v.lstrip("-").isdigit() for v in labels) else y.astype(np.float64)
    return {"x": np.array(features, dtype=np.float64), "y": y}
