"""The training loop: ``Run`` trains epoch by epoch, step by step, and ends the run.

One ``Run`` is one call of ``fit`` once its arguments are checked: it applies the setting,
wraps the model for data parallelism, and then, each epoch, takes the optimizer steps
(``step``: the setting's batch transforms, the loss and penalty, fp16's scaler), measures
the epoch on clean data (``end_epoch``), lets early stopping, the caller and a controller
act on it, and checkpoints (``regdial.training.resume``). It ends on completion, early
stopping, a caller's stop, Ctrl-C (saved, resumable) or a non-finite loss (the last good
checkpoint kept), and writes the summary (``regdial.training.summary``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from regdial._checks import Described, fail
from regdial._io import write_json
from regdial.applied import Applied, OptimizerSpec
from regdial.blocks.noise import dropout_sites
from regdial.blocks.stopping import EarlyStopping
from regdial.setting import Regularization
from regdial.training import resume
from regdial.training.batches import Adapter, OutputFn, forward, rebuild, split, to_device
from regdial.training.checkpoint import save_weights
from regdial.training.devices import Precision
from regdial.training.distributed import Distributed
from regdial.training.history import History, higher_is_better
from regdial.training.loop_state import FINISHED, LoopState
from regdial.training.metrics import (
    LossFn,
    MetricFn,
    check_labels,
    check_logits,
    checked_loss,
    evaluate,
    main_metric,
)
from regdial.training.options import RunOptions
from regdial.training.progress import Interrupt, ProgressBar
from regdial.training.source import Source
from regdial.training.summary import summary, weights_stats

__all__ = ["Controller", "Run", "StepController"]

logger = logging.getLogger(__name__)

Controller = Callable[[History, Applied], Regularization | None]
"""Called after each epoch with the history and the live ``Applied``; a setting it
returns is applied from the next epoch on. Give it ``state_dict``/``load_state_dict`` to
resume exactly."""


class StepController(Protocol):
    """A controller that also acts after optimizer steps: ``after_step(run, inputs,
    targets)`` is called after each step with the step's clean batch (before noise,
    augmentation and mixing), and a setting it returns is applied from the next step on.
    A controller without ``after_step`` costs the loop nothing per step."""

    def after_step(self, run: Run, inputs: Any, targets: Tensor) -> Regularization | None: ...


class Run:
    """One training run: its pieces (each saves itself, see ``regdial.training.resume``),
    the loop's own state (``loop``) and the loop."""

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
        output_fn: OutputFn | None = None,
    ) -> None:
        self.restore_best = restore_best
        self.output_fn = output_fn
        self.net, self.source, self.setting, self.options, self.device = net, source, setting, options, device
        self.run_dir, self.on_epoch, self.controller = run_dir, on_epoch, controller
        after_step = getattr(controller, "after_step", None)
        self.after_step: Callable[[Run, Any, Tensor], Regularization | None] | None = (
            after_step if callable(after_step) else None
        )
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
        if not dropout_sites(net):  # the diagnosis then advises no dropout (it would turn nothing)
            self.history.meta["no_dropout"] = True
        to_dict = getattr(getattr(controller, "space", None), "to_dict", None)
        if callable(to_dict):  # the ranges a controller's strengths stay in (the advice does too)
            self.history.meta["space"] = to_dict()
        self.loop = LoopState()
        self.trained_with = setting  # the setting of the last optimizer step
        self.reason = ""
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
            while self.loop.epoch < epochs and self.loop.status == "running":
                epoch = self.loop.epoch + 1
                started = time.perf_counter()
                self.net.train()
                for index, batch, weight in self.source.batches(epoch, skip=self.loop.batch):
                    value = self.step(
                        batch, weight, options.lr_at(self.loop.step, total_steps) / float(options.lr or 1)
                    )
                    if not math.isfinite(value):
                        return self._diverged(epoch, index, value)
                    self.loop.batch = index + 1
                    if self.stop_agreed if self.distributed is not None else self.interrupt.requested:
                        self.loop.status, self.reason = (
                            "interrupted",
                            f"interrupted at epoch {epoch}, step {index + 1}",
                        )
                        resume.save(self)
                        return self._finish()
                row = self.end_epoch(epoch, time.perf_counter() - started)
                bar.update(epoch, row, self.metric)
                now = time.monotonic()
                due = now - last_save >= options.checkpoint_seconds
                if self.distributed is not None:  # the clocks of the ranks differ: agree
                    due = self.distributed.any(due, self.device)
                if self.loop.status != "running" or epoch == epochs or self.saved_epoch is None or due:
                    resume.save(self)
                    last_save = now
        if self.loop.status == "running":
            self.loop.status = "completed"
        history = self._finish()
        if self.interrupt.requested and self.loop.status != "interrupted":
            # Ctrl-C came after the last batch: the run is complete and saved, and the caller
            # (a search, a script) still learns that the user asked to stop.
            raise KeyboardInterrupt("Ctrl-C after the last batch; the run completed and was saved")
        return history

    def step(self, batch: Any, weight: float, lr_factor: float) -> float:
        """One optimizer step on ``batch``; returns its loss (reduced across ranks)."""
        for group in self.applied.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor
        inputs, targets = split(batch, self.adapter)
        num_classes = self.source.num_classes
        if num_classes is not None and self.loop.step == 0 and self.loss_fn is None:
            check_labels(targets, num_classes)  # once, on the host: the first batch's labels
        inputs, targets = to_device(inputs, self.device, True), targets.to(self.device, non_blocking=True)
        clean = inputs, targets
        if isinstance(inputs, Tensor):
            inputs, targets = self.applied.batch(inputs, targets)
        elif self.applied.noise is not None or self.applied.mixer is not None or self.setting.augment:
            fail("regularization", "no input noise, mixing or augmentation for dict inputs (token ids)",
                 Described(", ".join(k for k in ("noise", "mixup", "cutmix", "augment")
                                     if getattr(self.setting, k))))  # fmt: skip
        with self.precision.autocast():
            output = forward(self.model, inputs, self.output_fn)
            if num_classes is not None and self.loss_fn is None and not targets.is_floating_point():
                check_logits(output, targets, num_classes)  # soft targets (mixing) are the setting's own
            if self.loss_fn is not None:
                loss = checked_loss(self.loss_fn(output, rebuild(batch, inputs, targets)))
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
        self.loop.step += 1
        self.loop.running["loss"] += value * count
        self.loop.running["seen"] += count
        self.trained_with = self.applied.setting  # a turn after the step applies from the next
        if self.after_step is not None:
            turned = self.after_step(self, *clean)
            if turned is not None and turned != self.applied.setting:
                self.applied.retune(turned)
        return value

    def scores(self, model: nn.Module, name: str) -> dict[str, float] | None:
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
            adapter=self.adapter, output_fn=self.output_fn, autocast=self.precision.autocast, limit=limit,
            reducer=reducer, field=name,
        )  # fmt: skip

    def end_epoch(self, epoch: int, seconds: float) -> dict[str, float]:
        model = self.applied.eval_model
        train_stats, val_stats = self.scores(model, "train"), self.scores(model, "val")
        assert train_stats is not None and val_stats is not None
        norm, zeros = weights_stats(model, self.applied.weights, self.net)
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
        self.loop.end_epoch(epoch, self.trained_with.to_dict())
        watched = row.get(self.monitor, math.nan)
        tiebreak = None if self.monitor == "val_loss" else row["val_loss"]  # an accuracy's ties
        stop = self.applied.end_epoch(
            epoch, int(self.options.epochs or epoch), val_metric=watched, tiebreak=tiebreak
        )
        if self.best is not self.applied.early_stopping:
            self.best.step(watched, model, tiebreak=tiebreak)
        # The caller sees every epoch's row, the one early stopping ends on too (a search
        # counts it: its trials' epochs were one short of their histories').
        caller_stops = self.on_epoch is not None and bool(self.on_epoch(row))
        if stop:
            self.loop.status, self.reason = "stopped early", self.best.message
        elif caller_stops:
            self.loop.status, self.reason = "pruned", f"stopped by the caller after epoch {epoch}"
        if self.controller is not None and self.loop.status == "running":
            turned = self.controller(self.history, self.applied)
            if turned is not None and turned != self.applied.setting:
                self.applied.retune(turned)
                self.history.meta.setdefault("retunes", []).append(
                    {"epoch": epoch, "setting": turned.to_dict()}
                )
        return row

    def _diverged(self, epoch: int, index: int, value: float) -> History:
        steps = self.source.steps_per_epoch()
        self.loop.status = "diverged"
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

    # -- the end ------------------------------------------------------------------------

    def _finish(self, save_weights_now: bool = True) -> History:
        if self.loop.status in FINISHED:
            restored = self.applied.finish(check_applied=False)  # early stopping's best weights back
            if self.restore_best and not restored and self.best.best_state is not None:
                self.applied.eval_model.load_state_dict(self.best.best_state)
        said = summary(self)
        self.history.meta.update(status=self.loop.status, reason=self.reason, summary=said)
        if self.run_dir is not None and self.is_main:
            self.history.save(self.run_dir)
            if save_weights_now and self.loop.status != "interrupted":
                checkpoints = self.run_dir / "checkpoints"
                save_weights(checkpoints / "final.safetensors", self.applied.eval_model.state_dict())
                if self.best.best_state is not None:
                    save_weights(checkpoints / "best.safetensors", self.best.best_state)
            write_json(self.run_dir / "summary.json", said)
        self.applied.remove()
        return self.history
