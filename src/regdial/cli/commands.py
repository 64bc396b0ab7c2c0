"""The small commands: ``regdial tasks``, ``regdial diagnose``, ``regdial report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from regdial.cli.app import app
from regdial.cli.flags import make_console

__all__ = ["diagnose_command", "report_command", "tasks"]


@app.command()
def tasks() -> None:
    """List the built-in tasks."""
    from rich.table import Table

    from regdial.training.tasks import TASKS, load_task

    table = Table(show_edge=False)
    table.add_column("task", no_wrap=True, style="bold")
    table.add_column("data", no_wrap=True)
    table.add_column("train/val/test", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("epochs", justify="right")
    for name, spec in TASKS.items():
        data = load_task(name, 0)
        shape = "x".join(str(n) for n in data.input_shape)
        target = f"{data.num_classes} classes" if data.kind == "classification" else "regression"
        table.add_row(
            name, f"{shape} {data.input_kind}, {target}", data.sizes(), spec.model, str(spec.epochs)
        )
    make_console().print(table)
    make_console().print(
        "train one with: regdial run --task NAME (--baseline to compare with regularization off)"
    )


@app.command(name="diagnose")
def diagnose_command(
    path: Annotated[
        Path,
        typer.Argument(
            help="A run directory (or a search's: its chosen run), a Hugging Face Trainer's output directory, a "
            "Lightning log directory, or a history.csv/.json, metrics.csv, trainer_state.json or step-by-step CSV."
        ),
    ],
) -> None:
    """Say where a run stands: overfitting, underfitting, good fit..., and which knob to turn."""
    from regdial.diagnosis import diagnose, in_force
    from regdial.training.reading import read_run

    console = make_console()
    history, setting = read_run(path, console.print)
    console.print(diagnose(history, in_force(history, setting)).message)


@app.command(name="report")
def report_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (regdial run) or a search's (regdial tune).")
    ],
) -> None:
    """Write report.html (with its PNGs) into a run directory or a search's directory."""
    from regdial.reports import report

    written = report(run_dir)
    make_console().print(f"report: {written}")
