"""``Space``: the part of the dial a search may turn, and how far.

A space maps knob names (``Regularization`` fields, see ``regdial.knobs.KNOBS``) to ranges. A
range is searched on a log scale (penalties and weight decay, whose useful values span
decades) or a linear one (rates). ``optional=True`` lets the search also switch the
technique off (0). Knobs not in the space keep the value of the ``base`` setting, which
is how a knob is fixed. In a TOML config::

    [tune.space]
    weight_decay = {low = 1e-4, high = 1.0, scale = "log"}
    dropout = {low = 0.0, high = 0.5}
    l1 = {low = 1e-6, high = 1e-3, scale = "log", optional = true}

    [regularization]       # the base: fixed knobs
    ema = 0.99

``Space.default(data, model)`` gives the default space for a kind of task: weight decay,
dropout, label smoothing and augmentation strength for image classifiers; weight decay,
dropout, augmentation, input noise and label smoothing for signals; weight decay, dropout
and input noise (and label smoothing for classifiers) for tabular models; each with a
weight average (EMA) for evaluation; L1 and L2 for a linear model (a lasso / ridge /
elastic-net search). ``Space.for_model(model, kind)`` gives the knobs that apply to a
user's own model: weight decay and an EMA always, dropout only if the model has dropout
layers to turn, drop path if it has ``DropPath``-like modules, label smoothing for
classifiers, augmentation for images and signals, input noise for tabular data and
signals, NEFTune noise for a model with an input embedding. Default ranges are the
knobs' own (``Knob.search``). The ``online`` strategy leaves out the knobs that cannot turn
during a run (``ema``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from regdial._checks import Described, check_choice, check_int, fail, unknown_key
from regdial.knobs import KNOBS
from regdial.setting import Regularization

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from regdial.training.tasks import Dataset

__all__ = ["MAX_GRID", "Range", "Space"]

MAX_GRID = 100_000
"""The most settings a grid may hold."""


@dataclass(frozen=True)
class Range:
    """Where a search may put one knob."""

    low: float
    high: float
    log: bool = False
    optional: bool = False

    def values(self, count: int) -> list[float]:
        """``count`` evenly spaced values (geometrically on a log scale), ends included."""
        if count == 1:
            return [math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2]
        if self.log:
            ratio = (self.high / self.low) ** (1 / (count - 1))
            inner = [self.low * ratio**i for i in range(1, count - 1)]
        else:
            step = (self.high - self.low) / (count - 1)
            inner = [self.low + step * i for i in range(1, count - 1)]
        # The ends exactly: low * ratio**(count-1) can land an ulp past high, and Optuna
        # warns about (and clips) a value outside its distribution.
        return [self.low, *inner, self.high]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"low": self.low, "high": self.high, "scale": "log" if self.log else "linear"}
        if self.optional:
            data["optional"] = True
        return data

    def position(self, value: float) -> float:
        """Where ``value`` sits: 0 at ``low`` (or off), 1 at ``high``, on the range's scale."""
        if value <= 0 and self.log:
            return 0.0
        if self.high == self.low:
            return 0.0
        if self.log:
            return math.log(value / self.low) / math.log(self.high / self.low)
        return (value - self.low) / (self.high - self.low)


def _search(name: str) -> tuple[float, float]:
    """A knob's default search range, from the registry."""
    search = KNOBS[name].search
    assert search is not None, name
    return search


