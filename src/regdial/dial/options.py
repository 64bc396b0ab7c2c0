"""``TuneOptions``: the one table of a search's options (a config's ``[tune]`` table).

The command line's flags, a config file's ``[tune]`` table and ``Search`` all validate
through it, so a key or value one of them accepts, the others accept too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field

from regdial.training.options import Options

__all__ = ["FIXED_COST", "STRATEGIES", "Strategy", "TuneOptions"]

Strategy = Literal["auto", "path", "online", "tpe", "random", "grid"]
"""How a search spends its budget (see ``regdial.dial.search``)."""
STRATEGIES: tuple[str, ...] = get_args(Strategy)
FIXED_COST = ("path", "online")
"""The strategies whose cost is fixed: they refuse a budget, workers, a storage, grid points."""


class TuneOptions(Options):
    """How a search runs (see ``regdial.dial.search``).

    Args:
        budget: epochs (a number), or text like ``"20 trials"`` or ``"5 minutes"``.
        strategy: auto, path, online, tpe, random or grid.
        storage: an Optuna storage URL shared by workers (default SQLite in the directory).
        workers: local worker processes.
        grid_points: values per knob of the grid strategy.
        space: the knobs to search, ``{knob = {low, high, scale, optional}}``.
        devices: one device per worker (``["cuda:0", "cuda:1"]``).
    """

    budget: Annotated[int, Field(ge=1)] | str | None = None
    strategy: Strategy = "auto"
    storage: Annotated[str, Field(min_length=1)] | None = None
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    grid_points: Annotated[int, Field(ge=1, le=100_000)] | None = None
    space: dict[str, Any] | None = None
    devices: list[str] | None = None
