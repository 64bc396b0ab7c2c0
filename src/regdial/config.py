"""Run configuration files: ``[run]``, ``[model]``, ``[regularization]`` and ``[tune]`` tables.

::

    [run]
    task = "digits-small"        # or data = "file.npz" / "file.csv" (with target = "label")
    model = "cnn"                # or "package.module:make_model", your own
    epochs = 60
    seed = 0
    out = "runs/digits-small"

    [model]                      # options of a built-in model: depth, width, channels, batchnorm
    channels = [32, 64]

    [regularization]             # a Regularization, flat keys
    dropout = 0.3
    label_smoothing = 0.1

    [tune]                       # a search (regdial tune)
    budget = "20 trials"

    [search]                     # written by a search on your own loaders: refused by regdial run
    own_data = true
    epochs = 90

Each table is validated by the one place that owns it: ``[run]`` by ``RunSection`` (the
training options of ``RunOptions`` plus what to train and where to write it),
``[regularization]`` by ``Regularization`` (the knobs of ``regdial.knobs``), ``[tune]``
by ``TuneOptions``. Unknown keys are refused by name; every error is one line naming
the field, the allowed values and the value received. Command-line flags override the
file. Every file regdial writes (a run's ``config.toml``, a search's ``best.toml``)
loads back here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from regdial._checks import fail, unknown_key
from regdial._io import read_toml
from regdial.dial.options import TuneOptions
from regdial.setting import Regularization
from regdial.training.options import RunOptions

__all__ = ["SECTIONS", "Config", "RunSection", "load_config"]

SECTIONS = ("run", "model", "regularization", "tune", "search")


class RunSection(RunOptions):
    """The ``[run]`` table: what to train, how (``RunOptions``), and where to write it."""

    task: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    data: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    target: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    kind: Literal["auto", "classification", "regression"] = "auto"
    model: Annotated[str, Field(min_length=1, max_length=300)] | None = None
    out: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    baseline: bool = False

    def training(self) -> RunOptions:
        """The training options alone."""
        return RunOptions.model_validate({k: getattr(self, k) for k in RunOptions.model_fields})


@dataclass(frozen=True)
class Config:
    """A whole configuration file, each table validated."""

    run: RunSection
    model: dict[str, Any]
    regularization: Regularization
    tune: TuneOptions

    def document(self) -> dict[str, Any]:
        """The file's tables (what a run's ``config.toml`` records)."""
        run = {k: v for k, v in self.run.model_dump().items() if v is not None}
        document: dict[str, Any] = {"run": run}
        if self.model:
            document["model"] = dict(self.model)
        document["regularization"] = self.regularization.to_dict()
        return document


def load_config(source: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config (or nothing) and apply ``overrides`` to its ``[run]`` table."""
    document: dict[str, Any] = read_toml(Path(source)) if source is not None else {}
    for key in document:
        if key not in SECTIONS:
            raise unknown_key("config", key, SECTIONS)
    for section in SECTIONS:
        if not isinstance(document.get(section, {}), dict):
            fail(section, "a table", document[section])
    run = dict(document.get("run", {}))
    run.update({k: v for k, v in (overrides or {}).items() if v is not None})
    search = document.get("search", {})
    if search.get("own_data") is True and run.get("task") is None and run.get("data") is None:
        length = f" for {search['epochs']} epochs" if isinstance(search.get("epochs"), int) else ""
        fail("task", f"given (--task or --data): {source} was tuned on your own data and model, which "
             f"regdial run cannot build; train it in your code{length} with Regularization.from_toml", None)  # fmt: skip
    return Config(
        run=RunSection.parse(run, "run"),
        model=dict(document.get("model", {})),
        regularization=Regularization.from_dict(document.get("regularization", {})),
        tune=TuneOptions.parse(document.get("tune", {}), "tune"),
    )
