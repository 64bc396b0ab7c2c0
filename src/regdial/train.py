"""``fit``: train a model under one setting of the dial and return its ``History``.

``fit`` trains a built-in task (``fit("digits-small", setting)``), a ``Dataset`` (the
user's own data from ``load_data``) or the user's own model with their own DataLoaders
(``fit(model, setting, train=..., val=..., num_classes=10)``). Each epoch it records,
in eval mode on clean data, the train and validation loss and metric (accuracy; RMSE and
R^2 for regression), the gap between them, the weights' norm and share of exact zeros,
the learning rate and the seconds taken.

With a run directory it also writes ``config.toml``, ``history.csv``/``.json``,
``summary.json`` and ``checkpoints/``; ``fit(..., run_dir=d, resume=True)`` continues
from the last checkpoint and ends with exactly the numbers an uninterrupted run gives
(the data order is a function of the seed and epoch, and the RNG state is saved).
Checkpoints are written at most every ``checkpoint_seconds`` at the end of an epoch,
and always at the end and on Ctrl-C (the first press stops after the current batch
and saves; a second press aborts). A non-finite loss stops the run with the epoch and
step; no checkpoint is written after it, so the last good one stays.

On CPU, the same seed gives the same numbers.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regdial._checks import Described, check_choice, check_int, check_range, fail
from regdial._io import write_json, write_text
from regdial.applied import Applied
from regdial.checkpoint import (
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    rng_from_text,
    rng_to_text,
    save_checkpoint,
    save_weights,
)
from regdial.history import History
from regdial.models import build_model
from regdial.setting import Regularization
from regdial.tasks import TASKS, Dataset, load_task

__all__ = ["RunOptions", "evaluate", "fit"]

logger = logging.getLogger(__name__)

Batches = Iterable[tuple[Tensor, Tensor]]

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


@dataclass(frozen=True)
class RunOptions:
    """The training choices that are not regularization; all checked here."""

    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    seed: int = 0
    checkpoint_seconds: float = 10.0
    train_eval_size: int = 2048

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_choice("optimizer", self.optimizer, ("adamw", "sgd"))
        check_range("lr", self.lr, low=0.0, low_open=True)
        check_choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        check_range("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_int("seed", self.seed, low=0)
        check_range("checkpoint_seconds", self.checkpoint_seconds, low=0.0)
        check_int("train_eval_size", self.train_eval_size, low=1)

    def optimizer_factory(self) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
        if self.optimizer == "sgd":
            return lambda groups: torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        return lambda groups: torch.optim.AdamW(groups, lr=self.lr, weight_decay=0.0)

    def lr_at(self, step: int, total: int) -> float:
        if self.lr_schedule == "constant" or total <= 0:
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


# -- evaluation -------------------------------------------------------------------------


def _tensor_batches(x: Tensor, y: Tensor, size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(x), size):
        yield x[start : start + size], y[start : start + size]


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Batches, num_classes: int | None, device: torch.device
) -> dict[str, float]:
    """Loss and metrics of ``model`` in eval mode over ``batches``.

    Classification: mean cross-entropy and accuracy. Regression: mean squared error,
    RMSE and R^2 (``1 - SSE/SST`` with this split's own mean).
    """
    was_training = model.training
    model.eval()
    total_loss, count, correct = 0.0, 0, 0
    targets: list[Tensor] = []
    squared = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        output = model(x)
        if num_classes is None:
            prediction = output.reshape(y.shape).float()
            errors = (prediction - y.float()).square().sum().item()
            squared += errors
            total_loss += errors
            targets.append(y.float().cpu())
        else:
            total_loss += F.cross_entropy(output, y, reduction="sum").item()
            correct += int((output.argmax(dim=1) == y).sum())
        count += len(y)
    model.train(was_training)
    if count == 0:
        fail("data", "at least one sample to evaluate", Described("an empty split"))
    if num_classes is not None:
        return {"loss": total_loss / count, "accuracy": correct / count}
    values = torch.cat(targets)
    spread = float((values - values.mean()).square().sum())
    return {
        "loss": squared / count,
        "rmse": math.sqrt(squared / count),
        "r2": 1.0 - squared / spread if spread > 0 else float("nan"),
    }


# -- the run ------------------------------------------------------------------------------


class _Interrupt:
    """First Ctrl-C: stop after this batch and save. Second: abort at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("stopping after this batch to save a checkpoint (Ctrl-C again to abort)")

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class _Progress:
    """A rich progress bar when the output is a terminal; otherwise silence."""

    def __init__(self, enabled: bool | None, total: int, title: str) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.total, self.title = total, title
        self._bar: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=self.console, transient=False,
            )  # fmt: skip
            self._bar.__enter__()
            self._task = self._bar.add_task(self.title, total=self.total, stats="")
        return self

    def update(self, epoch: int, row: Mapping[str, float], metric: str) -> None:
        if self._bar is not None:
            stats = (
                f"train {row['train_loss']:.3f}  val {row['val_loss']:.3f}  gap {row['gap']:+.3f}  "
                f"val {metric} {row[f'val_{metric}']:.3f}"
            )
            self._bar.update(self._task, completed=epoch, stats=stats)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _weights_stats(weights: list[Tensor]) -> tuple[float, float]:
    if not weights:
        return 0.0, 0.0
    with torch.no_grad():
        squares = sum(float(w.detach().float().square().sum()) for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        count = sum(w.numel() for w in weights)
    return math.sqrt(squares), zeros / count


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


def _config_toml(
    task: str, model: str, model_options: Mapping[str, Any], options: RunOptions, setting: Regularization
) -> str:
    import tomli_w

    run = {"task": task, "model": model, **{k: getattr(options, k) for k in RunOptions.__dataclass_fields__}}
    document: dict[str, Any] = {"run": run}
    if model_options:
        document["model"] = dict(model_options)
    document["regularization"] = setting.to_dict()
    return tomli_w.dumps(document)


def fit(
    task: str | Dataset | nn.Module,
    setting: Regularization | None = None,
    *,
    model: str | nn.Module | None = None,
    model_options: Mapping[str, Any] | None = None,
    train: Batches | None = None,
    val: Batches | None = None,
    test: Batches | None = None,
    num_classes: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    optimizer: str = "adamw",
    lr: float | None = None,
    lr_schedule: str = "cosine",
    seed: int = 0,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    checkpoint_seconds: float = 10.0,
    augment_options: Mapping[str, Any] | None = None,
    initial_weights: Mapping[str, Tensor] | None = None,
    on_epoch: Callable[[Mapping[str, float]], bool | None] | None = None,
    controller: Callable[[History, Applied], Regularization | None] | None = None,
    device: str | torch.device = "cpu",
) -> History:
    """Train under ``setting`` (default: every technique off); return the epoch history.

    Args:
        task: a built-in task's name, a ``Dataset``, or the user's own ``nn.Module``
            (then ``train`` and ``val`` are its batches: DataLoaders or any iterables
            of ``(x, y)``, and ``num_classes`` says it is a classifier).
        model: a built-in model's name for a task or dataset (default: the task's).
        epochs, batch_size, lr: default to the task's; ``optimizer`` "adamw" or "sgd";
            ``lr_schedule`` "cosine" (to 0 over the run, per step) or "constant".
        run_dir: where to write the run; None keeps everything in memory.
        resume: continue the run in ``run_dir`` from its last checkpoint.
        initial_weights: start from these weights (a warm start) instead of the seed's.
        on_epoch: called with each epoch's row; returning True stops the run ("pruned").
        controller: called after each epoch with the history and the live ``Applied``; a
            setting it returns is applied from the next epoch on (``Applied.retune``): the
            dial turned from inside the run. The summary's ``best_setting`` is the setting
            in force at the best epoch.
    """
    setting = Regularization() if setting is None else setting
    if not isinstance(setting, Regularization):
        fail("setting", "a regdial.Regularization", setting)
    device = torch.device(device)
    spec = TASKS.get(task) if isinstance(task, str) else None
    if isinstance(task, str) and spec is None:
        check_choice("task", task, TASKS)
    options = RunOptions(
        epochs=epochs if epochs is not None else default_epochs(task),
        batch_size=batch_size if batch_size is not None else (spec.batch_size if spec else 32),
        optimizer=optimizer,
        lr=lr if lr is not None else (spec.lr if spec else 1e-3),
        lr_schedule=lr_schedule,
        seed=seed,
        checkpoint_seconds=checkpoint_seconds,
    )
    augment = dict(spec.augment_options if spec else {}) | dict(augment_options or {})

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(options.seed)
        data: Dataset | None = None
        if isinstance(task, nn.Module):
            if train is None or val is None:
                fail("train/val", "the batches of your own model's data (DataLoaders)", None)
            net, model_name, data_name = task, type(task).__name__, type(task).__name__
            kind_classes = num_classes
            input_kind = None
        else:
            data = load_task(task, options.seed) if isinstance(task, str) else task
            if not isinstance(data, Dataset):
                fail("task", "a task name, a Dataset or an nn.Module", task)
            model_name = model if isinstance(model, str) else default_model(task, data)
            net = (
                model
                if isinstance(model, nn.Module)
                else build_model(model_name, data, dict(model_options or {}), seed=options.seed)
            )
            data_name, kind_classes, input_kind = data.name, data.num_classes, data.input_kind
            if data.kind == "regression":
                kind_classes = None
        net.to(device)
        if initial_weights is not None:
            net.load_state_dict(dict(initial_weights))
        run = _Run(
            net=net, data=data, train=train, val=val, test=test, num_classes=kind_classes, input_kind=input_kind,
            setting=setting, options=options, device=device, augment=augment,
            run_dir=None if run_dir is None else Path(run_dir), on_epoch=on_epoch, controller=controller,
        )  # fmt: skip
        if run.run_dir is not None and not resume and not (run.run_dir / "config.toml").exists():
            write_text(
                run.run_dir / "config.toml",
                _config_toml(data_name, model_name, dict(model_options or {}), options, setting),
            )
        if resume:
            if run.run_dir is None:
                fail("resume", "a run directory to resume from", None)
            run.restore()
        with _Progress(progress, options.epochs, data_name) as bar:
            return run.train(bar)


class _Run:
    """The state of one training run, which a checkpoint saves and restores."""

    def __init__(
        self,
        *,
        net: nn.Module,
        data: Dataset | None,
        train: Batches | None,
        val: Batches | None,
        test: Batches | None,
        num_classes: int | None,
        input_kind: str | None,
        setting: Regularization,
        options: RunOptions,
        device: torch.device,
        augment: Mapping[str, Any],
        run_dir: Path | None,
        on_epoch: Callable[[Mapping[str, float]], bool | None] | None,
        controller: Callable[[History, Applied], Regularization | None] | None = None,
    ) -> None:
        self.net, self.data, self.setting, self.options, self.device = net, data, setting, options, device
        self.controller = controller
        self.settings: dict[int, Regularization] = {}  # the setting in force during each epoch
        self.num_classes, self.run_dir, self.on_epoch = num_classes, run_dir, on_epoch
        self.loaders = (train, val, test)
        self.applied: Applied = setting.apply(
            net,
            options.optimizer_factory(),
            num_classes=num_classes,
            data_kind=input_kind,
            augment_options=augment,
        )
        kind = "classification" if num_classes is not None else "regression"
        self.history = History(
            kind, task=data.name if data else type(net).__name__, status="running", num_classes=num_classes
        )
        self.epoch, self.batch, self.step = 0, 0, 0
        self.running = {"loss": 0.0, "seen": 0}
        self.best: dict[str, Any] = {"epoch": None, "val_loss": math.inf}
        self.best_state: dict[str, Tensor] | None = None
        self.status, self.reason = "running", ""
        self.interrupt = _Interrupt()
        if data is not None:
            generator = torch.Generator().manual_seed(options.seed)
            subset = torch.randperm(len(data.x_train), generator=generator)[: options.train_eval_size]
            self.train_eval = (data.x_train[subset], data.y_train[subset])

    # -- batches ------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[int, tuple[Tensor, Tensor]]]:
        """(index, batch) pairs of an epoch from batch ``skip`` on; the order depends only on
        the seed and the epoch, so a resumed run sees the same batches."""
        if self.data is None:
            assert self.loaders[0] is not None
            for index, batch in enumerate(self.loaders[0]):
                if index >= skip:
                    yield index, batch
            return
        generator = torch.Generator().manual_seed(self.options.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data.x_train), generator=generator)
        chunks = torch.split(order, self.options.batch_size)
        for index in range(skip, len(chunks)):
            rows = chunks[index]
            yield index, (self.data.x_train[rows], self.data.y_train[rows])

    def _steps_per_epoch(self) -> int:
        if self.data is not None:
            return math.ceil(len(self.data.x_train) / self.options.batch_size)
        loader = self.loaders[0]
        return len(loader) if hasattr(loader, "__len__") else 0  # type: ignore[arg-type]

    def _split(self, name: str) -> Batches | None:
        size = 1024
        if self.data is None:
            return {"train": self.loaders[0], "val": self.loaders[1], "test": self.loaders[2]}[name]
        if name == "train":
            return _tensor_batches(*self.train_eval, size)
        if name == "val":
            return _tensor_batches(self.data.x_val, self.data.y_val, size)
        if self.data.x_test is None or self.data.y_test is None:
            return None
        return _tensor_batches(self.data.x_test, self.data.y_test, size)

    # -- the loop -----------------------------------------------------------------------

    def train(self, bar: _Progress) -> History:
        options = self.options
        total_steps = options.epochs * self._steps_per_epoch()
        last_save = time.monotonic()
        metric = self.history.metric
        with self.interrupt.installed():
            while self.epoch < options.epochs and self.status == "running":
                epoch = self.epoch + 1
                started = time.perf_counter()
                self.net.train()
                for index, (x, y) in self._epoch_batches(epoch, skip=self.batch):
                    lr = options.lr_at(self.step, total_steps)
                    for group in self.applied.optimizer.param_groups:
                        group["lr"] = lr
                    x, y = x.to(self.device), y.to(self.device)
                    x, y = self.applied.batch(x, y)
                    loss = self.applied.loss(self.net(x), y)
                    if self.setting.penalties_in == "loss":
                        loss = loss + self.applied.penalty()
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        return self._diverged(epoch, index, value)
                    self.applied.optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    self.applied.optimizer.step()
                    self.step += 1
                    self.batch = index + 1
                    self.running["loss"] += value * len(y)
                    self.running["seen"] += len(y)
                    if self.interrupt.requested:
                        self.status, self.reason = (
                            "interrupted",
                            f"interrupted at epoch {epoch}, step {index + 1}",
                        )
                        self._checkpoint()
                        return self._finish()
                row = self._end_epoch(epoch, time.perf_counter() - started)
                bar.update(epoch, row, metric)
                now = time.monotonic()
                if (
                    self.status != "running"
                    or epoch == options.epochs
                    or now - last_save >= options.checkpoint_seconds
                ):
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

    def _end_epoch(self, epoch: int, seconds: float) -> dict[str, float]:
        model = self.applied.eval_model
        train_split, val_split = self._split("train"), self._split("val")
        assert train_split is not None and val_split is not None
        train_stats = evaluate(model, train_split, self.num_classes, self.device)
        val_stats = evaluate(model, val_split, self.num_classes, self.device)
        norm, zeros = _weights_stats(self.applied.weights)
        row: dict[str, float] = {
            "epoch": epoch,
            "train_loss": train_stats["loss"],
            "val_loss": val_stats["loss"],
            "gap": val_stats["loss"] - train_stats["loss"],
            "weight_norm": norm,
            "zero_fraction": zeros,
            "lr": float(self.applied.optimizer.param_groups[0]["lr"]),
            "seconds": seconds,
        }
        for key, value in train_stats.items():
            if key != "loss":
                row[f"train_{key}"] = value
                row[f"val_{key}"] = val_stats[key]
        self.history.append(row)
        self.settings[epoch] = self.applied.setting
        self.epoch, self.batch = epoch, 0
        self.running = {"loss": 0.0, "seen": 0}
        if math.isfinite(val_stats["loss"]) and val_stats["loss"] < self.best["val_loss"]:
            self.best = {"epoch": epoch, "val_loss": val_stats["loss"]}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if self.applied.end_epoch(epoch, self.options.epochs, val_metric=val_stats["loss"]):
            stopper = self.applied.early_stopping
            self.status, self.reason = "stopped early", stopper.message if stopper else ""
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
        steps = self._steps_per_epoch()
        self.status = "diverged"
        self.reason = f"non-finite training loss ({value}) at epoch {epoch}, step {index + 1} of {steps}"
        logger.warning("%s; the last good checkpoint is kept", self.reason)
        return self._finish(save_weights_now=False)

    # -- checkpoints ----------------------------------------------------------------------

    def _checkpoint(self) -> None:
        if self.run_dir is None:
            return
        optimizer_tensors, optimizer_plain = optimizer_state(self.applied.optimizer)
        tensors: dict[str, Mapping[str, Tensor]] = {
            "model": self.net.state_dict(),
            "optimizer": optimizer_tensors,
        }
        if self.applied.ema is not None:
            tensors["ema"] = self.applied.ema.state_dict()
        if self.best_state is not None:
            tensors["best"] = self.best_state
        stopper = self.applied.early_stopping
        if stopper is not None and stopper.best_state is not None:
            tensors["early"] = stopper.best_state
        state = {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "running": self.running,
            "rng": rng_to_text(torch.get_rng_state()),
            "optimizer": optimizer_plain,
            "ema_updates": self.applied.ema._updates[0] if self.applied.ema is not None else 0,
            "early_stopping": stopper.state_dict() if stopper is not None else None,
            "best": self.best,
            "status": self.status,
            "history": self.history.to_dict(),
        }
        save_checkpoint(self.run_dir / "checkpoints", tensors, state)
        self.history.save(self.run_dir)

    def restore(self) -> None:
        assert self.run_dir is not None
        tensors, state = load_checkpoint(self.run_dir / "checkpoints")
        self.net.load_state_dict(tensors["model"])
        load_optimizer_state(self.applied.optimizer, tensors.get("optimizer", {}), state["optimizer"])
        if self.applied.ema is not None and "ema" in tensors:
            self.applied.ema.load_state_dict(tensors["ema"])
            self.applied.ema._updates[0] = int(state["ema_updates"])
        stopper = self.applied.early_stopping
        if stopper is not None and state["early_stopping"] is not None:
            stopper.load_state_dict(state["early_stopping"])
            stopper.best_state = tensors.get("early")
        self.best_state = tensors.get("best")
        self.best = dict(state["best"])
        self.epoch, self.batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self.running = dict(state["running"])
        self.history = History.from_dict(state["history"])
        self.history.meta["status"] = "running"
        if self.epoch > 0:
            self.applied.end_epoch(self.epoch, self.options.epochs)  # schedules to where they were
        torch.set_rng_state(rng_from_text(state["rng"]))
        if state["status"] in ("completed", "stopped early", "pruned"):
            self.status = state["status"]

    # -- the end ------------------------------------------------------------------------

    def _finish(self, save_weights_now: bool = True) -> History:
        if self.status in ("completed", "stopped early", "pruned"):
            self.applied.finish()  # early stopping's best weights back
        summary = self._summary()
        self.history.meta.update(status=self.status, reason=self.reason, summary=summary)
        if self.run_dir is not None:
            self.history.save(self.run_dir)
            if save_weights_now and self.status != "interrupted":
                save_weights(
                    self.run_dir / "checkpoints" / "final.safetensors", self.applied.eval_model.state_dict()
                )
                if self.best_state is not None:
                    save_weights(self.run_dir / "checkpoints" / "best.safetensors", self.best_state)
            write_json(self.run_dir / "summary.json", summary)
        self.applied.remove()
        return self.history

    def _scores(self, model: nn.Module, splits: tuple[str, ...] = ("val", "test")) -> dict[str, float]:
        scores: dict[str, float] = {}
        for split in splits:
            batches = self._split(split)
            if batches is not None:
                for key, value in evaluate(model, batches, self.num_classes, self.device).items():
                    scores[f"{split}_{key}"] = value
        return scores

    def _summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "task": self.history.meta.get("task"),
            "kind": self.history.kind,
            "status": self.status,
            "reason": self.reason,
            "epochs_run": self.epoch,
            "epochs": self.options.epochs,
            "best_epoch": self.best["epoch"],
            "setting": self.setting.to_dict(),
            "seconds": sum(row["seconds"] for row in self.history.rows),
        }
        if self.status in ("diverged", "interrupted") or not self.history.rows:
            return summary
        summary["final"] = self._scores(self.applied.eval_model)
        if self.best_state is not None:
            # The best epoch's validation scores are its history row (the same weights).
            row = next(r for r in self.history.rows if r["epoch"] == self.best["epoch"])
            current = {k: v.detach().clone() for k, v in self.applied.eval_model.state_dict().items()}
            self.applied.eval_model.load_state_dict(self.best_state)
            summary["best"] = {k: v for k, v in row.items() if k.startswith("val_")} | self._scores(
                self.applied.eval_model, ("test",)
            )
            self.applied.eval_model.load_state_dict(current)
        if self.best["epoch"] in self.settings:
            summary["best_setting"] = self.settings[self.best["epoch"]].to_dict()
        if self.data is not None and self.data.true_support is not None:
            summary["support"] = _support_scores(
                _selected_features(self.applied.eval_model), self.data.true_support
            )
        return summary
