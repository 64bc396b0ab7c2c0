"""``History``: one row per epoch, saved as CSV and JSON beside the run's checkpoints.

A row needs ``epoch``, ``train_loss`` and ``val_loss``; ``gap`` (``val_loss -
train_loss``) is added when missing. Everything else is optional and kept: the metrics
for train and validation (``train_accuracy``/``val_accuracy``; ``train_rmse``/``val_rmse``,
``train_r2``/``val_r2``; or any the user's own ``metrics`` measure), and what ``fit``
records beside them: ``weight_norm`` (L2 norm of the regularized weights of the
evaluated model), ``zero_fraction`` (their share of exact zeros), ``lr`` and ``seconds``.
``fit`` measures ``train_loss`` and the train metrics in eval mode on clean training data,
so the gap is not hidden by dropout or augmentation.

The main metric (``History.metric``) is the one a search optimizes and early stopping can
watch: ``meta["metric"]`` when set, else accuracy for classification and RMSE for
regression, else the first validation metric in the table.

``History.load`` reads a regdial run directory or its ``history.csv``/``.json``, and the
logs of other tools (see ``regdial.training.logs``): a Lightning ``CSVLogger``
``metrics.csv`` and a Hugging Face ``trainer_state.json``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from regdial._checks import Described, fail
from regdial._io import damaged, read_json, write_json, write_text

__all__ = ["KINDS", "REQUIRED", "History", "higher_is_better", "is_bookkeeping", "log_in", "metric_columns"]

KINDS = ("classification", "regression")
REQUIRED = ("epoch", "train_loss", "val_loss")
METRICS = {"classification": ("accuracy",), "regression": ("rmse", "r2")}
_HIGHER = ("accuracy", "acc", "r2", "f1", "auc", "auroc", "precision", "recall", "iou", "dice", "map", "bleu")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (a name like ``val_accuracy`` or ``rmse``) is better."""
    name = metric.removeprefix("val_").removeprefix("train_").removeprefix("test_").lower()
    return name.endswith(_HIGHER) or name.split("_")[-1] in _HIGHER


def metric_columns(kind: str) -> list[str]:
    """The columns ``fit`` writes for a task of ``kind``."""
    metrics = METRICS[kind]
    paired = [name for m in metrics for name in (f"train_{m}", f"val_{m}")]
    return ["epoch", "train_loss", "val_loss", "gap", *paired, f"val_{metrics[0]}_se", "weight_norm",
            "zero_fraction", "lr", "seconds"]  # fmt: skip


def is_bookkeeping(column: str) -> bool:
    """Whether a logged column is about the evaluation, not the model: its clock (a Hugging
    Face Trainer logs ``eval_runtime``, ``eval_samples_per_second``...) or a metric's
    standard error (``val_accuracy_se``)."""
    return "runtime" in column or "per_second" in column or column.endswith("_se")


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            fail(field, "a number", value)
    return float(value)


# regdial's own histories first: the callbacks' regdial_history.json records the setting,
# which a trainer's own log beside it (metrics.csv, trainer_state.json) does not.
OWN_LOGS = ("history.json", "history.csv", "regdial_history.json")
OTHER_LOGS = ("trainer_state.json", "metrics.csv")


def log_in(directory: Path) -> Path | None:
    """The history file a directory holds: regdial's own, else a trainer's (a Hugging Face
    output directory keeps ``trainer_state.json`` in its newest ``checkpoint-N/``)."""
    for name in (*OWN_LOGS, *OTHER_LOGS):
        if (directory / name).is_file():
            return directory / name
    checkpoints = [
        p for p in directory.glob("checkpoint-*/trainer_state.json") if p.parent.name[11:].isdigit()
    ]
    if checkpoints:
        return max(checkpoints, key=lambda p: int(p.parent.name[11:]))
    return None


