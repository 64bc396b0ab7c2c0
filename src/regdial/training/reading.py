"""What ``diagnose`` reads from a path: a run, a search's chosen run, or another loop's log.

``read_run(path)`` gives the history and the setting the run recorded (its
``summary.json``), or None where the log holds none (a Trainer's, Lightning's, a CSV).
A search's directory (``result.json`` without a ``history.csv``) reads its chosen run as the
search finished it: ``best/`` (the chosen trial's own run, the online run, or the setting
trained again), else the chosen trial's own history (``trials/<number>/``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from regdial._checks import fail
from regdial._io import read_json
from regdial.setting import Regularization
from regdial.training.history import History

__all__ = ["chosen_run", "read_run"]


def chosen_run(search: Path, say: Callable[[str], None] = lambda _: None) -> Path:
    """The run a search's directory stands for (see the module docstring); ``say`` is told which."""
    best = search / "best"
    if (best / "history.json").is_file():
        say(f"the search's chosen run, scored on test: {best}")
        return best
    result = read_json(search / "result.json", "a search result written by regdial tune")
    number = result.get("best", {}).get("trial") if isinstance(result, dict) else None
    trial = search / "trials" / str(number)
    if number is None or not (trial / "history.json").is_file():
        fail("history", "a run directory; this is a search's, with neither its chosen setting trained again "
             "into best/ nor the chosen trial's history in trials/ (diagnose a run)", str(search))  # fmt: skip
    say(f"the search's chosen trial ({number}), as it trained: {trial}")
    return trial


def read_run(
    path: str | Path, say: Callable[[str], None] = lambda _: None
) -> tuple[History, Regularization | None]:
    """The history at ``path`` (anything ``History.load`` reads, or a search's directory)
    and the setting its run recorded, if any."""
    path = Path(path)
    if path.is_dir() and (path / "result.json").is_file() and not (path / "history.csv").is_file():
        path = chosen_run(path, say)
    history = History.load(path)
    summary = (path if path.is_dir() else path.parent) / "summary.json"
    if summary.is_file():
        recorded = read_json(summary, "a run summary written by regdial")
        if isinstance(recorded, dict) and isinstance(recorded.get("setting"), dict):
            return history, Regularization.from_dict(recorded["setting"])
    return history, None
