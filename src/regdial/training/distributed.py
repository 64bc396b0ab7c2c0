"""Data-parallel training: PyTorch's own DDP, under ``torchrun`` or the user's own script.

``Distributed.current()`` finds the process group: one the user's script already
initialized, or the one ``torchrun`` describes in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``), which it then initializes (NCCL on CUDA, Gloo on the CPU).
Outside both it returns None and ``fit`` trains in one process.

What makes a data-parallel run the same run on every rank:

- every rank sees the same global batch order (a function of the seed and the epoch)
  and takes its own share of each global batch, so with DDP's gradient averaging the
  update is the one a single process takes on the whole batch;
- sums are reduced before any score is computed, so validation metrics, early stopping
  and the divergence check decide the same thing on every rank;
- the proximal steps follow the all-reduced update, so they are identical too;
- every choice that could differ between ranks (a checkpoint due by the clock, a Ctrl-C
  that reached one rank first) is agreed on collectively, so the ranks never part ways;
- only rank 0 writes files; each rank's random state is gathered into the checkpoint;
- a process group regdial initialized, regdial destroys: ``close`` after a barrier at the
  end of ``regdial run`` (no rank leaves while another still needs it), and at exit
  otherwise. Left to the interpreter's teardown, gloo's threads were destroyed while
  still joinable, and a rank died with ``terminate called without an active exception``.

FSDP is not wrapped here: ``fit`` trains data-parallel with DDP. Under a user's own FSDP,
``attach_prox`` refuses group lasso and max-norm (a row's norm spans shards); the
element-wise penalties are exact on shards.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch

from regdial._checks import fail

__all__ = ["Distributed"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int
    owned: bool = False  # regdial initialized the group (torchrun's), so regdial destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, device: torch.device | None = None) -> Distributed | None:
        """The running process group (initializing torchrun's), or None for one process."""
        import torch.distributed as dist

        if not dist.is_available():
            return None
        if not dist.is_initialized():
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world <= 1 or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
                return None
            on_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
            dist.init_process_group(backend="nccl" if on_cuda else "gloo")
            atexit.register(_destroy)  # before the interpreter's teardown, whatever ends the process
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            return cls(dist.get_rank(), dist.get_world_size(), local, owned=True)
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local)

    def close(self, *, wait: bool) -> None:
        """Destroy the process group if regdial initialized it; with ``wait``, first wait
        for every rank to get here (after a run that ended well on all of them)."""
        import torch.distributed as dist

        if not self.owned or not dist.is_initialized():
            return
        if wait:
            dist.barrier()
        dist.destroy_process_group()

    def device(self, requested: torch.device) -> torch.device:
        """On CUDA, each rank trains on its own GPU (``cuda:LOCAL_RANK``)."""
        if requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums over every rank (float64)."""
        import torch.distributed as dist

        on = device if self._backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=on)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (plain Python objects), on every rank."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (a plain Python object), on every rank."""
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any."""
        return self.sum([float(flag)], device)[0] > 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def _backend(self) -> str:
        import torch.distributed as dist

        return str(dist.get_backend())

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world:
            fail("batch_size", f"a multiple of the {self.world} data-parallel processes (the global batch)",
                 batch_size)  # fmt: skip


def _destroy() -> None:
    """At exit: destroy a process group regdial initialized and nobody closed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
