"""The ``regdial`` command: run, tasks, diagnose, report (and tune).

Bad input never shows a traceback: one line naming the field, the allowed values and
the value received, and exit code 2 (set ``REGDIAL_DEBUG=1`` to see the traceback).
Exit codes: 0 done, 1 the run diverged, 2 bad input, 130 interrupted (resumable).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from regdial._checks import Described, fail

app = typer.Typer(
    name="regdial",
    help="Regularization of neural networks as a dial: train, diagnose, report and tune.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# The flags `run` and `tune` share, declared once. Numbers are taken as text and checked by
# regdial, so that an error names the value received.
Task = Annotated[str | None, typer.Option(help="A built-in task (regdial tasks).")]
Data = Annotated[Path | None, typer.Option(help="Your data: a .npz (x, y, ...) or a .csv file.")]
Target = Annotated[str | None, typer.Option(help="The target column of a CSV file.")]
Kind = Annotated[str | None, typer.Option(help="auto, classification or regression.")]
Model = Annotated[str | None, typer.Option(help="linear, mlp, cnn, cnn1d or resnet.")]
Epochs = Annotated[
    str | None, typer.Option(help="Epochs to train (per trial when tuning).", metavar="INTEGER")
]
Seed = Annotated[
    str | None, typer.Option(help="Seed of the splits, initial weights and batches.", metavar="INTEGER")
]


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)  # paths stay on one line, copy-pasteable


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for the [regularization] table; values are read as TOML."""
    from regdial.setting import read_toml

    table: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail("--set", "KEY=VALUE (a regularization knob, e.g. dropout=0.2)", pair)
        try:
            table[key.strip()] = read_toml(f"v = {value.strip()}\n")["v"]
        except ValueError:
            table[key.strip()] = value.strip()  # a bare word: let the setting's check word the error
    return table


def _integer(field: str, text: str | None) -> int | None:
    """An integer flag given as text, so that the error names the value received."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        fail(field, "an integer", text)


def _choose_data(config: Any) -> str:
    """Check that the config names a task or a data file (not both); default digits-small.

    Returns the name the run directory is named after.
    """
    run = config.run
    if run.task is None and run.data is None:
        run.task = "digits-small"
    if run.task is not None and run.data is not None:
        fail(
            "run",
            "either a task or data, not both",
            Described(f"task {run.task!r} and data {str(run.data)!r}"),
        )
    return str(run.task) if run.task is not None else Path(str(run.data)).stem


def _free_directory(path: Path) -> Path:
    """``path`` if it is new or empty, else ``path-2``, ``path-3``...: never overwrite a run."""
    candidate, number = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def _finished(run_dir: Path) -> bool:
    import json

    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    return json.loads(summary.read_text(encoding="utf-8")).get("status") in (
        "completed",
        "stopped early",
        "pruned",
    )


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="A TOML run configuration (see examples/).")] = None,
    task: Task = None,
    data: Data = None,
    target: Target = None,
    kind: Kind = None,
    model: Model = None,
    # Numbers are taken as text and checked by regdial, so errors name the value received.
    epochs: Epochs = None,
    lr: Annotated[str | None, typer.Option(help="Learning rate.", metavar="FLOAT")] = None,
    seed: Seed = None,
    out: Annotated[Path | None, typer.Option(help="The run directory (default runs/<task>).")] = None,
    baseline: Annotated[
        bool | None, typer.Option("--baseline/--no-baseline", help="Also train with regularization off.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="A regularization knob, KEY=VALUE; repeatable.")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a model under one setting of the dial, diagnose it and write its report."""
    from regdial.config import load_config

    if resume is not None:
        given = [name for name, value in (("config", config), ("task", task), ("data", data), ("model", model),
                                          ("epochs", epochs), ("out", out), ("set", set_)) if value]  # fmt: skip
        if given:
            fail(
                "--resume", "used alone (the run continues as RUN_DIR/config.toml says)", f"also --{given[0]}"
            )
        if not (resume / "config.toml").is_file():
            fail("--resume", "a run directory written by regdial run", str(resume))
        loaded = load_config(resume / "config.toml")
        out_dir, resuming = resume, True
    else:
        overrides = {"task": task, "data": data, "target": target, "kind": kind, "model": model, "epochs": epochs,
                     "lr": lr, "seed": seed, "out": out, "baseline": baseline}  # fmt: skip
        loaded = load_config(config, overrides)
        if set_:
            loaded.regularization.update(_parse_sets(set_))
        loaded.setting()
        name = _choose_data(loaded)
        out_dir, resuming = _free_directory(loaded.run.out or Path("runs") / name), False
        loaded.run.out = out_dir
    _execute(loaded, out_dir, resuming, progress=None if not quiet else False)


