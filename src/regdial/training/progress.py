"""What a person watching a run sees and presses: a progress bar, and Ctrl-C.

``ProgressBar`` draws a rich progress bar with the latest losses when the output is a
terminal (and nothing otherwise, so logs and CI stay clean). ``Interrupt`` turns the
first Ctrl-C into a request to stop after the current batch and save; a second one
aborts at once. Outside the main thread (where signals cannot be caught) it does nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["Interrupt", "ProgressBar"]

logger = logging.getLogger(__name__)


class Interrupt:
    """First Ctrl-C: a request (``requested``) to stop at the next safe point, ``saying``
    so in the log. Second: abort at once."""

    def __init__(self, saying: str = "stopping after this batch to save a checkpoint") -> None:
        self.requested = False
        self.saying = saying

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("%s (Ctrl-C again to abort)", self.saying)

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class ProgressBar:
    """A rich progress bar when the output is a terminal; otherwise silence."""

    def __init__(self, enabled: bool | None, total: int, title: str) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.total, self.title = total, title
        self._bar: Any = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=self.console, transient=False,
            )  # fmt: skip
            self._bar.__enter__()
            self._task = self._bar.add_task(self.title, total=self.total, stats="")
        return self

    def update(self, epoch: int, row: Mapping[str, float], metric: str) -> None:
        if self._bar is not None:
            shown = f"  val {metric} {row[f'val_{metric}']:.3f}" if f"val_{metric}" in row else ""
            stats = f"train {row['train_loss']:.3f}  val {row['val_loss']:.3f}  gap {row['gap']:+.3f}{shown}"
            self._bar.update(self._task, completed=epoch, stats=stats)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
