"""The ``regdial`` command: run, tune, diagnose, report, tasks.

Bad input never shows a traceback: one line naming the field, the allowed values and
the value received, and exit code 2 (set ``REGDIAL_DEBUG=1`` to see the traceback).
Exit codes: 0 done, 1 the run diverged (or a file could not be written), 2 bad input
(an ``InputError``, and only that), 3 the training itself raised (the model, torch or the
user's own code: one line with the exception's type, not worded as bad input), 130
interrupted (resumable).

Flags override the config file's ``[run]`` and ``[tune]`` tables and are validated by
the same tables (``RunSection``, ``TuneOptions``): numbers are read as TOML values, so
an error names exactly what was typed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from regdial._checks import Described, InputError, fail, shorten

EXIT_INPUT, EXIT_CRASH = 2, 3

app = typer.Typer(
    name="regdial",
    help="Regularization of neural networks as a dial: train, diagnose, report and tune.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# The flags `run` and `tune` share, declared once. Values are taken as text and read as
# TOML literals, so the option tables word every error with the value received.
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


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)  # paths stay on one line, copy-pasteable


def _literal(text: str | None) -> Any:
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


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for the [regularization] table; values are read as TOML."""
    table: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail("--set", "KEY=VALUE (a regularization knob, e.g. dropout=0.2)", pair)
        table[key.strip()] = _literal(value.strip())
    return table


def _run_overrides(**flags: str | bool | None) -> dict[str, Any]:
    """The ``[run]`` flags that were given, typed: numbers and booleans read as TOML."""
    text_fields = ("task", "data", "target", "kind", "model", "optimizer", "device", "precision", "out")
    return {
        name: (value if name in text_fields or isinstance(value, bool) else _literal(value))
        for name, value in flags.items()
        if value is not None
    }


def _source(config: Any) -> str:
    """Check that the config names a task or a data file (not both); default digits-small.

    Returns the name the run directory is named after.
    """
    run = config.run
    if run.task is not None and run.data is not None:
        fail("run", "either a task or data, not both", Described(f"task {run.task!r} and data {run.data!r}"))
    if run.task is None and run.data is None:
        return "digits-small"
    return str(run.task) if run.task is not None else Path(str(run.data)).stem


def _free_directory(path: Path) -> Path:
    """``path`` if it is new or empty, else ``path-2``, ``path-3``...: never overwrite a run."""
    candidate, number = path, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def _creatable(field: str, path: Path) -> Path:
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


def _finished(run_dir: Path) -> bool:
    from regdial._io import read_json

    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    data = read_json(summary, "a run summary written by regdial")
    return isinstance(data, dict) and data.get("status") in ("completed", "stopped early", "pruned")


def _data(config: Any) -> Any:
    """The config's ``Dataset``: a built-in task or the user's file."""
    from regdial.training.data import load_data
    from regdial.training.tasks import load_task

    run = config.run
    if run.data is not None:
        return load_data(run.data, target=run.target, kind=run.kind, seed=run.seed)
    return load_task(run.task or "digits-small", run.seed)


def _model(config: Any, dataset: Any) -> Any:
    """The model to train: a built-in name (``fit`` builds it) or the user's factory's model."""
    model = config.run.model
    if model is None or ":" not in model:
        return model
    from regdial.dial.objective import import_string
    from regdial.training.models import model_from_factory

    return model_from_factory(import_string(model, "run.model"), "run.model", seed=config.run.seed,
                              input_shape=tuple(dataset.input_shape), num_classes=dataset.num_classes)  # fmt: skip


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="A TOML run configuration (see examples/).")] = None,
    task: Task = None,
    data: Data = None,
    target: Target = None,
    kind: Kind = None,
    model: Model = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    optimizer: Optimizer = None,
    lr: LearningRate = None,
    seed: Seed = None,
    device: Device = None,
    precision: Precision = None,
    deterministic: Deterministic = None,
    out: Annotated[str | None, typer.Option(help="The run directory (default runs/<task>).")] = None,
    baseline: Annotated[
        bool | None, typer.Option("--baseline/--no-baseline", help="Also train with regularization off.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="A regularization knob, KEY=VALUE; repeatable.")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory.")] = None,
    quiet: Quiet = False,
) -> None:
    """Train a model under one setting of the dial, diagnose it and write its report."""
    from regdial.config import load_config

    flags = {"task": task, "data": data, "target": target, "kind": kind, "model": model, "epochs": epochs,
             "batch_size": batch_size, "optimizer": optimizer, "lr": lr, "seed": seed, "device": device,
             "precision": precision, "deterministic": deterministic, "out": out}  # fmt: skip
    if resume is not None:
        given = [name for name, value in (("config", config), *flags.items(), ("set", set_), ("baseline", baseline))
                 if value is not None and value != []]  # fmt: skip
        if given:
            fail("--resume", "used alone (a resumed run continues exactly as RUN_DIR/config.toml says)",
                 Described(f"also --{given[0].replace('_', '-')}"))  # fmt: skip
        if not (resume / "config.toml").is_file():
            fail("--resume", "a run directory written by regdial run", str(resume))
        loaded = load_config(resume / "config.toml")
        out_dir, resuming = resume, True
    else:
        overrides = _run_overrides(**flags)
        if baseline is not None:
            overrides["baseline"] = baseline
        loaded = load_config(config, overrides)
        if set_:
            from regdial.setting import Regularization

            table = loaded.regularization.to_dict() | _parse_sets(set_)
            loaded = type(loaded)(loaded.run, loaded.model, Regularization.from_dict(table), loaded.tune)
        name = _source(loaded)
        wanted = _creatable("run.out", Path(loaded.run.out or Path("runs") / name))
        out_dir, resuming = _free_directory(wanted), False
    distributed = _data_parallel(loaded.run.device)
    main = distributed is None or distributed.is_main
    if distributed is not None:  # under torchrun: one directory, rank 0's choice
        out_dir = Path(distributed.broadcast(str(out_dir)))
    _execute(loaded, out_dir, resuming, progress=None if not quiet and main else False, main=main)


