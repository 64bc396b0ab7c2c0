"""Other tools' training logs as the rows of a ``History``, so the diagnosis reads anyone's curves.

- A Lightning ``CSVLogger`` ``metrics.csv``: one row per logging call, each with the
  values logged then (``epoch``, ``step``, ``train_loss``, ``val_loss``, ``val_acc``...;
  ``_epoch``/``_step`` suffixes when a metric was logged both ways). Rows are grouped by
  epoch and the last value of each column kept, preferring a metric's epoch-level form.
- A Hugging Face ``trainer_state.json``: its ``log_history`` holds training entries
  (``loss``) and evaluation entries (``eval_loss``, ``eval_accuracy``...). Each evaluation
  becomes a row; its ``train_loss`` is the mean of the training losses logged since the
  previous evaluation. That is the running loss of the training batches (with dropout
  on), not a clean evaluation, so the gap reads a little wider than ``fit``'s: the row's
  metadata says so (``train_loss_source``).

Column names are normalized: ``/`` becomes ``_`` (``val/loss`` -> ``val_loss``), a
trailing ``_epoch`` is dropped, ``acc`` is spelled ``accuracy``, and Hugging Face's
``eval_`` prefix is ``val_``. A log without a training and a validation loss is a one-line
error naming the columns it has.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from regdial._checks import shorten
from regdial._io import damaged, read_text

__all__ = [
    "STEP_COLUMNS",
    "from_lightning_rows",
    "from_step_rows",
    "from_tensorboard",
    "from_trainer_state",
    "is_tensorboard",
    "looks_like_lightning",
    "normalize",
    "read_csv",
    "step_column",
    "tidy",
]

logger = logging.getLogger("regdial")

STEP_COLUMNS = ("step", "global_step", "iteration", "iter", "steps")
"""The x columns of a log counted in optimizer steps (most language-model loops log these)."""


def normalize(name: str) -> str:
    """A logged metric's name in regdial's spelling (see the module docstring)."""
    name = name.strip().replace("/", "_").replace("-", "_").replace(" ", "_")
    name = name.removesuffix("_epoch")
    if name.startswith("eval_"):
        name = "val_" + name[5:]
    elif name.startswith("valid_"):
        name = "val_" + name[6:]
    elif name.startswith("validation_"):
        name = "val_" + name[11:]
    if name == "loss":
        name = "train_loss"
    if name.endswith("_acc"):
        name += "uracy"
    return name


def read_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The rows and header of a CSV file; a damaged one is one line naming it."""
    text = read_text(path, "a CSV history")
    try:
        reader = csv.DictReader(text.splitlines())
        header = [h for h in (reader.fieldnames or []) if h]
        rows = [dict(r) for r in reader]
    except csv.Error as error:
        damaged(path, "a CSV history", f"broken CSV ({shorten(str(error), 60)})")
    if not header:
        damaged(path, "a CSV history with a header row", "an empty file")
    return rows, header


def tidy(rows: list[dict[str, str]], header: list[str], where: str) -> tuple[list[dict[str, str]], list[str]]:
    """Another loop's CSV as regdial reads it: names in regdial's spelling (Keras's ``loss``
    is ``train_loss``, `` val_loss`` with its space is ``val_loss``; a name already taken
    stays as it was), and rows in the order of their epoch (or step) column. A log written
    newest first is reversed; one that goes back (a logger that appended after a restart,
    or a resumed run) keeps the later rows of each epoch. Said in one line: read in file
    order, the curves were another run's (an overfitting run read as 65 times its first
    loss). With several val dataloaders (Lightning's ``val_loss/dataloader_idx_0``...), the
    first's columns are read as ``val_loss``..."""
    names = {}
    for name in header:
        new = normalize(name) if name not in ("epoch", "step") else name
        names[name] = name if new in header and new != name else new
    first = "_dataloader_idx_0"  # Lightning's several val dataloaders: the first's is the record's
    if "val_loss" not in names.values() and "val_loss" + first in names.values():
        taken = set(names.values())
        names = {k: v.removesuffix(first) if v.endswith(first) and v.removesuffix(first) not in taken else v
                 for k, v in names.items()}  # fmt: skip
        logger.warning(
            "regdial: %s logs several val dataloaders: the first's (val_loss/dataloader_idx_0) is read", where
        )
    if any(new != name for name, new in names.items()):
        header = [names[h] for h in header]
        rows = [{names.get(k, k) if k else k: v for k, v in r.items()} for r in rows]
    counter = "epoch" if "epoch" in header else step_column(header)
    if counter is None:
        return rows, header
    try:
        keyed = [(float(r[counter]) if r.get(counter) not in ("", None) else None, r) for r in rows]
    except ValueError:
        return rows, header  # the readers name the cell
    values = [k for k, _ in keyed if k is not None]
    if all(a <= b for a, b in itertools.pairwise(values)):
        return rows, header
    if all(a >= b for a, b in itertools.pairwise(values)):
        logger.warning("regdial: %s lists its %ss newest first: read oldest first", where, counter)
        return rows[::-1], header
    kept: list[tuple[float | None, dict[str, str]]] = []
    last = -math.inf
    for key, row in keyed:
        if key is not None and key < last:  # the log goes back: later rows replace those from here on
            kept = [(k, r) for k, r in kept if k is None or k < key]
        if key is not None:
            last = key
        kept.append((key, row))
    logger.warning(
        "regdial: %s goes back in its %s column (a logger that appended after a restart?): the later rows of each "
        "%s are read", where, counter, counter)  # fmt: skip
    return [r for _, r in kept], header


