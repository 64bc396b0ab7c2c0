"""What both trainer callbacks share: wiring a setting into a trainer's optimizer, the
evaluated weights (EMA), early stopping, the History rows and the end-of-run files.

A trainer builds its own optimizer before any callback can act. ``regroup`` rebuilds its
parameter groups in place (before the first step, when no state exists) along
``param_groups``' split, keeping every hyperparameter the trainer chose, so that weight
decay, the proximal penalties and max-norm act on the weights only. ``Session`` then
applies the setting through ``Applied`` and keeps what a run records.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from regdial._checks import Described, fail
from regdial.applied import Applied
from regdial.blocks.groups import param_groups
from regdial.blocks.stopping import EarlyStopping
from regdial.dial.trial import Trial
from regdial.integrations._resume import AsBuilt, per_group_lists
from regdial.setting import Regularization
from regdial.training.history import History, higher_is_better

__all__ = [
    "CONFIG_DROPOUT",
    "Session",
    "check_dropout",
    "regroup",
    "set_config_dropout",
    "sets_weight_decay",
    "unwrap",
]

logger = logging.getLogger("regdial.integrations")

CONFIG_DROPOUT = (
    "hidden_dropout_prob", "attention_probs_dropout_prob", "hidden_dropout", "attention_dropout", "dropout",
    "activation_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout", "summary_first_dropout",
    "dropout_rate",
)  # fmt: skip
"""Configuration fields through which Hugging Face models read their dropout rates."""


def set_config_dropout(model: nn.Module, rate: float) -> list[str]:
    """Write ``rate`` into the model's config (``model.config``), and a peft model's adapter
    configs (``lora_dropout``), so a saved model (or adapter) reloads with it."""
    configs = [getattr(model, "config", None)]
    peft = getattr(model, "peft_config", None)
    if isinstance(peft, Mapping):
        configs += list(peft.values())
    changed = []
    for config in configs:
        for name in (*CONFIG_DROPOUT, "lora_dropout"):
            value = getattr(config, name, None) if config is not None else None
            if isinstance(value, float | int) and not isinstance(value, bool):
                setattr(config, name, float(rate))
                changed.append(name)
    return changed


def unwrap(optimizer: Any) -> Optimizer:
    """The torch optimizer inside a trainer's wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): the one whose ``step`` runs the hooks."""
    inner = optimizer
    while not _is_plain(inner) and isinstance(getattr(inner, "optimizer", None), Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, Optimizer):
        fail("optimizer", "a torch optimizer", inner)
    return inner


def _is_plain(optimizer: Any) -> bool:
    return isinstance(optimizer, Optimizer) and hasattr(optimizer, "_optimizer_step_post_hooks")


