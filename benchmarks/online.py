"""The dial in one run: ``online`` beside ``auto`` and the unregularized baseline (issue 23).

On each task of ``benchmarks/dial.py`` (its tasks, spaces and cache), one ``online`` run,
tuned as ``regdial tune --strategy online`` tunes it, and its rows:

- ``unregularized``: every technique off, at the same length (the search's retrain);
- ``online``: its test score at the run's best epoch, the epochs it trained (the time
  scale's probe included, where the length was learned) and its compute in runs' worth:
  ``(epochs · (1 + hypergradient share) + probe) / length``, with ``length`` the trial
  length ``auto`` uses;
- ``auto``: with ``--auto``, regdial's default, run here (cached); without, the figure
  stop 27 measured with the same code (``AUTO_STOP_27``), marked so.

Targets: ``online`` within 1 point (2% RMSE) of ``auto``, never below the unregularized
baseline, in at most 1.5 runs' compute.

Run: ``python benchmarks/online.py [--tasks ...] [--auto] [--fresh]``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from dial import HALVES, Task, described, probe_epochs, score_of

from regdial.training.tasks import TASKS

AUTO_STOP_27 = {
    "digits-small": 0.9540, "sparse-regression": 1.2121, "waveforms": 0.6967, "shifted-series": 0.8120,
    "digits-transfer": 0.9443, "friedman": 2.1844, "motifs": 0.7510, "wide-tabular": 0.4970,
}  # fmt: skip
"""``auto``'s test scores in ``benchmarks/dial.py`` at stop 27 (sampler seed 0)."""


def hypergradient_share(result: dict[str, Any]) -> float:
    """The hypergradient steps' cost as a share of the training steps, from the result's note."""
    for note in result.get("notes", []):
        found = re.search(r"cost (\d+)% of the training steps", note)
        if found:
            return int(found.group(1)) / 100
    return 0.0


def row(name: str, test: float, se: float, delta: float, unit: str, rest: str = "") -> str:
    return f"{name:<18}{f'{test:.4f} ± {se:.4f}':>20}{delta:+9.2f}{unit:<4}{rest}"


def evaluate(name: str, cache: Path, fresh: bool, with_auto: bool) -> dict[str, bool]:
    task = Task(name, cache, fresh)
    online = task.search("online")
    maximize = online["direction"] == "maximize"
    auto_run = task.search("auto") if with_auto else None
    scale = (auto_run or online).get("time_scale")
    length = int(scale["epochs"]) if scale else TASKS[name].epochs
    auto = score_of(auto_run)[0] if auto_run else AUTO_STOP_27[name]
    base, base_se = score_of(online, "baseline")
    test, se = score_of(online)
    share = hypergradient_share(online)
    trained = online["epochs_spent"]
    runs = (trained * (1 + share) + probe_epochs(online)) / length

    def delta(score: float) -> float:
        return (score - auto) * 100 if maximize else 100 * (score / auto - 1)

    unit = "pts" if maximize else "%"
    print(
        f"\n{name}: {len(task.space.knobs)} knobs ({', '.join(task.space.knobs)}); a run is {length} epochs"
    )
    print(f"{'row':<18}{'test':>20}{'vs auto':>13}  compute")
    print(row("unregularized", base, base_se, delta(base), unit))
    print(row("online", test, se, delta(test), unit, f"{runs:.2f} runs ({trained} epochs, hypergradient "
              f"{share:.0%}, probe {probe_epochs(online)})  {described(online['best']['setting'], task.space)}"))  # fmt: skip
    print(row("auto" + ("" if auto_run else " (stop 27)"), auto, math.nan, 0.0, unit))
    close = delta(test) >= -1.0 if maximize else delta(test) <= 2.0
    above = test >= base if maximize else test <= base
    cheap = runs <= 1.5
    print(f"targets: within {'1 point' if maximize else '2% RMSE'} of auto: {'ok' if close else 'MISSED'}; "
          f">= unregularized: {'ok' if above else 'MISSED'}; <= 1.5 runs: {'ok' if cheap else 'MISSED'}")  # fmt: skip
    return {"close": close, "above": above, "cheap": cheap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=[t for half in HALVES.values() for t in half])
    parser.add_argument(
        "--auto", action="store_true", help="run auto here too (cached), not stop 27's figure"
    )
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache" / "dial")
    parser.add_argument("--fresh", action="store_true", help="recompute the online runs")
    args = parser.parse_args()
    met = {name: evaluate(name, args.cache, args.fresh, args.auto) for name in args.tasks}
    every = sum(all(m.values()) for m in met.values())
    print(f"\nonline: targets met on {every} of {len(met)} tasks")


if __name__ == "__main__":
    main()
