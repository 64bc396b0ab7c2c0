"""Test-wide settings: one torch thread per test process, and the ``slow`` marker.

The suite runs in parallel (``pytest -n 2`` in ``make test``); two processes each using
every core would fight over the same two cores and run slower than one.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: an end-to-end test of tens of seconds (deselect with -m 'not slow')"
    )


# A dead worker's trial is taken over after a short silence here (the default is 8 s), so
# the tests that kill workers do not sit out long grace periods. Child processes inherit it.
os.environ.setdefault("REGDIAL_HEARTBEAT", "1,5")

# A child process the tests abort as stuck (tests/children.py) prints every thread's stack.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

# Pre-trained weights (regdial.training.pretrained) are made once per test session, in a
# cache of its own: never the user's, and shared by the parallel test processes.
if "REGDIAL_CACHE" not in os.environ:
    import tempfile

    os.environ["REGDIAL_CACHE"] = os.path.join(tempfile.gettempdir(), f"regdial-test-cache-{os.getppid()}")