def _check_device(run: Any) -> None:
    """The device and precision asked for exist here (one line if not)."""
    from regdial.training.devices import Precision, resolve_device

    Precision.choose(run.precision, resolve_device(run.device), "precision")


def _data_parallel(device: str | None) -> Any:
    """The data-parallel process group ``torchrun`` describes (initialized), or None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from regdial.training.devices import resolve_device
    from regdial.training.distributed import Distributed

    return Distributed.current(resolve_device(device or "auto", "run.device"))


def _execute(config: Any, out_dir: Path, resuming: bool, progress: bool | None, main: bool = True) -> None:
    """Train (and the baseline), then report; under data parallelism every rank trains and
    only rank 0 (``main``) writes and prints."""
    import tomli_w

    from regdial._io import write_text
    from regdial.diagnosis import diagnose
    from regdial.reports.run import run_report
    from regdial.setting import Regularization
    from regdial.training.fit import fit

    setting = config.regularization
    dataset = _data(config)  # read and check the data, model and device before writing anything
    model = _model(config, dataset)
    _check_device(config.run)
    if not resuming and main:
        document = config.document()
        document["run"]["out"] = str(out_dir)
        write_text(out_dir / "config.toml", tomli_w.dumps(document))
    console = _console() if main else _Silent()
    common: dict[str, Any] = {
        "model_options": config.model,
        "progress": progress,
        **config.run.training().model_dump(),
    }
    console.print(f"[bold]{dataset.name}[/]: training under {_describe(setting)} -> {out_dir}")
    task_arg: Any = config.run.task if config.run.task is not None and config.run.data is None else dataset
    history = fit(task_arg, setting, run_dir=out_dir, resume=resuming, model=model, **common)
    baseline_history = None
    if config.run.baseline and history.meta.get("status") != "interrupted":
        base_dir = out_dir / "baseline"
        if not _finished(base_dir):
            console.print("training the same model with regularization off (the baseline)")
            again = resuming and (base_dir / "checkpoints" / "last.json").is_file()
            base_model = _model(config, dataset)
            baseline_history = fit(task_arg, Regularization.off(), run_dir=base_dir, resume=again, model=base_model,
                                   **common)  # fmt: skip
        else:
            from regdial.training.history import History

            baseline_history = History.load(base_dir)
    status = history.meta.get("status")
    if status == "interrupted":
        console.print(f"{history.meta.get('reason')}; continue with: regdial run --resume {out_dir}")
        raise typer.Exit(130)
    if status == "diverged" and not history.rows:  # nothing to report or diagnose
        console.print(f"[red]{history.meta.get('reason')}[/]: no epoch finished; lower the learning rate "
                      f"({history.meta.get('kept', 'nothing was saved')})")  # fmt: skip
        raise typer.Exit(1)
    if main:
        page = run_report(out_dir)
        _print_summary(console, history, baseline_history, diagnose(history, setting))
        console.print(f"report: {page}")
    if status == "diverged":
        console.print(f"[red]{history.meta.get('reason')}[/]; {history.meta.get('kept', '')}")
        raise typer.Exit(1)


class _Silent:
    """The console of a data-parallel rank other than 0: it prints nothing."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def _describe(setting: Any) -> str:
    active = setting.active()
    return ", ".join(f"{k}={v}" for k, v in active.items()) if active else "no regularization"


