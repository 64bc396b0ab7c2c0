"""``report(run_dir)``: an HTML page, with its PNGs beside it, that shows where a run stands.

``report.html`` opens offline (plain HTML and relative image links, nothing fetched) and
holds: the setting, the diagnosis, the final test metrics (beside the unregularized
baseline when the run has one in ``baseline/``), learning curves (loss and metric, train
against validation), the generalization gap over epochs with the diagnosis marked,
per-layer weight histograms and each layer's share of exact zeros.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from regdial._checks import fail
from regdial._io import write_text
from regdial.diagnose import Diagnosis, diagnose, smooth
from regdial.history import History
from regdial.setting import Regularization

__all__ = ["report", "tune_report"]

COLORS = {"train": "#1f77b4", "val": "#d62728", "baseline": "#7f7f7f"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False})  # fmt: skip
    return plt


def _metric_label(history: History) -> tuple[str, float]:
    if history.kind == "classification":
        return "accuracy (%)", 100.0
    return "RMSE (target units)", 1.0


def _percent(metric: str) -> tuple[float, str]:
    """(scale, unit suffix) for a metric's axis: accuracies in percent, the rest as they are."""
    return (100.0, " (%)") if metric.endswith("accuracy") else (1.0, "")


def _mark(ax: Any, diagnosis: Diagnosis, last_epoch: float) -> None:
    if diagnosis.best_epoch is not None:
        ax.axvline(
            diagnosis.best_epoch,
            color="black",
            linestyle=":",
            linewidth=1,
            label=f"best epoch {diagnosis.best_epoch}",
        )
    if diagnosis.overfit_epoch is not None:
        ax.axvspan(diagnosis.overfit_epoch, last_epoch, color=COLORS["val"], alpha=0.07, label="overfitting")


