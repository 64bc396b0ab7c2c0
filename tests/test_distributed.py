"""Data-parallel training: 2 CPU processes over gloo, launched by ``torchrun``.

One run of the built-in wine task, three launches: ``torchrun -m regdial run`` from the
command line (uninterrupted); the same run from a user's own DDP script
(``tests/ddp_script.py``), killed at the end of epoch 3 before its checkpoint; and
``torchrun -m regdial run --resume``. The uninterrupted DDP run matches a single-process
run with the same global batch to float tolerance (the all-reduce sums in another
order); the killed and resumed run ends bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from regdial import Regularization, fit

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

SCRIPT = Path(__file__).with_name("ddp_script.py")
CONFIG = """\
[run]
task = "wine"
epochs = 4
batch_size = 16
seed = 3
checkpoint_seconds = 0

[regularization]
weight_decay = 0.01
l1 = 0.001
label_smoothing = 0.1
"""


def torchrun(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *arguments,
    ]
    return subprocess.run(command, cwd=cwd, env=environment | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "final.safetensors")


@pytest.mark.slow
def test_ddp_matches_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(CONFIG)

    whole = torchrun("-m", "regdial", "run", "run.toml", "--out", "ddp", "--quiet", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert whole.stdout.count("report: ddp/report.html") == 1  # rank 0 alone prints and writes
    assert not list(tmp_path.glob("ddp-*"))  # both ranks trained in the one directory rank 0 chose
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 4

    single = tmp_path / "single"
    fit("wine", Regularization(weight_decay=0.01, l1=0.001, label_smoothing=0.1), epochs=4, batch_size=16,
        seed=3, run_dir=single, progress=False)  # fmt: skip
    ddp, one = weights(tmp_path / "ddp"), weights(single)
    assert ddp.keys() == one.keys()
    for name in ddp:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-5, atol=1e-5, msg=name)
    zeros = sum(int((t == 0).sum()) for t in ddp.values())
    assert zeros == sum(int((t == 0).sum()) for t in one.values()) > 0  # the same exact zeros (L1's prox)

    crashed = torchrun(str(SCRIPT), "crashed", "3", cwd=tmp_path)
    assert crashed.returncode != 0
    last = json.loads((tmp_path / "crashed" / "checkpoints" / "last.json").read_text())
    assert last["state"]["loop"]["epoch"] == 2  # epoch 3 was trained, then lost: the resume replays it

    resumed = torchrun("-m", "regdial", "run", "--resume", "crashed", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = weights(tmp_path / "crashed")
    for name in ddp:
        assert torch.equal(after[name], ddp[name]), name
    history = json.loads((tmp_path / "crashed" / "history.json").read_text())
    assert [row["epoch"] for row in history["rows"]] == [1, 2, 3, 4]
