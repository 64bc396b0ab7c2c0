"""``regdial run``: train a model under one setting of the dial, diagnose it, report it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from regdial._checks import Described, fail
from regdial.cli.app import app
from regdial.cli.flags import (
    Quiet,
    check_device,
    creatable,
    free_directory,
    make_console,
    parse_sets,
    run_flags,
    run_overrides,
    source,
)
from regdial.cli.output import Silent, describe, print_summary
from regdial.training.loop_state import FINISHED

__all__ = ["run"]


def _finished(run_dir: Path) -> bool:
    from regdial._io import read_json

    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    data = read_json(summary, "a run summary written by regdial")
    return isinstance(data, dict) and data.get("status") in FINISHED


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
@run_flags
def run(
    config: Annotated[Path | None, typer.Argument(help="A TOML run configuration (see examples/).")] = None,
    out: Annotated[str | None, typer.Option(help="The run directory (default runs/<task>).")] = None,
    baseline: Annotated[
        bool | None, typer.Option("--baseline/--no-baseline", help="Also train with regularization off.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="A regularization knob, KEY=VALUE; repeatable.")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory.")] = None,
    quiet: Quiet = False,
    flags: dict[str, Any] | None = None,
) -> None:
    """Train a model under one setting of the dial, diagnose it and write its report."""
    from regdial.config import load_config

    flags = {**(flags or {}), "out": out}
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
        overrides = run_overrides(**flags)
        if baseline is not None:
            overrides["baseline"] = baseline
        loaded = load_config(config, overrides)
        if set_:
            from regdial.setting import Regularization

            table = loaded.regularization.to_dict() | parse_sets(set_)
            loaded = type(loaded)(loaded.run, loaded.model, Regularization.from_dict(table), loaded.tune)
        name = source(loaded)
        wanted = creatable("run.out", Path(loaded.run.out or Path("runs") / name))
        out_dir, resuming = free_directory(wanted), False
    distributed = _data_parallel(loaded.run.device)
    main = distributed is None or distributed.is_main
    if distributed is None:
        _execute(loaded, out_dir, resuming, progress=None if not quiet else False)
        return
    out_dir = Path(distributed.broadcast(str(out_dir)))  # under torchrun: one directory, rank 0's choice
    ended = False
    try:
        _execute(loaded, out_dir, resuming, progress=None if not quiet and main else False, main=main)
        ended = True
    finally:  # the group ends in order: every rank done (rank 0's report written), then destroyed
        distributed.close(wait=ended)
    if distributed.owned:
        _leave_without_teardown()


def _leave_without_teardown() -> None:
    """End a finished torchrun rank at once, its output flushed, without the interpreter's
    teardown. Gloo's ``pt_gloo_runloop`` threads outlive ``destroy_process_group`` (they
    were still running after it and after a garbage collection); one that touches Python
    once finalization has begun is ended by ``pthread_exit`` inside C++ code that may not
    unwind, and the rank died with ``terminate called without an active exception``
    (SIGABRT: torchrun then reports a run that finished as failed). Seen in CI, and in 1
    of 8-12 runs here under load, in a gdb backtrace (``Py_FinalizeEx`` on the main
    thread, a forced unwind on the gloo thread). Every file the run wrote is closed by now
    (atomic writes), and regdial's own exit hook (``distributed._destroy``) has run as
    ``close``."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    check_device(config.run)
    if not resuming and main:
        document = config.document()
        document["run"]["out"] = str(out_dir)
        write_text(out_dir / "config.toml", tomli_w.dumps(document))
    console = make_console() if main else Silent()
    common: dict[str, Any] = {
        "model_options": config.model,
        "progress": progress,
        **config.run.training().model_dump(),
    }
    console.print(f"[bold]{dataset.name}[/]: training under {describe(setting)} -> {out_dir}")
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
        print_summary(console, history, baseline_history, diagnose(history, setting))
        console.print(f"report: {page}")
    if status == "diverged":
        console.print(f"[red]{history.meta.get('reason')}[/]; {history.meta.get('kept', '')}")
        raise typer.Exit(1)
