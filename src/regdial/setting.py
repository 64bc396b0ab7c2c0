"""``Regularization``: one setting of the dial, every strength in one validated object.

Everything else in regdial takes a setting or returns one: ``regdial.Applied(setting,
model, optimizer)`` wires it into a model and optimizer (the setting knows nothing of
that: ``applied.py`` imports this module, never the other way), the trainer trains with it, the tuner searches over settings and
the diagnosis says which way to turn which of its knobs. A setting is immutable;
``replace(**changes)`` gives a new one. It reads and writes TOML (a ``[regularization]``
table of flat keys; a schedule is an inline table), and a key it does not know is an
error that names the key.

Each knob is described once, in ``regdial.knobs.KNOBS``: its range, how a search should
explore it (log scale for penalties and weight decay, linear for rates) and whether it
takes a schedule; the setting checks every field against that table. 0 turns a technique
off; ``dropout`` and ``drop_path`` default to ``None``, which leaves the model's own rates
alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regdial._checks import Described, check_choice, check_range, fail, unknown_key
from regdial._io import read_toml
from regdial.blocks.schedules import Schedule, Strength, check_strength, schedule_from_dict
from regdial.knobs import GROUP_LAYOUTS, KNOBS, PENALTIES_IN

__all__ = ["Regularization"]


def _toml_value(value: Any) -> Any:
    if isinstance(value, Schedule):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass(frozen=True)
class Regularization:
    """One setting of the dial. Every field is checked here; 0 turns a technique off.

    Penalties (see ``regdial.blocks.penalties``) act on the weights that ``param_groups`` decays
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
    embedding_noise: float = 0.0
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
        set_(self, "groups", check_choice("regularization.groups", self.groups, GROUP_LAYOUTS))
        set_(
            self,
            "penalties_in",
            check_choice("regularization.penalties_in", self.penalties_in, PENALTIES_IN),
        )
        set_(self, "min_delta", check_range("regularization.min_delta", self.min_delta, low=0.0))
        for name in ("exclude", "include"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                patterns = (patterns,)
            if not isinstance(patterns, list | tuple) or not all(isinstance(p, str) for p in patterns):
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


def _keywords_checked(generated: Any) -> Any:
    """The dataclass's ``__init__`` behind a check that words an unknown or extra argument
    as the one-line error a TOML key gets, not Python's ``TypeError``."""
    import functools

    @functools.wraps(generated)
    def checked_init(self: Regularization, *args: Any, **kwargs: Any) -> None:
        known = Regularization.names()
        for key in kwargs:
            if key not in known:
                raise unknown_key("regularization", key, known)
        if args:
            fail("Regularization", "given its knobs by name (Regularization(dropout=0.1))",
                 Described(f"{len(args)} positional value{'s' * (len(args) > 1)}"))  # fmt: skip
        generated(self, **kwargs)

    return checked_init


setattr(Regularization, "__init__", _keywords_checked(Regularization.__init__))  # noqa: B010 - mypy keeps the dataclass's signature
