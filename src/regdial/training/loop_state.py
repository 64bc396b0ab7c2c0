"""``LoopState``: where the training loop is and what it has decided, saving itself.

As Lightning's progress objects (``loops/progress.py``) are, it is a dataclass whose
``state_dict`` is its fields and whose ``load_state_dict`` restores them one by one. Each
field is checked as it is read back, so a damaged checkpoint names the field
(``loop.step: not an integer``) instead of failing somewhere later. The loop's other
pieces (model, optimizer, ``Applied``, the best weights, the controller) save themselves;
``regdial.training.resume`` puts them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from regdial.training.checkpoint import Part

__all__ = ["FINISHED", "STATUSES", "LoopState"]

FINISHED = ("completed", "stopped early", "pruned")
"""How a run that trained to its end ended: resuming it trains no more epochs."""

STATUSES = ("running", "interrupted", "diverged", *FINISHED)


def _no_loss() -> dict[str, float]:
    return {"loss": 0.0, "seen": 0.0}


@dataclass
class LoopState:
    """The loop's position and its sums; ``epoch`` epochs are done, ``batch`` batches of the
    next one (a checkpoint inside an epoch), ``step`` optimizer steps in all (the learning
    rate schedule's position)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    running: dict[str, float] = field(default_factory=_no_loss)
    """The training loss summed over this epoch's batches so far, and the samples seen."""
    status: str = "running"
    settings: dict[int, dict[str, Any]] = field(default_factory=dict)
    """The setting each epoch's last optimizer step trained under, by epoch: the one that
    made the weights it ended with (a controller may turn it; a turn after that step
    applies from the next epoch)."""

    def end_epoch(self, epoch: int, setting: dict[str, Any]) -> None:
        """``epoch`` is done, trained under ``setting``."""
        self.settings[epoch] = setting
        self.epoch, self.batch = epoch, 0
        self.running = _no_loss()

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["settings"] = {str(k): v for k, v in self.settings.items()}  # JSON's keys are text
        return state

    def load_state_dict(self, state: Mapping[str, Any] | Part) -> None:
        """Continue from ``state_dict()``. A run that was interrupted (or diverged) runs on;
        one that had finished stays finished. A field that is not what ``state_dict`` wrote
        is a one-line ``DamagedFileError`` naming it."""
        part = state if isinstance(state, Part) else Part(state, "loop", "the loop state")
        epoch, batch, step = part.integer("epoch"), part.integer("batch"), part.integer("step")
        sums = part.table("running")
        running = {"loss": sums.number("loss"), "seen": sums.number("seen")}
        status = part.text("status", STATUSES)
        table = part.table("settings")
        settings: dict[int, dict[str, Any]] = {}
        for key in table.value:
            if not key.isdigit():
                table.damaged("not an epoch number", key)
            settings[int(key)] = dict(table.table(key).value)
        self.epoch, self.batch, self.step, self.running, self.settings = epoch, batch, step, running, settings
        self.status = status if status in FINISHED else "running"