def _execute(config: Any, out_dir: Path, resuming: bool, progress: bool | None) -> None:
    import tomli_w

    from regdial._io import write_text
    from regdial.diagnose import diagnose
    from regdial.report import report
    from regdial.setting import Regularization
    from regdial.tasks import load_data, load_task
    from regdial.train import fit

    run = config.run
    setting = config.setting()
    dataset = (
        load_task(run.task, run.seed)
        if run.task is not None
        else load_data(run.data, target=run.target, kind=run.kind, seed=run.seed)
    )
    task_arg: Any = run.task if run.task is not None else dataset
    if not resuming:
        document = config.model_dump(mode="json", exclude_none=True)
        document["regularization"] = setting.to_dict()
        write_text(out_dir / "config.toml", tomli_w.dumps(document))
    console = _console()
    common: dict[str, Any] = {
        "model": run.model, "model_options": config.model, "epochs": run.epochs, "batch_size": run.batch_size,
        "optimizer": run.optimizer, "lr": run.lr, "lr_schedule": run.lr_schedule, "seed": run.seed,
        "checkpoint_seconds": run.checkpoint_seconds, "progress": progress,
    }  # fmt: skip
    console.print(f"[bold]{dataset.name}[/]: training under {_describe(setting)} -> {out_dir}")
    history = fit(task_arg, setting, run_dir=out_dir, resume=resuming, **common)
    baseline_history = None
    if run.baseline and history.meta.get("status") not in ("interrupted",):
        base_dir = out_dir / "baseline"
        if not _finished(base_dir):
            console.print("training the same model with regularization off (the baseline)")
            again = resuming and (base_dir / "checkpoints" / "last.json").is_file()
            baseline_history = fit(task_arg, Regularization.off(), run_dir=base_dir, resume=again, **common)
        else:
            from regdial.history import History

            baseline_history = History.load(base_dir)
    status = history.meta.get("status")
    if status == "interrupted":
        console.print(f"{history.meta.get('reason')}; continue with: regdial run --resume {out_dir}")
        raise typer.Exit(130)
    if status == "diverged" and not history.rows:  # nothing to report or diagnose
        console.print(f"[red]{history.meta.get('reason')}[/]: no epoch finished; lower the learning rate")
        raise typer.Exit(1)
    page = report(out_dir)
    _print_summary(console, history, baseline_history, diagnose(history, setting))
    console.print(f"report: {page}")
    if status == "diverged":
        console.print(f"[red]{history.meta.get('reason')}[/]")
        raise typer.Exit(1)


def _describe(setting: Any) -> str:
    active = setting.active()
    return ", ".join(f"{k}={v}" for k, v in active.items()) if active else "no regularization"


def _print_summary(console: Any, history: Any, baseline: Any, diagnosis: Any) -> None:
    from rich.table import Table

    metric = history.metric
    table = Table(title=None, show_edge=False)
    for column in ("", f"val {metric}", f"test {metric}", "best epoch", "status"):
        table.add_column(column, justify="right" if column else "left")

    def add(label: str, h: Any) -> None:
        summary = h.meta.get("summary", {})
        final = summary.get("final", {})
        cells = [f"{final[key]:.4f}" if key in final else "-" for key in (f"val_{metric}", f"test_{metric}")]
        table.add_row(label, *cells, str(summary.get("best_epoch", "-")), str(h.meta.get("status")))

    if baseline is not None:
        add("unregularized", baseline)
    add("this setting", history)
    console.print(table)
    console.print(f"diagnosis: {diagnosis.message}")


@app.command()
def tune(
    config: Annotated[
        Path | None,
        typer.Argument(help="A TOML config: its tune table holds the search (space, budget, strategy)."),
    ] = None,
    task: Task = None,
    data: Data = None,
    target: Target = None,
    kind: Kind = None,
    model: Model = None,
    epochs: Epochs = None,
    seed: Seed = None,
    out: Annotated[
        Path | None, typer.Option(help="The search's directory (default runs/<task>-tune).")
    ] = None,
    budget: Annotated[
        str | None, typer.Option(help="Epochs (default 12 trials' worth), 'N trials' or 'N minutes'.")
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="auto, path, online, tpe, random or grid.")] = None,
    storage: Annotated[
        str | None, typer.Option(help="An Optuna storage URL (postgresql://...) to share.")
    ] = None,
    workers: Annotated[str | None, typer.Option(help="Local worker processes.", metavar="INTEGER")] = None,
    retrain: Annotated[
        bool, typer.Option("--retrain/--no-retrain", help="Retrain the best and the baseline.")
    ] = True,
    quiet: Annotated[bool, typer.Option(help="Only the final table.")] = False,
) -> None:
    """Find the right strengths from validation results; running it again resumes the search."""
    from regdial.config import load_config
    from regdial.setting import unknown_key
    from regdial.space import Space
    from regdial.tune import tune as search

    overrides = {"task": task, "data": data, "target": target, "kind": kind, "model": model, "epochs": epochs,
                 "seed": seed, "out": out}  # fmt: skip
    loaded = load_config(config, overrides)
    table = dict(loaded.tune)
    known = ("budget", "strategy", "storage", "workers", "space", "grid_points")
    for key in table:
        if key not in known:
            raise unknown_key("tune", key, known)
    name = _choose_data(loaded)
    out_dir = loaded.run.out or Path("runs") / f"{name}-tune"
    base = loaded.setting()
    space = Space.from_dict(table["space"], base) if "space" in table else None
    console = _console()
    say = None if quiet else (lambda message: console.print(message, markup=False))
    try:
        result = search(
            loaded.run.task if loaded.run.task is not None else Path(str(loaded.run.data)),
            space,
            model=loaded.run.model,
            model_options=loaded.model,
            epochs=loaded.run.epochs,
            lr=loaded.run.lr,
            batch_size=loaded.run.batch_size,
            budget=budget if budget is not None else table.get("budget"),
            strategy=strategy or table.get("strategy", "auto"),
            storage=storage or table.get("storage"),
            workers=table.get("workers", 1) if workers is None else _integer("workers", workers) or 0,
            seed=loaded.run.seed,
            run_dir=out_dir,
            target=loaded.run.target,
            kind=loaded.run.kind,
            grid_points=table.get("grid_points", 4),
            retrain=retrain,
            progress=say,
        )
    except KeyboardInterrupt:
        if (strategy or table.get("strategy", "auto")) in ("path", "online"):
            console.print("interrupted (the path and online strategies start over when run again)")
        else:
            where = "the shared study" if storage or table.get("storage") else out_dir / "study.db"
            console.print(
                f"interrupted: the finished trials are kept in {where}; run the same command again to resume"
            )
        raise typer.Exit(130) from None
    _print_tune(console, result, out_dir, space)


