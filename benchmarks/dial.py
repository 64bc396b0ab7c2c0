"""How well does each strategy choose, and how cheaply? A dense grid is the oracle.

Eight tasks in two halves (issue 19). The **development** half is where the dial's
defaults were set; the **held-out** half was run once, after they were frozen, and is
reported apart: only it says how the dial does on tasks nobody tuned it on.

=============  ==================================================================
development    digits-small, sparse-regression, waveforms (built-in tasks, 30-300
               epochs known), shifted-series (generated, needs 100+ epochs)
held-out       digits-transfer, friedman (built-in), motifs, wide-tabular
               (generated, need 100+ epochs)
=============  ==================================================================

A built-in task is tuned over the knobs of ``CASES`` for its known length. A generated task
(``benchmarks/long_tasks.py``) is written as a user's ``.npz`` and tuned exactly as
``regdial tune --data F.npz --model mlp`` tunes it: its default space, no length given (the
dial learns it), the default budget. Rows of every table:

- ``unregularized``: every technique off (trained beside auto's choice, at auto's length);
- ``recipe``: the practitioner's recipe (``regdial.dial.timescale.RECIPE``) for the same
  knobs, trained once for the same length;
- ``auto``: regdial's default (the probe of the time scale where the length is unknown,
  the warm-started path, TPE with pruning, the reserve);
- ``tpe``: Optuna's plain TPE with the same budget, no pruning;
- ``grid``: every combination of a few values per knob (for a generated task: of three
  knobs, the other knobs at the recipe), the oracle;
- built-in tasks also have ``path``, ``online`` and ``random`` with ``--all``.

For each it prints the test score of its final choice with its standard error, the epochs
spent (the probe's included), and for the searches the epochs until a trial came within
0.5 points of the grid's best validation score (0.5% of its RMSE).

Targets (issue 19, on every held-out task): ``auto``'s test score >= the best of
(unregularized, recipe) and within 1 point (2% RMSE) of the grid's choice.

Run: ``python benchmarks/dial.py [--half development|held-out] [--tasks ...]`` (about 15
minutes a generated task and 10 a built-in one on 2 CPU cores; results are cached in
``benchmarks/.cache/dial``, so a second run only prints; ``--fresh`` recomputes).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from regdial import fit, tune
from regdial.dial.result import epochs_so_far
from regdial.dial.space import Space
from regdial.dial.timescale import recipe
from regdial.training.data import load_data
from regdial.training.tasks import TASKS

sys.path.insert(0, str(Path(__file__).parent))
from long_tasks import LONG_TASKS, write

CASES: dict[str, dict[str, Any]] = {
    "digits-small": {
        "space": {
            "weight_decay": (1e-4, 1.0),
            "dropout": (0.0, 0.5),
            "label_smoothing": (0.0, 0.2),
            "augment": (0.0, 1.0),
        },
        "grid_points": 3,
    },
    "sparse-regression": {"space": {"l1": (1e-3, 3.0), "l2": (1e-3, 3.0)}, "grid_points": 8},
    "waveforms": {
        "space": {"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5), "augment": (0.0, 1.0)},
        "grid_points": 3,
    },
    # Fine-tuning from pre-trained weights: L2-SP pulls toward them, weight decay toward zero.
    "digits-transfer": {
        "space": {"l2sp": (1e-3, 1.0), "weight_decay": (1e-4, 0.3), "dropout": (0.0, 0.5)},
        "grid_points": 3,
    },
    # A nonlinear regression with five useless features and 200 rows.
    "friedman": {"space": {"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)}, "grid_points": 5},
}
GRIDS: dict[str, dict[str, tuple[float, float]]] = {
    # The generated tasks' grids: three knobs of their default space, three values each.
    "shifted-series": {"weight_decay": (1e-3, 0.3), "dropout": (0.0, 0.4), "augment": (0.0, 1.0)},
    "motifs": {"weight_decay": (1e-3, 0.3), "dropout": (0.0, 0.4), "augment": (0.0, 1.0)},
    "wide-tabular": {"weight_decay": (1e-3, 0.3), "dropout": (0.0, 0.4), "noise": (0.0, 0.5)},
}
HALVES = {
    "development": ["digits-small", "sparse-regression", "waveforms", "shifted-series"],
    "held-out": ["digits-transfer", "friedman", "motifs", "wide-tabular"],
}
GRID_POINTS = 3
MODEL = "mlp"  # the generated tasks' model, as a user would pick it


def cached(cache: Path, key: str, fresh: bool, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    path = cache / f"{key}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = compute()
    result["wall_seconds"] = time.perf_counter() - started
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, default=str))
    return result


def _searched(result: Any, run_dir: Path) -> dict[str, Any]:
    data = result.to_dict()
    data["trial_rows"] = result.trials
    scale = run_dir / "timescale.json"
    data["time_scale"] = json.loads(scale.read_text()) if scale.is_file() else None
    return data


def reached(result: dict[str, Any], target: float, maximize: bool) -> float:
    """The epochs spent when a trial first reached the target (inf: never)."""
    ok = (lambda v: v >= target) if maximize else (lambda v: v <= target)
    if result["strategy"] in ("path", "online"):
        metric = result["metric"]
        found = (result["retrain"]["tuned"]["final"][metric] if result["strategy"] == "path"
                 else result["best"]["value"])  # fmt: skip
        return result["epochs_spent"] if ok(found) else math.inf
    for spent, trial in epochs_so_far(result.get("path", []), result["trial_rows"]):
        if trial["state"] == "complete" and trial["value"] is not None and ok(trial["value"]):
            return spent + probe_epochs(result)
    return math.inf


def described(setting: dict[str, Any], space: Space) -> str:
    """The knobs of ``space`` that ``setting`` turns on, with their values."""
    on = {k: setting.get(k) for k in space.knobs if isinstance(setting.get(k), float) and setting.get(k)}
    return ", ".join(f"{k}={v:.3g}" for k, v in on.items()) or "none"


def probe_epochs(result: dict[str, Any]) -> int:
    scale = result.get("time_scale")
    return int(scale["probe_epochs"]) if scale else 0


def score_of(result: dict[str, Any], which: str = "tuned") -> tuple[float, float]:
    """(test score, its standard error) of ``which`` run of a search's retrain."""
    metric = result["metric"].replace("val_", "test_")
    final = result["retrain"][which]["final"]
    return float(final[metric]), float(final.get(f"{metric}_se", math.nan))