def _range(name: str, spec: object) -> Range:
    field = f"tune.space.{name}"
    if name not in KNOBS:
        raise unknown_key("tune.space", name, KNOBS)
    knob = KNOBS[name]
    if isinstance(spec, Range):
        spec = spec.to_dict()
    if isinstance(spec, tuple | list) and len(spec) == 2:
        spec = {"low": spec[0], "high": spec[1], "scale": knob.scale if knob.scale != "int" else "linear"}
    if not isinstance(spec, Mapping):
        fail(field, "a table {low, high, scale, optional} or a [low, high] pair", spec)
    for key in spec:
        if key not in ("low", "high", "scale", "optional"):
            raise unknown_key(field, str(key), ("low", "high", "scale", "optional"))
    if "low" not in spec or "high" not in spec:
        fail(field, "a range with both low and high", Described(f"keys {sorted(spec)}"))
    scale = check_choice(
        f"{field}.scale", spec.get("scale", "log" if knob.scale == "log" else "linear"), ("log", "linear")
    )
    low = knob.check(f"{field}.low", spec["low"])
    high = knob.check(f"{field}.high", spec["high"])
    if low > high:
        fail(f"{field}.low", f"at most high ({high:g})", low)
    if scale == "log" and low <= 0:
        fail(f"{field}.low", "above 0 on a log scale (use optional = true to allow off)", low)
    optional = spec.get("optional", False)
    if not isinstance(optional, bool):
        fail(f"{field}.optional", "true or false", optional)
    return Range(low, high, log=scale == "log", optional=optional)


