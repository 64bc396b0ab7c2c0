"""Run configuration files: ``[run]``, ``[model]``, ``[regularization]`` and ``[tune]`` tables.

::

    [run]
    task = "digits-small"        # or data = "file.npz" / "file.csv" (with target = "label")
    model = "cnn"
    epochs = 60
    seed = 0
    out = "runs/digits-small"

    [model]                      # options of the model: depth, width, channels, batchnorm
    channels = [32, 64]

    [regularization]             # a Regularization, flat keys
    dropout = 0.3
    label_smoothing = 0.1

Structure and types are checked by pydantic (unknown keys are rejected by name), ranges by
regdial's own checks; every error is one line naming the field, the allowed values and
the value received. Command-line flags override the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from regdial._checks import check_int, check_range
from regdial.setting import Regularization, read_toml, unknown_key

__all__ = ["RunConfig", "RunSection", "load_config", "one_line"]


class RunSection(BaseModel):
    """The ``[run]`` table: what to train, for how long, and where to write it."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = None
    data: Path | None = None
    target: str | None = None
    kind: Literal["auto", "classification", "regression"] = "auto"
    model: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float | None = None
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    seed: int = 0
    out: Path | None = None
    baseline: bool = False
    checkpoint_seconds: float = 10.0

    @field_validator("epochs", "batch_size")
    @classmethod
    def _positive(cls, value: int | None, info: Any) -> int | None:
        return None if value is None else check_int(f"run.{info.field_name}", value, low=1)

    @field_validator("lr")
    @classmethod
    def _lr(cls, value: float | None) -> float | None:
        return None if value is None else check_range("run.lr", value, low=0.0, low_open=True)

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        return check_int("run.seed", value, low=0)


class RunConfig(BaseModel):
    """A whole configuration file."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    run: RunSection = RunSection()
    model: dict[str, Any] = {}
    regularization: dict[str, Any] = {}
    tune: dict[str, Any] = {}

    def setting(self) -> Regularization:
        return Regularization.from_dict(self.regularization)


def one_line(error: ValidationError) -> ValueError:
    """Pydantic's first error as regdial's one-line message."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        section, _, key = where.rpartition(".")
        known = RunSection.model_fields if section == "run" else RunConfig.model_fields
        return unknown_key(section or "config", key, known)
    if first["type"] == "value_error":
        return ValueError(str(first.get("ctx", {}).get("error", first["msg"])))
    expected = first["msg"].removeprefix("Input should be ").split(",")[0]
    return ValueError(f"{where} must be {expected}, got {first.get('input')!r}")


def load_config(source: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML config (or nothing) and apply ``overrides`` to its ``[run]`` table."""
    document: dict[str, Any] = read_toml(Path(source)) if source is not None else {}
    run = dict(document.get("run", {}))
    run.update({k: v for k, v in (overrides or {}).items() if v is not None})
    document["run"] = run
    try:
        config = RunConfig.model_validate(document)
    except ValidationError as error:
        raise one_line(error) from None
    config.setting()  # check the [regularization] table now, not mid-run
    return config
