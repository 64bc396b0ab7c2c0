"""A run's checkpoint state, and resuming from it exactly.

As Lightning's trainer collects its callbacks' states, ``run_state`` asks each stateful
piece for its own ``state_dict()``: the model, the optimizer (and fp16's gradient scaler),
``Applied`` (the setting in force, schedules, weight average, early stopping), the
best-weights tracker, the controller, the data source and the loop (``LoopState``, with
the random states and what the run started with beside it). ``restore`` hands each piece
its part back. A part that is not what its piece saved is a one-line ``DamagedFileError``
naming that part (``model: Missing key(s) in state_dict: "0.weight"``); only the errors a
piece raises for a state it did not write are caught, each around the one call that reads
it, so a bug keeps its own type and traceback.

The layout in ``last.json`` (``checkpoints/`` holds the tensors)::

    model  optimizer  applied  best?  scaler?  controller?  source  history
    loop: epoch batch step running status settings  rng  options setting
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from regdial._checks import Described, fail
from regdial._io import DiskFullError
from regdial.training.checkpoint import THIS_RUN, Part, has_checkpoint, load_checkpoint, save_checkpoint
from regdial.training.devices import rng_state, set_rng_state
from regdial.training.history import History
from regdial.training.loop_state import LoopState

if TYPE_CHECKING:
    from regdial.training.loop import Run

__all__ = ["restore", "run_state", "save"]

THIS_MODEL = f"{THIS_RUN} (the model config.toml describes)"

# What each piece raises for a state it did not write, as it reads it.
TORCH_MODULE = (RuntimeError,)  # nn.Module.load_state_dict: missing, unexpected or misshapen tensors
TORCH_OPTIMIZER = (KeyError, TypeError, ValueError)  # a group or its params missing, or not matching
PLAIN = (KeyError, TypeError, ValueError)  # a missing key, a value of the wrong type or range


def run_state(run: Run) -> dict[str, Any]:
    """The whole run's state: each piece's own ``state_dict`` and the loop's."""
    rngs: dict[str, Any] = dict(rng_state(run.device))
    if run.distributed is not None:  # every rank's random state, so each resumes its own
        rngs = {"ranks": run.distributed.gather({k: v.tolist() for k, v in rngs.items()})}
    controller_state = getattr(run.controller, "state_dict", None)
    state = {
        "model": run.net.state_dict(),
        "optimizer": run.applied.optimizer.state_dict(),
        "applied": run.applied.state_dict(),
        "loop": run.loop.state_dict()
        | {"rng": rngs, "options": run.options.to_toml_dict(), "setting": run.setting.to_dict()},
        "history": run.history.to_dict(),
        "source": run.source.state_dict(),
    }
    if run.best is not run.applied.early_stopping:
        state["best"] = run.best.state_dict()
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    if callable(controller_state):
        state["controller"] = controller_state()
    return state


def save(run: Run) -> None:
    """Write a checkpoint of ``run`` (rank 0 writes; every rank takes part in gathering)."""
    if run.run_dir is None:
        return
    state = run_state(run)
    if run.is_main:
        intact = run.saved_epoch
        try:
            save_checkpoint(run.run_dir / "checkpoints", state)
            intact = run.loop.epoch
            run.history.save(run.run_dir)
        except DiskFullError as error:  # each write is atomic: what was there is still there
            error.add_context(
                f"the last checkpoint (epoch {intact}) is intact; free some space and resume with --resume"
                if intact is not None
                else "no checkpoint was written yet"
            )
            raise
    run.saved_epoch = run.loop.epoch


