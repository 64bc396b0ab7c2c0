"""``search_report(dir)``: the report of a search (``regdial tune``), from its result files.

It reads ``result.json`` and ``trials.csv`` through ``TuneResult.load`` and shows: the
unregularized baseline against the chosen setting (with standard errors, and the notes
that say when a difference is inside noise), how the setting was chosen, the validation
curve per knob (each on its own scale, as the space declares it: log for penalties and
weight decay), the search's progress against epochs spent, Optuna's knob importances,
and for the ``online`` strategy the run with each knob as the controller turned it.
"""

from __future__ import annotations

import html
from pathlib import Path

from regdial._checks import fail
from regdial._io import atomic_write, write_text
from regdial.dial.result import TuneResult, epochs_so_far
from regdial.reports._html import COLORS, fmt, page, percent, pyplot, table, with_se
from regdial.setting import Regularization

__all__ = ["search_report"]


def _knob_curves(result: TuneResult, path: Path) -> bool:
    """Validation metric against each knob: every finished trial, the path, the choice."""
    plt = pyplot()
    metric = result.metric
    trials = [t for t in result.trials if t["state"] == "complete" and t.get("value") is not None]
    knobs = [k for k in result.space if any(t.get(k) is not None for t in trials)]
    if not knobs:
        return False
    scale, unit = percent(metric)
    figure, axes = plt.subplots(1, len(knobs), figsize=(3.6 * len(knobs), 3.3), squeeze=False)
    chosen = result.best.to_dict()
    for ax, knob in zip(axes[0], knobs, strict=True):
        done = [t for t in trials if t.get(knob) is not None]
        errors = [(t.get("se") or 0.0) * scale for t in done]
        ax.errorbar([t[knob] for t in done], [t["value"] * scale for t in done], yerr=errors, fmt="o", markersize=4,
                    color=COLORS["train"], alpha=0.7, elinewidth=0.8, label="trials (± 1 s.e.)")  # fmt: skip
        shown = [t[knob] for t in done]
        if result.path and knob == result.path_knob:
            rows = sorted(result.path, key=lambda r: r["value"])
            ax.plot([r["value"] for r in rows], [r[metric] * scale for r in rows], color=COLORS["baseline"], marker="o",
                    markersize=3, label="path (warm-started)")  # fmt: skip
            shown += [r["value"] for r in rows]
        value = float(chosen.get(knob, 0.0) or 0.0)
        ax.axvline(value, color=COLORS["val"], linestyle="--", linewidth=1, label="chosen")
        spec = result.space.get(knob, {})
        if spec.get("scale") == "log":  # as the space declares it, not guessed from the values
            positive = [v for v in [*shown, value] if v > 0]
            if min([*shown, value]) > 0:
                ax.set_xscale("log")
            elif positive:  # some trials had it off (0): linear around 0, logarithmic above
                ax.set_xscale("symlog", linthresh=min(positive))
                ax.set_xlim(left=0)
        ax.set_xlabel(knob)
        ax.set_ylabel(metric.replace("_", " ") + unit)
        ax.set_title(f"{metric.replace('_', ' ')} vs {knob}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return True


def _progress(result: TuneResult, path: Path) -> None:
    """Best validation metric found so far against epochs spent."""
    plt = pyplot()
    metric, maximize = result.metric, result.direction == "maximize"
    scale, unit = percent(metric)
    xs, ys, best = [], [], None
    for spent, trial in epochs_so_far(result.path, result.trials):
        if trial["state"] == "complete" and trial.get("value") is not None:
            value = trial["value"]
            best = value if best is None or (value > best if maximize else value < best) else best
        if best is not None:
            xs.append(spent)
            ys.append(best * scale)
    figure, ax = plt.subplots(figsize=(7, 3.3))
    ax.step(xs, ys, where="post", color=COLORS["val"])
    ax.set_xlabel("epochs spent (all trials, pruned ones included)")
    ax.set_ylabel(f"best {metric.replace('_', ' ')}{unit}")
    ax.set_title("Search progress")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _position(value: float, spec: dict[str, object]) -> float:
    """Where ``value`` sits in a knob's range: 0 at ``low``, 1 at ``high`` (log scale for log knobs)."""
    from regdial.dial.space import Range

    low, high = float(spec["low"]), float(spec["high"])  # type: ignore[arg-type]
    return Range(low, high, log=spec.get("scale") == "log").position(value)


def _controller(result: TuneResult, path: Path) -> None:
    """The online run: its train and validation metric, and each knob as the controller turned it."""
    plt = pyplot()
    curve, metric = result.curve, result.metric
    train_metric = metric.replace("val_", "train_", 1)
    scale, unit = percent(metric)
    epochs = [row["epoch"] for row in curve]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True)
    top.plot(
        epochs, [(row.get(train_metric) or 0) * scale for row in curve], color=COLORS["train"], label="train"
    )
    top.plot(
        epochs, [(row.get(metric) or 0) * scale for row in curve], color=COLORS["val"], label="validation"
    )
    top.set_ylabel(metric.replace("val_", "").replace("_", " ") + unit)
    top.set_title("The online run: the controller turns the knobs as it goes")
    for name, spec in result.space.items():
        positions = [_position(float(row[name]), spec) for row in curve if name in row]
        bottom.step(epochs[: len(positions)], positions, where="post", label=name)
    for turn in result.turns:
        for ax in (top, bottom):
            ax.axvline(turn["epoch"], color=COLORS["baseline"], linewidth=0.6, alpha=0.5)
    if result.best_epoch:
        top.axvline(result.best_epoch, color=COLORS["val"], linestyle="--", linewidth=1, label="chosen epoch")
        bottom.axvline(result.best_epoch, color=COLORS["val"], linestyle="--", linewidth=1)
    top.legend(fontsize=8)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("place in its range\n(0 weakest, 1 strongest)")
    bottom.set_xlabel("epoch (grey lines: turns)")
    bottom.legend(fontsize=8, ncol=min(4, max(1, len(result.space))))
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _importances(importances: dict[str, float], path: Path) -> None:
    plt = pyplot()
    names = list(importances)
    figure, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color=COLORS["train"])
    ax.invert_yaxis()
    ax.set_xlabel("share of the validation metric's variance (fANOVA)")
    ax.set_title("Which knobs matter")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _scores(result: TuneResult) -> list[str]:
    metric = result.metric
    test = metric.replace("val_", "test_", 1)
    if not result.retrain:
        return ["<h2>Best found</h2>",
                f"<p>{html.escape(metric.replace('_', ' '))} {with_se(result.best_value, result.best_se)} in the "
                "search; not trained again or scored on a test split (the search ran without retraining).</p>"]  # fmt: skip
    rows = []
    for label, key in (("unregularized", "baseline"), ("tuned", "tuned")):
        final = result.retrain.get(key, {}).get("final", {})
        cells = [with_se(final.get(k), final.get(f"{k}_se")) if k in final else "-" for k in (metric, test)]
        rows.append([label, *cells])
    where = result.retrain.get("test", "the test split")
    return [
        "<h2>Baseline vs tuned</h2>",
        table(rows, ["setting", metric.replace("_", " "), test.replace("_", " ")]),
        f"<p class='muted'>The tuned row is the chosen run as the search finished it (the chosen trial's own run "
        "where its checkpoint was kept, the online run itself, or the setting trained again), the unregularized "
        f"one trained with the search's seed; {html.escape(str(where))} was used for these two scores only; ± one "
        "standard error. <a href='best/report.html'>The tuned run's own report</a>.</p>",
    ]


