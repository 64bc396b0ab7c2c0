"""The user's own data: ``.npz`` and ``.csv`` files as a ``Dataset``, checked on the way in.

``load_data("file.npz")`` reads arrays ``x``, ``y`` and optionally ``x_val``, ``y_val``,
``x_test``, ``y_test``; ``load_data("file.csv", target="label")`` reads a header row and
numeric feature columns. Splits that are missing are carved from the training rows,
seeded and stratified for classification: a validation split (20%) for choosing, and a
test split (20%) for the final score only, so that "tuned vs baseline" is always scored
on data the search never saw (``Dataset.test_carved`` says it was carved).

Whether the task is classification or regression is inferred from the targets (integers
or strings: classes; other floats: values) and can be forced with ``kind``.

Nothing reaches training that would make it silently wrong. Refused, each with one line
naming the file, the array and what is wrong (the first bad row where there is one):
``y`` that is not one value per sample (a 2-D ``y`` of shape (n, 2) would pair x[i] with
the wrong label), complex numbers, NaN or infinite targets, inputs that are not finite
once in float32 (``x * 1e300``), samples without features, fewer than ``MIN_ROWS``
rows, a class with a single sample, files that are not what their name says (an ``.npy``
named ``.npz``, a truncated or garbage archive), and arrays whose header claims more
memory than ``MAX_BYTES`` or than the file holds.
"""

from __future__ import annotations

import contextlib
import csv
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from regdial._checks import Described, check_choice, check_int, fail
from regdial._io import read_text
from regdial.training.tasks import Dataset, Kind, split_arrays, standardizer, to_tensors

__all__ = ["MAX_BYTES", "MIN_ROWS", "load_data"]

MIN_ROWS = 10
"""The fewest rows a data file may have: enough for a train, validation and test split."""
MAX_BYTES = 8 * 2**30
"""The largest array a data file may hold (8 GiB)."""
SPLIT = 0.2


def _where(path: Path, array: str) -> str:
    return f"{path.name}: {array}"


