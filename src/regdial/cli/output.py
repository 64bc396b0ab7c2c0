"""What the ``regdial`` command prints: a run's summary table, a search's table and notes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["Silent", "cell", "describe", "print_summary", "print_tune"]


class Silent:
    """The console of a data-parallel rank other than 0: it prints nothing."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def describe(setting: Any) -> str:
    active = setting.active()
    return ", ".join(f"{k}={v}" for k, v in active.items()) if active else "no regularization"


def cell(scores: dict[str, Any], key: str) -> str:
    if key not in scores:
        return "-"
    se = scores.get(f"{key}_se")
    value = f"{scores[key]:.4f}"
    return f"{value} ± {se:.4f}" if isinstance(se, float) and se > 0 else value


def print_summary(console: Any, history: Any, baseline: Any, diagnosis: Any) -> None:
    from rich.table import Table

    metric = history.metric
    table = Table(title=None, show_edge=False)
    for column in ("", f"val {metric}", f"test {metric}", "best epoch", "status"):
        table.add_column(column, justify="right" if column else "left")

    def add(label: str, h: Any) -> None:
        summary = h.meta.get("summary", {})
        final = summary.get("final", {})
        cells = [cell(final, key) for key in (f"val_{metric}", f"test_{metric}")]
        table.add_row(label, *cells, str(summary.get("best_epoch", "-")), str(h.meta.get("status")))

    if baseline is not None:
        add("unregularized", baseline)
    add("this setting", history)
    console.print(table)
    console.print(f"diagnosis: {diagnosis.message}")


def print_tune(console: Any, result: Any, out_dir: Path) -> None:
    from rich.table import Table

    metric = result.metric
    test = metric.replace("val_", "test_", 1)
    table = Table(show_edge=False)
    for column in ("", metric.replace("_", " "), test.replace("_", " ")):
        table.add_column(column, justify="right" if column else "left")
    if result.retrain:
        for label, key in (("unregularized", "baseline"), ("tuned", "tuned")):
            final = result.retrain[key].get("final", {})
            table.add_row(label, cell(final, metric), cell(final, test))
    else:
        table.add_row("tuned (search)", f"{result.best_value:.4f}", "-")
    console.print(table)
    if result.retrain.get("test"):
        console.print(f"test: {result.retrain['test']}")
    chosen = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best.active().items()
    )
    console.print(f"chosen: {chosen or 'every technique off'} ({result.chosen_by})")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(
        f"spent {result.epochs_spent} epochs ({result.strategy}); best setting: {out_dir / 'best.toml'}"
    )
    if (out_dir / "report.html").is_file():
        console.print(f"report: {out_dir / 'report.html'}")
