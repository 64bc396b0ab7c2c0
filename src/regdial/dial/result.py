"""``TuneResult``: what a search found, and the files it leaves in its directory.

============  ==========================================================================
file          what it holds
============  ==========================================================================
result.json   the whole result: strategy, metric, the chosen setting and how it was
              chosen, every trial's counts, the path or the online run, importances,
              the retrained tuned and baseline scores, the space, notes
best.toml     the chosen setting as a run config (``regdial run best.toml``)
trials.csv    one row per trial: state, score, its standard error, epochs, the knobs, device
study.db      the Optuna study (SQLite), which a rerun resumes
best/         the chosen setting trained again (with ``baseline/`` inside), when retrained
============  ==========================================================================

Every file loads back into regdial: ``TuneResult.load(dir)`` reads ``result.json`` (the
report does), ``regdial run best.toml`` trains the chosen setting.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regdial._io import damaged, read_json, write_json, write_text
from regdial.setting import Regularization

__all__ = ["RESULT_FILES", "TuneResult", "epochs_so_far"]

RESULT_FILES = ("result.json", "best.toml", "trials.csv", "report.html", "study.db", "best")


@dataclass
class TuneResult:
    """What a search found; ``run_dir`` holds it as files (see the module docstring)."""

    strategy: str
    metric: str
    direction: str
    best: Regularization
    best_value: float
    epochs_spent: int
    best_se: float = math.nan
    best_trial: int | None = None
    chosen_by: str = "best validation score"
    trials: list[dict[str, Any]] = field(default_factory=list)
    path: list[dict[str, Any]] = field(default_factory=list)
    path_knob: str | None = None
    turns: list[dict[str, Any]] = field(default_factory=list)  # online: the controller's turns
    curve: list[dict[str, Any]] = field(default_factory=list)  # online: the run, epoch by epoch
    # online: every move of a knob, {step, epoch, knob, value}
    moves: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None  # online: the epoch whose setting was chosen
    importances: dict[str, float] = field(default_factory=dict)
    retrain: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    notes: list[str] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def best_setting(self) -> Regularization:
        """The chosen setting (``best``)."""
        return self.best

    @property
    def tuned(self) -> dict[str, float]:
        """The chosen setting's scores (validation, and test when there is one)."""
        return dict(self.retrain.get("tuned", {}).get("final", {})) or {self.metric: self.best_value}

    @property
    def baseline(self) -> dict[str, float]:
        """The unregularized baseline's scores (empty when it was not trained)."""
        return dict(self.retrain.get("baseline", {}).get("final", {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "strategy": self.strategy, "metric": self.metric, "direction": self.direction,
            "best": {"setting": self.best.to_dict(), "value": self.best_value, "se": self.best_se,
                     "trial": self.best_trial, "chosen_by": self.chosen_by},
            "epochs_spent": self.epochs_spent, "trials": _counts(self.trials), "importances": self.importances,
            "path_knob": self.path_knob, "path": self.path, "turns": self.turns, "curve": self.curve,
            "moves": self.moves,
            "best_epoch": self.best_epoch, "retrain": self.retrain, "space": self.space, "notes": self.notes,
            "identity": self.identity,
        }  # fmt: skip

    # -- files ------------------------------------------------------------------------

    def write(
        self,
        directory: Path,
        run_table: dict[str, Any] | None,
        model_table: dict[str, Any] | None,
        epochs: int | None = None,
    ) -> None:
        """Write ``result.json``, ``best.toml`` and ``trials.csv`` into ``directory``.

        Without ``run_table`` (a search on the user's own loaders or objective), best.toml
        holds the setting and a ``[search]`` table (``own_data``, the ``epochs`` the tuned
        row trained), and ``regdial run`` refuses it in one line: it trained the built-in
        default task in its place."""
        import tomli_w

        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "result.json", self.to_dict())
        document: dict[str, Any] = {}
        if run_table:
            document["run"] = run_table
        else:
            document["search"] = {"own_data": True} | ({"epochs": epochs} if epochs else {})
        if model_table:
            document["model"] = model_table
        document["regularization"] = self.best.to_dict(changed_only=True)
        header = (
            "# the setting chosen by regdial tune; train it with: regdial run best.toml\n"
            if run_table
            else "# the setting chosen by regdial tune on your own data: train it in your code with\n"
            "# Regularization.from_toml('best.toml') (regdial run has neither your data nor your model)\n"
        )
        write_text(directory / "best.toml", header + tomli_w.dumps(document))
        out = io.StringIO()
        names = ["number", "state", "value", "se", "epochs", *self.space, "seconds", "device", "worker"]
        writer = csv.DictWriter(out, fieldnames=names, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.trials:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        write_text(directory / "trials.csv", out.getvalue())

    @classmethod
    def load(cls, directory: str | Path) -> TuneResult:
        """Read a search's ``result.json`` (and ``trials.csv``); a damaged file is one line."""
        directory = Path(directory)
        where = directory / "result.json"
        data = read_json(where, "a search result written by regdial tune")
        try:
            best = data["best"]
            result = cls(
                strategy=str(data["strategy"]), metric=str(data["metric"]), direction=str(data["direction"]),
                best=Regularization.from_dict(best["setting"]), best_value=float(best["value"]),
                epochs_spent=int(data["epochs_spent"]), best_se=float(best.get("se", math.nan)),
                best_trial=best.get("trial"), chosen_by=str(best.get("chosen_by", "best validation score")),
                path=list(data.get("path", [])), path_knob=data.get("path_knob"), turns=list(data.get("turns", [])),
                curve=list(data.get("curve", [])), moves=list(data.get("moves", [])), best_epoch=data.get("best_epoch"),
                importances=dict(data.get("importances", {})), retrain=dict(data.get("retrain", {})),
                space=dict(data.get("space", {})), task=data.get("task"), notes=list(data.get("notes", [])),
                identity=dict(data.get("identity", {})), run_dir=directory,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            damaged(where, "a search result written by regdial tune", f"{type(error).__name__}: {error}")
        result.trials = _read_trials(directory / "trials.csv")
        return result


def _read_trials(path: Path) -> list[dict[str, Any]]:
    from regdial._io import read_text

    if not path.is_file():
        return []
    rows = []
    for line, record in enumerate(csv.DictReader(read_text(path, "a trials.csv").splitlines()), start=2):
        try:
            parsed: dict[str, Any] = {"number": int(record["number"]), "state": str(record["state"])}
            for key in ("device", "worker"):  # text columns
                if record.get(key):
                    parsed[key] = str(record[key])
            for key, value in record.items():
                if key not in ("number", "state", "device", "worker") and key:
                    parsed[key] = float(value) if value not in ("", "None", None) else None
        except (KeyError, TypeError, ValueError):
            damaged(path, "a trials.csv written by regdial tune", f"an unreadable row at line {line}")
        rows.append(parsed)
    return rows


def _counts(trials: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial["state"]] = counts.get(trial["state"], 0) + 1
    return counts


def epochs_so_far(
    path: list[dict[str, Any]], trials: list[dict[str, Any]]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each trial in order, with the epochs the search had spent when it ended: the path's
    points first, then every trial's own, pruned ones included."""
    spent = sum(int(row.get("epochs", 0)) for row in path)
    for trial in sorted(trials, key=lambda t: t["number"]):
        spent += int(trial.get("epochs") or 0)
        yield spent, trial
