"""The ``regdial`` typer application; each command registers itself from its module."""

from __future__ import annotations

import typer

__all__ = ["app"]

app = typer.Typer(
    name="regdial",
    help="Regularization of neural networks as a dial: train, diagnose, report and tune.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
