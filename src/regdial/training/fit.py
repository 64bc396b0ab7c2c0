"""``fit``: train a model under one setting of the dial and return its ``History``.

``fit`` trains a built-in task (``fit("digits-small", setting)``), a ``Dataset`` (the
user's own data from ``load_data``) or the user's own model with their own DataLoaders
(``fit(model, setting, train=..., val=..., num_classes=10)``), with their own loss,
metrics and optimizer if they have them. Each epoch it records, in eval mode on clean
data, the train and validation loss and metrics (accuracy, or RMSE and R^2, with the
standard error of the validation score), the gap between them, the evaluated model's
weight norm and share of exact zeros, the learning rate and the seconds taken.

With a run directory it also writes ``config.toml``, ``history.csv``/``.json``,
``summary.json`` and ``checkpoints/``; ``fit(..., run_dir=d, resume=True)`` continues
from the last checkpoint and ends with exactly the numbers an uninterrupted run gives
(the data order is a function of the seed and epoch; the random state of every device,
the setting in force, the weight average and early stopping are saved). A checkpoint is
written after the first epoch, then at most every ``checkpoint_seconds`` at the end of
an epoch, and always at the end and on Ctrl-C (the first press stops after the current
batch and saves; a second aborts). A non-finite loss stops the run with the epoch and
step; no checkpoint is written after it, so the last good one (if any) stays.

Under ``torchrun`` (or inside a script that set up a process group) ``fit`` trains
data-parallel with PyTorch's ``DistributedDataParallel``; see ``regdial.training.distributed``.
On the CPU, the same seed gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sized
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from regdial._checks import Described, check_choice, check_int, fail, unknown_key
from regdial._io import remove_orphans, write_text
from regdial.applied import OptimizerSpec
from regdial.blocks.augment import option_names
from regdial.setting import Regularization
from regdial.training.batches import Adapter, OutputFn, first_batch
from regdial.training.devices import resolve_device, use_deterministic
from regdial.training.distributed import Distributed
from regdial.training.history import History
from regdial.training.loop import Controller, Run
from regdial.training.metrics import LossFn, MetricFn
from regdial.training.options import RunOptions, run_table
from regdial.training.pretrained import start_model
from regdial.training.progress import ProgressBar
from regdial.training.resume import restore
from regdial.training.source import LoaderSource, Source, TensorSource
from regdial.training.tasks import TASKS, Dataset, load_task

__all__ = ["Controller", "check_metrics", "check_options", "default_epochs", "default_model", "fit"]

DEFAULT_MODELS = {"image": "cnn", "signal": "cnn1d", "tabular": "mlp"}


def default_epochs(task: object) -> int:
    """The epochs ``fit`` trains when none are given: a built-in task's own, else 30."""
    spec = TASKS.get(task) if isinstance(task, str) else None
    return spec.epochs if spec else 30


def default_model(task: object, data: Dataset) -> str:
    """The model ``fit`` builds when none is named: a built-in task's own, else the default
    for the data's kind of input."""
    spec = TASKS.get(task) if isinstance(task, str) else None
    return spec.model if spec else DEFAULT_MODELS[data.input_kind]


def _optimizer_spec(optimizer: object, options: RunOptions, lr_given: bool) -> OptimizerSpec:
    """A factory of param groups for a name, a torch optimizer class or the user's factory."""
    if isinstance(optimizer, str):
        return options.optimizer_factory()
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        lr = float(options.lr if options.lr is not None else 1e-3)
        return lambda groups: optimizer(groups, lr=lr)  # type: ignore[call-arg]
    if isinstance(optimizer, Optimizer):
        fail("optimizer", "a name, a torch optimizer class or a function of param groups (fit builds it)",
             Described(f"a built {type(optimizer).__name__}"))  # fmt: skip
    if callable(optimizer):
        if lr_given:
            fail("lr", "unset when optimizer is a factory (the factory sets its own lr)", options.lr)
        return optimizer
    fail("optimizer", "a name, a torch optimizer class or a function of param groups", optimizer)


