"""A trainer's run, resumed: what regdial saves beside a trainer's checkpoint, and how the
trainer's own optimizer state stays loadable after regdial regrouped it.

A trainer that resumes loads its optimizer and scheduler state into a newly built
optimizer before any callback runs (Hugging Face's ``Trainer``), so a regrouped
optimizer saves in the groups it was built with (``AsBuilt``). Lightning saves a callback's
``state_dict`` in its checkpoint; Hugging Face's has no place for tensors, so its callback
writes ``checkpoint-<step>/regdial/`` (``save_state``) and reads it back (``saved_state``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

from regdial._checks import Described, fail
from regdial.training.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from regdial.integrations._common import Session
    from regdial.integrations._online import Online

__all__ = ["SCHEDULER_LISTS", "STATE_DIR", "AsBuilt", "Patched", "per_group_lists", "resume_online", "resume_record",
           "save_state", "saved_state"]  # fmt: skip

logger = logging.getLogger("regdial.integrations")

STATE_DIR = "regdial"
"""The folder of regdial's state (record, early stopping, average, controller) in each Trainer checkpoint."""

SCHEDULER_LISTS = ("base_lrs", "lr_lambdas", "_last_lr", "min_lrs")
"""A learning-rate scheduler's lists of one entry per parameter group."""


def per_group_lists(
    values_of: Callable[[str], Any], count: int, order: Sequence[int]
) -> dict[str, list[Any]]:
    """A scheduler's lists of one entry per group (``SCHEDULER_LISTS``, read by ``values_of``)
    that have ``count`` entries, taken in ``order``: a scheduler on other groups of the same
    parameters."""
    return {
        name: [values[i] for i in order]
        for name in SCHEDULER_LISTS
        if isinstance(values := values_of(name), list) and len(values) == count
    }


