"""What the run report and the search report share: the page's style, tables, numbers,
colours and matplotlib set up for files (no display)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["COLORS", "STYLE", "fmt", "page", "percent", "pyplot", "table", "with_se"]

COLORS = {"train": "#1f77b4", "val": "#d62728", "baseline": "#7f7f7f"}

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.state { font-size: 1.05rem; padding: 0.8rem 1rem; border-left: 5px solid #d62728; background: #fbf3f3; }
.state.good { border-color: #2ca02c; background: #f3fbf3; } .muted { color: #666; font-size: 0.9rem; }
.note { padding: 0.5rem 1rem; border-left: 4px solid #e0a800; background: #fffbea; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.92rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.8rem; text-align: left; }
th { background: #f5f5f5; } img { max-width: 100%; border: 1px solid #eee; margin: 0.4rem 0; }
"""


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only), in the reports' style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False})  # fmt: skip
    return plt


def percent(metric: str) -> tuple[float, str]:
    """(scale, unit suffix) for a metric's axis: accuracies in percent, the rest as they are."""
    return (100.0, " (%)") if metric.endswith("accuracy") else (1.0, "")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def with_se(value: Any, se: Any) -> str:
    """``0.9625 ± 0.0095`` (a 68% interval), or the value alone without a standard error."""
    if isinstance(value, int | float) and isinstance(se, int | float) and math.isfinite(se) and se > 0:
        return f"{value:.4g} ± {se:.2g}"
    return fmt(value)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, parts: Sequence[str]) -> str:
    """A whole offline HTML page: no script, no fetched resource, images beside it."""
    head = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>")  # fmt: skip
    return "\n".join([head, *parts, "</body></html>"])