def _source(
    task: str | Dataset | nn.Module,
    *,
    model: str | nn.Module | None,
    model_options: Mapping[str, Any] | None,
    train: Iterable[Any] | None,
    val: Iterable[Any] | None,
    test: Iterable[Any] | None,
    num_classes: int | None,
    kind: str | None,
    options: RunOptions,
    adapter: Adapter | None,
    distributed: Distributed | None,
) -> tuple[Source, nn.Module, str]:
    """What to train on, the network, and the model's name."""
    if isinstance(task, nn.Module):
        if train is None or val is None:
            fail("train/val", "the batches of your own model's data (DataLoaders)", None)
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, low=2, high=10**7)
        if kind is not None:
            check_choice("kind", kind, ("classification", "regression"))
        elif num_classes is not None:
            kind = "classification"
        source = LoaderSource(
            type(task).__name__, train, val, test, kind, num_classes, options.train_eval_size
        )
        _, targets = first_batch(source.train, adapter)
        for name, batches in (("val", val), ("test", test)):
            if _known_empty(batches):  # said now, not after an epoch's training
                fail(name, "at least one batch", Described("an empty source"))
        if kind is None and not targets.is_floating_point():
            fail("num_classes", "the number of classes: your targets are class labels",
                 Described(f"None with {targets.dtype} targets"))  # fmt: skip
        if kind is None:
            source.kind = "regression"
        return source, task, type(task).__name__
    data = load_task(task, options.seed) if isinstance(task, str) else task
    if not isinstance(data, Dataset):
        fail("task", "a task name, a Dataset or an nn.Module", task)
    model_name = model if isinstance(model, str) else default_model(task, data)
    net = (
        model
        if isinstance(model, nn.Module)
        else start_model(task, model_name, data, model_options, options.seed)
    )
    batch_size = int(options.batch_size or 32)
    if distributed is not None:
        distributed.check_batch_size(batch_size)
    return TensorSource(data, batch_size, options.seed, options.train_eval_size, distributed), net, model_name