def regroup(
    optimizer: Optimizer,
    model: nn.Module,
    setting: Regularization,
    schedulers: Sequence[Any] = (),
    *,
    resumed: bool = False,
    whole: bool = False,
) -> AsBuilt | None:
    """Rebuild ``optimizer``'s groups along ``param_groups``' split, in place, before any step
    (or, ``resumed``, before the first step of a run resumed with its state loaded).

    Only when the setting sets ``weight_decay``: a setting that leaves it unset leaves the
    optimizer's groups, and the decay the user or the trainer gave them, alone; a search
    trial's setting is ``whole``, its 0 a decay (a trial with the knob off, the unregularized
    baseline, trained with the optimizer's own decay while its record said 0). Each new
    group keeps the hyperparameters (lr, betas, eps, initial_lr...) of the group its
    parameters came from; the weights get the setting's weight decay, the rest none, and
    where that replaces a decay the optimizer had, one warning says so. Learning-rate
    schedulers already built on the old groups are given one entry per new group (their
    base lr and, for ``LambdaLR``, their function). Returns the ``AsBuilt`` that writes the
    optimizer's state in its old groups (None where nothing was regrouped).
    """
    if not whole and not sets_weight_decay(setting):
        return None
    if not resumed and any(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
        fail("optimizer", "one that has not stepped yet (regdial regroups it at the start of training)",
             Described("an optimizer with state"))  # fmt: skip
    decay = resolve_float(setting.weight_decay)
    split = param_groups(model, decay, exclude=setting.exclude, include=setting.include)
    weights = {id(p) for g in split if g["regularize"] for p in g["params"]}
    own = sorted({float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups} - {0.0, decay})
    if own:
        logger.warning("regdial: weight_decay=%s replaces the optimizer's own (%s) on the weights; biases, "
                       "normalization layers and embeddings get none", setting.weight_decay,
                       ", ".join(f"{v:g}" for v in own))  # fmt: skip
    rebuilt: list[dict[str, Any]] = []
    positions: list[int] = []  # which old group each new one came from, by identity (a dict of tensors
    for is_weight in (True, False):  # compared with == compares the tensors)
        for position, template in enumerate(optimizer.param_groups):
            params = [p for p in template["params"] if (id(p) in weights) == is_weight]
            if params:
                group = {k: v for k, v in template.items() if k != "params"}
                group.update(params=params, weight_decay=decay if is_weight else 0.0, regularize=is_weight)
                rebuilt.append(group)
                positions.append(position)
    count = len(optimizer.param_groups)
    built = AsBuilt(optimizer, positions, schedulers)
    optimizer.param_groups[:] = rebuilt
    for wrapped in schedulers:
        scheduler = getattr(wrapped, "scheduler", wrapped)  # accelerate's AcceleratedScheduler holds it
        for name, values in per_group_lists(vars(scheduler).get, count, positions).items():
            setattr(scheduler, name, values)
    return built


def sets_weight_decay(setting: Regularization) -> bool:
    """Whether the setting sets weight decay (a schedule, or a strength above 0)."""
    from regdial.blocks.schedules import Schedule

    return isinstance(setting.weight_decay, Schedule) or bool(setting.weight_decay)


def resolve_float(value: object) -> float:
    from regdial.blocks.schedules import resolve

    return float(resolve(value, 0.0))  # type: ignore[arg-type]


class Session:
    """One training run inside a trainer: the setting applied, and what the run records.

    Args:
        setting: the setting to apply.
        trial: a ``regdial.Trial`` of a search: each evaluation is reported, and a pruned
            trial stops the training (``optuna.TrialPruned`` reaches the objective).
        monitor: the evaluation value early stopping watches (the trainer's name for it).
    """

    def __init__(self, setting: Regularization, trial: Trial | None, monitor: str) -> None:
        if not isinstance(setting, Regularization):
            fail("setting", "a regdial.Regularization", setting)
        if trial is not None and not isinstance(trial, Trial):
            fail("trial", "a regdial.Trial (the objective form of regdial.tune) or None", trial)
        if not isinstance(monitor, str) or not monitor:
            fail("monitor", "the name of a logged evaluation value (eval_loss, val_loss...)", monitor)
        self.setting, self.trial, self.monitor = setting, trial, monitor
        self.applied: Applied | None = None
        self.built: AsBuilt | None = None
        self.history = History(None, setting=setting.to_dict(),
                               train_loss_source="running mean of the training batches' losses")  # fmt: skip
        self.stopper = EarlyStopping(
            patience=setting.early_stopping or None, min_delta=setting.min_delta,
            mode="max" if higher_is_better(monitor) else "min", monitor=monitor, check_finite=False,
        )  # fmt: skip
        self._live: dict[str, Tensor] | None = None
        self._train_loss = [0.0, 0]
        self.pruned = False
        self.ended = False  # finished: a later evaluation (trainer.evaluate()) is the user's own

    def fresh(self, setting: Regularization | None = None) -> Session:
        """A new session for the next run (a search's next trial): nothing carries over."""
        return Session(self.setting if setting is None else setting, self.trial, self.monitor)

    def start(
        self,
        model: nn.Module,
        optimizer: Any,
        num_classes: int | None,
        data_kind: str | None,
        schedulers: Any = (),
        *,
        resumed: bool = False,
        spaced: Collection[str] = (),
    ) -> Applied:
        """Apply the setting (``resumed``: to a run whose optimizer state is already loaded);
        ``built`` is then the regrouped optimizer's ``AsBuilt``, or None. ``spaced``: the
        knobs an ``online=`` Space turns."""
        optimizer = unwrap(optimizer)
        check_dropout(model, self.setting, spaced)
        from regdial.blocks.noise import dropout_sites

        if not dropout_sites(model):  # the diagnosis then advises no dropout (it would turn nothing)
            self.history.meta["no_dropout"] = True
        self.built = regroup(
            optimizer,
            model,
            self.setting,
            [s for s in schedulers if s is not None],
            resumed=resumed,
            whole=self.trial is not None,
        )
        self.applied = Applied(self.setting, model, optimizer, num_classes=num_classes, data_kind=data_kind)
        if self.setting.dropout is not None:
            set_config_dropout(model, resolve_float(self.setting.dropout))
        if self.setting.l2sp and any(not p.requires_grad for p in model.parameters()):
            logger.warning("regdial: l2sp=%s on a model with frozen weights pulls the trainable ones (adapters, "
                           "a head) toward their values at the start; an adapter that starts at zero (LoRA's "
                           "lora_B) is then under plain L2, and the frozen weights are untouched",
                           self.setting.l2sp)  # fmt: skip
        return self.applied

    def retune(self, turned: Regularization | None) -> None:
        """An online controller's turn, applied; a dropout it moved goes into the model's
        config too, as the start's did (a model saved after the move reloads with it)."""
        if self.applied is None or turned is None or turned == self.applied.setting:
            return
        self.applied.retune(turned)
        if turned.dropout is not None:
            set_config_dropout(self.applied.model, resolve_float(turned.dropout))

    # -- the evaluated weights ----------------------------------------------------------

    def use_average(self, model: nn.Module) -> None:
        """Evaluate the EMA weights: put them in the model, keeping the live ones aside."""
        if self.ended or self.applied is None or self.applied.ema is None or self._live is not None:
            return
        averaged = _averaged(model, self.applied.ema.module)
        self._live = {k: v.detach().clone() for k, v in model.state_dict().items() if k in averaged}
        model.load_state_dict(averaged, strict=False)

    def use_live(self, model: nn.Module) -> None:
        """Back to the weights being trained."""
        if self._live is not None:
            model.load_state_dict(self._live, strict=False)
            self._live = None

    # -- resuming -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The record, early stopping, the applied setting's state and, while the model holds
        the average (a trainer saving the model it evaluated), the live weights."""
        return {
            "applied": None if self.applied is None else self.applied.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "history": self.history.to_dict(),
            "live": self._live,
            "start": self.setting.to_dict(),
            "train_loss": list(self._train_loss),  # the steps since the last evaluation
        }

    def swap_in_average(self, saved: Any, model: nn.Module) -> dict[str, Tensor] | None:
        """Put the average's tensors into ``saved`` (a checkpoint's copy of ``model.state_dict()``,
        live now) in place; returns the live tensors it replaced (None without an average)."""
        if self.applied is None or self.applied.ema is None or not isinstance(saved, dict) or self.ended:
            return None
        live = {}
        for name, tensor in _averaged(model, self.applied.ema.module).items():
            if name in saved:
                live[name], saved[name] = saved[name], tensor.detach().clone()
        return live

    def load_record(self, state: Mapping[str, Any], where: str, *, same_start: bool = True) -> None:
        """The record and early stopping of ``state_dict()``, before ``start``. ``same_start``:
        the session's setting must be the one the saved run started with (a changed one would
        be silently replaced by the saved state in force), refused in one line otherwise."""
        saved = state.get("start")
        now = self.setting.to_dict()
        if same_start and isinstance(saved, dict) and saved != now:
            changed = [k for k in now if now[k] != saved.get(k)]
            fail("regularization", "the setting the checkpoint's run started with, "
                 + ", ".join(f"{k}={saved.get(k)}" for k in changed) + " (resume it unchanged, or start a new run)",
                 Described(", ".join(f"{k}={now[k]}" for k in changed)))  # fmt: skip
        self.stopper.load_state_dict(state["early_stopping"])
        self.history = History.from_dict(state["history"], where)
        total, count = state.get("train_loss", (0.0, 0))
        self._train_loss = [float(total), int(count)]

    def load_applied(self, state: Mapping[str, Any], model: nn.Module) -> None:
        """The applied setting's state and the live weights of ``state_dict()``, after ``start``."""
        if self.applied is not None and state.get("applied") is not None:
            self.applied.load_state_dict(state["applied"])
        if state.get("live"):
            model.load_state_dict(state["live"], strict=False)

    # -- the record -----------------------------------------------------------------------

    def add_train_loss(self, loss: float | Tensor) -> None:
        value = float(loss)
        if math.isfinite(value):
            self._train_loss[0] += value
            self._train_loss[1] += 1

    def evaluated(self, epoch: float, metrics: Mapping[str, float], model: nn.Module) -> bool:
        """Record an evaluation; True when early stopping says stop. Reports to the trial
        (which may raise ``optuna.TrialPruned``). After ``finish`` nothing is recorded: an
        evaluation after training (``trainer.evaluate()``) is not one of the run's."""
        if self.ended:
            return False
        values = {
            k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        train = self._train_loss[0] / self._train_loss[1] if self._train_loss[1] else math.nan
        self._train_loss = [0.0, 0]
        val_loss = values.get("val_loss", math.nan)
        row = {"epoch": float(len(self.history) + 1), "train_loss": train, "val_loss": val_loss,
               **{k: v for k, v in values.items() if k != "val_loss"}, "epoch_fraction": float(epoch)}  # fmt: skip
        self.history.append(row)
        if self.setting.early_stopping > 0 and self.monitor not in values:
            fail("monitor", "a value the evaluation logs (" + ", ".join(sorted(values)) + ") for early stopping",
                 self.monitor)  # fmt: skip
        watched = values.get(self.monitor, math.nan)
        evaluated = self.applied.eval_model if self.applied is not None else model
        tiebreak = None if self.monitor == "val_loss" else val_loss  # an accuracy's ties
        stop = self.stopper.step(watched, evaluated, tiebreak=tiebreak) if math.isfinite(watched) else False
        if self.trial is not None and self.trial.metric in self.history.rows[-1]:
            from optuna import TrialPruned

            extra = {
                k: v
                for k, v in self.history.rows[-1].items()
                if k not in ("epoch", "train_loss", "val_loss", "gap")
            }
            try:
                self.trial.report(len(self.history), train_loss=train, val_loss=val_loss, **extra)
            except TrialPruned:
                self.pruned = True
                self.use_live(model)
                self.trial.save_weights(model)  # the path's next point starts here
                raise
        return bool(stop) and self.setting.early_stopping > 0

    def finish(
        self,
        model: nn.Module,
        output_dir: str | Path | None,
        *,
        chosen: bool = False,
        num_classes: int | None = None,
    ) -> None:
        """End of training: the best weights (early stopping) or the average into the model,
        the history and the report written, the diagnosis logged, the hooks removed.
        ``chosen``: the trainer already put the weights it was asked for in the model (Hugging
        Face's ``load_best_model_at_end``), which then stay. ``num_classes``: the user's, for
        the diagnosis (an untrained classifier's loss, label smoothing's floor)."""
        from regdial.diagnosis import diagnose

        self.use_live(model)
        self.ended = True
        if self.applied is not None:
            if not chosen and self.setting.early_stopping > 0 and self.stopper.best_state is not None:
                self.applied.eval_model.load_state_dict(self.stopper.best_state)
            if self.applied.ema is not None and not chosen:
                model.load_state_dict(_averaged(model, self.applied.ema.module), strict=False)
            self.applied.remove()
        if len(self.history) == 0:
            return
        setting = self.applied.setting if self.applied is not None else self.setting  # in force at the end
        reading = diagnose(self.history, setting, num_classes=num_classes)
        # One line for a person watching a run; quieter inside a search, where every trial ends so.
        logger.log(
            logging.INFO if self.trial is not None else logging.WARNING, "regdial: %s", reading.message
        )
        self.history.meta.update(status="completed", diagnosis=reading.message)
        if output_dir is not None and self.trial is None:  # a search records its own trials
            write_record(Path(output_dir), self.history, setting, self.monitor)

    def record_so_far(self, output_dir: str | Path | None, main: bool = True) -> None:
        """After an evaluation, ``regdial_history.json`` with its rows so far and the status
        ``unfinished``, for a trainer that tells callbacks of no exception (the Hugging
        Face Trainer's): a run stopped by Ctrl-C or an error keeps its record, and says it
        did not complete. ``finish`` writes the whole record over it. ``main``: whether
        this is the process that writes (the Trainer's ``should_save``)."""
        if not main or self.ended or not self.history or output_dir is None or self.trial is not None:
            return
        from regdial._io import write_json

        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        record = self.history.to_dict()
        record["meta"] = {**record.get("meta", {}), "status": "unfinished"}
        write_json(directory / "regdial_history.json", record)

    def record_unfinished(self, output_dir: str | Path | None, error: BaseException) -> None:
        """A run the trainer stopped by an exception (Ctrl-C: ``interrupted``; else
        ``failed``, with its type): its record so far is written, and says so, where it
        would have been lost. The weights are left as they are, for a resume."""
        if self.ended or len(self.history) == 0 or output_dir is None or self.trial is not None:
            return
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else f"failed ({type(error).__name__})"
        self.history.meta["status"] = status
        setting = self.applied.setting if self.applied is not None else self.setting
        write_record(Path(output_dir), self.history, setting, self.monitor, status=status)


def _averaged(model: nn.Module, average: nn.Module) -> dict[str, Tensor]:
    """The average's tensors that are not the model's own (frozen weights are shared, see ``EMA``)."""
    live = model.state_dict()
    return {k: v for k, v in average.state_dict().items() if k in live and v.data_ptr() != live[k].data_ptr()}


def check_dropout(model: nn.Module, setting: Regularization, spaced: Collection[str] = ()) -> None:
    """Refuse a dropout rate that nothing in the model would take (named as the Space's knob
    where an ``online=`` Space turns it); name rates it does not turn."""
    from regdial.blocks.noise import dropout_sites, unturned_rates
    from regdial.blocks.schedules import Schedule

    if "dropout" in spaced and not dropout_sites(model):
        fail("online.dropout", "a knob of a model with dropout (nn.Dropout modules or attention dropout rates) "
             "to set: leave dropout out of the Space", Described("dropout in the Space"))  # fmt: skip

    if setting.dropout is None or (not isinstance(setting.dropout, Schedule) and not setting.dropout):
        return
    if not dropout_sites(model):
        fail("regularization.dropout", "unset for a model with no dropout (nn.Dropout modules or attention "
             "dropout rates) to set", setting.dropout)  # fmt: skip
    unturned = unturned_rates(model)
    if unturned:
        logger.warning("regdial: dropout=%s does not turn these float attributes, which look like rates: %s",
                       setting.dropout, ", ".join(unturned[:5]) + (" ..." if len(unturned) > 5 else ""))  # fmt: skip


def write_record(
    directory: Path,
    history: History,
    setting: Regularization,
    monitor: str = "val_loss",
    status: str = "completed",
) -> None:
    """``regdial_history.json`` and ``regdial_report.html`` (PNGs in ``regdial_report/``); the
    summary's scores are the last evaluation's (``final``) and the best one's by ``monitor``."""
    from regdial._io import write_json
    from regdial.reports.run import run_report

    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "regdial_history.json", history.to_dict())
    run = directory / "regdial_report"
    history.save(run)

    def scores(row: Mapping[str, Any]) -> dict[str, float]:
        return {k: v for k, v in row.items() if k.startswith("val_") and isinstance(v, float) and math.isfinite(v)
                and "runtime" not in k and "per_second" not in k}  # fmt: skip

    best = history.best_epoch(monitor if monitor in history.columns else "val_loss")
    best_row = next((r for r in history.rows if r["epoch"] == best), None)
    write_json(run / "summary.json", {"setting": setting.to_dict(), "status": status,
                                      "task": history.meta.get("task", directory.name),
                                      "final": scores(history.rows[-1]),
                                      "best": scores(best_row) if best_row is not None else {}})  # fmt: skip
    page = run_report(run)
    html = page.read_text(encoding="utf-8").replace("src='", "src='regdial_report/")
    from regdial._io import write_text

    write_text(directory / "regdial_report.html", html)