class Task:
    """One benchmark task: how each strategy is run on it."""

    def __init__(self, name: str, cache: Path, fresh: bool) -> None:
        self.name, self.cache, self.fresh = name, cache, fresh
        self.generated = name in LONG_TASKS
        if self.generated:
            self.data_path = write(name, cache / "data" / f"{name}.npz")
            self.dataset = load_data(self.data_path)
            self.space = Space.default(self.dataset, MODEL)
            rest = {n: r for n, r in self.space.knobs.items() if n not in GRIDS[name]}
            self.grid_space = Space(dict(GRIDS[name]), recipe(Space(rest)) if rest else None)
            self.grid_points = GRID_POINTS
            self.kind = self.dataset.kind
        else:
            self.space = Space(CASES[name]["space"])
            self.grid_space = self.space
            self.grid_points = CASES[name]["grid_points"]
            self.kind = TASKS[name].load(0).kind

    def search(self, strategy: str, seed: int = 0) -> dict[str, Any]:
        key = f"{self.name}-{strategy}" + ("" if strategy in ("grid", "path", "online") else f"-{seed}")
        run_dir = self.cache / "runs" / key

        def compute() -> dict[str, Any]:
            shutil.rmtree(run_dir, ignore_errors=True)
            grid = strategy == "grid"
            options: dict[str, Any] = {
                "strategy": strategy,
                "sampler_seed": seed,
                "retrain": True,
                "run_dir": run_dir,
                "report": False,
            }
            if grid:
                options["grid_points"] = self.grid_points
                options["budget"] = f"{self.grid_points ** len(self.grid_space.knobs)} trials"
            space = self.grid_space if grid else self.space
            if self.generated:  # online's default space: the knobs that can turn in its one run
                result = tune(self.data_path, None if strategy == "online" else space, model=MODEL, **options)
            else:
                if strategy in ("tpe", "random"):  # the built-in tasks' old cap for plain searches
                    grid_trials = self.grid_points ** len(self.space.knobs)
                    options["budget"] = f"{max(10, grid_trials // 2)} trials"
                result = tune(self.name, space, **options)
            return _searched(result, run_dir)

        return cached(self.cache, key, self.fresh, compute)

    def recipe(self, epochs: int) -> dict[str, Any]:
        """The practitioner's recipe for this task's knobs, trained once for ``epochs``."""
        setting = recipe(self.space)

        def compute() -> dict[str, Any]:
            metric = "val_accuracy" if self.kind == "classification" else "val_rmse"
            options: dict[str, Any] = {
                "epochs": epochs,
                "monitor": metric,
                "restore_best": True,
                "progress": False,
            }
            if self.generated:
                history = fit(self.dataset, setting, model=MODEL, **options)
            else:
                history = fit(self.name, setting, **options)
            summary = history.meta["summary"]
            return {"final": summary["final"], "epochs": len(history),
                    "setting": described(setting.to_dict(), self.space)}  # fmt: skip

        return cached(self.cache, f"{self.name}-recipe-{epochs}", self.fresh, compute)