# fit's signature and docstring are the public API, 66 lines of the function; its body is 51.
def fit(
    task: str | Dataset | nn.Module,
    setting: Regularization | None = None,
    *,
    model: str | nn.Module | None = None,
    model_options: Mapping[str, Any] | None = None,
    train: Iterable[Any] | None = None,
    val: Iterable[Any] | None = None,
    test: Iterable[Any] | None = None,
    num_classes: int | None = None,
    kind: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    optimizer: str | type[Optimizer] | Callable[[list[dict[str, Any]]], Optimizer] = "adamw",
    lr: float | None = None,
    lr_schedule: str = "cosine",
    momentum: float = 0.9,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    metric: str | None = None,
    monitor: str = "val_loss",
    restore_best: bool = False,
    batch_to_inputs: Adapter | None = None,
    output: OutputFn | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    checkpoint_seconds: float = 10.0,
    train_eval_size: int = 2048,
    augment_options: Mapping[str, Any] | None = None,
    initial_weights: Mapping[str, Tensor] | None = None,
    on_epoch: Callable[[Mapping[str, float]], bool | None] | None = None,
    controller: Controller | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    deterministic: bool = False,
) -> History:
    """Train under ``setting`` (default: every technique off); return the epoch history.

    Args:
        task: a built-in task's name, a ``Dataset``, or the user's own ``nn.Module`` (then
            ``train`` and ``val`` are its batches: DataLoaders or any re-iterables of
            ``(x, y)`` tuples, dicts with ``labels``, or what ``batch_to_inputs`` reads;
            a dict goes to the model as its ``forward`` takes it, see
            ``regdial.training.batches``).
        num_classes, kind: for your own model: a classifier needs ``num_classes``;
            ``kind="regression"`` (or float targets) means mean squared error.
        model: a built-in model's name for a task or dataset (default: the task's).
        epochs, batch_size, lr: default to the task's. ``optimizer``: a name (adamw, adam,
            sgd, nadam, radam, rmsprop, adagrad), a torch optimizer class, or a function of
            ``param_groups`` returning an optimizer (it sets its own lr); ``lr_schedule``
            "cosine" (to 0 over the run, per step, relative to each group's lr) or
            "constant".
        loss_fn: ``loss_fn(output, batch) -> Tensor`` in place of the setting's
            cross-entropy/MSE (label smoothing is then yours to apply).
        metrics: ``{name: fn(outputs, targets) -> float}`` over each whole split;
            ``metric`` names the main one (default accuracy or RMSE) for tuning.
        monitor: what early stopping and the best weights follow (``"val_loss"``, or
            ``"val_" + metric``); higher is better for accuracy-like names.
        output: ``output(model_output) -> logits`` for a model whose output is not a
            tensor, a ``ModelOutput``/dict with ``logits`` or a tuple starting with them.
        restore_best: end with the best epoch's weights even without early stopping
            (early stopping always restores them).
        run_dir: where to write the run; None keeps everything in memory.
        resume: continue the run in ``run_dir`` from its last checkpoint; with more
            ``epochs`` than it started with, a completed run trains on to them (its cosine
            schedule stretched over the new length, see ``regdial.training.resume``).
        initial_weights: start from these weights (a warm start) instead of the seed's.
        on_epoch: called with each epoch's row; returning True stops the run ("pruned").
        controller: the dial turned from inside the run (see ``Controller``).
        device, precision, deterministic: see ``regdial.training.devices``.
    """
    setting = Regularization() if setting is None else setting
    if not isinstance(setting, Regularization):
        fail("setting", "a regdial.Regularization", setting)
    _check_arguments(model=model, model_options=model_options, loss_fn=loss_fn, metrics=metrics, metric=metric,
                     batch_to_inputs=batch_to_inputs, output=output, run_dir=run_dir,
                     augment_options=augment_options, initial_weights=initial_weights, on_epoch=on_epoch,
                     controller=controller)  # fmt: skip
    if isinstance(task, str) and task not in TASKS:
        check_choice("task", task, TASKS)
    spec = TASKS.get(task) if isinstance(task, str) else None
    optimizer_name = optimizer if isinstance(optimizer, str) else "adamw"
    options = RunOptions.parse(
        {
            "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer_name, "lr": lr,
            "lr_schedule": lr_schedule, "momentum": momentum, "seed": seed, "checkpoint_seconds": checkpoint_seconds,
            "train_eval_size": train_eval_size, "device": str(device), "precision": precision,
            "deterministic": deterministic, "monitor": monitor, "restore_best": restore_best,
        },
        "run",
    ).resolved(default_epochs(task), spec.batch_size if spec else 32, spec.lr if spec else 1e-3)  # fmt: skip
    factory = _optimizer_spec(optimizer, options, lr is not None)
    target, distributed = _devices(options)
    augment = dict(spec.augment_options if spec else {}) | dict(augment_options or {})
    directory = None if run_dir is None else Path(run_dir)
    if resume and directory is None:
        fail("resume", "a run directory to resume from", None)

    with torch.random.fork_rng(devices=[target] if target.type == "cuda" else []):
        torch.manual_seed(options.seed)
        source, net, model_name = _source(
            task, model=model, model_options=model_options, train=train, val=val, test=test,
            num_classes=num_classes, kind=kind, options=options, adapter=batch_to_inputs, distributed=distributed,
        )  # fmt: skip
        source.seed(options.seed)
        net = _unwrapped(net)
        net.to(target)
        if initial_weights is not None:
            net.load_state_dict(dict(initial_weights))
        run = Run(
            net=net, source=source, setting=setting, options=options, factory=factory, device=target,
            augment=augment, run_dir=directory, on_epoch=on_epoch, controller=controller, loss_fn=loss_fn,
            metrics=metrics, metric=metric, monitor=monitor, adapter=batch_to_inputs, distributed=distributed,
            restore_best=restore_best, output_fn=output,
        )  # fmt: skip
        if directory is not None and run.is_main:
            remove_orphans(directory)
            remove_orphans(directory / "checkpoints")
            if not resume and not (directory / "config.toml").exists():
                write_text(
                    directory / "config.toml", _config_toml(task, model_name, model_options, options, setting)
                )
        grown = resume and restore(run)
        if grown and directory is not None and run.is_main:  # resumed for longer: config.toml says how long
            write_text(
                directory / "config.toml", _config_toml(task, model_name, model_options, options, setting)
            )
        with ProgressBar(progress if run.is_main else False, options.epochs or 1, source.name) as bar:
            return run.train(bar)


def _known_empty(batches: object) -> bool:
    """Whether ``batches`` says it has no batch (a DataLoader over an iterable dataset
    without a length says nothing)."""
    try:
        return isinstance(batches, Sized) and len(batches) == 0
    except TypeError:
        return False


