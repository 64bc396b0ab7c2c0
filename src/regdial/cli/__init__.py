"""The ``regdial`` command: run, tune, diagnose, report, tasks.

Bad input never shows a traceback: one line naming the field, the allowed values and
the value received, and exit code 2 (set ``REGDIAL_DEBUG=1`` to see the traceback).
Exit codes: 0 done, 1 the run diverged (or a file could not be written), 2 bad input
(an ``InputError``, and only that), 3 the training itself raised (the model, torch or the
user's own code: one line with the exception's type, not worded as bad input), 130
interrupted (resumable).

Flags override the config file's ``[run]`` and ``[tune]`` tables and are validated by
the same tables (``RunSection``, ``TuneOptions``): numbers are read as TOML values, so
an error names exactly what was typed.
"""

from __future__ import annotations

from regdial.cli import commands, run, tune  # noqa: F401 - each registers its command on the app
from regdial.cli.app import app
from regdial.cli.entry import EXIT_CRASH, EXIT_INPUT, main

__all__ = ["EXIT_CRASH", "EXIT_INPUT", "app", "main"]