def search_report(run_dir: str | Path) -> Path:
    """Write the search's ``report.html`` (and PNGs) into a ``regdial tune`` directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").is_file():
        fail("run_dir", "a regdial tune directory (with result.json)", str(run_dir))
    result = TuneResult.load(run_dir)
    images = []
    if result.curve:
        _controller(result, run_dir / "online.png")
        images.append("online.png")
    elif result.trials:
        if _knob_curves(result, run_dir / "knobs.png"):
            images.append("knobs.png")
        _progress(result, run_dir / "progress.png")
        images.append("progress.png")
    if result.importances:
        _importances(result.importances, run_dir / "importances.png")
        images.append("importances.png")
    counts: dict[str, int] = {}
    for trial in result.trials:
        counts[trial["state"]] = counts.get(trial["state"], 0) + 1
    shown = ", ".join(f"{n} {state}" for state, n in counts.items()) or "none"
    chosen = Regularization.active(result.best)
    task = str(result.task or run_dir.name)
    parts = [
        f"<h1>regdial tune: {html.escape(task)}</h1>",
        f"<p class='muted'>strategy {html.escape(result.strategy)} · {result.epochs_spent} epochs spent · trials: "
        f"{html.escape(shown)}</p>",
        *_scores(result),
        *[f"<p class='note'>{html.escape(note)}</p>" for note in result.notes],
        "<h2>Chosen setting</h2>",
        table([[k, fmt(v)] for k, v in chosen.items()] or [["(every technique off)", ""]], ["knob", "value"]),
        f"<p class='muted'>Chosen by {html.escape(result.chosen_by)}. As a run config: best.toml "
        "(<code>regdial run best.toml</code>). All trials: trials.csv.</p>",
    ]  # fmt: skip
    if "knobs.png" in images:
        parts += [
            "<h2>Validation curve per knob</h2>",
            "<img src='knobs.png' alt='validation metric against each knob'>",
        ]
    if "progress.png" in images:
        parts += [
            "<h2>Search progress</h2>",
            "<img src='progress.png' alt='best validation metric against epochs spent'>",
        ]
    if "online.png" in images:
        parts += ["<h2>The online run</h2>", "<img src='online.png' alt='metric and knob positions over epochs'>",
                  "<p class='muted'>The table above scores this run itself, its best epoch's weights restored: "
                  "one run is the whole method, not retrained with its knobs frozen.</p>"]  # fmt: skip
    if "importances.png" in images:
        parts += ["<h2>Knob importance</h2>", "<img src='importances.png' alt='importance of each knob'>"]
    written = run_dir / "report.html"
    write_text(written, page(f"regdial tune: {task}", parts))
    return written
