"""``regdial.tune``: the dial on anything a user brings, from Python.

The front end of the search, as the ``regdial tune`` command is from the shell: it
builds the objective from what it is given, runs a ``Search`` (``regdial.dial``) and
writes the search's report. What ``tune`` accepts as its first argument:

=================================  =========================================================
``"digits-small"``                 a built-in task (``regdial tasks``)
``"mine.npz"``, ``"mine.csv"``     the user's data file (``target`` names a CSV's column)
``make_model`` with ``train=``,    the user's own model: a function returning a fresh
``val=`` (``test=``) or ``data=``  ``nn.Module`` per trial (like Hugging Face's
                                   ``model_init``); the data as DataLoaders, a data file,
                                   or a ``"module:function"`` returning the loaders
``train_fn(setting, trial)``       any training code (a custom loop, a Hugging Face or
                                   Lightning Trainer): it reports to ``trial``
=================================  =========================================================

With ``workers`` (processes sharing the study), every piece must be importable by another
process: a built-in name, a file, or ``"package.module:function"`` strings (a function
defined at module level is turned into one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from regdial._checks import Described, InputError, check_choice, check_int, check_range, fail
from regdial.dial.fingerprint import fingerprint
from regdial.dial.objective import FitObjective, UserObjective, import_name, import_string
from regdial.dial.options import STRATEGIES
from regdial.dial.result import TuneResult
from regdial.dial.search import Search
from regdial.dial.space import Space
from regdial.knobs import retunable
from regdial.setting import Regularization

__all__ = ["tune"]


def _is_file(value: object) -> bool:
    return isinstance(value, Path) or (isinstance(value, str) and value.lower().endswith((".npz", ".csv")))


# tune's signature and docstring are the public API, 68 lines of the function; its body is 42.
def tune(
    task: str | Path | Callable[..., Any] | None = None,
    space: Space | None = None,
    *,
    train: Iterable[Any] | None = None,
    val: Iterable[Any] | None = None,
    test: Iterable[Any] | None = None,
    data: str | Path | None = None,
    num_classes: int | None = None,
    kind: str = "auto",
    target: str | None = None,
    model: str | None = None,
    model_options: Mapping[str, Any] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    metrics: Mapping[str, Callable[..., float]] | None = None,
    metric: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    optimizer: str = "adamw",
    device: str = "auto",
    precision: str = "auto",
    deterministic: bool = False,
    budget: object = None,
    strategy: str = "auto",
    storage: str | None = None,
    workers: int = 1,
    devices: list[str] | None = None,
    seed: int = 0,
    sampler_seed: int | None = None,
    run_dir: str | Path | None = None,
    study_name: str | None = None,
    grid_points: int | None = None,
    retrain: bool = True,
    report: bool = True,
    progress: Callable[[str], None] | None = None,
    base: Regularization | None = None,
    output: Callable[[Any], Any] | None = None,
) -> TuneResult:
    """Search ``space`` (default: the knobs that apply) for the setting that generalizes best.

    Args:
        task: what to tune (see the module docstring): a built-in task, a data file, a
            model factory (with ``train``/``val`` loaders or ``data``), or your objective.
        space: the knobs and ranges (default: ``Space.default`` for built-in models,
            ``Space.for_model`` for yours, weight decay and dropout for an objective).
        train, val, test: your DataLoaders (any re-iterables of batches).
        data: a data file, or a ``"module:function"`` returning ``(train, val[, test])``.
        num_classes, kind: a classifier's classes, or ``kind="regression"``.
        model: a built-in model's name, or a ``"module:function"`` factory (with a file
            or a task, the factory gets ``input_shape`` and ``num_classes`` if it asks).
        loss_fn, metrics, metric: your loss and metrics (see ``fit``); ``metric`` names
            the score the search optimizes (default accuracy, RMSE, or val_loss for an
            objective).
        epochs, lr, batch_size, optimizer, device, precision, deterministic: how each trial trains
            (``epochs``: the trials' length, also for an objective's ``trial.epochs``).
        budget, strategy, storage, workers, grid_points: see ``regdial.dial.search``.
        devices: one worker per device (``["cuda:0", "cuda:1"]``), each trial on its
            worker's device.
        seed: the data split, initial weights and batches, the same for every trial.
        sampler_seed: the search's own randomness (default: ``seed``).
        run_dir: where the study and the result files go (``result.json``, ``best.toml``,
            ``trials.csv``, ``study.db``, ``report.html``); None keeps it in memory.
        retrain: train the chosen setting and the unregularized baseline again and score
            both on the test split (for an objective: run it once with everything off).
        report: write ``report.html`` (and the tuned run's own) into ``run_dir``.
        progress: called with each line of progress (None: logging only).
        base: the fixed knobs of the default space (ignored when ``space`` is given).
        output: for your own model, ``output(model_output) -> logits`` (see ``fit``).

    Every argument is checked here, before anything trains: a bad one is one line naming it.
    """
    strategy = check_choice("strategy", strategy, STRATEGIES)
    _check_arguments(space=space, num_classes=num_classes, kind=kind, model_options=model_options, loss_fn=loss_fn,
                     metrics=metrics, metric=metric, epochs=epochs, lr=lr, batch_size=batch_size, base=base,
                     progress=progress, output=output, run_dir=run_dir, seed=seed, sampler_seed=sampler_seed,
                     flags={"deterministic": deterministic, "retrain": retrain, "report": report})  # fmt: skip
    objective, name = _objective(
        task, train=train, val=val, test=test, data=data, num_classes=num_classes, kind=kind, target=target,
        model=model, model_options=model_options, loss_fn=loss_fn, metrics=metrics, metric=metric, epochs=epochs,
        lr=lr, batch_size=batch_size, optimizer=optimizer, device=device, precision=precision, seed=seed,
        deterministic=deterministic, output=output,
    )  # fmt: skip
    patience = None
    reference = None
    if isinstance(objective, FitObjective):
        kind_of = objective.task_kind
        reference = objective.full_epochs
        # Trials train the task's length, so their cosine schedule anneals, and stop early
        # (keeping their best epoch) when the validation metric stalls for a quarter of it;
        # a chosen setting still improving at its end is trained again for twice as long.
        full = reference
        patience = max(5, reference // 4)
        fresh = objective.build_model()  # once: for the fingerprint and a default space over it
        if space is None:
            space = objective.default_space(base, fresh)
            if (
                strategy == "online"
            ):  # the knobs that cannot turn during the one run stay as the base has them
                space = Space({n: r for n, r in space.knobs.items() if retunable(n)}, space.base)
        _check_dropout_turns(space, fresh)
        identity: dict[str, Any] = {"task": name, "model": objective.model, "seed": seed}
        identity["fingerprint"] = fingerprint(fresh, objective.data_path, _data_of(objective))
    else:
        kind_of = "classification" if num_classes is not None else None
        full = objective.epochs
        space = (
            space if space is not None else Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)}, base)
        )
        identity = {"task": name, "objective": objective.import_path or name}
    search = Search(
        objective, space, budget=budget, strategy=strategy, storage=storage, workers=workers, devices=devices,
        seed=seed if sampler_seed is None else sampler_seed, run_dir=run_dir, study_name=study_name,
        grid_points=grid_points, retrain=retrain, progress=progress, identity=identity, kind=kind_of, epochs=full,
        reference_epochs=reference, patience=patience,
        # Your data, without epochs given: the trials' length is the dial's to learn (a
        # built-in task's length is known: it is the task's own).
        learn_length=isinstance(objective, FitObjective) and epochs is None and objective.task is None,
    )  # fmt: skip
    result = search.run()
    if report and result.run_dir is not None:
        from regdial.reports.run import run_report
        from regdial.reports.search import search_report

        best = result.run_dir / "best"
        if (best / "history.json").is_file():
            run_report(best)
        search_report(result.run_dir)
    return result


def _data_of(objective: FitObjective) -> tuple[Any, ...] | None:
    """The loaders a fingerprint reads (None for a built-in task or a data file), built
    without keeping them: an objective that keeps none is one other processes rebuild."""
    if objective.dataset is not None:
        return None
    kept = objective.loaders
    try:
        return objective.user_loaders()
    finally:
        objective.loaders = kept


def _check_arguments(
    *, space: object, num_classes: object, kind: object, model_options: object, loss_fn: object, metrics: object,
    metric: object, epochs: object, lr: object, batch_size: object, base: object, progress: object, output: object,
    run_dir: object, seed: object, sampler_seed: object, flags: Mapping[str, object],
) -> None:  # fmt: skip
    """The arguments every form of ``tune`` shares, checked before anything trains."""
    from regdial.training.fit import check_metrics, check_options

    if space is not None and not isinstance(space, Space):
        fail("space", "a regdial.Space (Space(weight_decay=(1e-5, 1e-1), dropout=(0, 0.5)))", space)
    if base is not None and not isinstance(base, Regularization):
        fail("base", "a regdial.Regularization", base)
    check_choice("kind", kind, ("auto", "classification", "regression"))
    check_int("seed", seed, low=0, high=2**32 - 1)  # it seeds the sampler too (numpy: below 2**32)
    if sampler_seed is not None:
        check_int("sampler_seed", sampler_seed, low=0, high=2**32 - 1)
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            fail(name, "true or false", flag)
    if num_classes is not None:
        check_int("num_classes", num_classes, low=2, high=10**7)
    if epochs is not None:
        check_int("epochs", epochs, low=1, high=10**6)
    if batch_size is not None:
        check_int("batch_size", batch_size, low=1)
    if lr is not None:
        check_range("lr", lr, low=0, low_open=True)
    if metric is not None and not (isinstance(metric, str) and metric):
        fail(
            "metric",
            "the name of the score to optimize (accuracy, rmse, val_loss, or one you report)",
            metric,
        )
    check_options("model_options", model_options)
    check_metrics("metrics", metrics)
    for name, value in (("loss_fn", loss_fn), ("progress", progress), ("output", output)):
        if value is not None and not callable(value):
            fail(name, "a function (or None)", value)
    if run_dir is not None and (not isinstance(run_dir, str | Path) or not str(run_dir)):
        fail("run_dir", "a directory path (or None to keep the study in memory)", run_dir)
    if run_dir is not None and Path(run_dir).exists() and not Path(run_dir).is_dir():
        fail("run_dir", "a directory (or a path to create one at)", Described(f"{str(run_dir)!r}, a file"))


def _check_dropout_turns(space: Space, model: nn.Module) -> None:
    """Refuse a search over dropout for a model that has nothing dropout sets: every trial
    would train the same, and the chosen rate would be reported as if it had mattered."""
    from regdial.blocks.noise import dropout_sites

    if "dropout" in space.knobs and not dropout_sites(model):
        fail("space.dropout", "left out for a model with no dropout (nn.Dropout modules or attention dropout "
             f"rates) to set: {type(model).__name__} has none",
             Described(f"[{space.knobs['dropout'].low:g}, {space.knobs['dropout'].high:g}]"))  # fmt: skip


def _objective(
    task: object, *, train: Any, val: Any, test: Any, data: Any, num_classes: int | None, kind: str,
    target: str | None, model: str | None, model_options: Mapping[str, Any] | None, loss_fn: Any, metrics: Any,
    metric: str | None, epochs: int | None, lr: float | None, batch_size: int | None, optimizer: str, device: str,
    precision: str, seed: int, deterministic: bool = False, output: Any = None,
) -> tuple[FitObjective | UserObjective, str]:  # fmt: skip
    """The objective ``tune`` was given, and the search's name for it."""
    common: dict[str, Any] = {
        "epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size, "optimizer": optimizer, "device": device,
        "precision": precision, "model_options": dict(model_options or {}), "loss_fn": loss_fn, "metrics": metrics,
        "metric_name": metric, "num_classes": num_classes, "kind": kind, "deterministic": deterministic,
        "output": output,
    }  # fmt: skip
    has_data = train is not None or val is not None or data is not None
    for name, value in (("model", model), ("data", data)):
        if isinstance(value, str) and ":" in value and not _is_file(value):
            import_string(
                value, name
            )  # a model or data that does not import: one line, before anything is written
    if isinstance(task, nn.Module):
        fail("task", "a function returning a fresh model for each trial (like Hugging Face's model_init), "
             "not a model", Described(f"a {type(task).__name__} instance"))  # fmt: skip
    if task is None and data is not None and _is_file(data):
        task, data = data, None
    if task is None:
        if model is None or not has_data:
            fail("task", "a built-in task, a data file, a model factory with data, or an objective", None)
        task = model  # "module:function" with data
    if isinstance(task, str | Path) and (_is_file(task) or isinstance(task, Path)):
        objective = FitObjective(data_path=str(task), target=target, model=model, **common)
        objective.dataset  # noqa: B018 - load and check the file now, not in the first trial
        return objective, Path(str(task)).stem
    if isinstance(task, str) and ":" in task:
        if not has_data:
            fail("task", "a model factory with its data (train/val loaders or data='module:function')", task)
        return _factory_objective(task, None, train, val, test, data, common), task.split(":")[-1]
    if isinstance(task, str):
        from regdial.training.tasks import TASKS

        check_choice("task", task, TASKS)
        if has_data:
            fail("train/val/data", "unset with a built-in task (it has its own data)", Described("given"))
        return FitObjective(task=task, model=model, **common), task
    if callable(task):
        if has_data:
            return _factory_objective(None, task, train, val, test, data, common), getattr(
                task, "__name__", "model"
            )
        for name in ("loss_fn", "metrics", "lr", "batch_size", "num_classes", "output"):
            if common.get(name) is not None:
                fail(name, "unset for your own training code (your objective trains; it reports to the trial)",
                     Described("given"))  # fmt: skip
        path = None
        try:
            path = import_name(task, "objective")
        except InputError:
            path = None  # fine in one process; workers refuse it with the same message
        user = UserObjective(task, metric=metric or "val_loss", epochs=epochs or 30, import_path=path)
        return user, getattr(task, "__name__", "objective")
    fail("task", "a built-in task, a data file, a model factory with data, or an objective", task)


def _factory_objective(
    path: str | None, factory: Callable[..., Any] | None, train: Any, val: Any, test: Any, data: Any,
    common: dict[str, Any],
) -> FitObjective:  # fmt: skip
    if data is not None and (train is not None or val is not None):
        fail("data", "unset when train and val loaders are given", data)
    if data is not None and _is_file(data):
        return FitObjective(data_path=str(data), model=path, model_factory=factory, **common)
    if data is not None:
        return FitObjective(data=str(data), model=path, model_factory=factory, **common)
    if train is None or val is None:
        fail("train/val", "both loaders (or data='module:function' returning them)",
             Described("only " + ("train" if train is not None else "val")))  # fmt: skip
    objective = FitObjective(model=path, model_factory=factory, loaders=(train, val, test), **common)
    if objective.task_kind is None and objective.kind != "regression":
        from regdial.training.batches import first_batch

        _, targets = first_batch(train)
        if not targets.is_floating_point():
            fail("num_classes", "the number of classes: your targets are class labels",
                 Described(f"None with {targets.dtype} targets"))  # fmt: skip
        objective.kind = "regression"
    if factory is not None:
        try:
            objective.model = import_name(factory, "model")
            objective.model_factory = factory
        except InputError:
            pass
    return objective