class History:
    """The per-epoch table of a run, plus its metadata (task kind, status, summary)."""

    def __init__(
        self,
        kind: str | None = "classification",
        rows: Sequence[Mapping[str, Any]] | None = None,
        **meta: Any,
    ) -> None:
        if kind is not None and kind not in KINDS:
            fail("kind", "one of 'classification', 'regression' (or None)", kind)
        self.kind = kind
        self.rows: list[dict[str, float]] = []
        self.meta: dict[str, Any] = dict(meta)
        for row in rows or []:
            self.append(row)

    # -- the table ----------------------------------------------------------------------

    @property
    def columns(self) -> list[str]:
        """Every column, in order: the required ones, gap, paired train/val metrics, the rest."""
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        if not seen and self.kind is not None:
            return metric_columns(self.kind)
        names = [c for c in (*REQUIRED, "gap") if c in seen or c in REQUIRED]
        metrics = [c[4:] for c in seen if c.startswith("val_") and c != "val_loss"]
        for metric in metrics:
            names += [c for c in (f"train_{metric}", f"val_{metric}") if c in seen]
        names += [c for c in seen if c not in names]
        return names

    @property
    def metric(self) -> str:
        """The main metric's name without its split (``accuracy``, ``rmse``, ``loss``...)."""
        named = self.meta.get("metric")
        if isinstance(named, str) and named:
            return named.removeprefix("val_")
        if self.kind is not None:
            return METRICS[self.kind][0]
        for row in self.rows[:1]:
            for key in row:
                if key.startswith("val_") and key != "val_loss" and not is_bookkeeping(key):
                    return key[4:]
        return "loss"

    @property
    def higher_is_better(self) -> bool:
        """Whether the main metric is better when higher (accuracy) or lower (RMSE, loss)."""
        direction = self.meta.get("direction")
        if direction in ("maximize", "minimize"):
            return bool(direction == "maximize")
        return higher_is_better(self.metric)

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one epoch's row: ``epoch``, ``train_loss``, ``val_loss`` and any numbers."""
        if not isinstance(row, Mapping):
            fail("row", "a mapping of column names to numbers", row)
        missing = [c for c in REQUIRED if c not in row]
        if missing:
            fail("row", f"a value for {', '.join(REQUIRED)}", Described(f"no {', '.join(missing)}"))
        clean = {str(k): _number(f"row.{k}", v) for k, v in row.items()}
        if not math.isfinite(clean["epoch"]) or clean["epoch"] < 0:  # losses may be NaN; the epoch may not
            fail("row.epoch", "a finite number of epochs, at least 0", row["epoch"])
        if "gap" not in clean:
            clean["gap"] = clean["val_loss"] - clean["train_loss"]
        self.rows.append(clean)

    def column(self, name: str) -> list[float]:
        """The values of one column, NaN where a row lacks it."""
        if name not in self.columns:
            fail("column", "one of " + ", ".join(self.columns), name)
        return [row.get(name, math.nan) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, float]]:
        return iter(self.rows)

    def best_epoch(self, column: str = "val_loss") -> int | None:
        """The epoch with the best ``column`` (lowest, or highest for accuracy-like).

        Ties: the lower ``val_loss`` (as ``EarlyStopping``'s ``tiebreak``), then the first."""
        losses = self.column("val_loss")
        values = [
            (v, math.inf if not math.isfinite(loss) or column == "val_loss" else loss, row["epoch"])
            for row, v, loss in zip(self.rows, self.column(column), losses, strict=True)
            if math.isfinite(v)
        ]
        if not values:
            return None
        sign = -1.0 if higher_is_better(column) and column != "val_loss" else 1.0
        return int(min(values, key=lambda p: (sign * p[0], p[1], p[2]))[2])

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
    def from_dict(cls, data: Mapping[str, Any], where: str = "history") -> History:
        """Inverse of ``to_dict``; anything else is a one-line error naming ``where``."""
        what = "a history written by regdial"
        if not isinstance(data, Mapping) or not isinstance(data.get("rows"), list):
            damaged(where, what, "a document without a list of rows")
        kind = data.get("kind")
        meta = data.get("meta", {})
        if kind not in (*KINDS, None) or not isinstance(meta, Mapping):
            damaged(
                where, what, f"kind {kind!r}" if kind not in (*KINDS, None) else "meta that is not a table"
            )
        try:
            return cls(kind, list(data["rows"]), **{str(k): v for k, v in meta.items()})
        except ValueError as error:
            damaged(where, what, str(error))

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a run directory's history, a ``history.json``/``.csv``, a Lightning
        ``metrics.csv`` or a Hugging Face ``trainer_state.json`` (or a directory holding one)."""
        from regdial.training import logs

        path = Path(path)
        if path.is_dir() and log_in(path) is None and logs.is_tensorboard(path):
            kind, table, meta = logs.from_tensorboard(path)
            return cls(kind, table, **meta)
        if path.is_dir():
            found = log_in(path)
            if found is None:
                fail("history", "a run directory, a Trainer's output or Lightning log directory, or a history file "
                     "(history.csv/.json, regdial_history.json, metrics.csv, trainer_state.json)", str(path))  # fmt: skip
            path = found
        if not path.exists():
            fail("history", "a run directory or a history.csv/.json file", str(path))
        if path.suffix == ".json":
            document = read_json(path, "a history (history.json or trainer_state.json)")
            if isinstance(document, dict) and "log_history" in document:
                kind, table, meta = logs.from_trainer_state(document, str(path))
                return cls(kind, table, **meta)
            return cls.from_dict(document, str(path))
        rows, header = logs.read_csv(path)
        if "history" not in path.stem:  # another loop's log: its names and its order as regdial reads them
            rows, header = logs.tidy(rows, header, str(path))
        if "history" not in path.stem and logs.looks_like_lightning(header):
            kind, table, meta = logs.from_lightning_rows(rows, header, str(path))
            return cls(kind, table, **meta)
        counter = logs.step_column(header)
        if counter is not None:  # a loop that logs steps: losses on rows of their own, read by step
            kind, table, meta = logs.from_step_rows(rows, header, counter, str(path))
            return cls(kind, table, **meta)
        kind = (
            "regression" if "val_rmse" in header else "classification" if "val_accuracy" in header else None
        )
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            damaged(path, "a history with epoch, train_loss and val_loss columns", f"no {', '.join(missing)}")
        if any(not record.get(c) for record in rows for c in ("train_loss", "val_loss")):
            # a loop that validates every few epochs, or logs its losses on rows of their own
            kind, table, meta = logs.from_step_rows(rows, header, "epoch", str(path), unit="epoch")
            return cls(kind, table, **meta)
        parsed = []
        for line, record in enumerate(rows, start=2):
            try:
                parsed.append({c: float(v) for c, v in record.items() if c and v not in ("", None)})
            except ValueError:
                damaged(path, "numbers in every cell", f"text at line {line}")
        return cls.from_dict({"kind": kind, "rows": parsed}, str(path))