def looks_like_lightning(header: list[str]) -> bool:
    """Lightning's CSVLogger writes a ``step`` column beside ``epoch``."""
    return "step" in header and "epoch" in header


def step_column(header: list[str]) -> str | None:
    """The step column of a CSV log without an ``epoch`` column, if it has one."""
    if "epoch" in header:
        return None
    return next((name for name in header if name.strip().lower() in STEP_COLUMNS), None)


Table = tuple[str | None, list[dict[str, float]], dict[str, Any]]
"""(the task's kind or None, one row per epoch, metadata): what ``History`` is built from."""


def _table(rows: list[dict[str, float]], where: str, **meta: Any) -> Table:
    rows = [r for r in rows if "train_loss" in r and "val_loss" in r]
    if not rows:
        damaged(where, "a log with a training and a validation loss per epoch",
                "none that has both")  # fmt: skip
    kind = "classification" if "val_accuracy" in rows[0] else "regression" if "val_rmse" in rows[0] else None
    return kind, rows, meta


def from_lightning_rows(rows: list[dict[str, str]], header: list[str], where: str) -> Table:
    """A Lightning ``CSVLogger`` table as one row per epoch (the last value of each column)."""
    by_epoch: dict[int, dict[str, float]] = {}
    steps_only = {normalize(h) for h in header if h.endswith("_step")}
    epochs = []
    for line, record in enumerate(rows, start=2):
        epoch_text = record.get("epoch", "")
        try:
            epochs.append(int(float(epoch_text)) if epoch_text else None)
        except ValueError:
            damaged(where, "a CSV log with numeric epochs", f"{epoch_text!r} at line {line}")
    # Lightning counts from 0; a log with epoch and step columns that starts at 1 is not its.
    offset = 1 if min((e for e in epochs if e is not None), default=0) == 0 else 0
    for epoch, record in zip(epochs, rows, strict=True):
        if epoch is None:
            continue
        row = by_epoch.setdefault(epoch + offset, {"epoch": float(epoch + offset)})
        for name, text in record.items():
            if not name or name in ("epoch", "step") or text in ("", None):
                continue
            key = normalize(name)
            if key.endswith("_step"):
                key = key.removesuffix("_step")
                if key in row and key not in steps_only:
                    continue  # the epoch-level value of a metric logged both ways wins
            try:
                value = float(text)
            except ValueError:
                continue
            if math.isfinite(value) or key in ("train_loss", "val_loss"):
                row[key] = value
    return _table([by_epoch[e] for e in sorted(by_epoch)], where, source="lightning", log=where,
                  epochs_from_zero=bool(offset))  # fmt: skip


def from_step_rows(
    rows: list[dict[str, str]], header: list[str], counter: str, where: str, unit: str = "step"
) -> Table:
    """A log by step as one row per evaluation: each row with a validation loss, its step as
    the row's ``epoch`` (``epoch_unit`` ``unit``), and the training loss of that step or, when
    training losses sit on rows of their own, their mean since the previous evaluation. An
    epoch log that validates every few epochs is read the same way (``unit`` "epoch")."""
    table: list[dict[str, float]] = []
    pending: list[float] = []
    for line, record in enumerate(rows, start=2):
        values: dict[str, float] = {}
        for name, text in record.items():
            if not name or text in ("", None):
                continue
            try:
                values[normalize(name) if name != counter else "epoch"] = float(text)
            except ValueError:
                damaged(where, "numbers in every cell", f"{shorten(str(text), 20)!r} at line {line}")
        if "epoch" not in values:
            continue
        if "train_loss" in values and "val_loss" not in values:
            pending.append(values["train_loss"])
            continue
        if "val_loss" in values:
            if "train_loss" not in values and pending:
                values["train_loss"] = sum(pending) / len(pending)
            pending = []
            if "train_loss" in values:
                table.append(values)
    return _table(table, where, source="csv", log=where, epoch_unit=unit)


