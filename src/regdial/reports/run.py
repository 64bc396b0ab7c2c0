"""``report(run_dir)``: an HTML page, with its PNGs beside it, that shows where a run stands.

``report.html`` opens offline (plain HTML and relative image links, nothing fetched) and
holds: the diagnosis, the scores with their standard errors (beside the unregularized
baseline when the run has one in ``baseline/``), the setting, learning curves (loss and
main metric, train against validation), the generalization gap over epochs with the
diagnosis marked, per-layer weight histograms and each layer's share of exact zeros.

Every file it reads is checked: a damaged one is a one-line error naming it, and weights
that are not finite (a run that diverged) are counted, not drawn.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from regdial._checks import fail, shorten
from regdial._io import atomic_write, damaged, read_json, write_text
from regdial.diagnosis import Diagnosis, diagnose, in_force, smooth
from regdial.reports._html import COLORS, fmt, page, percent, pyplot, table, with_se
from regdial.setting import Regularization
from regdial.training.history import History

__all__ = ["run_report"]


def _mark(ax: Any, diagnosis: Diagnosis, last_epoch: float) -> None:
    if diagnosis.best_epoch is not None:
        ax.axvline(diagnosis.best_epoch, color="black", linestyle=":", linewidth=1,
                   label=f"best epoch {diagnosis.best_epoch}")  # fmt: skip
    if diagnosis.overfit_epoch is not None:
        ax.axvspan(diagnosis.overfit_epoch, last_epoch, color=COLORS["val"], alpha=0.07, label="overfitting")


def _learning_curves(history: History, baseline: History | None, diagnosis: Diagnosis, path: Path) -> None:
    plt = pyplot()
    metric = history.metric
    has_metric = f"val_{metric}" in history.columns and metric != "loss"
    figure, axes = plt.subplots(
        1, 2 if has_metric else 1, figsize=(11 if has_metric else 6, 4), squeeze=False
    )
    loss_ax = axes[0][0]
    epochs = history.column("epoch")
    scale, unit = percent(metric)
    for split, name in (("train", "train"), ("val", "validation")):
        loss_ax.plot(epochs, history.column(f"{split}_loss"), color=COLORS[split], label=name)
        if has_metric and f"{split}_{metric}" in history.columns:
            axes[0][1].plot(epochs, [v * scale for v in history.column(f"{split}_{metric}")], color=COLORS[split],
                            label=name)  # fmt: skip
        if baseline is not None:
            style = "--" if split == "train" else "-."
            loss_ax.plot(baseline.column("epoch"), baseline.column(f"{split}_loss"), color=COLORS["baseline"],
                         linestyle=style, label=f"{name}, unregularized")  # fmt: skip
            if has_metric and f"{split}_{metric}" in baseline.columns:
                axes[0][1].plot(baseline.column("epoch"), [v * scale for v in baseline.column(f"{split}_{metric}")],
                                color=COLORS["baseline"], linestyle=style, label=f"{name}, unregularized")  # fmt: skip
    for ax in axes[0]:
        _mark(ax, diagnosis, epochs[-1])
        ax.set_xlabel(str(history.meta.get("epoch_unit", "epoch")))
    loss_ax.set_ylabel("cross-entropy (nats)" if history.kind == "classification" else "loss")
    loss_ax.set_title("Loss: train vs validation")
    if has_metric:
        axes[0][1].set_ylabel(metric.replace("_", " ") + unit)
        axes[0][1].set_title(f"{metric.replace('_', ' ').capitalize()}: train vs validation")
    loss_ax.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _gap(history: History, baseline: History | None, diagnosis: Diagnosis, path: Path) -> None:
    plt = pyplot()
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
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _knobs(online: Mapping[str, Any], path: Path) -> bool:
    """Each knob the run turned itself (``online=``), over its optimizer steps: from where it
    started (step 0) to the run's last step, a knob that never moved flat; False: no knobs."""
    moves = [m for m in online.get("moves", []) if isinstance(m, Mapping)]
    given = online.get("start")
    start: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    knobs = list(start) + sorted({str(m["knob"]) for m in moves} - set(start))
    if not knobs:
        return False
    last = float(online.get("last_step") or max((float(m["step"]) for m in moves), default=0.0))
    plt = pyplot()
    figure, axes = plt.subplots(1, len(knobs), figsize=(min(11, 3.7 * len(knobs)), 3.2), squeeze=False)
    for ax, knob in zip(axes[0], knobs, strict=True):
        steps = [0.0] if knob in start else []
        values = [float(start[knob])] if knob in start else []
        steps += [float(m["step"]) for m in moves if m["knob"] == knob]
        values += [float(m["value"]) for m in moves if m["knob"] == knob]
        if last > steps[-1]:  # held from its last move to the run's end
            steps, values = [*steps, last], [*values, values[-1]]
        ax.step(steps, values, where="post", color=COLORS["val"])
        if min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(knob)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return True


