"""The flags of the ``regdial`` command: declared once, read as TOML literals.

``run`` and ``tune`` share the ``[run]`` flags (``RUN_FLAGS``): ``@run_flags`` adds them
to a command's signature and hands them to it as one ``flags`` table, so they are
declared, named and documented in one place. Values are taken as text and read as TOML
literals, so the option tables word every error with the value received.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from regdial._checks import Described, fail, shorten

__all__ = [
    "RUN_FLAGS",
    "check_device",
    "creatable",
    "free_directory",
    "literal",
    "make_console",
    "parse_sets",
    "run_flags",
    "run_overrides",
    "source",
]

Task = Annotated[str | None, typer.Option(help="A built-in task (regdial tasks).")]
Data = Annotated[str | None, typer.Option(help="Your data: a .npz (x, y, ...) or a .csv file.")]
Target = Annotated[str | None, typer.Option(help="The target column of a CSV file.")]
Kind = Annotated[str | None, typer.Option(help="auto, classification or regression.")]
Model = Annotated[
    str | None, typer.Option(help="linear, mlp, cnn, cnn1d, resnet, or your own: package.module:make_model.")
]
Epochs = Annotated[
    str | None, typer.Option(help="Epochs to train (per trial when tuning).", metavar="INTEGER")
]
Seed = Annotated[
    str | None, typer.Option(help="Seed of the splits, initial weights and batches.", metavar="INTEGER")
]
BatchSize = Annotated[str | None, typer.Option("--batch-size", help="Samples per step.", metavar="INTEGER")]
Optimizer = Annotated[str | None, typer.Option(help="adamw, adam, sgd, nadam, radam, rmsprop or adagrad.")]
LearningRate = Annotated[str | None, typer.Option("--lr", help="Learning rate.", metavar="FLOAT")]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Precision = Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16 (autocast).")]
Deterministic = Annotated[
    bool | None,
    typer.Option("--deterministic/--no-deterministic", help="Deterministic kernels (slower on CUDA)."),
]
Quiet = Annotated[bool, typer.Option(help="No progress output.")]


RUN_FLAGS: dict[str, Any] = {
    "task": Task, "data": Data, "target": Target, "kind": Kind, "model": Model, "epochs": Epochs,
    "batch_size": BatchSize, "optimizer": Optimizer, "lr": LearningRate, "seed": Seed, "device": Device,
    "precision": Precision, "deterministic": Deterministic,
}  # fmt: skip
"""The ``[run]`` flags of ``run`` and ``tune``, in the order ``--help`` lists them."""


def run_flags(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the ``RUN_FLAGS`` after its first argument, passed to it as
    ``flags`` (a table of the values given, ``None`` for those not given)."""
    signature = inspect.signature(command, eval_str=True)
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in signature.parameters.values()
        if p.name != "flags"
    ]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
              for name, annotation in RUN_FLAGS.items()]  # fmt: skip

    @functools.wraps(command)
    def with_flags(**given: Any) -> None:
        flags = {name: given.pop(name) for name in RUN_FLAGS}
        command(**given, flags=flags)

    with_flags.__signature__ = signature.replace(parameters=[own[0], *shared, *own[1:]])  # type: ignore[attr-defined]
    with_flags.__annotations__ = {p.name: p.annotation for p in [*own, *shared]}
    return with_flags


def make_console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)  # paths stay on one line, copy-pasteable


def literal(text: str | None) -> Any:
    """A flag's text as a TOML value (``5`` an integer, ``1e-3`` a float); else the text."""
    if text is None:
        return None
    if "\n" in text or "\r" in text:
        return text
    from regdial._io import read_toml

    try:
        return read_toml(f"v = {text}\n")["v"]
    except (ValueError, KeyError, RecursionError):
        return text


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for the [regularization] table; values are read as TOML."""
    table: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail("--set", "KEY=VALUE (a regularization knob, e.g. dropout=0.2)", pair)
        table[key.strip()] = literal(value.strip())
    return table


def run_overrides(**flags: str | bool | None) -> dict[str, Any]:
    """The ``[run]`` flags that were given, typed: numbers and booleans read as TOML."""
    text_fields = ("task", "data", "target", "kind", "model", "optimizer", "device", "precision", "out")
    return {
        name: (value if name in text_fields or isinstance(value, bool) else literal(value))
        for name, value in flags.items()
        if value is not None
    }


def source(config: Any) -> str:
    """Check that the config names a task or a data file (not both); default digits-small.

    Returns the name the run directory is named after.
    """
    run = config.run
    if run.task is not None and run.data is not None:
        fail("run", "either a task or data, not both", Described(f"task {run.task!r} and data {run.data!r}"))
    if run.task is None and run.data is None:
        return "digits-small"
    return str(run.task) if run.task is not None else Path(str(run.data)).stem


def free_directory(path: Path) -> Path:
    """``path`` if it is new or empty, else ``path-2``, ``path-3``...: never overwrite a run."""
    candidate, number = path, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def creatable(field: str, path: Path) -> Path:
    """``path``, after checking a directory can be made there (without making it)."""
    too_long = [part for part in path.parts if len(part.encode()) > 255]
    if too_long:
        fail(field, "a path whose names fit the file system (255 bytes each)",
             Described(f"a name of {len(too_long[0].encode())} bytes"))  # fmt: skip
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                fail(field, "a directory path (not under a file)", Described(f"{shorten(str(path), 60)}: "
                     f"{shorten(str(parent), 40)} is a file"))  # fmt: skip
            if not os.access(parent, os.W_OK):
                fail(
                    field,
                    "a directory regdial can write",
                    Described(f"{shorten(str(parent), 60)} is read-only"),
                )
            break
    return path


def check_device(run: Any) -> None:
    """The device and precision asked for exist here (one line if not)."""
    from regdial.training.devices import Precision, resolve_device

    Precision.choose(run.precision, resolve_device(run.device), "precision")