def _print_tune(console: Any, result: Any, out_dir: Path, space: Any) -> None:
    from rich.table import Table

    metric = result.metric
    test = metric.replace("val_", "test_")
    table = Table(show_edge=False)
    for column in ("", metric.replace("_", " "), test.replace("_", " ")):
        table.add_column(column, justify="right" if column else "left")
    if result.retrain:
        for label, key in (("unregularized", "baseline"), ("tuned", "tuned")):
            final = result.retrain[key].get("final", {})
            cells = [f"{final[k]:.4f}" if k in final else "-" for k in (metric, test)]
            table.add_row(label, *cells)
    else:
        table.add_row("tuned (search)", f"{result.best_value:.4f}", "-")
    console.print(table)
    chosen = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best.active().items()
    )
    console.print(f"chosen: {chosen or 'every technique off'}")
    if result.retrain:
        tuned, base = (result.retrain[k].get("final", {}).get(metric) for k in ("tuned", "baseline"))
        both = tuned is not None and base is not None
        if both and (tuned <= base if result.direction == "maximize" else tuned >= base):
            console.print(
                "note: the unregularized baseline validates as well as the tuned setting or better: "
                "this model may need no more regularization, or the space should reach weaker settings"
            )
    console.print(
        f"spent {result.epochs_spent} epochs ({result.strategy}); best setting: {out_dir / 'best.toml'}"
    )
    if (out_dir / "report.html").is_file():
        console.print(f"report: {out_dir / 'report.html'}")


@app.command()
def tasks() -> None:
    """List the built-in tasks."""
    from rich.table import Table

    from regdial.tasks import TASKS, load_task

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
    _console().print(table)
    _console().print(
        "train one with: regdial run --task NAME (--baseline to compare with regularization off)"
    )


@app.command(name="diagnose")
def diagnose_command(
    path: Annotated[Path, typer.Argument(help="A run directory or a history.csv/.json file.")],
) -> None:
    """Say where a run stands: overfitting, underfitting, good fit..., and which knob to turn."""
    import json

    from regdial.diagnose import diagnose
    from regdial.history import History
    from regdial.setting import Regularization

    if path.is_dir() and (path / "result.json").is_file() and not (path / "history.csv").is_file():
        fail(
            "history",
            f"a run directory; {path} is a search's, whose chosen setting's run is {path / 'best'}",
            str(path),
        )
    history = History.load(path)
    setting = None
    summary = (path if path.is_dir() else path.parent) / "summary.json"
    if summary.is_file():
        setting = Regularization.from_dict(json.loads(summary.read_text(encoding="utf-8")).get("setting", {}))
    result = diagnose(history, setting)
    _console().print(result.message)


@app.command(name="report")
def report_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (regdial run) or a search's (regdial tune).")
    ],
) -> None:
    """Write report.html (with its PNGs) into a run directory or a search's directory."""
    from regdial.report import report, tune_report

    written = tune_report(run_dir) if (run_dir / "result.json").is_file() else report(run_dir)
    _console().print(f"report: {written}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit code 2 for bad input, never a traceback."""
    command = typer.main.get_command(app)
    debug = bool(os.environ.get("REGDIAL_DEBUG"))
    try:
        code = command.main(args=argv, prog_name="regdial", standalone_mode=False)
        if isinstance(code, int) and code:  # click returns a command's typer.Exit code here
            sys.exit(code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("regdial: interrupted", file=sys.stderr)
        sys.exit(130)
    except (typer.exceptions.TyperException, ValueError) as error:
        if debug:
            raise
        format_message = getattr(error, "format_message", None)
        message = format_message() if callable(format_message) else str(error)
        print(f"regdial: error: {str(message).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