class AsBuilt:
    """An optimizer ``state_dict`` post-hook that writes a regrouped optimizer's state in the
    groups it was built with (``optimizer.register_state_dict_post_hook(built)``).

    A trainer that resumes (Hugging Face's) loads the saved state into a newly built
    optimizer before any callback runs, and torch refuses a state of other groups; saved as
    built, it loads, and the callback regroups it again. Each group keeps the hyperparameters
    in force now (the scheduler's lr) but the weight decay it was built with; the
    per-parameter state is renumbered to the built order.

    Args:
        optimizer: the optimizer, still in its built groups (``regroup`` makes this first).
        positions: which built group each regrouped one comes from.
        schedulers: the learning-rate schedulers on it (accelerate's wrappers allowed).
    """

    def __init__(
        self, optimizer: Optimizer, positions: Sequence[int], schedulers: Sequence[Any] = ()
    ) -> None:
        self.optimizer, self.schedulers = optimizer, list(schedulers)
        self.groups = [({k: v for k, v in g.items() if k != "params"}, list(g["params"]))
                       for g in optimizer.param_groups]  # fmt: skip
        self.positions = list(positions)
        # The regrouped group each built one's hyperparameters and scheduler entries are read
        # from: its first (its parts share the lr); None for a built group without parameters.
        self.firsts = [
            self.positions.index(j) if j in self.positions else None for j in range(len(self.groups))
        ]
        self.restored = False

    def _group(self, position: int, now: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Built group ``position``'s hyperparameters: those in force in ``now`` (the regrouped
        groups), but the weight decay it was built with."""
        first = self.firsts[position]
        current = now[first] if first is not None else {}
        return {
            k: v if k == "weight_decay" else current.get(k, v) for k, v in self.groups[position][0].items()
        }

    def _lists(self, values_of: Callable[[str], Any]) -> dict[str, list[Any]]:
        """A scheduler's per-group lists in the built groups (none where a built group had no
        parameters: nothing to take its entry from)."""
        if None in self.firsts:
            return {}
        return per_group_lists(values_of, len(self.positions), [f for f in self.firsts if f is not None])

    def __call__(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        saved = state_dict["param_groups"]
        index = {id(p): i for g, s in zip(optimizer.param_groups, saved, strict=True)
                 for p, i in zip(g["params"], s["params"], strict=True)}  # fmt: skip
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        number = 0  # torch numbers the parameters in the order of the groups
        for position, (_, params) in enumerate(self.groups):
            group = self._group(position, saved)
            group["params"] = list(range(number, number + len(params)))
            for p in params:
                if index[id(p)] in state_dict["state"]:
                    state[number] = state_dict["state"][index[id(p)]]
                number += 1
            groups.append(group)
        return {"state": state, "param_groups": groups}

    def restore(self) -> None:
        """Put the optimizer back in its built groups, in place (the lr in force, the built
        weight decay), and its schedulers' lists; once (later calls change nothing)."""
        if self.restored:
            return
        self.restored = True
        now = self.optimizer.param_groups
        built = [
            {**self._group(position, now), "params": list(params)}
            for position, (_, params) in enumerate(self.groups)
        ]
        self.optimizer.param_groups[:] = built
        for wrapped in self.schedulers:
            scheduler = getattr(wrapped, "scheduler", wrapped)
            for name, values in self._lists(vars(scheduler).get).items():
                setattr(scheduler, name, values)

    def restore_when_loaded(self) -> Any:
        """After training: a ``load_state_dict`` pre-hook that puts the optimizer (and its
        schedulers) back in the built groups when a state of those groups is loaded into it,
        as a trainer that trains again from a checkpoint does (Hugging Face's keeps its
        optimizer). Returns the handle."""

        def hook(opt: Optimizer, state_dict: dict[str, Any]) -> None:
            groups = state_dict.get("param_groups")
            if isinstance(groups, list) and len(groups) == len(self.groups) != len(opt.param_groups):
                self.restore()

        return self.optimizer.register_load_state_dict_pre_hook(hook)

    def save_schedulers(self) -> list[Patched]:
        """Have each scheduler write its state in the built groups (its ``state_dict`` replaced
        on the instance, until ``remove()``): torch's schedulers have no state hooks."""
        patched = []
        for wrapped in self.schedulers:
            scheduler = getattr(wrapped, "scheduler", wrapped)

            def state_dict(own: Callable[[], dict[str, Any]] = scheduler.state_dict) -> dict[str, Any]:
                state = own()
                state.pop("state_dict", None)  # torch's schedulers save their __dict__, which now holds this
                return {**state, **self._lists(state.get)}

            scheduler.state_dict = state_dict
            patched.append(Patched(scheduler, "state_dict"))
        return patched


class Patched:
    """An attribute set on an instance, which ``remove()`` deletes (the class's shows again)."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


# -- Hugging Face's checkpoints ------------------------------------------------------------


def _checkpoint(args: Any, state: Any) -> Path:
    """The folder the Trainer saves a step's checkpoint in (its ``PREFIX_CHECKPOINT_DIR``)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def save_state(args: Any, state: Any, saved: Mapping[str, Any]) -> None:
    """Write ``saved`` into the checkpoint the Trainer has just written (``on_save``), with what
    tells it apart from another run's: the step and the Trainer's last log entry. Nothing when
    that folder is elsewhere (a search trial's run directory)."""
    folder = _checkpoint(args, state)
    if folder.is_dir():
        save_checkpoint(
            folder / STATE_DIR, {**saved, "step": int(state.global_step), "log": _last_log(state)}
        )


def _last_log(state: Any) -> dict[str, Any] | None:
    """The Trainer's last log entry: what its ``trainer_state.json`` beside regdial's state ends with."""
    logs = getattr(state, "log_history", None) or [None]
    return logs[-1] if isinstance(logs[-1], dict) else None


