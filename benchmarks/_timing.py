"""Timing helpers shared by the benchmark scripts: medians, measured alternately."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """The median time of ``fn`` in milliseconds, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def paired_ms(fn: Callable[[], object], reference: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median times of ``fn`` and ``reference`` in ms, measured alternately so drift hits both."""
    for _ in range(3):
        fn()
        reference()
    times: list[float] = []
    reference_times: list[float] = []
    for _ in range(repeats):
        for f, bucket in ((fn, times), (reference, reference_times)):
            start = time.perf_counter()
            f()
            bucket.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * statistics.median(reference_times)
