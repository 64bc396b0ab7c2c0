"""Schedules of strengths over training."""

from __future__ import annotations

import math

import pytest

from regdial.blocks.schedules import schedule_from_dict
from regdial.schedules import Constant, Cosine, Early, Linear, Step


@pytest.mark.parametrize(
    ("schedule", "points"),
    [
        (Constant(0.3), {0.0: 0.3, 0.7: 0.3, 1.0: 0.3}),
        (Linear(0.0, 1.0), {0.0: 0.0, 0.25: 0.25, 1.0: 1.0, 2.0: 1.0, -1.0: 0.0}),
        (Cosine(1.0, 0.0), {0.0: 1.0, 0.5: 0.5, 1.0: 0.0, 1 / 3: 0.75}),
        (Step((0.1, 0.05, 0.0), milestones=(0.5, 0.8)), {0.0: 0.1, 0.49: 0.1, 0.5: 0.05, 0.8: 0.0, 1.0: 0.0}),
        (Early(0.2, until=0.25), {0.0: 0.2, 0.24: 0.2, 0.25: 0.0, 1.0: 0.0}),
    ],
)
def test_values(schedule, points: dict[float, float]) -> None:
    for progress, expected in points.items():
        assert math.isclose(schedule(progress), expected, abs_tol=1e-12), progress


@pytest.mark.parametrize(
    "schedule",
    [
        Constant(0.3),
        Linear(0.0, 1.0),
        Cosine(1e-4, 0.0),
        Step((0.1, 0.0), milestones=(0.5,)),
        Early(0.1, 0.3),
    ],
)
def test_dict_round_trip(schedule) -> None:
    assert schedule_from_dict(schedule.to_dict()) == schedule


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Step((0.1, 0.2), milestones=()), r"^Step.milestones must be one fewer than values"),
        (
            lambda: Step((0.1, 0.2, 0.3), milestones=(0.6, 0.4)),
            r"^Step.milestones\[1\] must be in \(0.6, 1\], got 0.4$",
        ),
        (lambda: Early(0.1, until=1.5), r"^Early.until must be in \[0, 1\], got 1.5$"),
        (lambda: schedule_from_dict({"schedule": "exp"}), r"^schedule.schedule must be one of 'constant'"),
        (
            lambda: schedule_from_dict({"schedule": "linear", "start": 0.0, "end": 1.0, "stop": 2}),
            r"^schedule must be a linear schedule with keys \['end', 'start'\], got unknown key 'stop'$",
        ),
    ],
)
def test_bad_schedules(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
