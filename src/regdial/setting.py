"""``Regularization``: one setting of the dial, every strength in one validated object.

Everything else in regdial takes a setting or returns one: ``apply`` wires it into a
model and optimizer, the trainer trains with it, the tuner searches over settings and
the diagnosis says which way to turn which of its knobs. A setting is immutable;
``replace(**changes)`` gives a new one. It reads and writes TOML (a ``[regularization]``
table of flat keys; a schedule is an inline table), and a key it does not know is an
error that names the key.

Each knob is described once, in ``KNOBS``: its range, how a search should explore it
(log scale for penalties and weight decay, linear for rates) and whether it takes a
schedule. 0 turns a technique off; ``dropout`` and ``drop_path`` default to ``None``,
which leaves the model's own rates alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from regdial._checks import check_choice, check_int, check_range, fail
from regdial.schedules import Schedule, Strength, check_strength, schedule_from_dict

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from regdial.applied import Applied

__all__ = ["KNOBS", "Knob", "Regularization", "read_toml", "unknown_key"]


@dataclass(frozen=True)
class Knob:
    """One numeric knob of a setting: its range and how a search explores it."""

    name: str
    doc: str
    high: float | None = None
    high_open: bool = False
    scale: Literal["log", "linear", "int"] = "log"
    schedulable: bool = False
    off: float | None = 0.0  # the value that turns the technique off; None: always on

    def check(self, field_name: str, value: object) -> float:
        if self.scale == "int":
            return float(check_int(field_name, value, low=0))
        return check_range(field_name, value, low=0.0, high=self.high, high_open=self.high_open)


KNOBS: dict[str, Knob] = {
    knob.name: knob
    for knob in (
        Knob("weight_decay", "decoupled weight decay on the weights (the optimizer's own)", schedulable=True),
        Knob("l1", "L1 (lasso) strength: exact zeros with the proximal step", schedulable=True),
        Knob("l2", "L2 (ridge) strength as a penalty, in the optimizer's metric", schedulable=True),
        Knob("elastic_net", "elastic-net strength, mixing L1 and L2 by l1_ratio", schedulable=True),
        Knob("l1_ratio", "the elastic net's share of L1", high=1.0, scale="linear", off=None),
        Knob("group_lasso", "group-lasso strength: whole units (rows) go to zero", schedulable=True),
        Knob("l2sp", "L2-SP strength: pull toward the weights at apply time", schedulable=True),
        Knob("max_norm", "cap on each unit's incoming weight norm (0: off)"),
        Knob(
            "dropout",
            "rate of the model's dropout layers",
            high=1.0,
            high_open=True,
            scale="linear",
            schedulable=True,
        ),
        Knob(
            "drop_path",
            "maximum stochastic-depth rate",
            high=1.0,
            high_open=True,
            scale="linear",
            schedulable=True,
        ),
        Knob("noise", "std of Gaussian noise added to the inputs", scale="linear"),
        Knob("label_smoothing", "label smoothing epsilon", high=1.0, high_open=True, scale="linear"),
        Knob("mixup", "Mixup alpha", scale="linear"),
        Knob("cutmix", "CutMix alpha", scale="linear"),
        Knob("augment", "data-augmentation strength", high=1.0, scale="linear", schedulable=True),
        Knob("early_stopping", "early-stopping patience in epochs (0: off)", scale="int"),
        Knob(
            "ema",
            "decay of an exponential moving average of the weights (0: off)",
            high=1.0,
            high_open=True,
            scale="linear",
        ),
    )
}

PENALTIES = ("l1", "l2", "elastic_net", "group_lasso", "l2sp")


def unknown_key(section: str, key: str, known: Iterable[str]) -> ValueError:
    """The one-line error for a config key regdial does not know, with a suggestion."""
    names = sorted(known)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ValueError(f"{section}.{key} is not a known setting; {hint}known: {', '.join(names)}")


def read_toml(source: str | Path) -> dict[str, Any]:
    """Parse TOML text or a ``.toml`` file; a syntax error becomes a one-line ValueError."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    text = source
    where = "config"
    if isinstance(source, Path) or (
        isinstance(source, str) and source.endswith(".toml") and "\n" not in source
    ):
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            reason = (error.strerror or "an unreadable file").lower()
            raise ValueError(f"{where} must be a readable TOML file, got {reason}") from None
    try:
        return tomllib.loads(str(text))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{where} must be valid TOML, got a syntax error: {error}") from None


def _toml_value(value: Any) -> Any:
    if isinstance(value, Schedule):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass(frozen=True)