TENSORBOARD_TAGS = {"train_loss": "train_loss", "loss": "train_loss", "loss_train": "train_loss",
                    "training_loss": "train_loss", "val_loss": "val_loss", "loss_val": "val_loss",
                    "validation_loss": "val_loss", "test_loss": "test_loss"}  # fmt: skip
"""Tag names (normalized: ``/`` as ``_``) that mean the losses, as trainers write them:
``train/loss``, ``eval/loss`` (Hugging Face), ``val_loss`` (Lightning), ``Loss/train``."""


def is_tensorboard(directory: Path) -> bool:
    """Whether ``directory`` (or a folder in it) holds TensorBoard event files."""
    return any(directory.glob("events.out.tfevents.*")) or any(directory.glob("*/events.out.tfevents.*"))


def from_tensorboard(directory: Path) -> Table:
    """A TensorBoard log directory's scalars, read by TensorBoard's own reader, as a log by step."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # type: ignore[import-untyped]
    except ImportError:
        from regdial._checks import Described, fail

        fail("history", "a log regdial can read without TensorBoard (pip install 'regdial[tensorboard]')",
             Described(f"{directory}, TensorBoard event files"))  # fmt: skip
    runs = sorted({p.parent for p in directory.glob("**/events.out.tfevents.*")})
    by_step: dict[float, dict[str, float]] = {}
    for run in runs:  # Lightning and Hugging Face may split train and eval into sub-folders
        accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
        accumulator.Reload()
        prefix = "" if run == directory else run.name.lower()
        for tag in accumulator.Tags().get("scalars", []):
            name = normalize(tag)
            if prefix in ("train", "eval", "validation", "val") and name in ("loss", "train_loss"):
                name = "train_loss" if prefix == "train" else "val_loss"
            name = TENSORBOARD_TAGS.get(name.lower(), name)
            for event in accumulator.Scalars(tag):
                by_step.setdefault(float(event.step), {"step": float(event.step)})[name] = float(event.value)
    rows = [{k: str(v) for k, v in by_step[step].items()} for step in sorted(by_step)]
    header = sorted({k for row in rows for k in row})
    kind, table, meta = from_step_rows(rows, header, "step", str(directory))
    return kind, table, meta | {"source": "tensorboard"}


def from_trainer_state(document: Mapping[str, Any], where: str) -> Table:
    """A Hugging Face ``trainer_state.json`` as one row per evaluation."""
    entries = document.get("log_history")
    if not isinstance(entries, list):
        damaged(where, "a trainer_state.json with a log_history list", "something else")
    rows: list[dict[str, Any]] = []
    pending: list[float] = []
    last_train: float | None = None  # None: no training loss logged yet (a NaN one is kept)
    fractional = False
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        if isinstance(entry.get("loss"), int | float):
            pending.append(float(entry["loss"]))
        if not isinstance(entry.get("eval_loss"), int | float):
            continue
        if pending:
            last_train = sum(pending) / len(pending)
            pending = []
            for early in rows:  # evaluations before the first logged training loss
                if early["train_loss"] is None:
                    early["train_loss"] = last_train
        epoch = entry.get("epoch", len(rows) + 1)
        if isinstance(epoch, bool) or not isinstance(epoch, int | float):
            damaged(where, "a trainer_state.json whose log_history epochs are numbers",
                    f"epoch {shorten(repr(epoch), 30)} at evaluation {len(rows) + 1}")  # fmt: skip
        epoch = float(epoch)
        fractional = fractional or not epoch.is_integer()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": last_train}
        for key, value in entry.items():
            if key.startswith("eval_") and isinstance(value, int | float) and not isinstance(value, bool):
                if key.endswith(("_runtime", "_samples_per_second", "_steps_per_second")):
                    continue
                row[normalize(key)] = float(value)
        rows.append(row)
    # The first logged training loss is the mean over the steps before it, the evaluations
    # before it included (as a later one holds for the evaluations after it until the next).
    first = sum(pending) / len(pending) if pending else None
    rows = [r | {"train_loss": first} if r["train_loss"] is None else r for r in rows]
    rows = [r for r in rows if r["train_loss"] is not None]  # a log with no training loss at all
    if fractional:  # evaluations inside epochs: number them 1, 2, 3...
        for index, row in enumerate(rows, start=1):
            row["epoch_fraction"], row["epoch"] = row["epoch"], float(index)
    return _table(
        rows, where, source="huggingface", log=where, train_loss_source="running mean of logged training losses",
        epoch_unit="evaluation" if fractional else "epoch",
    )  # fmt: skip