def _cell(scores: dict[str, Any], key: str) -> str:
    if key not in scores:
        return "-"
    se = scores.get(f"{key}_se")
    value = f"{scores[key]:.4f}"
    return f"{value} ± {se:.4f}" if isinstance(se, float) and se > 0 else value


def _print_summary(console: Any, history: Any, baseline: Any, diagnosis: Any) -> None:
    from rich.table import Table

    metric = history.metric
    table = Table(title=None, show_edge=False)
    for column in ("", f"val {metric}", f"test {metric}", "best epoch", "status"):
        table.add_column(column, justify="right" if column else "left")

    def add(label: str, h: Any) -> None:
        summary = h.meta.get("summary", {})
        final = summary.get("final", {})
        cells = [_cell(final, key) for key in (f"val_{metric}", f"test_{metric}")]
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
    batch_size: BatchSize = None,
    optimizer: Optimizer = None,
    lr: LearningRate = None,
    seed: Seed = None,
    device: Device = None,
    precision: Precision = None,
    deterministic: Deterministic = None,
    out: Annotated[
        str | None, typer.Option(help="The search's directory (default runs/<task>-tune).")
    ] = None,
    budget: Annotated[
        str | None, typer.Option(help="Epochs (default 12 trials' worth), 'N trials' or 'N minutes'.")
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="auto, path, online, tpe, random or grid.")] = None,
    storage: Annotated[
        str | None, typer.Option(help="An Optuna storage URL (postgresql://...) to share.")
    ] = None,
    workers: Annotated[str | None, typer.Option(help="Local worker processes.", metavar="INTEGER")] = None,
    devices: Annotated[
        str | None, typer.Option(help="One worker per device, comma-separated: cuda:0,cuda:1.")
    ] = None,
    retrain: Annotated[
        bool, typer.Option("--retrain/--no-retrain", help="Retrain the best and the baseline.")
    ] = True,
    quiet: Annotated[bool, typer.Option(help="Only the final table.")] = False,
) -> None:
    """Find the right strengths from validation results; running it again resumes the search."""
    from regdial.api import tune as search
    from regdial.config import load_config
    from regdial.dial.options import TuneOptions
    from regdial.dial.space import Space

    flags = {"task": task, "data": data, "target": target, "kind": kind, "model": model, "epochs": epochs,
             "batch_size": batch_size, "optimizer": optimizer, "lr": lr, "seed": seed, "device": device,
             "precision": precision, "deterministic": deterministic, "out": out}  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("tune", "one process: trials run one per worker (--workers N --devices cuda:0,cuda:1,...), "
             "torchrun is for regdial run", Described(f"WORLD_SIZE={os.environ['WORLD_SIZE']}"))  # fmt: skip
    loaded = load_config(config, _run_overrides(**flags))
    table = loaded.tune.model_dump(exclude_none=True)
    for name, value in (("budget", budget), ("strategy", strategy), ("storage", storage)):
        if value is not None:
            table[name] = value
    if workers is not None:
        table["workers"] = _literal(workers)
    if devices is not None:
        table["devices"] = [d.strip() for d in devices.split(",") if d.strip()]
    options = TuneOptions.parse(table, "tune")
    name = _source(loaded)
    out_dir = _creatable("run.out", Path(loaded.run.out or Path("runs") / f"{name}-tune"))
    for device in options.devices or [loaded.run.device]:
        _check_device(loaded.run.model_copy(update={"device": device}))
    space = Space.from_dict(options.space, loaded.regularization) if options.space is not None else None
    run = loaded.run
    console = _console()
    say = None if quiet else (lambda message: console.print(message, markup=False))
    task_arg: Any = run.task if run.data is None else run.data
    if run.task is None and run.data is None:
        task_arg = "digits-small"
    try:
        result = search(
            task_arg, space, model=run.model, model_options=loaded.model, target=run.target, kind=run.kind,
            epochs=run.epochs, lr=run.lr, batch_size=run.batch_size, optimizer=run.optimizer, device=run.device,
            precision=run.precision, deterministic=run.deterministic, budget=options.budget, strategy=options.strategy, storage=options.storage,
            workers=options.workers, devices=options.devices, seed=run.seed, run_dir=out_dir,
            grid_points=options.grid_points, retrain=retrain, progress=say, base=loaded.regularization,
        )  # fmt: skip
    except KeyboardInterrupt:
        if options.strategy in ("path", "online"):
            console.print("interrupted (the path and online strategies start over when run again)")
        else:
            where = "the shared study" if options.storage else out_dir / "study.db"
            console.print(
                f"interrupted: the finished trials are kept in {where}; run the same command again to resume"
            )
        raise typer.Exit(130) from None
    _print_tune(console, result, out_dir)


