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

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from regdial._checks import Described, InputError, check_choice, check_int, fail
from regdial._io import DamagedFileError, remove_orphans, write_json, write_text
from regdial.applied import Applied, OptimizerSpec
from regdial.blocks.stopping import EarlyStopping
from regdial.setting import Regularization
from regdial.training.batches import Adapter, first_batch, forward, rebuild, split, to_device
from regdial.training.checkpoint import (
    describe,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from regdial.training.devices import Precision, resolve_device, rng_state, set_rng_state, use_deterministic
from regdial.training.distributed import Distributed
from regdial.training.history import History, higher_is_better
from regdial.training.metrics import LossFn, MetricFn, evaluate, main_metric
from regdial.training.options import RunOptions
from regdial.training.pretrained import start_model
from regdial.training.progress import Interrupt, ProgressBar
from regdial.training.source import LoaderSource, Source, TensorSource
from regdial.training.tasks import TASKS, Dataset, load_task

__all__ = ["Controller", "default_epochs", "default_model", "fit"]

logger = logging.getLogger(__name__)

Controller = Callable[[History, Applied], Regularization | None]
"""Called after each epoch with the history and the live ``Applied``; a setting it
returns is applied from the next epoch on. Give it ``state_dict``/``load_state_dict`` to
resume exactly."""

DEFAULT_MODELS = {"image": "cnn", "signal": "cnn1d", "tabular": "mlp"}
FINISHED = ("completed", "stopped early", "pruned")


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
            ``(x, y)`` tuples, dicts with ``labels``, or what ``batch_to_inputs`` reads).
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
        restore_best: end with the best epoch's weights even without early stopping
            (early stopping always restores them).
        run_dir: where to write the run; None keeps everything in memory.
        resume: continue the run in ``run_dir`` from its last checkpoint.
        initial_weights: start from these weights (a warm start) instead of the seed's.
        on_epoch: called with each epoch's row; returning True stops the run ("pruned").
        controller: the dial turned from inside the run (see ``Controller``).
        device, precision, deterministic: see ``regdial.training.devices``.
    """
    setting = Regularization() if setting is None else setting
    if not isinstance(setting, Regularization):
        fail("setting", "a regdial.Regularization", setting)
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
    target = resolve_device(options.device)
    distributed = Distributed.current(target)
    if distributed is not None:
        target = distributed.device(target)
    use_deterministic(options.deterministic)
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
        run = _Run(
            net=net, source=source, setting=setting, options=options, factory=factory, device=target,
            augment=augment, run_dir=directory, on_epoch=on_epoch, controller=controller, loss_fn=loss_fn,
            metrics=metrics, metric=metric, monitor=monitor, adapter=batch_to_inputs, distributed=distributed,
            restore_best=restore_best,
        )  # fmt: skip
        if directory is not None and (distributed is None or distributed.is_main):
            remove_orphans(directory)
            remove_orphans(directory / "checkpoints")
            if not resume and not (directory / "config.toml").exists():
                write_text(directory / "config.toml", _config_toml(task, source, model_name, model_options,
                                                                   options, setting))  # fmt: skip
        if resume:
            run.restore()
        with ProgressBar(progress if run.is_main else False, options.epochs or 1, source.name) as bar:
            return run.train(bar)


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
    source: Source,
    model_name: str,
    model_options: Mapping[str, Any] | None,
    options: RunOptions,
    setting: Regularization,
) -> str:
    """The run's ``config.toml``: what ``regdial run`` reads back (the same tables)."""
    import tomli_w

    run: dict[str, Any] = {}
    if isinstance(task, str):
        run["task"] = task
    elif isinstance(task, Dataset) and task.path is not None:
        run.update({"data": task.path, "kind": task.kind} | ({"target": task.target} if task.target else {}))
    run["model"] = model_name
    run.update(options.to_toml_dict())
    document: dict[str, Any] = {"run": run}
    if model_options:
        document["model"] = dict(model_options)
    document["regularization"] = setting.to_dict()
    return tomli_w.dumps(document)


