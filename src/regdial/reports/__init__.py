"""Reports: HTML pages (with PNGs beside them) that show where a run or a search stands.

``report(directory)`` writes the page of whatever the directory holds: a run's
(``regdial run``, ``fit(run_dir=...)``: ``run.run_report``) or a search's (``regdial tune``,
with ``result.json``: ``search.search_report``). They read the files a run or a search
wrote, never the objects in memory, so ``regdial report DIR`` can write them again at any
time. matplotlib is imported only when a report is written.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["report"]


def report(directory: str | Path) -> Path:
    """Write ``report.html`` (and its PNGs) into a run's or a search's directory; return the page."""
    directory = Path(directory)
    if (directory / "result.json").is_file():
        from regdial.reports.search import search_report

        return search_report(directory)
    from regdial.reports.run import run_report

    return run_report(directory)