def _print_tune(console: Any, result: Any, out_dir: Path) -> None:
    from rich.table import Table

    metric = result.metric
    test = metric.replace("val_", "test_", 1)
    table = Table(show_edge=False)
    for column in ("", metric.replace("_", " "), test.replace("_", " ")):
        table.add_column(column, justify="right" if column else "left")
    if result.retrain:
        for label, key in (("unregularized", "baseline"), ("tuned", "tuned")):
            final = result.retrain[key].get("final", {})
            table.add_row(label, _cell(final, metric), _cell(final, test))
    else:
        table.add_row("tuned (search)", f"{result.best_value:.4f}", "-")
    console.print(table)
    if result.retrain.get("test"):
        console.print(f"test: {result.retrain['test']}")
    chosen = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best.active().items()
    )
    console.print(f"chosen: {chosen or 'every technique off'} ({result.chosen_by})")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(
        f"spent {result.epochs_spent} epochs ({result.strategy}); best setting: {out_dir / 'best.toml'}"
    )
    if (out_dir / "report.html").is_file():
        console.print(f"report: {out_dir / 'report.html'}")


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
    _console().print(table)
    _console().print(
        "train one with: regdial run --task NAME (--baseline to compare with regularization off)"
    )


@app.command(name="diagnose")
def diagnose_command(
    path: Annotated[
        Path,
        typer.Argument(
            help="A run directory, a history.csv/.json, a Lightning metrics.csv or a trainer_state.json."
        ),
    ],
) -> None:
    """Say where a run stands: overfitting, underfitting, good fit..., and which knob to turn."""
    from regdial._io import read_json
    from regdial.diagnosis import diagnose
    from regdial.setting import Regularization
    from regdial.training.history import History

    if path.is_dir() and (path / "result.json").is_file() and not (path / "history.csv").is_file():
        fail("history", f"a run directory; {path} is a search's, whose chosen setting's run is {path / 'best'}",
             str(path))  # fmt: skip
    history = History.load(path)
    setting = None
    summary = (path if path.is_dir() else path.parent) / "summary.json"
    if summary.is_file():
        recorded = read_json(summary, "a run summary written by regdial")
        if isinstance(recorded, dict) and isinstance(recorded.get("setting"), dict):
            setting = Regularization.from_dict(recorded["setting"])
    _console().print(diagnose(history, setting).message)


@app.command(name="report")
def report_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (regdial run) or a search's (regdial tune).")
    ],
) -> None:
    """Write report.html (with its PNGs) into a run directory or a search's directory."""
    from regdial.reports import report

    written = report(run_dir)
    _console().print(f"report: {written}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit code 2 for bad input, never a traceback."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    debug = bool(os.environ.get("REGDIAL_DEBUG"))
    if not args:
        args = ["--help"]
    try:
        code = command.main(args=args, prog_name="regdial", standalone_mode=False)
        if isinstance(code, int) and code:  # click returns a command's typer.Exit code here
            sys.exit(code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("regdial: interrupted", file=sys.stderr)
        sys.exit(130)
    except (typer.exceptions.TyperException, InputError) as error:
        if debug:
            raise
        format_message = getattr(error, "format_message", None)
        message = format_message() if callable(format_message) else str(error)
        lines = str(message).splitlines() or [type(error).__name__]
        print(f"regdial: error: {shorten(lines[0], 400)}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except OSError as error:  # a file regdial had to read or write (disk full, permissions...)
        if debug:
            raise
        where = f" ({shorten(str(error.filename), 120)})" if error.filename else ""
        print(f"regdial: error: {(error.strerror or str(error)).lower()}{where}", file=sys.stderr)
        sys.exit(1)
    except (RecursionError, MemoryError) as error:
        if debug:
            raise
        print(
            f"regdial: error: {type(error).__name__}: the input is too large or too deeply nested",
            file=sys.stderr,
        )
        sys.exit(EXIT_INPUT)
    except Exception as error:  # raised inside the training: the model, torch, the user's code
        if debug:
            raise
        lines = str(error).splitlines() or [""]
        print(
            f"regdial: error: the training raised {type(error).__name__}: {shorten(lines[0], 300)} "
            "(inside the model or training code, not bad input to regdial; REGDIAL_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        sys.exit(EXIT_CRASH)