def evaluate(
    name: str, cache: Path, fresh: bool, seeds: tuple[int, ...], everything: bool
) -> dict[str, bool]:
    """Run (or read from the cache) every row on one task, print its table, return the
    targets met."""
    task = Task(name, cache, fresh)
    grid = task.search("grid")
    maximize = grid["direction"] == "maximize"
    scores = [t["value"] for t in grid["trial_rows"] if t["state"] == "complete" and t["value"] is not None]
    best = max(scores) if maximize else min(scores)
    target = best - 0.005 if maximize else best * 1.005
    runs: dict[str, list[dict[str, Any]]] = {"auto": [task.search("auto", s) for s in seeds],
                                             "tpe": [task.search("tpe", s) for s in seeds], "grid": [grid]}  # fmt: skip
    if everything and not task.generated:
        runs["path"], runs["online"] = [task.search("path")], [task.search("online")]
        runs["random"] = [task.search("random", s) for s in seeds]
    scale = runs["auto"][0]["time_scale"]
    length = int(scale["epochs"]) if scale else TASKS[name].epochs
    recipe_run = task.recipe(length)
    metric = grid["metric"].replace("val_", "test_")
    grid_test = score_of(grid)[0]

    def delta(score: float) -> float:
        return (score - grid_test) * 100 if maximize else 100 * (score / grid_test - 1)

    unit = "pts" if maximize else "%"
    where = (
        f"the dial learned {length} epochs a trial (probe {scale['probe_epochs']} epochs, best at "
        f"{scale['best_epoch']}, patience {scale['patience']})"
        if scale
        else f"{length} epochs a trial"
    )
    print(f"\n{name}: {len(task.space.knobs)} knobs ({', '.join(task.space.knobs)}); {where}; grid over "
          f"{', '.join(task.grid_space.knobs)} x{task.grid_points} = {len(grid['trial_rows'])} trials, best "
          f"validation {best:.4f}")  # fmt: skip
    header = f"{'row':<14}{'test':>20}{'vs grid':>11}{'epochs spent':>14}{'to target':>12}  chosen"
    print(header)
    print("-" * (len(header) + 40))
    base, base_se = score_of(runs["auto"][0], "baseline")
    print(f"{'unregularized':<14}{f'{base:.4f} ± {base_se:.4f}':>20}{delta(base):+8.2f}{unit:<3}"
          f"{runs['auto'][0]['retrain']['baseline'].get('epochs_run', length):>14}")  # fmt: skip
    rec = float(recipe_run["final"][metric])
    rec_se = float(recipe_run["final"].get(f"{metric}_se", math.nan))
    print(f"{'recipe':<14}{f'{rec:.4f} ± {rec_se:.4f}':>20}{delta(rec):+8.2f}{unit:<3}{recipe_run['epochs']:>14}"
          f"{'':>12}  {recipe_run['setting']}")  # fmt: skip
    tests: dict[str, float] = {}
    for strategy, results in runs.items():
        pairs = [score_of(r) for r in results]
        test = statistics.mean(p[0] for p in pairs)
        tests[strategy] = test
        se = statistics.mean(p[1] for p in pairs)
        spent = statistics.mean(r["epochs_spent"] + probe_epochs(r) for r in results)
        firsts = [reached(r, target, maximize) for r in results]
        shown = "never" if all(f == math.inf for f in firsts) else "/".join(
            "-" if f == math.inf else f"{f:.0f}" for f in firsts)  # fmt: skip
        chosen = described(results[0]["best"]["setting"], task.space)
        print(f"{strategy:<14}{f'{test:.4f} ± {se:.4f}':>20}{delta(test):+8.2f}{unit:<3}{spent:>14,.0f}"
              f"{shown:>12}  {chosen}")  # fmt: skip
    auto = tests["auto"]
    floor = max(base, rec) if maximize else min(base, rec)
    beats = auto >= floor if maximize else auto <= floor
    close = (grid_test - auto) * 100 <= 1.0 if maximize else (auto / grid_test - 1) * 100 <= 2.0
    print(f"targets: auto >= best of (unregularized, recipe): {'ok' if beats else 'MISSED'} "
          f"({auto:.4f} vs {floor:.4f}); within {'1 point' if maximize else '2% RMSE'} of the grid's choice: "
          f"{'ok' if close else 'MISSED'} ({delta(auto):+.2f}{unit})")  # fmt: skip
    return {"beats": beats, "close": close}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half", choices=[*HALVES, "both"], default="both")
    parser.add_argument("--tasks", nargs="*", help="these tasks instead of a half")
    parser.add_argument("--seeds", type=int, default=1, help="sampler seeds for auto and tpe (default 1)")
    parser.add_argument("--all", action="store_true", help="also path, online and random on built-in tasks")
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache" / "dial")
    parser.add_argument("--fresh", action="store_true", help="recompute everything")
    args = parser.parse_args()
    halves = list(HALVES) if args.half == "both" else [args.half]
    for half in halves:
        names = [t for t in HALVES[half] if not args.tasks or t in args.tasks]
        if not names:
            continue
        print(f"\n=== {half} half ===")
        met = {
            name: evaluate(name, args.cache, args.fresh, tuple(range(args.seeds)), args.all) for name in names
        }
        missed = [n for n, m in met.items() if not all(m.values())]
        print(f"\n{half}: targets met on {len(names) - len(missed)} of {len(names)} tasks"
              + (f" (missed: {', '.join(missed)})" if missed else ""))  # fmt: skip


if __name__ == "__main__":
    main()