def _weights(weights: Mapping[str, Any], path: Path) -> list[tuple[str, int, float, int]]:
    """Histograms of each weight matrix; returns (name, size, share of exact zeros, non-finite count)."""
    plt = pyplot()
    layers = [(name, w) for name, w in weights.items() if w.dim() >= 2 and w.is_floating_point()]
    layers.sort(key=lambda item: _natural(item[0]))  # "2.weight" before "10.weight"
    rows = [(n, w.numel(), float((w == 0).float().mean()), int((~w.isfinite()).sum())) for n, w in layers]
    if not layers:
        return rows
    shown = layers[:12]
    columns = min(4, len(shown))
    lines = math.ceil(len(shown) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.6 * lines), squeeze=False)
    for ax, (name, w) in zip(axes.flat, shown, strict=False):
        values = w.detach().float().flatten()
        zeros = float((values == 0).float().mean())
        drawn = values[(values != 0) & values.isfinite()]  # exact zeros are counted, not drawn as a spike
        if drawn.numel():
            ax.hist(drawn.numpy(), bins=60, color=COLORS["train"])
        bad = int((~values.isfinite()).sum())
        extra = f", {bad:,} not finite" if bad else ""
        ax.set_title(f"{name}\n{w.numel():,} weights, {zeros:.0%} exactly 0{extra}", fontsize=8)
        ax.set_xlabel("weight value", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    figure.suptitle("Final weights per layer", fontsize=10)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return rows


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _sparsity(rows: Sequence[tuple[str, int, float, int]], path: Path) -> None:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows], [100 * r[2] for r in rows], color=COLORS["train"])
    ax.set_xlim(0, 100)
    ax.set_xlabel("exact zeros (% of the layer's weights)")
    ax.set_title("Sparsity per layer")
    ax.invert_yaxis()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _scores_table(summary: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> str:
    final = summary.get("final", {})
    keys = [k for k in final if k.startswith(("test_", "val_")) and not k.endswith(("_se", "_count"))]
    if not keys:
        return "<p>No scores: the run did not finish.</p>"
    header = ["metric", "this run (final)", "this run (best epoch)"] + (
        ["unregularized (final)"] if baseline else []
    )
    rows = []
    best = summary.get("best", {})
    for key in sorted(keys, key=lambda k: (not k.startswith("test"), k)):
        row = [key.replace("_", " "), with_se(final.get(key), final.get(f"{key}_se")),
               with_se(best.get(key), best.get(f"{key}_se")) if key in best else ""]  # fmt: skip
        if baseline:
            base = baseline.get("final", {})
            row.append(with_se(base.get(key), base.get(f"{key}_se")) if key in base else "")
        rows.append(row)
    errors = any(f"{key}_se" in scores for key in keys for scores in (final, best))
    return table(rows, header) + (
        "<p class='muted'>± one standard error over the split's samples.</p>" if errors else ""
    )


def _smoothing_note(setting: Regularization, accuracy: bool) -> str:
    if not setting.label_smoothing and not setting.mixup and not setting.cutmix:
        return ""
    compare = (
        "compare runs by accuracy"
        if accuracy
        else "compare runs at the same smoothing (this run logs no accuracy to compare them by)"
    )
    return (
        "<p class='muted'>Label smoothing and mixing train the model to be less confident, which raises its "
        f"cross-entropy loss even where its accuracy improves: {compare}.</p>"
    )


def _summary(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / "summary.json").exists():
        return {}
    data = read_json(run_dir / "summary.json", "a run summary written by regdial")
    if not isinstance(data, dict):
        fail(str(run_dir / "summary.json"), "a run summary written by regdial", type(data).__name__)
    for table_name in ("final", "best"):  # the score tables the page reads
        if not isinstance(data.get(table_name, {}), dict):
            damaged(run_dir / "summary.json", "a run summary written by regdial",
                    f"{table_name!r} that is not a table of scores ({shorten(repr(data[table_name]), 40)})")  # fmt: skip
    return data


def run_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` and its PNGs into ``run_dir``; return the page's path."""
    from regdial.training.checkpoint import load_weights

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any((run_dir / n).is_file() for n in ("history.json", "history.csv")):
        fail("run_dir", "a regdial run directory (with history.csv)", str(run_dir))
    history = History.load(run_dir)
    if len(history) == 0:
        fail("run_dir", "a run with at least one finished epoch", str(run_dir))
    summary = _summary(run_dir)
    recorded = summary.get("setting", history.meta.get("setting"))
    setting = Regularization.from_dict(recorded) if isinstance(recorded, dict) else Regularization()
    setting = in_force(history, setting) or setting  # an online run's knobs where it ended
    diagnosis = diagnose(history, setting)
    baseline_dir = run_dir / "baseline"
    has_baseline = any((baseline_dir / n).is_file() for n in ("history.json", "history.csv"))
    baseline = History.load(baseline_dir) if has_baseline else None
    baseline_summary = _summary(baseline_dir) if has_baseline else None

    _learning_curves(history, baseline, diagnosis, run_dir / "learning_curves.png")
    _gap(history, baseline, diagnosis, run_dir / "gap.png")
    weights_file = run_dir / "checkpoints" / "final.safetensors"
    layer_rows: list[tuple[str, int, float, int]] = []
    if weights_file.is_file():
        layer_rows = _weights(load_weights(weights_file), run_dir / "weights.png")
        if layer_rows:
            _sparsity(layer_rows, run_dir / "sparsity.png")

    task = str(summary.get("task", history.meta.get("task", run_dir.name)))
    status = str(summary.get("status", ""))
    reason = f" ({html.escape(str(summary['reason']))})" if summary.get("reason") else ""
    setting_rows = [[k, fmt(v)] for k, v in setting.active().items()] or [["(every technique off)", ""]]
    good = diagnosis.state in ("good fit", "still improving")
    parts = [
        f"<h1>regdial report: {html.escape(task)}</h1>",
        f"<p class='muted'>{html.escape(str(run_dir))} · {len(history)} epochs · status {html.escape(status)}{reason}</p>",
        f"<p class='state{' good' if good else ''}'><b>{html.escape(diagnosis.state)}</b>: "
        f"{html.escape(diagnosis.message)}</p>",
        "<h2>Scores</h2>", _scores_table(summary, baseline_summary), _smoothing_note(setting, "val_accuracy" in history.columns),
        "<h2>Setting</h2>", table(setting_rows, ["knob", "value"]),
        "<h2>Learning curves</h2>",
        "<img src='learning_curves.png' alt='train and validation loss and metric per epoch'>",
        "<h2>Generalization gap</h2>", "<img src='gap.png' alt='validation minus train loss per epoch'>",
    ]  # fmt: skip
    if layer_rows:
        parts += [
            "<h2>Weights</h2>",
            "<img src='weights.png' alt='histograms of each layer&#39;s final weights'>",
            "<img src='sparsity.png' alt='share of exact zeros per layer'>",
            table([[n, f"{c:,}", f"{z:.1%}", f"{b:,}"] for n, c, z, b in layer_rows],
                  ["layer", "weights", "exact zeros", "not finite"]),
        ]  # fmt: skip
    online = history.meta.get("online")
    if isinstance(online, Mapping) and _knobs(online, run_dir / "knobs.png"):
        cost = online.get("cost")
        parts += [
            "<h2>Knobs over training</h2>",
            "<img src='knobs.png' alt='each knob the run turned, over its optimizer steps'>",
            f"<p class='muted'>{int(online.get('hypergradient_steps', 0))} hypergradient steps, "
            f"{len(online.get('moves', []))} moves"
            + (f"; they took {float(cost):.0%} of the rest of training's time" if isinstance(cost, float)
               and math.isfinite(cost) else "") + "</p>",
        ]  # fmt: skip
    if isinstance(summary.get("support"), dict):
        support = summary["support"]
        parts += [
            "<h2>Feature selection</h2>",
            table([[k, fmt(v)] for k, v in support.items() if k != "features"], ["measure", "value"]),
            f"<p class='muted'>features kept: {html.escape(', '.join(map(str, support.get('features', []))))}</p>",
        ]
    written = run_dir / "report.html"
    write_text(written, page(f"regdial report: {task}", parts))
    return written