def _check_arguments(
    *, model: object, model_options: object, loss_fn: object, metrics: object, metric: object,
    batch_to_inputs: object, output: object, run_dir: object, augment_options: object, initial_weights: object,
    on_epoch: object, controller: object,
) -> None:  # fmt: skip
    """Every argument of ``fit`` that its options table does not check, where it enters."""
    if model is not None and not isinstance(model, str | nn.Module):
        fail("model", "a built-in model's name or an nn.Module", model)
    check_options("model_options", model_options)
    check_metrics("metrics", metrics)
    if metric is not None and not isinstance(metric, str):
        fail("metric", "a metric's name (accuracy, rmse, r2, loss or one of your metrics)", metric)
    for name, value in (("loss_fn", loss_fn), ("batch_to_inputs", batch_to_inputs), ("output", output),
                        ("on_epoch", on_epoch), ("controller", controller)):  # fmt: skip
        if value is not None and not callable(value):
            fail(name, "a function (or None)", value)
    if run_dir is not None:
        if not isinstance(run_dir, str | Path) or not str(run_dir):
            fail("run_dir", "a directory path", run_dir)
        if Path(run_dir).exists() and not Path(run_dir).is_dir():
            fail(
                "run_dir", "a directory (or a path to create one at)", Described(f"{str(run_dir)!r}, a file")
            )
    if augment_options is not None:
        check_options("augment_options", augment_options)
        known = option_names()
        for key in augment_options:  # type: ignore[attr-defined]
            if key not in known:
                raise unknown_key("augment_options", str(key), known)
    if initial_weights is not None and not (
        isinstance(initial_weights, Mapping) and all(isinstance(v, Tensor) for v in initial_weights.values())
    ):
        fail("initial_weights", "a state dict (names to tensors)", initial_weights)


def check_options(field: str, value: object) -> None:
    """``value`` is None or a table of keyword options with string keys."""
    if value is not None and not (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
        fail(field, "a dict of options by name", value)


def check_metrics(field: str, metrics: object) -> None:
    """``metrics`` is None or ``{name: fn(outputs, targets) -> float}``."""
    if metrics is None:
        return
    if not isinstance(metrics, Mapping):
        fail(field, "a dict {name: fn(outputs, targets) -> float}", metrics)
    for name, fn in metrics.items():
        if not isinstance(name, str) or not name or not callable(fn):
            fail(f"{field}[{name!r}]", "a function fn(outputs, targets) -> float", fn)


def _devices(options: RunOptions) -> tuple[torch.device, Distributed | None]:
    """The device this process trains on and, under ``torchrun``, the process group's view."""
    target = resolve_device(options.device)
    distributed = Distributed.current(target)
    if distributed is not None:
        target = distributed.device(target)
    use_deterministic(options.deterministic)
    return target, distributed


def _unwrapped(net: nn.Module) -> nn.Module:
    """The user's module: a DDP wrapper is taken off (``fit`` wraps it itself); FSDP is
    refused in one line (``fit`` trains data-parallel with DDP)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(net, DistributedDataParallel):
        inner: nn.Module = net.module
        return inner
    if any(cls.__name__ in ("FullyShardedDataParallel", "FSDPModule") for cls in type(net).__mro__):
        fail("model", "an unwrapped module (fit trains data-parallel with DDP; FSDP is not supported)",
             Described(type(net).__name__))  # fmt: skip
    return net


def _config_toml(
    task: object,
    model_name: str,
    model_options: Mapping[str, Any] | None,
    options: RunOptions,
    setting: Regularization,
) -> str:
    """The run's ``config.toml``: what ``regdial run`` reads back (the same tables)."""
    import tomli_w

    if isinstance(task, str):
        run = run_table(options, task=task, model=model_name)
    elif isinstance(task, Dataset) and task.path is not None:
        run = run_table(options, data=task.path, kind=task.kind, target=task.target, model=model_name)
    else:
        run = run_table(options, model=model_name)
    document: dict[str, Any] = {"run": run}
    if model_options:
        document["model"] = dict(model_options)
    document["regularization"] = setting.to_dict()
    return tomli_w.dumps(document)
