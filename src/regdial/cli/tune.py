"""``regdial tune``: find the right strengths from validation results; again, it resumes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from regdial._checks import Described, fail
from regdial.cli.app import app
from regdial.cli.flags import check_device, creatable, literal, make_console, run_flags, run_overrides, source
from regdial.cli.output import print_tune

__all__ = ["tune"]


@app.command()
@run_flags
def tune(
    config: Annotated[
        Path | None,
        typer.Argument(help="A TOML config: its tune table holds the search (space, budget, strategy)."),
    ] = None,
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
    flags: dict[str, Any] | None = None,
) -> None:
    """Find the right strengths from validation results; running it again resumes the search."""
    from regdial.api import tune as search
    from regdial.config import load_config
    from regdial.dial.options import TuneOptions
    from regdial.dial.space import Space

    flags = {**(flags or {}), "out": out}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("tune", "one process: trials run one per worker (--workers N --devices cuda:0,cuda:1,...), "
             "torchrun is for regdial run", Described(f"WORLD_SIZE={os.environ['WORLD_SIZE']}"))  # fmt: skip
    loaded = load_config(config, run_overrides(**flags))
    table = loaded.tune.model_dump(exclude_none=True)
    for name, value in (("budget", budget), ("strategy", strategy), ("storage", storage)):
        if value is not None:
            table[name] = value
    if workers is not None:
        table["workers"] = literal(workers)
    if devices is not None:
        table["devices"] = [d.strip() for d in devices.split(",") if d.strip()]
    options = TuneOptions.parse(table, "tune")
    name = source(loaded)
    out_dir = creatable("run.out", Path(loaded.run.out or Path("runs") / f"{name}-tune"))
    for device in options.devices or [loaded.run.device]:
        check_device(loaded.run.model_copy(update={"device": device}))
    space = Space.from_dict(options.space, loaded.regularization) if options.space is not None else None
    run = loaded.run
    console = make_console()
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
    print_tune(console, result, out_dir)
