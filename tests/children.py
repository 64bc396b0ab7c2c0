"""Waiting on the command-line processes a test starts, never without a bound.

A child that outlives its bound is stuck (a lock never released, a thread that keeps it
alive): it is aborted with SIGABRT, which makes Python print every thread's stack
(``PYTHONFAULTHANDLER``, set for the whole run in conftest.py), and the test fails with
that stack, instead of waiting for CI's own limit.
"""

from __future__ import annotations

import signal
import subprocess

import pytest


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """``process.communicate()``, failing the test with the child's stacks after ``timeout`` s."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        printed = ((out or "") + (err or ""))[-8000:]
        pytest.fail(
            f"{' '.join(map(str, process.args))!r} still ran after {timeout:.0f} s; it printed:\n{printed}"
        )
    return out or "", err or ""


def run(command: list[str], timeout: float, **options: object) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(command, capture_output=True, text=True)``, bounded as ``finish`` is."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)  # type: ignore[call-overload]
    out, err = finish(process, timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def stop_all(processes: list[subprocess.Popen[str]]) -> None:
    """Kill what is still running of ``processes`` (a test that failed leaves none behind)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.communicate()