class Regularization:
    """One setting of the dial. Every field is checked here; 0 turns a technique off.

    Penalties (see ``regdial.penalties``) act on the weights that ``param_groups`` decays
    (not biases, normalization layers or embeddings, nor names matching ``exclude``),
    as proximal steps in the optimizer's metric (``penalties_in="prox"``) or as loss
    terms (``"loss"``: add ``applied.penalty()`` to the loss yourself).
    """

    weight_decay: Strength = 0.0
    l1: Strength = 0.0
    l2: Strength = 0.0
    elastic_net: Strength = 0.0
    l1_ratio: float = 0.5
    group_lasso: Strength = 0.0
    groups: str = "rows"
    l2sp: Strength = 0.0
    max_norm: float = 0.0
    penalties_in: str = "prox"
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    dropout: Strength | None = None
    drop_path: Strength | None = None
    noise: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    augment: Strength = 0.0
    early_stopping: int = 0
    min_delta: float = 0.0
    ema: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name, knob in KNOBS.items():
            value = getattr(self, name)
            if value is None and name in ("dropout", "drop_path"):
                continue
            if isinstance(value, Schedule) and not knob.schedulable:
                fail(f"regularization.{name}", "a number (this knob takes no schedule)", value)
            checked = check_strength(f"regularization.{name}", value, knob.check)
            if knob.scale == "int" and not isinstance(checked, Schedule):
                checked = int(checked)
            set_(self, name, checked)
        set_(
            self, "groups", check_choice("regularization.groups", self.groups, ("rows", "columns", "tensor"))
        )
        set_(
            self,
            "penalties_in",
            check_choice("regularization.penalties_in", self.penalties_in, ("prox", "loss")),
        )
        set_(self, "min_delta", check_range("regularization.min_delta", self.min_delta, low=0.0))
        for name in ("exclude", "include"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                patterns = (patterns,)
            if not all(isinstance(p, str) for p in patterns):
                fail(f"regularization.{name}", "a list of fnmatch patterns over parameter names", patterns)
            set_(self, name, tuple(patterns))

    @staticmethod
    def names() -> list[str]:
        """Every setting's name, as written in TOML."""
        return [f.name for f in dataclasses.fields(Regularization)]

    def replace(self, **changes: Any) -> Regularization:
        """A new setting with ``changes``; unknown names fail like unknown TOML keys."""
        for key in changes:
            if key not in self.names():
                raise unknown_key("regularization", key, self.names())
        return dataclasses.replace(self, **changes)

    @classmethod
    def off(cls) -> Regularization:
        """Every technique off, the model's dropout and drop path included: the baseline."""
        return cls(dropout=0.0, drop_path=0.0)

    def is_off(self) -> bool:
        """True when every knob is at its off value (dropout and drop path 0 or unset)."""
        return all(getattr(self, name) in (0, None) for name, knob in KNOBS.items() if knob.off is not None)

    def active(self) -> dict[str, Any]:
        """The fields that differ from the defaults, for reports and tables."""
        default = Regularization()
        return {
            name: getattr(self, name)
            for name in self.names()
            if getattr(self, name) != getattr(default, name)
        }

    # -- TOML -------------------------------------------------------------------------

    def to_dict(self, *, changed_only: bool = False) -> dict[str, Any]:
        """Plain values (schedules as dicts, ``None`` left out), for TOML and JSON.

        ``changed_only`` keeps the fields that differ from the defaults (what a person
        wants to read); the full form is what a run records.
        """
        default = Regularization()
        return {
            name: _toml_value(value)
            for name in self.names()
            if (value := getattr(self, name)) is not None
            and not (changed_only and value == getattr(default, name))
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], section: str = "regularization") -> Regularization:
        """Build from plain values; unknown keys fail by name, schedules are inline tables."""
        if not isinstance(data, Mapping):
            fail(section, "a table of settings", data)
        known = cls.names()
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise unknown_key(section, key, known)
            if isinstance(value, Mapping):
                value = schedule_from_dict(value, f"{section}.{key}")
            values[key] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def to_toml(self) -> str:
        """A TOML document with one ``[regularization]`` table; ``from_toml`` reads it back."""
        import tomli_w

        return tomli_w.dumps({"regularization": self.to_dict()})

    @classmethod
    def from_toml(cls, source: str | Path) -> Regularization:
        """Read TOML text or a file: its ``[regularization]`` table, or the whole document."""
        document = read_toml(source)
        table = document.get("regularization", document)
        return cls.from_dict(table)

    # -- applying ---------------------------------------------------------------------

    def apply(
        self,
        model: nn.Module,
        optimizer: Optimizer | Callable[[list[dict[str, Any]]], Optimizer],
        *,
        num_classes: int | None = None,
        data_kind: str | None = None,
        augment_options: Mapping[str, Any] | None = None,
    ) -> Applied:
        """Wire this setting into ``model`` and an optimizer; see ``regdial.applied.Applied``."""
        from regdial.applied import Applied

        return Applied(
            self,
            model,
            optimizer,
            num_classes=num_classes,
            data_kind=data_kind,
            augment_options=augment_options,
        )
