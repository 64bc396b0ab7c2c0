"""The one place that checks user input and words the error.

Every user-facing value is checked where it enters (a constructor, the config loader, the
CLI) and a bad one raises ``ValueError`` with one line that names the field, the allowed
range and the value received, as an ``InputError`` (a ``ValueError``)::

    L1.strength must be in [0, inf), got -0.1

The CLI turns these, and only these, into a one-line message and exit code 2, so keeping
them to a single line that makes sense on its own is part of the contract. What the user's
own code (or torch inside it) raises is not bad input: it keeps its type.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import NoReturn

__all__ = [
    "Described",
    "InputError",
    "check_choice",
    "check_int",
    "check_range",
    "check_real",
    "fail",
    "shorten",
    "unknown_key",
]

SHOWN = 80
"""The most characters of a received value that a message echoes."""


class InputError(ValueError):
    """Bad input to regdial, worded in one line: the field, the allowed range, the value."""


class Described(str):
    """A received value already put in words ("an empty list"): shown without quotes."""


def fail(field: str, allowed: str, value: object) -> NoReturn:
    """Raise the one-line ``InputError`` every bad input gets."""
    raise InputError(f"{field} must be {allowed}, got {_show(value)}")


def shorten(text: str, limit: int = SHOWN) -> str:
    """``text`` on one line, cut to about ``limit`` characters with its length said."""
    flat = " ".join(text.split()) if "\n" in text or "\r" in text else text
    if len(flat) <= limit:
        return flat
    return f"{flat[: limit - 30]}... ({len(text):,} characters)"


def _show(value: object) -> str:
    if isinstance(value, Described):
        return shorten(str(value))
    if isinstance(value, str | bytes | float | bool) or value is None:
        return shorten(repr(value))
    if isinstance(value, int):
        text = repr(value)
        return text if len(text) <= 30 else f"an integer of {len(text)} digits"
    text = repr(value)
    if len(text) > 60 or "\n" in text:
        text = f"a {type(value).__name__}"
    return text


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"in {left}{number(low, '-inf')}, {number(high, 'inf')}{right}"


def number(value: float | None, unbounded: str = "inf") -> str:
    """A bound in words: whole numbers in full (1000000), others in ``%g`` form."""
    if value is None:
        return unbounded
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


def check_range(
    field: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real number inside the interval.

    ``low``/``high`` of ``None`` mean unbounded; ``*_open`` excludes that end. NaN and
    infinities are always refused. Booleans are refused even though Python counts them as
    numbers: ``dropout=True`` is a mistake, not a rate of 1.
    """
    allowed = _interval(low, high, low_open, high_open)
    if not _is_real_scalar(value):
        fail(field, f"a number {allowed}", value)
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        fail(field, f"a finite number {allowed}", value)
    if low is not None and (number < low or (low_open and number == low)):
        fail(field, allowed, value)
    if high is not None and (number > high or (high_open and number == high)):
        fail(field, allowed, value)
    return number


def _is_real_scalar(value: object) -> bool:
    # numpy and torch scalars: anything float() accepts that is not a string or a bool.
    if isinstance(value, str | bytes | bool) or value is None:
        return False
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def check_real(field: str, value: object) -> float:
    """Return ``value`` as a float if it is a real number (NaN and infinities included: a
    diverged loss is a value to record). Strings, booleans and None are refused."""
    if not _is_real_scalar(value):
        fail(field, "a number", value)
    return float(value)  # type: ignore[arg-type]


def check_int(field: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` if it is an integer (not a bool, not a float) in ``[low, high]``."""
    allowed = "an integer " + _interval(low, high, False, False)
    index = getattr(value, "__index__", None)
    if isinstance(value, bool) or index is None:
        fail(field, allowed, value)
    try:
        number: int = index()
    except (TypeError, ValueError, RuntimeError):  # a tensor of several elements, a float tensor
        fail(field, allowed, value)
    if (low is not None and number < low) or (high is not None and number > high):
        fail(field, allowed, value)
    return number


def unknown_key(section: str, key: str, known: Iterable[str]) -> InputError:
    """The one-line error for a config key regdial does not know, with a suggestion."""
    names = sorted(known)
    shown = shorten(str(key), 40)
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return InputError(f"{section}.{shown} is not a known setting; {hint}known: {', '.join(names)}")


def check_choice(field: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        fail(field, "one of " + ", ".join(repr(c) for c in options), value)
    return value
