"""The one range-check helper: its messages are part of the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regdial._checks import check_choice, check_int, check_range


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"low": 0.0, "high": 1.0, "high_open": True}, 1.0, r"^rate must be in \[0, 1\), got 1.0$"),
        ({"low": 0.0, "low_open": True}, 0, r"^rate must be in \(0, inf\), got 0$"),
        ({"high": 5.0}, 7.5, r"^rate must be in \(-inf, 5\], got 7.5$"),
        ({"low": 0.0}, float("inf"), r"^rate must be a finite number in \[0, inf\), got inf$"),
        ({"low": 0.0}, None, r"^rate must be a number in \[0, inf\), got None$"),
        ({"low": 0.0}, [1], r"^rate must be a number in \[0, inf\), got \[1\]$"),
    ],
)
def test_check_range_messages(kwargs, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_range("rate", value, **kwargs)


def test_check_range_accepts_numpy_and_torch_scalars() -> None:
    assert check_range("x", np.float32(0.5), low=0.0) == 0.5
    assert check_range("x", torch.tensor(0.25), low=0.0) == 0.25


def test_check_int() -> None:
    assert check_int("epochs", np.int64(3), low=1) == 3
    with pytest.raises(ValueError, match=r"^epochs must be an integer in \[1, inf\), got 2.5$"):
        check_int("epochs", 2.5, low=1)
    with pytest.raises(ValueError, match=r"^epochs must be an integer in \[1, inf\), got 0$"):
        check_int("epochs", 0, low=1)


def test_check_choice() -> None:
    with pytest.raises(ValueError, match=r"^mode must be one of 'min', 'max', got 'avg'$"):
        check_choice("mode", "avg", ("min", "max"))