class Space:
    """Ranges for some knobs, on top of a base setting that holds the others fixed."""

    def __init__(
        self,
        knobs: Mapping[str, Range | Mapping[str, Any] | tuple[float, float]] | None = None,
        base: Regularization | None = None,
        **ranges: Range | Mapping[str, Any] | tuple[float, float],
    ) -> None:
        """``Space({"dropout": (0, 0.5)})`` or ``Space(dropout=(0, 0.5))``: the same space."""
        if knobs is None and ranges:
            knobs = ranges
        elif ranges:
            if not isinstance(knobs, Mapping):
                fail("tune.space", "a table of knobs or knobs as keywords, not both", knobs)
            knobs = {**knobs, **ranges}
        if not isinstance(knobs, Mapping) or not knobs:
            fail("tune.space", "a table of at least one knob to search, like {dropout = [0, 0.5]}", knobs)
        self.knobs: dict[str, Range] = {name: _range(name, spec) for name, spec in knobs.items()}
        self.base = Regularization() if base is None else base
        if not isinstance(self.base, Regularization):
            fail("base", "a Regularization", self.base)

    # -- building -----------------------------------------------------------------------

    @classmethod
    def default(
        cls,
        data: Dataset,
        model: str | None = None,
        base: Regularization | None = None,
        *,
        fine_tuning: bool = False,
    ) -> Space:
        """The default space for ``data`` and ``model`` (see the module docstring); a
        fine-tuning task (one that starts from pre-trained weights) also searches L2-SP."""
        if model == "linear":
            return cls({"l1": (1e-3, 3.0), "l2": (1e-3, 3.0)}, base)
        names = ["weight_decay", "dropout"] + (["l2sp"] if fine_tuning else [])
        names += {"image": ["label_smoothing", "augment"], "signal": ["augment", "noise"]}.get(
            data.input_kind, ["noise"]
        )
        if data.kind == "classification" and data.input_kind in ("tabular", "signal"):
            names.append("label_smoothing")
        names.append("ema")  # a weight average for evaluation applies to every model
        return cls({name: _search(name) for name in names}, base)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        kind: str | None,
        input_kind: str | None = None,
        base: Regularization | None = None,
    ) -> Space:
        """The knobs that apply to a user's own ``model`` (see the module docstring)."""
        from torch import nn

        from regdial.applied import input_embedding

        names = ["weight_decay"]
        modules = list(model.modules())
        if any(isinstance(m, nn.modules.dropout._DropoutNd | nn.MultiheadAttention) for m in modules) or any(
            isinstance(getattr(m, "attention_dropout", None), float) for m in modules
        ):
            names.append("dropout")
        if any(type(m).__name__ in ("DropPath", "StochasticDepth") for m in modules):
            names.append("drop_path")
        if kind == "classification":
            names.append("label_smoothing")
        if input_kind in ("image", "signal"):
            names.append("augment")
        if input_kind in ("tabular", "signal"):
            names.append("noise")
        elif input_kind is None and input_embedding(model) is not None:
            names.append("embedding_noise")
        names.append("ema")  # a weight average for evaluation applies to every model
        return cls({name: _search(name) for name in names}, base)

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], base: Regularization | None = None) -> Space:
        return cls(dict(table), base)

    def to_dict(self) -> dict[str, Any]:
        return {name: r.to_dict() for name, r in self.knobs.items()}

    def narrow(self, **ranges: Any) -> Space:
        """A copy with some ranges replaced (or knobs added)."""
        return Space({**self.knobs, **ranges}, self.base)

    def fix(self, **values: Any) -> Space:
        """A copy where these knobs are fixed to ``values`` and no longer searched."""
        remaining = {k: v for k, v in self.knobs.items() if k not in values}
        return Space(remaining, self.base.replace(**values))

    # -- searching ----------------------------------------------------------------------

    @property
    def path_knob(self) -> str:
        """The knob a regularization path sweeps: the first log-scale one."""
        return next((name for name, r in self.knobs.items() if r.log), next(iter(self.knobs)))

    def setting(self, values: Mapping[str, float]) -> Regularization:
        """The base setting with ``values`` for the searched knobs."""
        changes = {}
        for name, value in values.items():
            if name not in self.knobs:
                raise unknown_key("tune.space", name, self.knobs)
            changes[name] = round(value) if KNOBS[name].scale == "int" else float(value)
        return self.base.replace(**changes)

    def suggest(self, trial: optuna.trial.Trial) -> Regularization:
        """The setting an Optuna trial asks for."""
        values: dict[str, float] = {}
        for name, r in self.knobs.items():
            if r.optional and not trial.suggest_categorical(f"{name}_on", [True, False]):
                values[name] = 0.0
                continue
            values[name] = trial.suggest_float(name, r.low, r.high, log=r.log)
        return self.setting(values)

    def values_of(self, params: Mapping[str, Any]) -> dict[str, float]:
        """Knob values from an Optuna trial's ``params`` (0 where switched off)."""
        return {
            name: 0.0 if r.optional and params.get(f"{name}_on") is False else float(params[name])
            for name, r in self.knobs.items()
            if name in params or f"{name}_on" in params
        }

    def grid(self, points: int | Mapping[str, int] = 4) -> list[dict[str, float]]:
        """Every combination of ``points`` values per knob (per knob if a mapping), at most
        ``MAX_GRID`` settings."""
        counts = {name: check_int(f"points.{name}", points[name] if isinstance(points, Mapping) else points,
                                  low=1, high=MAX_GRID) for name in self.knobs}  # fmt: skip
        size = math.prod(counts.values())
        if size > MAX_GRID:
            fail("tune.grid_points", f"a grid of at most {MAX_GRID:,} settings",
                 Described(f"{size:,} settings ({' x '.join(map(str, counts.values()))})"))  # fmt: skip
        axes = [[(name, v) for v in self.knobs[name].values(counts[name])] for name in self.knobs]
        return [dict(combination) for combination in itertools.product(*axes)]

    def strength(self, values: Mapping[str, float]) -> float:
        """How regularized a setting is: the mean of its knobs' positions in their ranges
        (0 every knob at its weakest or off, 1 every knob at its strongest). The
        one-standard-error rule picks the largest among settings within noise of the best."""
        positions = [r.position(float(values.get(name, 0.0))) for name, r in self.knobs.items()]
        return sum(positions) / len(positions)

    def __repr__(self) -> str:
        ranges = ", ".join(
            f"{n}=[{r.low:g}, {r.high:g}]{' log' if r.log else ''}{' optional' if r.optional else ''}"
            for n, r in self.knobs.items()
        )
        return f"Space({ranges})"