class _Run:
    """One training run: the loop, and the state a checkpoint saves and restores.

    Each stateful piece saves itself: the model, the optimizer (and fp16's gradient
    scaler), ``Applied`` (the setting in force, schedules, weight average, early
    stopping), the best-weights tracker, the controller; the loop adds its position,
    the random states and the history.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        source: Source,
        setting: Regularization,
        options: RunOptions,
        factory: OptimizerSpec,
        device: torch.device,
        augment: Mapping[str, Any],
        run_dir: Path | None,
        on_epoch: Callable[[Mapping[str, float]], bool | None] | None,
        controller: Controller | None,
        loss_fn: LossFn | None,
        metrics: Mapping[str, MetricFn] | None,
        metric: str | None,
        monitor: str,
        adapter: Adapter | None,
        distributed: Distributed | None,
        restore_best: bool = False,
    ) -> None:
        self.restore_best = restore_best
        self.net, self.source, self.setting, self.options, self.device = net, source, setting, options, device
        self.run_dir, self.on_epoch, self.controller = run_dir, on_epoch, controller
        self.loss_fn, self.metrics, self.adapter, self.distributed = (
            loss_fn,
            dict(metrics or {}),
            adapter,
            distributed,
        )
        self.is_main = distributed is None or distributed.is_main
        self.precision = Precision.choose(options.precision, device)
        self.scaler = self.precision.scaler()
        self.metric = (metric or main_metric(source.kind)[0]).removeprefix("val_")
        if metric is not None and metric not in self.metrics and metric.removeprefix("val_") not in (
            "accuracy", "rmse", "r2", "loss"):  # fmt: skip
            fail(
                "metric",
                "one of your metrics (" + ", ".join(self.metrics) + ") or accuracy/rmse/r2/loss",
                metric,
            )
        mode = "max" if higher_is_better(monitor) else "min"
        self.applied = Applied(
            setting, net, factory, num_classes=source.num_classes, data_kind=source.input_kind, augment_options=augment,
            monitor=monitor, mode=mode,
        )  # fmt: skip
        for group in self.applied.optimizer.param_groups:
            group.setdefault("initial_lr", float(group["lr"]))  # the cosine schedule scales each group's own
        self.model: nn.Module = net
        if distributed is not None:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(net, device_ids=ids)
        self.monitor = monitor
        self.best = self.applied.early_stopping or EarlyStopping(
            patience=None, mode=mode, monitor=monitor, check_finite=False
        )
        self.history = History(
            source.kind, task=source.name, status="running", num_classes=source.num_classes, metric=self.metric,
            direction="maximize" if higher_is_better(self.metric) else "minimize", setting=setting.to_dict(),
            device=str(device), precision=self.precision.name,
            world=1 if distributed is None else distributed.world,
        )  # fmt: skip
        self.epoch, self.batch, self.step = 0, 0, 0
        self.running = {"loss": 0.0, "seen": 0.0}
        self.settings: dict[int, dict[str, Any]] = {}  # the setting in force during each epoch
        self.status, self.reason = "running", ""
        self.saved_epoch: int | None = None
        self.interrupt = Interrupt()
        self.stop_agreed = False  # data-parallel: a Ctrl-C any rank saw, agreed at the last step

    # -- the loop -----------------------------------------------------------------------

    def train(self, bar: ProgressBar) -> History:
        options = self.options
        epochs = int(options.epochs or 1)
        total_steps = epochs * self.source.steps_per_epoch()
        last_save = time.monotonic()
        with self.interrupt.installed():
            while self.epoch < epochs and self.status == "running":
                epoch = self.epoch + 1
                started = time.perf_counter()
                self.net.train()
                for index, batch, weight in self.source.batches(epoch, skip=self.batch):
                    value = self._step(
                        batch, weight, options.lr_at(self.step, total_steps) / float(options.lr or 1)
                    )
                    if not math.isfinite(value):
                        return self._diverged(epoch, index, value)
                    self.batch = index + 1
                    if self.stop_agreed if self.distributed is not None else self.interrupt.requested:
                        self.status, self.reason = (
                            "interrupted",
                            f"interrupted at epoch {epoch}, step {index + 1}",
                        )
                        self._checkpoint()
                        return self._finish()
                row = self._end_epoch(epoch, time.perf_counter() - started)
                bar.update(epoch, row, self.metric)
                now = time.monotonic()
                due = now - last_save >= options.checkpoint_seconds
                if self.distributed is not None:  # the clocks of the ranks differ: agree
                    due = self.distributed.any(due, self.device)
                if self.status != "running" or epoch == epochs or self.saved_epoch is None or due:
                    self._checkpoint()
                    last_save = now
        if self.status == "running":
            self.status = "completed"
        history = self._finish()
        if self.interrupt.requested and self.status != "interrupted":
            # Ctrl-C came after the last batch: the run is complete and saved, and the caller
            # (a search, a script) still learns that the user asked to stop.
            raise KeyboardInterrupt("Ctrl-C after the last batch; the run completed and was saved")
        return history

    def _step(self, batch: Any, weight: float, lr_factor: float) -> float:
        """One optimizer step on ``batch``; returns its loss (reduced across ranks)."""
        for group in self.applied.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor
        inputs, targets = split(batch, self.adapter)
        inputs, targets = to_device(inputs, self.device, True), targets.to(self.device, non_blocking=True)
        if isinstance(inputs, Tensor):
            inputs, targets = self.applied.batch(inputs, targets)
        elif self.applied.noise is not None or self.applied.mixer is not None or self.setting.augment:
            fail("regularization", "no input noise, mixing or augmentation for dict inputs (token ids)",
                 Described(", ".join(k for k in ("noise", "mixup", "cutmix", "augment")
                                     if getattr(self.setting, k))))  # fmt: skip
        with self.precision.autocast():
            output = forward(self.model, inputs)
            if self.loss_fn is not None:
                loss = self.loss_fn(output, rebuild(batch, inputs, targets))
            else:
                loss = self.applied.loss(output.float(), targets)
            if self.setting.penalties_in == "loss":
                loss = loss + self.applied.penalty()
        value = float(loss.detach())
        count = float(len(targets))
        if self.distributed is not None:  # every rank decides on the same numbers (Ctrl-C included)
            total, seen, stop = self.distributed.sum(
                [value * count * weight, count * weight, float(self.interrupt.requested)], self.device
            )
            value = total / seen if seen else value
            self.stop_agreed = stop > 0
        if not math.isfinite(value):
            return value
        optimizer = self.applied.optimizer
        optimizer.zero_grad(set_to_none=True)
        scaled = loss * weight if weight != 1.0 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()  # type: ignore[no-untyped-call]
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            scaled.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        self.step += 1
        self.running["loss"] += value * count
        self.running["seen"] += count
        return value

    def _scores(self, model: nn.Module, name: str) -> dict[str, float] | None:
        batches = self.source.split(name)
        if batches is None:
            return None
        limit = self.source.train_limit if name == "train" else None
        reducer = None
        if self.distributed is not None:
            distributed, device = self.distributed, self.device
            reducer = lambda values: distributed.sum(values, device)  # noqa: E731
        return evaluate(
            model, batches, self.source.num_classes, self.device, loss_fn=self.loss_fn, metrics=self.metrics,
            adapter=self.adapter, autocast=self.precision.autocast, limit=limit, reducer=reducer,
        )  # fmt: skip

    def _end_epoch(self, epoch: int, seconds: float) -> dict[str, float]:
        model = self.applied.eval_model
        train_stats, val_stats = self._scores(model, "train"), self._scores(model, "val")
        assert train_stats is not None and val_stats is not None
        norm, zeros = _weights_stats(model, self.applied.weights, self.net)
        row: dict[str, float] = {"epoch": epoch, "train_loss": train_stats["loss"], "val_loss": val_stats["loss"],
                                 "gap": val_stats["loss"] - train_stats["loss"]}  # fmt: skip
        for key, value in train_stats.items():
            if key not in ("loss", "count") and not key.endswith("_se"):
                row[f"train_{key}"] = value
                row[f"val_{key}"] = val_stats[key]
        for key, value in val_stats.items():
            if key.endswith("_se"):
                row[f"val_{key}"] = value
        row |= {"weight_norm": norm, "zero_fraction": zeros, "lr": float(self.applied.optimizer.param_groups[0]["lr"]),
                "seconds": seconds}  # fmt: skip
        self.history.append(row)
        self.settings[epoch] = self.applied.setting.to_dict()
        self.epoch, self.batch = epoch, 0
        self.running = {"loss": 0.0, "seen": 0.0}
        watched = row.get(self.monitor, math.nan)
        stop = self.applied.end_epoch(epoch, int(self.options.epochs or epoch), val_metric=watched)
        if self.best is not self.applied.early_stopping:
            self.best.step(watched, model)
        if stop:
            self.status, self.reason = "stopped early", self.best.message
        elif self.on_epoch is not None and self.on_epoch(row):
            self.status, self.reason = "pruned", f"stopped by the caller after epoch {epoch}"
        if self.controller is not None and self.status == "running":
            turned = self.controller(self.history, self.applied)
            if turned is not None and turned != self.applied.setting:
                self.applied.retune(turned)
                self.history.meta.setdefault("retunes", []).append(
                    {"epoch": epoch, "setting": turned.to_dict()}
                )
        return row

    def _diverged(self, epoch: int, index: int, value: float) -> History:
        steps = self.source.steps_per_epoch()
        self.status = "diverged"
        self.reason = f"non-finite training loss ({value}) at epoch {epoch}, step {index + 1} of {steps}"
        if self.saved_epoch is not None:
            kept = f"the last good checkpoint (after epoch {self.saved_epoch}) is kept"
        elif self.run_dir is not None:
            kept = "no checkpoint was written before it"
        else:
            kept = "nothing was saved (no run directory)"
        self.history.meta["kept"] = kept
        logger.warning("%s; %s", self.reason, kept)
        return self._finish(save_weights_now=False)

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole run's state: each piece's own ``state_dict`` and the loop's position."""
        rngs: dict[str, Any] = dict(rng_state(self.device))
        if self.distributed is not None:  # every rank's random state, so each resumes its own
            rngs = {"ranks": self.distributed.gather({k: v.tolist() for k, v in rngs.items()})}
        controller_state = getattr(self.controller, "state_dict", None)
        state = {
            "model": self.net.state_dict(),
            "optimizer": self.applied.optimizer.state_dict(),
            "applied": self.applied.state_dict(),
            "loop": {
                "epoch": self.epoch,
                "batch": self.batch,
                "step": self.step,
                "running": self.running,
                "status": self.status,
                "settings": {str(k): v for k, v in self.settings.items()},
                "rng": rngs,
                "options": self.options.to_toml_dict(),
                "setting": self.setting.to_dict(),
            },
            "history": self.history.to_dict(),
            "source": self.source.state_dict(),
        }
        if self.best is not self.applied.early_stopping:
            state["best"] = self.best.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if callable(controller_state):
            state["controller"] = controller_state()
        return state

    def _checkpoint(self) -> None:
        if self.run_dir is None:
            return
        state = self.state_dict()
        if self.is_main:
            save_checkpoint(self.run_dir / "checkpoints", state)
            self.history.save(self.run_dir)
        self.saved_epoch = self.epoch

    def restore(self) -> None:
        """Continue from the run directory's last checkpoint; a damaged one is one line."""
        assert self.run_dir is not None
        directory = self.run_dir / "checkpoints"
        if not has_checkpoint(directory):
            fail("resume", "a run directory with a checkpoint (checkpoints/last.json)", str(self.run_dir))
        state = load_checkpoint(directory)
        where = directory / "last.json"
        try:
            loop = state["loop"]
            for name, value in (
                ("options", self.options.to_toml_dict()),
                ("setting", self.setting.to_dict()),
            ):
                saved = loop[name]
                if saved != value:
                    key = next(k for k in {*saved, *value} if saved.get(k) != value.get(k))
                    fail("resume", f"the {name} the run started with ({key} = {saved.get(key)!r})",
                         Described(f"{key} = {value.get(key)!r}"))  # fmt: skip
            self.net.load_state_dict(state["model"])
            self.applied.optimizer.load_state_dict(state["optimizer"])
            self.applied.load_state_dict(state["applied"])
            if "best" in state:
                self.best.load_state_dict(state["best"])
            self.source.load_state_dict(state.get("source", {}))
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            controller_load = getattr(self.controller, "load_state_dict", None)
            if callable(controller_load) and "controller" in state:
                controller_load(state["controller"])
            self.epoch, self.batch, self.step = int(loop["epoch"]), int(loop["batch"]), int(loop["step"])
            self.running = {k: float(v) for k, v in loop["running"].items()}
            self.settings = {int(k): dict(v) for k, v in loop["settings"].items()}
            self.history = History.from_dict(state["history"], str(where))
            self.history.meta.update(device=str(self.device), precision=self.precision.name)
            rngs = loop["rng"]
            if "ranks" in rngs:
                mine = rngs["ranks"][self.distributed.rank if self.distributed else 0]
                rngs = {k: torch.tensor(v, dtype=torch.uint8) for k, v in mine.items()}
            set_rng_state(rngs, self.device)
        except InputError:  # a damaged file, or resuming with other options: already one line
            raise
        except ValueError as error:
            raise DamagedFileError(
                f"{where} must be a checkpoint of this run, got {describe(error)}"
            ) from None
        except (KeyError, TypeError, RuntimeError, AttributeError, IndexError) as error:
            raise DamagedFileError(
                f"{where} must be a checkpoint of this run (the model config.toml describes), got "
                f"{describe(error)}; start a new run"
            ) from None
        self.history.meta["status"] = "running"
        self.saved_epoch = self.epoch
        if loop["status"] in FINISHED:
            self.status = loop["status"]

    # -- the end ------------------------------------------------------------------------

    def _finish(self, save_weights_now: bool = True) -> History:
        if self.status in FINISHED:
            restored = self.applied.finish()  # early stopping's best weights back
            if self.restore_best and not restored and self.best.best_state is not None:
                self.applied.eval_model.load_state_dict(self.best.best_state)
        summary = self._summary()
        self.history.meta.update(status=self.status, reason=self.reason, summary=summary)
        if self.run_dir is not None and self.is_main:
            self.history.save(self.run_dir)
            if save_weights_now and self.status != "interrupted":
                checkpoints = self.run_dir / "checkpoints"
                save_weights(checkpoints / "final.safetensors", self.applied.eval_model.state_dict())
                if self.best.best_state is not None:
                    save_weights(checkpoints / "best.safetensors", self.best.best_state)
            write_json(self.run_dir / "summary.json", summary)
        self.applied.remove()
        return self.history

    def _scored(self, model: nn.Module, splits: tuple[str, ...]) -> dict[str, float]:
        scores: dict[str, float] = {}
        for name in splits:
            found = self._scores(model, name)
            for key, value in (found or {}).items():
                if key != "count":
                    scores[f"{name}_{key}"] = value
        return scores

    def _summary(self) -> dict[str, Any]:
        best_epoch = self.best.best_epoch
        summary: dict[str, Any] = {
            "task": self.history.meta.get("task"), "kind": self.history.kind, "status": self.status,
            "reason": self.reason, "epochs_run": self.epoch, "epochs": self.options.epochs, "best_epoch": best_epoch,
            "metric": self.metric, "monitor": self.monitor, "setting": self.setting.to_dict(),
            "device": str(self.device), "precision": self.precision.name,
            "seconds": sum(row.get("seconds", 0.0) for row in self.history.rows),
        }  # fmt: skip
        if "kept" in self.history.meta:
            summary["kept"] = self.history.meta["kept"]
        if self.status in ("diverged", "interrupted") or not self.history.rows:
            return summary
        model = self.applied.eval_model
        summary["final"] = self._scored(model, ("val", "test"))
        if self.best.best_state is not None and best_epoch is not None:
            # The best epoch's validation scores are its history row (the same weights).
            row = next(r for r in self.history.rows if r["epoch"] == best_epoch)
            current = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.best.best_state)
            summary["best"] = {k: v for k, v in row.items() if k.startswith("val_")} | self._scored(
                model, ("test",)
            )
            model.load_state_dict(current)
        if best_epoch in self.settings:
            summary["best_setting"] = self.settings[best_epoch]
        support = self.source.true_support
        if support is not None:
            summary["support"] = _support_scores(_selected_features(model), support)
        return summary