def saved_state(args: Any, state: Any) -> dict[str, Any] | None:
    """regdial's state in the checkpoint the Trainer resumed from (``resumed_from``, else
    ``checkpoint-<step>`` of its output directory), when that checkpoint's log ends as the
    resumed state's does (another run's folder is not this one's). None when there is none."""
    for checkpoint in dict.fromkeys(c for c in (resumed_from(), _checkpoint(args, state)) if c is not None):
        folder = checkpoint / STATE_DIR
        if not has_checkpoint(folder):
            continue
        saved = load_checkpoint(folder)
        if saved.get("step") == state.global_step and _same(saved.get("log"), _last_log(state)):
            return saved
    return None


def _same(saved: Any, resumed: Any) -> bool:
    """Two log entries alike as JSON writes them (a logged NaN, a grad norm's, is not == itself)."""
    return json.dumps(saved, sort_keys=True) == json.dumps(resumed, sort_keys=True)


def resumed_from() -> Path | None:
    """The checkpoint the Hugging Face Trainer is resuming from, anywhere on disk: the
    ``resume_from_checkpoint`` of its ``_inner_training_loop``, which calls ``on_train_begin``
    (the Trainer hands callbacks no path; a checkpoint copied out of the output directory,
    resumed as plain Hugging Face resumes it, lost regdial's state). None outside that call."""
    frame = _training_loop()
    path = None if frame is None else frame.f_locals.get("resume_from_checkpoint")
    return Path(path) if isinstance(path, str | os.PathLike) else None


def evaluation_loader() -> Any:
    """The Hugging Face Trainer's evaluation DataLoader, made now (its ``get_eval_dataloader``,
    a sequential walk that draws nothing from the training's random stream): the Trainer
    hands callbacks one only from its first evaluation, which a run resumed between two
    has not had. None outside the Trainer's training loop, or for several eval datasets."""
    frame = _training_loop()
    trainer = None if frame is None else frame.f_locals.get("self")
    dataset = getattr(trainer, "eval_dataset", None)
    if (
        dataset is None
        or isinstance(dataset, Mapping)
        or not callable(getattr(trainer, "get_eval_dataloader", None))
    ):
        return None
    return trainer.get_eval_dataloader()  # type: ignore[union-attr]


def _training_loop() -> Any:
    """The frame of the Trainer's ``_inner_training_loop`` on the call stack, or None."""
    frame = inspect.currentframe()
    while frame is not None:
        if (
            frame.f_code.co_name == "_inner_training_loop"
            and "resume_from_checkpoint" in frame.f_code.co_varnames
        ):
            return frame
        frame = frame.f_back
    return None


def resume_online(online: Online, saved: Mapping[str, Any] | None, step: int, *, waits: bool) -> None:
    """The controller of a resumed ``online`` run, as the checkpoint saved it; refused without it."""
    if saved is None or saved.get("online") is None:
        fail("online", f"a run from its start, or resumed from a checkpoint this callback saved (with its {STATE_DIR}/ "
             "folder)", Described(f"a run resumed at step {step} without the controller's state"))  # fmt: skip
    online.controller.load_state_dict(saved["online"])
    if waits:
        logger.warning("regdial: online: resumed at step %d; the hypergradient waits for this run's first evaluation "
                       "(the Trainer gives callbacks its evaluation data only then): give online_data= to continue "
                       "it to the bit", step)  # fmt: skip


def resume_record(session: Session, saved: Mapping[str, Any] | None, step: int, *, online: bool) -> None:
    """A resumed run's record and early stopping, as the checkpoint saved them (its setting
    the one it started with, unless ``online`` turns it); one line without them."""
    if saved is not None:
        session.load_record(saved, "the checkpoint's regdial state", same_start=not online)
        return
    logger.warning("regdial: resumed at step %d from a checkpoint without regdial's state (%s/, saved beside the "
                   "Trainer's files) or of another run: its record, early stopping and average start afresh here",
                   step, STATE_DIR)  # fmt: skip