def _labels(y: np.ndarray, path: Path, kind: str) -> tuple[np.ndarray, Kind, tuple[str, ...] | None]:
    """Targets as class indices (with names) or float values, by ``kind`` or inference."""
    field = _where(path, "y")
    if y.dtype.kind == "c":
        fail(field, "real numbers or labels", Described("complex numbers"))
    is_text = y.dtype.kind in "USO"
    if not is_text and y.dtype.kind not in "iubf":
        fail(field, "numbers or text labels", Described(f"dtype {y.dtype}"))
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y))
        if len(bad):
            fail(field, "finite targets", Described(f"NaN or inf at row {int(bad[0])}"))
    integral = is_text or y.dtype.kind in "iub" or bool(np.all(np.mod(y, 1) == 0))
    if kind == "auto":
        kind = "classification" if is_text or y.dtype.kind in "iub" else "regression"
        levels = len(np.unique(y)) if not is_text else 0
        # Integers with a class per few rows are a count or a score (diabetes' 214 values in
        # 442 rows trained as 214 classes); whole floats in a few levels are labels written
        # as floats (0.0/1.0 trained as a regression). Either way the file cannot say.
        if (kind == "classification" and levels > max(20, y.size // 5)) or (
            kind == "regression" and integral and levels <= 10
        ):
            fail("kind", "'classification' or 'regression' for these targets (--kind; auto cannot tell)",
                 Described(f"auto, with {levels} distinct {'integers' if y.dtype.kind in 'iub' else 'whole numbers'} "
                           f"in {y.size} targets"))  # fmt: skip
    if kind == "regression":
        if is_text:
            fail(field, "numbers for regression", Described("text labels"))
        values = y.astype(np.float64)
        if not np.all(np.isfinite(values.astype(np.float32))):
            fail(field, "targets that fit in float32", Described("values beyond 3.4e38"))
        return values.astype(np.float32), "regression", None
    if not integral:
        example = next(v for v in y.ravel() if np.mod(v, 1) != 0)
        fail(field, "integer class labels for classification", Described(f"values like {float(example)!r}"))
    classes, indices = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        fail(field, "at least 2 classes", len(classes))
    return indices.reshape(y.shape), "classification", tuple(str(c) for c in classes)


def _targets(y: np.ndarray, path: Path, array: str) -> np.ndarray:
    """One target per sample: shape (n,) or (n, 1); anything else is refused."""
    if y.ndim == 2 and y.shape[1] == 1:
        return y[:, 0]
    if y.ndim != 1:
        fail(
            _where(path, array), "one target per sample, shape (n,) or (n, 1)", Described(f"shape {y.shape}")
        )
    return y


def _features(x: np.ndarray, path: Path, array: str) -> np.ndarray:
    field = _where(path, array)
    if x.dtype.kind == "c":
        fail(field, "real numbers", Described("complex numbers"))
    if x.dtype.kind not in "iufb":
        fail(field, "numeric features", Described(f"dtype {x.dtype}"))
    if x.ndim < 2:
        fail(field, "one row per sample, with features (2-D or more)", Described(f"shape {x.shape}"))
    if x.ndim > 4:
        fail(field, "rows of features (2-D), signals (3-D) or images (4-D)", Described(f"shape {x.shape}"))
    if any(n == 0 for n in x.shape[1:]):
        fail(field, "samples with at least one feature", Described(f"shape {x.shape}"))
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values are found just below
        narrow = x.astype(np.float32)
    bad = np.argwhere(~np.isfinite(narrow.reshape(len(narrow), -1)))
    if len(bad):
        wide = np.isfinite(x.astype(np.float64).reshape(len(x), -1)[bad[0][0]]).all()
        why = "values beyond float32's range (3.4e38)" if wide else "NaN or inf"
        fail(field, "finite numbers in float32", Described(f"{why} at row {int(bad[0][0])}"))
    return narrow


def _input_kind(x: np.ndarray) -> str:
    return {2: "tabular", 3: "signal", 4: "image"}.get(x.ndim, "tabular")


def load_data(path: str | Path, *, target: str | None = None, kind: str = "auto", seed: int = 0) -> Dataset:
    """The user's data from ``.npz`` or ``.csv``; see the module docstring."""
    path = Path(path)
    kind = check_choice("kind", kind, ("auto", "classification", "regression"))
    seed = check_int("seed", seed, low=0, high=2**32 - 1)
    if not path.is_file():
        fail("data", "an existing .npz or .csv file", str(path))
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = _read_npz(path)
    elif suffix == ".csv":
        arrays = _read_csv(path, target)
    else:
        fail("data", "a .npz or .csv file", str(path))
    carve = ("x_val" not in arrays) + ("x_test" not in arrays)
    rows = len(arrays["x"]) if np.ndim(arrays["x"]) else 0
    if rows < MIN_ROWS + carve * 2:
        fail(
            _where(path, "x"), f"at least {MIN_ROWS + carve * 2} rows (enough for the splits it needs)", rows
        )
    for x_name, y_name in (("x", "y"), ("x_val", "y_val"), ("x_test", "y_test")):
        if (x_name in arrays) != (y_name in arrays):
            present, missing = (x_name, y_name) if x_name in arrays else (y_name, x_name)
            fail(_where(path, missing), f"given together with {present}", Described("missing"))
        if x_name in arrays:
            if x_name != "x" and (np.ndim(arrays[x_name]) == 0 or len(arrays[x_name]) == 0):
                fail(_where(path, x_name), "at least one row (or leave it out: a split is then carved from x)",
                     Described(f"{np.size(arrays[x_name])} values"))  # fmt: skip
            arrays[y_name] = _targets(arrays[y_name], path, y_name)
            if len(arrays[x_name]) != len(arrays[y_name]):
                fail(_where(path, y_name), f"one target per row of {x_name} ({len(arrays[x_name])})",
                     Described(f"{len(arrays[y_name])}"))  # fmt: skip
    xs = {name: _features(arrays[name], path, name) for name in ("x", "x_val", "x_test") if name in arrays}
    shapes = {name: x.shape[1:] for name, x in xs.items()}
    if len(set(shapes.values())) > 1:
        fail(
            _where(path, "x_val/x_test"), f"the same feature shape as x {shapes['x']}", Described(str(shapes))
        )
    names = [n for n in ("y", "y_val", "y_test") if n in arrays]
    labels, task_kind, class_names = _labels(np.concatenate([arrays[n] for n in names]), path, kind)
    offsets = np.cumsum([0] + [len(arrays[n]) for n in names])
    ys = {name: labels[offsets[i] : offsets[i + 1]] for i, name in enumerate(names)}
    if task_kind == "classification" and class_names is not None:
        for name in names[1:]:  # a class only the held-out rows hold can never be predicted
            unseen = np.setdiff1d(ys[name], ys["y"])
            if unseen.size:
                seen = ", ".join(class_names[i] for i in np.unique(ys["y"])[:10])
                fail(_where(path, name), f"classes y holds ({seen})", class_names[int(unseen[0])])
    x, y = xs["x"], ys["y"]
    stratify = task_kind == "classification" and np.bincount(y).min() >= 3
    test_carved = "x_test" not in xs
    if test_carved:
        (x_test, y_test), (x, y) = split_arrays(x, y, (SPLIT,), seed, stratify=stratify)
    else:
        x_test, y_test = xs["x_test"], ys["y_test"]
    if "x_val" in xs:
        x_val, y_val = xs["x_val"], ys["y_val"]
    else:
        stratify = stratify and np.bincount(y).min() >= 3
        (x_val, y_val), (x, y) = split_arrays(
            x, y, (SPLIT / (1 - SPLIT * test_carved),), seed, stratify=stratify
        )
    input_kind = _input_kind(x)
    if input_kind == "tabular":
        scale = standardizer(x)
        x, x_val, x_test = scale(x), scale(x_val), scale(x_test)
    num_classes = len(class_names) if class_names else None
    (x_train, y_train), (x_v, y_v) = to_tensors(x, y, task_kind), to_tensors(x_val, y_val, task_kind)
    x_t, y_t = to_tensors(x_test, y_test, task_kind)
    carved = " (validation and test splits carved from it)" if carve == 2 else (
        " (test split carved from it)" if test_carved else " (validation split carved from it)" if carve else "")  # fmt: skip
    return Dataset(
        name=path.stem, kind=task_kind, input_kind=input_kind, x_train=x_train, y_train=y_train,  # type: ignore[arg-type]
        x_val=x_v, y_val=y_v, x_test=x_t, y_test=y_t, num_classes=num_classes, class_names=class_names,
        description=f"user data from {path.name}{carved}, " + (f"{num_classes}-class classification"
                    if num_classes else "regression"), path=str(path), target=target, test_carved=test_carved,
    )  # fmt: skip


def _check_npz(path: Path) -> None:
    """Refuse a file that is not a zip of ``.npy`` arrays, or whose arrays claim more memory
    than ``MAX_BYTES`` or than the archive holds, before NumPy allocates anything."""
    if not zipfile.is_zipfile(path):
        fail("data", "a .npz archive (numpy.savez)", Described(f"{path.name}, which is not a zip archive"))
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    header = (
                        np.lib.format.read_array_header_1_0(member)
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0(member)
                    )
                shape, _, dtype = header
                count = int(np.prod(shape, dtype=object)) if shape else 1
                claimed = count * dtype.itemsize
                if claimed > MAX_BYTES:
                    fail(_where(path, info.filename.removesuffix(".npy")), f"at most {MAX_BYTES // 2**30} GiB",
                         Described(f"a header claiming {claimed:,} bytes (shape {shape})"))  # fmt: skip
                if dtype.kind != "O" and claimed > info.file_size:
                    fail(_where(path, info.filename.removesuffix(".npy")), "a complete array",
                         Described(f"a header claiming {claimed:,} bytes in {info.file_size:,}"))  # fmt: skip
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        if str(error).startswith(path.name):
            raise
        fail("data", "a readable .npz archive", Described(f"{path.name}: {str(error).splitlines()[0][:80]}"))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    _check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:  # object arrays need pickle, which is never allowed
        fail("data", "a .npz of plain numeric arrays (no pickled objects)",
             Described(f"{path.name}: {str(error).splitlines()[0][:80]}"))  # fmt: skip
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        fail("data", "a readable .npz file", Described(f"{path.name}: {str(error).splitlines()[0][:80]}"))
    for required in ("x", "y"):
        if required not in arrays:
            found = ", ".join(sorted(arrays)) or "no arrays"
            fail(_where(path, required), "an array in the file", Described(f"missing (found: {found[:60]})"))
    return arrays


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, target: str | None) -> dict[str, Any]:
    text = read_text(path, "a readable CSV file")
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as error:
        fail(path.name, "a readable CSV file", Described(str(error)[:80]))
    if len(rows) < 2:
        fail(path.name, "a header row and data rows", Described(f"{len(rows)} rows"))
    header, body = rows[0], rows[1:]
    if len(header) > 1 and all(_is_number(name) for name in header):
        fail(path.name, "a CSV whose first line names its columns (a header row)",
             Described(f"a first line of numbers ({', '.join(header)[:40]})"))  # fmt: skip
    if len(header) == 1 and ";" in header[0]:
        fail(path.name, "a comma-separated file", Described("a header separated by semicolons"))
    if target is None:
        target = "target" if "target" in header else None
    if target is None or target not in header:
        fail("target", f"a column of {path.name} ({', '.join(header)[:60]})", target)
    if len(header) < 2:
        fail(path.name, "feature columns beside the target", Described(f"only {target!r}"))
    column = header.index(target)
    features, labels = [], []
    for line, row in enumerate(body, start=2):
        if not row:
            continue
        if len(row) != len(header):
            fail(f"{path.name}: line {line}", f"{len(header)} fields like the header", len(row))
        values = []
        for index, (name, cell) in enumerate(zip(header, row, strict=True)):
            if index == column:
                continue
            try:
                values.append(float(cell))
            except ValueError:
                fail(f"{path.name}: column {name!r} line {line}", "a number", cell)
        features.append(values)
        labels.append(row[column].strip())
    if any(label == "" for label in labels):
        line = labels.index("") + 2
        fail(f"{path.name}: column {target!r} line {line}", "a target value", Described("an empty cell"))
    y: np.ndarray = np.array(labels)
    if all(v.lstrip("-").isdigit() for v in labels):
        y = y.astype(np.int64)
    else:
        with contextlib.suppress(ValueError):  # text labels stay text: they are classes
            y = y.astype(np.float64)
    return {"x": np.array(features, dtype=np.float64).reshape(len(features), -1), "y": y}
