"""Built-in tasks and the user-data loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from regdial.training.data import load_data
from regdial.training.models import build_model
from regdial.training.tasks import TASKS, load_task


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_loads_with_fixed_splits(name: str) -> None:
    first, again, other = load_task(name, 0), load_task(name, 0), load_task(name, 1)
    assert torch.equal(first.x_train, again.x_train)
    assert torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.x_train, other.x_train)
    assert len(first.x_train) == len(first.y_train)
    model = build_model(TASKS[name].model, first)
    assert model(first.x_val[:3]).shape == (3, first.outputs)


def test_digits_small_is_small_and_stratified() -> None:
    data = load_task("digits-small")
    assert data.sizes() == "200/400/500"
    counts = torch.bincount(data.y_train, minlength=10)
    assert counts.min() >= 18  # every digit present, about 20 each
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0


def test_splits_do_not_share_rows() -> None:
    data = load_task("breast-cancer")
    rows = lambda x: {tuple(r.tolist()) for r in x}  # noqa: E731
    assert not rows(data.x_train) & rows(data.x_test)
    assert not rows(data.x_val) & rows(data.x_test)


def test_tabular_tasks_are_standardized_on_the_training_split_only() -> None:
    data = load_task("wine")
    torch.testing.assert_close(data.x_train.mean(dim=0), torch.zeros(13), atol=1e-5, rtol=0)
    assert data.x_val.mean(dim=0).abs().max() > 1e-3  # validation is scaled, not re-centred


def test_sparse_regression_knows_its_support() -> None:
    data = load_task("sparse-regression")
    assert data.kind == "regression"
    assert len(data.true_support) == 10
    assert data.y_train.dtype == torch.float32


# -- user data --------------------------------------------------------------------------


def test_npz_without_validation_gets_a_stratified_fifth(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((100, 4)), np.repeat(np.arange(4), 25)
    np.savez(tmp_path / "data.npz", x=x, y=y, x_test=x[:10], y_test=y[:10])
    data = load_data(tmp_path / "data.npz")
    assert data.kind == "classification"
    assert data.num_classes == 4
    assert data.sizes() == "80/20/10"
    assert torch.bincount(data.y_val).tolist() == [5, 5, 5, 5]
    assert data.input_kind == "tabular"


def test_npz_images_and_forced_regression(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "images.npz",
        x=rng.random((20, 1, 6, 6)),
        y=rng.integers(0, 2, 20),
        x_val=rng.random((5, 1, 6, 6)),
        y_val=rng.integers(0, 2, 5),
    )
    assert load_data(tmp_path / "images.npz").input_kind == "image"
    np.savez(tmp_path / "counts.npz", x=rng.random((20, 3)), y=rng.integers(0, 50, 20))
    data = load_data(tmp_path / "counts.npz", kind="regression")
    assert data.kind == "regression" and data.y_train.dtype == torch.float32


def test_csv_with_text_labels(tmp_path: Path) -> None:
    lines = ["a,b,species"] + [f"{i},{i % 3},{['cat', 'dog'][i % 2]}" for i in range(20)]
    (tmp_path / "pets.csv").write_text("\n".join(lines) + "\n")
    data = load_data(tmp_path / "pets.csv", target="species")
    assert data.class_names == ("cat", "dog")
    assert data.input_shape == (2,)


@pytest.mark.parametrize(
    ("arrays", "kwargs", "message"),
    [
        (
            {"x": np.zeros((4, 2))},
            {},
            r"^data.npz: y must be an array in the file, got missing \(found: x\)$",
        ),
        (
            {"x": np.zeros((20, 2)), "y": np.zeros(19, dtype=int)},
            {},
            r"^data.npz: y must be one target per row of x \(20\), got 19$",
        ),
        (
            {"x": np.zeros((20, 2)), "y": np.array([0.5, 1, 0, 1] * 5)},
            {"kind": "classification"},
            r"^data.npz: y must be integer class labels for classification, got values like 0.5$",
        ),
        (
            {"x": np.array([[1.0, np.nan]] * 20), "y": np.arange(20) % 2},
            {},
            r"^data.npz: x must be finite numbers in float32, got NaN or inf at row 0$",
        ),
        (
            {"x": np.zeros(20), "y": np.arange(20) % 2},
            {},
            r"^data.npz: x must be one row per sample, with features",
        ),
        (
            {"x": np.zeros((20, 2)), "y": np.zeros(20, dtype=int)},
            {},
            r"^data.npz: y must be at least 2 classes, got 1$",
        ),
        (
            {
                "x": np.zeros((20, 2)),
                "y": np.arange(20) % 2,
                "x_val": np.zeros((2, 3)),
                "y_val": np.arange(2),
            },
            {},
            r"^data.npz: x_val/x_test must be the same feature shape as x",
        ),
        (
            {"x": np.zeros((20, 2)), "y": np.arange(20) % 2, "x_val": np.zeros((2, 2))},
            {},
            r"^data.npz: y_val must be given together with x_val, got missing$",
        ),
    ],
)
def test_malformed_npz(tmp_path: Path, arrays, kwargs, message: str) -> None:
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_data(tmp_path / "data.npz", **kwargs)


def test_targets_auto_cannot_tell_and_classes_only_held_out_rows_hold_are_one_line(tmp_path: Path) -> None:
    """Each trained silently: diabetes' integer target as 214 classes (val accuracy 0),
    labels written 0.0/1.0 as a regression, a y_val class y never holds (accuracy 0)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    cases = [
        ({"y": rng.integers(25, 346, 400)}, r"^kind must be 'classification' or 'regression' for these targets "
         r"\(--kind; auto cannot tell\), got auto, with \d+ distinct integers in 400 targets$"),
        ({"y": (x[:, 0] > 0).astype(np.float64)}, r"got auto, with 2 distinct whole numbers in 400 targets$"),
        ({"y": x[:300, 0] > 0, "x_val": x[300:], "y_val": np.full(100, 5)},
         r"^data.npz: y_val must be classes y holds \(0, 1\), got '5'$"),
    ]  # fmt: skip
    for arrays, message in cases:
        arrays = {"x": x[: len(arrays["y"])]} | arrays
        np.savez(tmp_path / "data.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            load_data(tmp_path / "data.npz")
    np.savez(tmp_path / "data.npz", x=x, y=rng.integers(25, 346, 400))
    assert load_data(tmp_path / "data.npz", kind="regression").kind == "regression"  # said: it trains
    np.savez(tmp_path / "data.npz", x=x, y=(x[:, 0] > 0).astype(np.float64))
    data = load_data(tmp_path / "data.npz", kind="classification")
    assert data.num_classes == 2 and data.description.endswith("2-class classification")


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(
        ValueError, match=r"^data must be a .npz of plain numeric arrays \(no pickled objects\)"
    ):
        load_data(tmp_path / "data.npz")


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        ("a,b\n1,2\n", "label", r"^target must be a column of data.csv \(a, b\), got 'label'$"),
        ("a,label\n1,0\nx,1\n", "label", r"^data.csv: column 'a' line 3 must be a number, got 'x'$"),
        ("a,label\n1,0\n2\n", "label", r"^data.csv: line 3 must be 2 fields like the header, got 1$"),
        (
            "1.5,0\n2.5,1\n",
            "0",
            r"^data.csv must be a CSV whose first line names its columns \(a header row\), got a "
            r"first line of numbers \(1.5, 0\)$",
        ),  # its first row was read as the names, and lost
        (
            "a;label\n1;0\n",
            "label",
            r"^data.csv must be a comma-separated file, got a header separated by semicolons$",
        ),
    ],
)
def test_malformed_csv(tmp_path: Path, text: str, target: str, message: str) -> None:
    (tmp_path / "data.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_data(tmp_path / "data.csv", target=target)


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^data must be an existing .npz or .csv file"):
        load_data(tmp_path / "nope.npz")
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(ValueError, match=r"^data must be a .npz or .csv file"):
        load_data(tmp_path / "data.json")