def restore(run: Run) -> bool:
    """Continue ``run`` from its run directory's last checkpoint; a damaged one is one line.

    A run resumed with more ``epochs`` than it started with trains on to them: a run that
    completed its epochs runs again (one that stopped early, or was pruned, stays
    finished), and the cosine schedule, a function of the step and the run's whole
    length, is stretched over the new length, so the learning rate rises to where a run
    of that length stands at this step and anneals to 0 with it (a warm restart, as
    SGDR's, to a lower peak). Returns whether the length grew."""
    assert run.run_dir is not None
    directory = run.run_dir / "checkpoints"
    if not has_checkpoint(directory):
        fail("resume", "a run directory with a checkpoint (checkpoints/last.json)", str(run.run_dir))
    where = directory / "last.json"
    state = Part(load_checkpoint(directory), "", where)
    saved = state.table("loop")
    options = run.options.to_toml_dict()
    started = dict(saved.table("options").value)
    grown = options.get("epochs") != started.get("epochs")
    _same_start(saved, "options", options | ({"epochs": started.get("epochs")} if grown else {}))
    _same_start(saved, "setting", run.setting.to_dict())
    loop = LoopState()
    loop.load_state_dict(saved)  # read first: a damaged position changes nothing
    if grown:
        epochs = int(options.get("epochs") or 0)
        if epochs < loop.epoch:
            fail("epochs", f"at least the {loop.epoch} the run has trained (to resume it for longer)", epochs)
        if loop.status == "completed" and epochs > loop.epoch:
            loop.status = "running"
    rngs = _rng_states(saved.table("rng"), run.distributed.rank if run.distributed else 0)
    with state.reading("model", *TORCH_MODULE, what=THIS_MODEL):
        run.net.load_state_dict(state.table("model").value)
    with state.reading("optimizer", *TORCH_OPTIMIZER):
        run.applied.optimizer.load_state_dict(dict(state.table("optimizer").value))
    with state.reading("applied", *PLAIN, *TORCH_MODULE):  # its weight average is a torch module
        run.applied.load_state_dict(state.table("applied").value)
    if "best" in state:
        with state.reading("best", *PLAIN):
            run.best.load_state_dict(state.table("best").value)
    if "source" in state:
        with state.reading("source", TypeError, *TORCH_MODULE):  # a loader's generator state
            run.source.load_state_dict(dict(state.table("source").value))
    if run.scaler is not None and "scaler" in state:
        with state.reading("scaler", *PLAIN, *TORCH_MODULE):
            run.scaler.load_state_dict(dict(state.table("scaler").value))
    controller_load = getattr(run.controller, "load_state_dict", None)
    if callable(controller_load) and "controller" in state:
        with state.reading("controller", *PLAIN):
            controller_load(dict(state.table("controller").value))
    run.history = History.from_dict(state.get("history"), str(where))
    run.history.meta.update(device=str(run.device), precision=run.precision.name, status="running")
    with saved.reading("rng", RuntimeError):  # torch: "RNG state is wrong size"
        set_rng_state(rngs, run.device)
    run.loop = loop
    run.saved_epoch = loop.epoch
    return grown


def _same_start(saved: Part, name: str, value: dict[str, Any]) -> None:
    """The run resumes with the options and setting it started with, or says which differs."""
    before = dict(saved.table(name).value)
    if before != value:
        key = next(k for k in {*before, *value} if before.get(k) != value.get(k))
        fail("resume", f"the {name} the run started with ({key} = {before.get(key)!r})",
             Described(f"{key} = {value.get(key)!r}"))  # fmt: skip


def _rng_states(rngs: Part, rank: int) -> dict[str, Tensor]:
    """This rank's random states: tensors, or (data-parallel) each rank's as lists of bytes."""
    if "ranks" in rngs:
        ranks = rngs.get("ranks")
        if not isinstance(ranks, list) or rank >= len(ranks):
            rngs.damaged(f"no random state for rank {rank}", "ranks")
        mine = Part(ranks[rank], rngs.at(f"ranks.{rank}"), rngs.where)
        states = {}
        for key, value in mine.value.items():
            if not isinstance(value, list) or not all(type(b) is int and 0 <= b < 256 for b in value):
                mine.damaged("not a list of bytes", key)
            states[key] = torch.tensor(value, dtype=torch.uint8)
    else:
        states = dict(rngs.value)
        for key, value in states.items():
            if not isinstance(value, Tensor):
                rngs.damaged("not a tensor", key)
    if "cpu" not in states:
        rngs.damaged("no CPU random state")
    return states
