"""``Budget``: how much a search may spend, in epochs, trials or minutes.

``"600"`` and ``"600 epochs"`` count every epoch trained (summed over trials, the path's
included, pruned trials with the epochs they ran): the default, since the same budget
then buys the same search on any machine. ``"20 trials"`` counts finished trials;
``"5 minutes"`` counts wall time from the search's start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from regdial._checks import fail

__all__ = ["LIMITS", "Budget", "Unit"]

Unit = Literal["epochs", "trials", "minutes"]
LIMITS: dict[str, float] = {"epochs": 10**7, "trials": 100_000, "minutes": 525_600}
"""The largest budget of each unit (a year of minutes): beyond that a search never ends."""

_TEXT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(epochs?|e|trials?|t|minutes?|min|m)?\s*")


@dataclass(frozen=True)
class Budget:
    """How much a search may spend: epochs (summed over trials), trials or minutes."""

    amount: float
    unit: Unit = "epochs"

    @classmethod
    def parse(cls, value: object) -> Budget:
        """``600``, ``"600 epochs"``, ``"20 trials"``, ``"5 minutes"`` (or a Budget)."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            fail("budget", "a number of epochs, or text like '20 trials' or '5 minutes'", value)
        match = _TEXT.fullmatch(text)
        if match is None:
            fail("budget", "a number of epochs, or text like '600 epochs', '20 trials', '5 minutes'", value)
        amount = float(match.group(1))
        word = (match.group(2) or "epochs")[0]
        unit: Unit = {"e": "epochs", "t": "trials", "m": "minutes"}[word]  # type: ignore[assignment]
        if amount <= 0 or (unit != "minutes" and not amount.is_integer()):
            wanted = (
                f"a positive whole number of {unit}" if unit != "minutes" else "a positive number of minutes"
            )
            fail("budget", wanted, value)
        if amount > LIMITS[unit]:
            fail("budget", f"at most {LIMITS[unit]:,.0f} {unit}", value)
        return cls(amount, unit)

    def __str__(self) -> str:
        amount = int(self.amount) if self.amount.is_integer() else self.amount
        return f"{amount} {self.unit}"
