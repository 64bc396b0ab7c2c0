"""Reports: HTML pages (with PNGs beside them) that show where a run or a search stands.

``report(run_dir)`` for a run, ``search_report(dir)`` for a search. They read the files
a run or a search wrote, never the objects in memory, so ``regdial report DIR`` can write
them again at any time. Names load on first use (matplotlib is imported only then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from regdial._lazy import lazy

if TYPE_CHECKING:
    from regdial.reports.run import report
    from regdial.reports.search import search_report

__all__ = ["report", "search_report"]

__getattr__, __dir__ = lazy(
    globals(), {"report": "regdial.reports.run", "search_report": "regdial.reports.search"}
)
