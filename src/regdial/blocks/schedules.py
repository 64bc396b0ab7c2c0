"""Schedules: a strength that changes over training.

A schedule maps training progress ``t`` in [0, 1] (the fraction of training done) to a
value. Anything in regdial that takes a strength also takes a schedule: the penalties
(``L1(Cosine(1e-4, 0.0))``), ``set_dropout``, ``set_drop_path`` and the augmentation
presets, so a user can turn the dial from inside their own loop.

``Early`` is early dropout (Liu et al., 2023, "Dropout Reduces Underfitting"): the
technique is on for the first part of training only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from regdial._checks import Described, check_range, fail

__all__ = [
    "Constant",
    "Cosine",
    "Early",
    "Linear",
    "Schedule",
    "Scheduled",
    "Step",
    "Strength",
    "check_strength",
    "resolve",
    "schedule_from_dict",
]


class Schedule(ABC):
    """A value as a function of training progress ``t`` in [0, 1]."""

    kind: ClassVar[str]

    @abstractmethod
    def __call__(self, progress: float) -> float:
        """The value at ``progress`` (clamped to [0, 1])."""

    @abstractmethod
    def extremes(self) -> tuple[float, ...]:
        """Every value the schedule can reach lies between min and max of these."""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (``{"schedule": kind, ...}``) for TOML and JSON."""
        return {"schedule": self.kind, **asdict(self)}  # type: ignore[call-overload]


def _clamp(progress: float) -> float:
    return min(1.0, max(0.0, float(progress)))


@dataclass(frozen=True)
class Constant(Schedule):
    """``value`` throughout."""

    value: float
    kind: ClassVar[str] = "constant"

    def __call__(self, progress: float) -> float:
        return self.value

    def extremes(self) -> tuple[float, ...]:
        return (self.value,)


@dataclass(frozen=True)
class Linear(Schedule):
    """``start + (end - start) * t``."""

    start: float
    end: float
    kind: ClassVar[str] = "linear"

    def __call__(self, progress: float) -> float:
        return self.start + (self.end - self.start) * _clamp(progress)

    def extremes(self) -> tuple[float, ...]:
        return (self.start, self.end)


@dataclass(frozen=True)
class Cosine(Schedule):
    """``end + (start - end) * (1 + cos(pi * t)) / 2``: a half cosine from start to end."""

    start: float
    end: float
    kind: ClassVar[str] = "cosine"

    def __call__(self, progress: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * _clamp(progress)))

    def extremes(self) -> tuple[float, ...]:
        return (self.start, self.end)


@dataclass(frozen=True)
class Step(Schedule):
    """Piecewise constant: ``values[i]`` from ``milestones[i-1]`` up to ``milestones[i]``.

    ``Step((0.1, 0.05, 0.0), milestones=(0.5, 0.8))`` is 0.1 for t < 0.5, 0.05 for
    0.5 <= t < 0.8 and 0 after.
    """

    values: tuple[float, ...]
    milestones: tuple[float, ...] = field(default=())
    kind: ClassVar[str] = "step"

    def __post_init__(self) -> None:
        for name in ("values", "milestones"):
            given = getattr(self, name)
            if isinstance(given, str | bytes) or not isinstance(given, Iterable):
                fail(f"Step.{name}", "a sequence of numbers", given)
            checked = tuple(check_range(f"Step.{name}[{i}]", v) for i, v in enumerate(given))
            object.__setattr__(self, name, checked)
        if len(self.values) != len(self.milestones) + 1:
            fail(
                "Step.milestones",
                f"one fewer than values ({len(self.values) - 1} for {len(self.values)} values)",
                len(self.milestones),
            )
        previous = 0.0
        for i, milestone in enumerate(self.milestones):
            check_range(f"Step.milestones[{i}]", milestone, low=previous, high=1.0, low_open=i > 0)
            previous = milestone

    def __call__(self, progress: float) -> float:
        t = _clamp(progress)
        index = sum(1 for milestone in self.milestones if t >= milestone)
        return self.values[index]

    def extremes(self) -> tuple[float, ...]:
        return self.values

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.kind, "values": list(self.values), "milestones": list(self.milestones)}


@dataclass(frozen=True)
class Early(Schedule):
    """``value`` for t < ``until``, then 0: on for the first part of training only."""

    value: float
    until: float = 0.25
    kind: ClassVar[str] = "early"

    def __post_init__(self) -> None:
        check_range("Early.until", self.until, low=0.0, high=1.0)

    def __call__(self, progress: float) -> float:
        return self.value if _clamp(progress) < self.until else 0.0

    def extremes(self) -> tuple[float, ...]:
        return (self.value, 0.0)


Strength = float | Schedule
"""A fixed strength, or a schedule of strengths over training."""

_KINDS: dict[str, type[Schedule]] = {cls.kind: cls for cls in (Constant, Linear, Cosine, Step, Early)}


def schedule_from_dict(data: Mapping[str, Any], field_name: str = "schedule") -> Schedule:
    """Inverse of ``Schedule.to_dict``; unknown kinds and keys fail by name."""
    kind = data.get("schedule")
    if kind not in _KINDS:
        fail(f"{field_name}.schedule", "one of " + ", ".join(map(repr, _KINDS)), kind)
    cls = _KINDS[kind]
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key != "schedule" and key not in names:
            fail(
                f"{field_name}",
                f"a {kind} schedule with keys {sorted(names)}",
                Described(f"unknown key {key!r}"),
            )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "schedule":
            continue
        if cls is Step:  # values and milestones are lists of numbers
            if not isinstance(value, list | tuple) or len(value) > 10_000:
                fail(f"{field_name}.{key}", "a list of numbers", value)
            kwargs[key] = tuple(check_range(f"{field_name}.{key}[{i}]", v) for i, v in enumerate(value))
        else:
            kwargs[key] = check_range(f"{field_name}.{key}", value)
    try:
        return cls(**kwargs)
    except TypeError as error:
        fail(field_name, f"a complete {kind} schedule", Described(str(error)))


def check_strength(field_name: str, strength: object, check: Callable[[str, object], float]) -> Strength:
    """Validate a strength or every value a schedule can reach with ``check``."""
    if isinstance(strength, Schedule):
        for value in strength.extremes():
            check(field_name, value)
        return strength
    return check(field_name, strength)


def resolve(strength: Strength, progress: float) -> float:
    """The strength's value at ``progress``."""
    return strength(progress) if isinstance(strength, Schedule) else strength


class Scheduled:
    """Mixin for anything with a ``strength`` that may follow a schedule.

    Subclasses set ``strength_range`` (low, high, high_open). ``set_progress(t)`` tells a
    scheduled strength how far training is; ``current_strength`` is its value now.
    """

    strength_range: ClassVar[tuple[float, float | None, bool]] = (0.0, None, False)
    _strength: Strength
    progress: float = 0.0

    def _check_one(self, field_name: str, value: object) -> float:
        low, high, high_open = self.strength_range
        return check_range(field_name, value, low=low, high=high, high_open=high_open)

    @property
    def strength(self) -> Strength:
        """The strength, or its schedule."""
        return self._strength

    @strength.setter
    def strength(self, strength: Strength) -> None:
        self._strength = check_strength(f"{type(self).__name__}.strength", strength, self._check_one)

    @property
    def current_strength(self) -> float:
        """The strength now: the schedule's value at ``progress``, or the fixed strength."""
        return resolve(self._strength, self.progress)

    def set_progress(self, progress: float) -> None:
        """How far training is, as a fraction in [0, 1]."""
        self.progress = check_range("progress", progress, low=0.0, high=1.0)
