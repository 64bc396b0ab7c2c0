"""SIGKILL at random moments, resume, compare: nothing finished is lost, results are exact.

    python benchmarks/crash.py --runs 20 --searches 10

``regdial run``: killed at a random moment after its first checkpoint, resumed with
``regdial run --resume``; its final weights must be bit-identical to an uninterrupted run.
``regdial tune``: killed at a random moment, run again with the same command; every trial
that had completed must still be there with the same value, and the budget must complete
exactly (as many complete or pruned trials as it asks for). Prints the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

RUN = ["run", "--task", "digits-small", "--epochs", "12", "--set", "dropout=0.2", "--set", "ema=0.9",
       "--set", "augment=0.5", "--quiet"]  # fmt: skip
TUNE = ["tune", "--task", "wine", "--epochs", "6", "--budget", "5 trials", "--strategy", "tpe", "--no-retrain",
        "--quiet"]  # fmt: skip


def regdial(*args: str) -> list[str]:
    return [sys.executable, "-m", "regdial", *args]


def checkpointed(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last.json").is_file()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "final.safetensors"))


def crash_run(root: Path, reference: Path, rng: random.Random) -> str:
    """One killed-and-resumed run: 'exact', 'finished before the kill', or what went wrong."""
    out = root / f"run-{rng.randrange(10**9)}"
    process = subprocess.Popen(
        regdial(*RUN, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not checkpointed(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 2.0))  # a random moment after the first checkpoint
    if process.poll() is not None:
        return "finished before the kill"
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(regdial("run", "--resume", str(out), "--quiet"), capture_output=True, text=True)
    if resumed.returncode != 0:
        return f"resume failed ({resumed.returncode}): {resumed.stderr.strip()[-200:]}"
    a, b = weights(out), weights(reference)
    return "exact" if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else "weights differ"


def states(database: Path) -> dict[int, tuple[str, float | None]]:
    if not database.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        try:
            rows = db.execute(
                "SELECT t.number, t.state, v.value FROM trials t LEFT JOIN trial_values v ON v.trial_id = t.trial_id"
            ).fetchall()
        except sqlite3.OperationalError:
            return {}
    return {number: (state, value) for number, state, value in rows}


def crash_search(root: Path, rng: random.Random) -> str:
    out = root / f"tune-{rng.randrange(10**9)}"
    process = subprocess.Popen(
        regdial(*TUNE, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(rng.uniform(3.0, 12.0))  # imports take ~3 s; the search a few more
    if process.poll() is not None:
        return "finished before the kill"
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {n: s for n, s in states(out / "study.db").items() if s[0] == "COMPLETE"}
    again = subprocess.run(regdial(*TUNE, "--out", str(out)), capture_output=True, text=True)
    if again.returncode != 0:
        return f"rerun failed ({again.returncode}): {again.stderr.strip()[-200:]}"
    after = states(out / "study.db")
    if any(after.get(n) != s for n, s in before.items()):
        return "a completed trial was lost or changed"
    done = sum(state in ("COMPLETE", "PRUNED") for state, _ in after.values())
    result = json.loads((out / "result.json").read_text())
    return "exact" if done == 5 and sum(result["trials"].get(k, 0) for k in ("complete", "pruned")) == 5 else (
        f"{done} trials finished, not 5")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--searches", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        reference = root / "reference"
        subprocess.run(regdial(*RUN, "--out", str(reference)), check=True, capture_output=True)
        runs: dict[str, int] = {}
        for _ in range(args.runs):
            outcome = crash_run(root, reference, rng)
            runs[outcome] = runs.get(outcome, 0) + 1
        searches: dict[str, int] = {}
        for _ in range(args.searches):
            outcome = crash_search(root, rng)
            searches[outcome] = searches.get(outcome, 0) + 1
    print(
        f"regdial run, SIGKILL at a random moment after the first epoch, then --resume ({args.runs}): {runs}"
    )
    print(f"regdial tune, SIGKILL at a random moment, then the same command ({args.searches}): {searches}")


if __name__ == "__main__":
    main()
