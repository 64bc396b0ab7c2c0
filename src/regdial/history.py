"""``History``: one row per epoch, saved as CSV and JSON beside the run's checkpoints.

Columns, in this order: ``epoch``, ``train_loss``, ``val_loss``, ``gap``
(``val_loss - train_loss``), then the task's metrics for train and validation
(``train_accuracy``/``val_accuracy`` for classification; ``train_rmse``/``val_rmse``,
``train_r2``/``val_r2`` for regression), ``weight_norm`` (the L2 norm of the regularized
weights), ``zero_fraction`` (their share of exact zeros), ``lr`` and ``seconds``.
``train_loss`` and the train metrics are measured in eval mode on clean training data, so
the gap is not hidden by dropout or augmentation.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from regdial._checks import Described, fail
from regdial._io import write_json, write_text

__all__ = ["History", "metric_columns"]

METRICS = {"classification": ("accuracy",), "regression": ("rmse", "r2")}


def metric_columns(kind: str) -> list[str]:
    """All history columns for a task of ``kind``."""
    metrics = METRICS[kind]
    return [
        "epoch", "train_loss", "val_loss", "gap",
        *(f"train_{m}" for m in metrics), *(f"val_{m}" for m in metrics),
        "weight_norm", "zero_fraction", "lr", "seconds",
    ]  # fmt: skip


class History:
    """The per-epoch table of a run, plus a little metadata (task kind, status)."""

    def __init__(
        self, kind: str = "classification", rows: list[dict[str, float]] | None = None, **meta: Any
    ) -> None:
        if kind not in METRICS:
            fail("kind", "one of 'classification', 'regression'", kind)
        self.kind = kind
        self.columns = metric_columns(kind)
        self.rows: list[dict[str, float]] = [dict(r) for r in rows or []]
        self.meta: dict[str, Any] = dict(meta)

    @property
    def metric(self) -> str:
        """The main metric: accuracy (higher is better) or rmse (lower is better)."""
        return METRICS[self.kind][0]

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classification"

    def append(self, row: Mapping[str, float]) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            fail(
                "row",
                f"a value for every column ({', '.join(self.columns)})",
                Described(f"missing {missing}"),
            )
        self.rows.append({c: float(row[c]) for c in self.columns})

    def column(self, name: str) -> list[float]:
        if name not in self.columns:
            fail("column", "one of " + ", ".join(self.columns), name)
        return [row[name] for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, float]]:
        return iter(self.rows)

    def best_epoch(self, column: str = "val_loss") -> int | None:
        """The epoch with the lowest ``column`` (highest for accuracy and r2); ties: the first."""
        values = [
            (v, row["epoch"])
            for row, v in zip(self.rows, self.column(column), strict=True)
            if math.isfinite(v)
        ]
        if not values:
            return None
        higher = column.endswith(("accuracy", "r2"))
        best = max(values, key=lambda p: (p[0], -p[1])) if higher else min(values, key=lambda p: (p[0], p[1]))
        return int(best[1])

    # -- files ------------------------------------------------------------------------

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (int(v) if k == "epoch" else repr(v)) for k, v in row.items()})
        return out.getvalue()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "columns": self.columns, "meta": self.meta, "rows": self.rows}

    def save(self, run_dir: Path) -> None:
        """Write ``history.csv`` and ``history.json`` into ``run_dir``, atomically."""
        write_text(run_dir / "history.csv", self.to_csv())
        write_json(run_dir / "history.json", self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        return cls(data["kind"], list(data["rows"]), **data.get("meta", {}))

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a run directory's history, or a ``history.json`` / ``history.csv`` file."""
        path = Path(path)
        if path.is_dir():
            path = path / "history.json" if (path / "history.json").exists() else path / "history.csv"
        if not path.is_file():
            fail("history", "a run directory or a history.csv/.json file", str(path))
        if path.suffix == ".json":
            try:
                return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                fail(str(path), "a history written by regdial", Described(f"unreadable JSON ({error})"))
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            kind = "regression" if "val_rmse" in header else "classification"
            missing = [c for c in metric_columns(kind) if c not in header]
            if missing:
                fail(
                    str(path), "a history with regdial's columns", Described(f"missing {', '.join(missing)}")
                )
            rows = []
            for line, record in enumerate(reader, start=2):
                try:
                    rows.append({c: float(record[c]) for c in metric_columns(kind)})
                except (TypeError, ValueError):
                    fail(
                        f"{path.name}: line {line}",
                        "numbers in every column",
                        Described("a blank or text cell"),
                    )
        return cls(kind, rows)