def _learning_curves(history: History, baseline: History | None, diagnosis: Diagnosis, path: Path) -> None:
    plt = _pyplot()
    figure, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = history.column("epoch")
    loss_name = "cross-entropy (nats)" if history.kind == "classification" else "mean squared error"
    label, scale = _metric_label(history)
    for split in ("train", "val"):
        name = "train" if split == "train" else "validation"
        loss_ax.plot(epochs, history.column(f"{split}_loss"), color=COLORS[split], label=f"{name}")
        metric_ax.plot(
            epochs,
            [v * scale for v in history.column(f"{split}_{history.metric}")],
            color=COLORS[split],
            label=name,
        )
        if baseline is not None:
            style = "--" if split == "train" else "-."
            base_epochs = baseline.column("epoch")
            loss_ax.plot(base_epochs, baseline.column(f"{split}_loss"), color=COLORS["baseline"], linestyle=style,
                         label=f"{name}, unregularized")  # fmt: skip
            metric_ax.plot(base_epochs, [v * scale for v in baseline.column(f"{split}_{history.metric}")],
                           color=COLORS["baseline"], linestyle=style, label=f"{name}, unregularized")  # fmt: skip
    for ax in (loss_ax, metric_ax):
        _mark(ax, diagnosis, epochs[-1])
        ax.set_xlabel("epoch")
    loss_ax.set_ylabel(loss_name)
    loss_ax.set_title("Loss: train vs validation")
    metric_ax.set_ylabel(label)
    metric_ax.set_title(f"{label.split(' (')[0].capitalize()}: train vs validation")
    loss_ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _gap(history: History, baseline: History | None, diagnosis: Diagnosis, path: Path) -> None:
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(11, 3.4))
    epochs = history.column("epoch")
    gap = history.column("gap")
    ax.plot(epochs, gap, color=COLORS["val"], alpha=0.35, label="gap (validation - train loss)")
    ax.plot(epochs, smooth(gap)[0], color=COLORS["val"], label="gap, smoothed")
    if baseline is not None:
        ax.plot(baseline.column("epoch"), smooth(baseline.column("gap"))[0], color=COLORS["baseline"], linestyle="--",
                label="gap, unregularized (smoothed)")  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.8)
    _mark(ax, diagnosis, epochs[-1])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation - train loss")
    ax.set_title(f"Generalization gap: {diagnosis.state}")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _weights(weights: Mapping[str, Any], path: Path) -> list[tuple[str, int, float]]:
    """Histograms of each weight matrix; returns (name, size, share of exact zeros)."""
    plt = _pyplot()
    layers = [(name, w) for name, w in weights.items() if w.dim() >= 2 and w.is_floating_point()]
    layers.sort(key=lambda item: _natural(item[0]))  # "2.weight" before "10.weight"
    rows = [(name, w.numel(), float((w == 0).float().mean())) for name, w in layers]
    if not layers:
        return rows
    shown = layers[:12]
    columns = min(4, len(shown))
    lines = math.ceil(len(shown) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.6 * lines), squeeze=False)
    for ax, (name, w) in zip(axes.flat, shown, strict=False):
        values = w.detach().float().flatten()
        zeros = float((values == 0).float().mean())
        nonzero = values[values != 0]  # exact zeros are counted in the title, not drawn as a spike
        ax.hist(nonzero.numpy(), bins=60, color=COLORS["train"])
        ax.set_title(f"{name}\n{w.numel():,} weights, {zeros:.0%} exactly 0", fontsize=8)
        ax.set_xlabel("weight value", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    figure.suptitle("Final weights per layer", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return rows


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _sparsity(rows: Sequence[tuple[str, int, float]], path: Path) -> None:
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    names = [name for name, _, _ in rows]
    ax.barh(names, [100 * share for _, _, share in rows], color=COLORS["train"])
    ax.set_xlim(0, 100)
    ax.set_xlabel("exact zeros (% of the layer's weights)")
    ax.set_title("Sparsity per layer")
    ax.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _scores_table(summary: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> str:
    final = summary.get("final", {})
    keys = [k for k in final if k.startswith(("test_", "val_"))]
    if not keys:
        return "<p>No scores: the run did not finish.</p>"
    header = ["metric", "this run (final)", "this run (best epoch)"] + (
        ["unregularized (final)"] if baseline else []
    )
    rows = []
    for key in sorted(keys, key=lambda k: (not k.startswith("test"), k)):
        row = [key.replace("_", " "), _fmt(final.get(key)), _fmt(summary.get("best", {}).get(key, ""))]
        if baseline:
            row.append(_fmt(baseline.get("final", {}).get(key, "")))
        rows.append(row)
    return _table(rows, header)


def _smoothing_note(setting: Regularization) -> str:
    if not setting.label_smoothing and not setting.mixup and not setting.cutmix:
        return ""
    return (
        "<p class='muted'>Label smoothing and mixing train the model to be less confident, which raises its "
        "cross-entropy loss even where its accuracy improves: compare runs by accuracy.</p>"
    )


STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.state { font-size: 1.05rem; padding: 0.8rem 1rem; border-left: 5px solid #d62728; background: #fbf3f3; }
.state.good { border-color: #2ca02c; background: #f3fbf3; } .muted { color: #666; font-size: 0.9rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.92rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.8rem; text-align: left; }
th { background: #f5f5f5; } img { max-width: 100%; border: 1px solid #eee; margin: 0.4rem 0; }
"""


def report(run_dir: str | Path) -> Path:
    """Write ``report.html`` and its PNGs into ``run_dir``; return the page's path."""
    from regdial.checkpoint import load_weights

    run_dir = Path(run_dir)
    if not (run_dir / "history.json").is_file() and not (run_dir / "history.csv").is_file():
        fail("run_dir", "a regdial run directory (with history.csv)", str(run_dir))
    history = History.load(run_dir)
    if len(history) == 0:
        fail("run_dir", "a run with at least one finished epoch", str(run_dir))
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    setting = Regularization.from_dict(summary["setting"]) if "setting" in summary else Regularization()
    diagnosis = diagnose(history, setting)
    baseline_dir = run_dir / "baseline"
    baseline = History.load(baseline_dir) if (baseline_dir / "history.csv").is_file() else None
    baseline_summary = None
    if baseline is not None and (baseline_dir / "summary.json").is_file():
        baseline_summary = json.loads((baseline_dir / "summary.json").read_text(encoding="utf-8"))

    _learning_curves(history, baseline, diagnosis, run_dir / "learning_curves.png")
    _gap(history, baseline, diagnosis, run_dir / "gap.png")
    images = ["learning_curves.png", "gap.png"]
    weights_file = run_dir / "checkpoints" / "final.safetensors"
    layer_rows: list[tuple[str, int, float]] = []
    if weights_file.is_file():
        layer_rows = _weights(load_weights(weights_file), run_dir / "weights.png")
        if layer_rows:
            _sparsity(layer_rows, run_dir / "sparsity.png")
            images += ["weights.png", "sparsity.png"]

    task = summary.get("task", history.meta.get("task", run_dir.name))
    status = summary.get("status", "")
    setting_rows = [[k, _fmt(v)] for k, v in setting.active().items()] or [["(every technique off)", ""]]
    good = diagnosis.state in ("good fit", "still improving")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>regdial report: {html.escape(str(task))}</title><style>{STYLE}</style></head><body>",
        f"<h1>regdial report: {html.escape(str(task))}</h1>",
        f"<p class='muted'>{html.escape(str(run_dir))} · {len(history)} epochs · status {html.escape(status)}"
        + (f" ({html.escape(summary.get('reason', ''))})" if summary.get("reason") else "")
        + "</p>",
        f"<p class='state{' good' if good else ''}'><b>{html.escape(diagnosis.state)}</b>: {html.escape(diagnosis.message)}</p>",
        "<h2>Scores</h2>",
        _scores_table(summary, baseline_summary),
        _smoothing_note(setting),
        "<h2>Setting</h2>",
        _table(setting_rows, ["knob", "value"]),
        "<h2>Learning curves</h2>",
        "<img src='learning_curves.png' alt='train and validation loss and metric per epoch'>",
        "<h2>Generalization gap</h2>",
        "<img src='gap.png' alt='validation minus train loss per epoch'>",
    ]
    if "weights.png" in images:
        parts += [
            "<h2>Weights</h2>",
            "<img src='weights.png' alt='histograms of each layer\\'s final weights'>",
            "<img src='sparsity.png' alt='share of exact zeros per layer'>",
            _table(
                [[n, f"{c:,}", f"{z:.1%}"] for n, c, z in layer_rows], ["layer", "weights", "exact zeros"]
            ),
        ]
    if "support" in summary:
        support = summary["support"]
        parts += [
            "<h2>Feature selection</h2>",
            _table([[k, _fmt(v)] for k, v in support.items() if k != "features"], ["measure", "value"]),
            f"<p class='muted'>features kept: {html.escape(', '.join(map(str, support.get('features', []))))}</p>",
        ]
    parts.append("</body></html>")
    page = run_dir / "report.html"
    write_text(page, "\n".join(parts))
    return page


# -- the search ---------------------------------------------------------------------------


def _knob_curves(result: Mapping[str, Any], trials: list[dict[str, Any]], path: Path) -> None:
    """Validation metric against each knob: every finished trial, the path, the best."""
    plt = _pyplot()
    metric = result["metric"]
    knobs = [k for k in result["best"]["setting"] if any(k in t for t in trials)]
    knobs = [k for k in knobs if k not in ("number", "state", "value", "epochs", "seconds")]
    if not knobs:
        return
    scale, unit = _percent(metric)
    figure, axes = plt.subplots(1, len(knobs), figsize=(3.6 * len(knobs), 3.3), squeeze=False)
    best = result["best"]["setting"]
    for ax, knob in zip(axes[0], knobs, strict=True):
        done = [
            t
            for t in trials
            if t["state"] == "complete" and t.get(knob) is not None and t["value"] is not None
        ]
        ax.scatter([t[knob] for t in done], [t["value"] * scale for t in done], s=18, color=COLORS["train"], alpha=0.7,
                   label="trials")  # fmt: skip
        if result.get("path") and knob == result.get("path_knob"):
            rows = sorted(result["path"], key=lambda r: r["value"])
            ax.plot([r["value"] for r in rows], [r[metric] * scale for r in rows], color=COLORS["baseline"], marker="o",
                    markersize=3, label="path (warm-started)")  # fmt: skip
        ax.axvline(best[knob], color=COLORS["val"], linestyle="--", linewidth=1, label="chosen")
        shown = [t[knob] for t in done] + [best[knob]]
        if result.get("path") and knob == result.get("path_knob"):
            shown += [r["value"] for r in result["path"]]
        positive = [v for v in shown if v > 0]
        if positive and max(positive) / min(positive) > 50:  # a log-scale knob
            if min(shown) > 0:
                ax.set_xscale("log")
            else:  # some trials had it off (0): linear around 0, logarithmic above
                ax.set_xscale("symlog", linthresh=min(positive))
                ax.set_xlim(left=0)
        ax.set_xlabel(knob)
        ax.set_ylabel(metric.replace("_", " ") + unit)
        ax.set_title(f"{metric.replace('_', ' ')} vs {knob}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _progress(result: Mapping[str, Any], trials: list[dict[str, Any]], path: Path) -> None:
    """Best validation metric found so far against epochs spent."""
    from regdial.tune import epochs_so_far

    plt = _pyplot()
    metric, maximize = result["metric"], result["direction"] == "maximize"
    scale, unit = _percent(metric)
    xs, ys, best = [], [], None
    for spent, trial in epochs_so_far(result.get("path", []), trials):
        if trial["state"] == "complete" and trial["value"] is not None:
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
    figure.savefig(path)
    plt.close(figure)


def _position(value: float, spec: Mapping[str, Any]) -> float:
    """Where ``value`` sits in a knob's range: 0 at ``low``, 1 at ``high`` (log scale for log knobs)."""
    low, high = float(spec["low"]), float(spec["high"])
    if spec.get("scale") == "log":
        return 0.0 if value <= 0 else math.log(value / low) / math.log(high / low)
    return (value - low) / (high - low) if high > low else 0.0


def _controller(result: Mapping[str, Any], path: Path) -> None:
    """The online run: its train and validation metric, and each knob as the controller turned it."""
    plt = _pyplot()
    curve, metric = result["curve"], result["metric"]
    train_metric = metric.replace("val_", "train_")
    scale, unit = _percent(metric)
    epochs = [row["epoch"] for row in curve]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True)
    top.plot(epochs, [row[train_metric] * scale for row in curve], color=COLORS["train"], label="train")
    top.plot(epochs, [row[metric] * scale for row in curve], color=COLORS["val"], label="validation")
    top.set_ylabel(metric.replace("val_", "").replace("_", " ") + unit)
    top.set_title("The online run: the controller turns the knobs as it goes")
    space = result.get("space", {})
    for name, spec in space.items():
        positions = [_position(float(row[name]), spec) for row in curve if name in row]
        bottom.step(epochs[: len(positions)], positions, where="post", label=name)
    for turn in result.get("path", []):
        for ax in (top, bottom):
            ax.axvline(turn["epoch"], color=COLORS["baseline"], linewidth=0.6, alpha=0.5)
    if result.get("best_epoch"):
        top.axvline(
            result["best_epoch"], color=COLORS["val"], linestyle="--", linewidth=1, label="chosen epoch"
        )
        bottom.axvline(result["best_epoch"], color=COLORS["val"], linestyle="--", linewidth=1)
    top.legend(fontsize=8)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("place in its range\n(0 weakest, 1 strongest)")
    bottom.set_xlabel("epoch (grey lines: turns)")
    bottom.legend(fontsize=8, ncol=min(4, max(1, len(space))))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _importances(importances: Mapping[str, float], path: Path) -> None:
    plt = _pyplot()
    names = list(importances)
    figure, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color=COLORS["train"])
    ax.invert_yaxis()
    ax.set_xlabel("share of the validation metric's variance (fANOVA)")
    ax.set_title("Which knobs matter")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def tune_report(run_dir: str | Path) -> Path:
    """Write the search's ``report.html`` (and PNGs) into a ``regdial tune`` directory."""
    import csv

    run_dir = Path(run_dir)
    if not (run_dir / "result.json").is_file():
        fail("run_dir", "a regdial tune directory (with result.json)", str(run_dir))
    result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    trials: list[dict[str, Any]] = []
    if (run_dir / "trials.csv").is_file():
        with (run_dir / "trials.csv").open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                parsed: dict[str, Any] = {"number": int(row["number"]), "state": row["state"]}
                for key, value in row.items():
                    if key not in ("number", "state"):
                        parsed[key] = float(value) if value not in ("", "None") else None
                trials.append(parsed)
    images = []
    if result.get("curve"):
        _controller(result, run_dir / "online.png")
        images.append("online.png")
    elif trials:
        _knob_curves(result, trials, run_dir / "knobs.png")
        _progress(result, trials, run_dir / "progress.png")
        images += ["knobs.png", "progress.png"]
    if result.get("importances"):
        _importances(result["importances"], run_dir / "importances.png")
        images.append("importances.png")
    metric = result["metric"]
    retrain = result.get("retrain", {})
    rows = []
    for label, key in (("unregularized", "baseline"), ("tuned", "tuned")):
        final = retrain.get(key, {}).get("final", {})
        rows.append([label, _fmt(final.get(metric)), _fmt(final.get(metric.replace("val_", "test_")))])
    chosen = Regularization.from_dict(result["best"]["setting"]).active()
    counts = ", ".join(f"{n} {state}" for state, n in result.get("trials", {}).items())
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>regdial tune: {html.escape(str(result.get('task')))}</title><style>{STYLE}</style></head><body>",
        f"<h1>regdial tune: {html.escape(str(result.get('task')))}</h1>",
        f"<p class='muted'>strategy {html.escape(result['strategy'])} · {result['epochs_spent']} epochs spent · "
        f"trials: {html.escape(counts or 'none')}</p>",
        *(
            [
                "<h2>Baseline vs tuned</h2>",
                _table(
                    rows,
                    ["setting", metric.replace("_", " "), metric.replace("val_", "test ").replace("_", " ")],
                ),
                "<p class='muted'>Both trained again with the search's seed; the test split was used for these two "
                "scores only. <a href='best/report.html'>The tuned run's own report</a>.</p>",
            ]
            if retrain
            else [
                "<h2>Best found</h2>",
                f"<p>{html.escape(metric.replace('_', ' '))} {_fmt(result['best']['value'])} in the search; not "
                "trained again or scored on the test split (the search ran without retraining).</p>",
            ]
        ),
        "<h2>Chosen setting</h2>",
        _table(
            [[k, _fmt(v)] for k, v in chosen.items()] or [["(every technique off)", ""]], ["knob", "value"]
        ),
        "<p class='muted'>As a run config: best.toml (<code>regdial run best.toml</code>). All trials: trials.csv.</p>",
    ]
    if "knobs.png" in images:
        parts += ["<h2>Validation curve per knob</h2>", "<img src='knobs.png' alt='validation metric against each knob'>",
                  "<h2>Search progress</h2>", "<img src='progress.png' alt='best validation metric against epochs spent'>"]  # fmt: skip
    if "online.png" in images:
        parts += ["<h2>The online run</h2>", "<img src='online.png' alt='metric and knob positions over epochs'>",
                  "<p class='muted'>Its choice is the setting in force at the chosen epoch, trained again from the "
                  "start for the table above.</p>"]  # fmt: skip
    if "importances.png" in images:
        parts += ["<h2>Knob importance</h2>", "<img src='importances.png' alt='importance of each knob'>"]
    parts.append("</body></html>")
    page = run_dir / "report.html"
    write_text(page, "\n".join(parts))
    return page