def _weights_stats(model: nn.Module, weights: list[Tensor], net: nn.Module) -> tuple[float, float]:
    """L2 norm and share of exact zeros of the regularized weights, measured on ``model``
    (the evaluated one: the EMA average when it is on, whose tensors mirror ``net``'s)."""
    if not weights:
        return 0.0, 0.0
    if model is not net:
        by_id = {id(p): name for name, p in net.named_parameters()}
        evaluated = dict(model.named_parameters())
        weights = [evaluated[by_id[id(w)]] for w in weights if by_id.get(id(w)) in evaluated]
    with torch.no_grad():
        squares = sum(float(w.detach().float().square().sum()) for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        count = sum(w.numel() for w in weights)
    return math.sqrt(squares), zeros / max(count, 1)


def _selected_features(model: nn.Module) -> list[int]:
    """Input features whose first-layer weights are not all exactly zero."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        return []
    return [int(i) for i in torch.nonzero(first.weight.detach().abs().sum(dim=0)).flatten()]


def _support_scores(selected: list[int], truth: tuple[int, ...]) -> dict[str, Any]:
    """How well the kept input features match the true support: precision, recall, F1."""
    chosen, actual = set(selected), set(truth)
    hits = len(chosen & actual)
    precision = hits / len(chosen) if chosen else 0.0
    recall = hits / len(actual) if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "selected": len(chosen), "true": len(actual), "precision": precision, "recall": recall, "f1": f1,
        "features": sorted(chosen),
    }  # fmt: skip
