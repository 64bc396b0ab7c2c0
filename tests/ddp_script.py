"""A user's own data-parallel script around ``fit`` (run by tests/test_distributed.py).

    torchrun --standalone --nproc-per-node 2 tests/ddp_script.py OUT [CRASH_AT_EPOCH]

It initializes the process group itself (gloo, as on any CPU machine), wraps nothing:
``fit`` finds the group and trains data-parallel. With CRASH_AT_EPOCH every rank dies
(``os._exit``, no cleanup, like a SIGKILL) at the end of that epoch, before its
checkpoint: a resume must replay that epoch exactly.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from regdial import Regularization, fit

SETTING = Regularization(weight_decay=0.01, l1=0.001, label_smoothing=0.1)
OPTIONS = {"epochs": 4, "batch_size": 16, "seed": 3, "checkpoint_seconds": 0}


def main() -> None:
    out = sys.argv[1]
    crash_at = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    dist.init_process_group("gloo")

    def on_epoch(row: dict[str, float]) -> None:
        if row["epoch"] == crash_at:
            os._exit(1)

    fit("wine", SETTING, run_dir=out, on_epoch=on_epoch, progress=False, **OPTIONS)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
