"""The entry point: one line and an exit code for every way a command can fail."""

from __future__ import annotations

import os
import sys

import typer

from regdial._checks import InputError, shorten
from regdial._io import DiskFullError
from regdial.cli.app import app

__all__ = ["EXIT_CRASH", "EXIT_INPUT", "main"]

EXIT_INPUT, EXIT_CRASH = 2, 3


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit code 2 for bad input, never a traceback."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    debug = bool(os.environ.get("REGDIAL_DEBUG"))
    if not args:
        args = ["--help"]
    try:
        code = command.main(args=args, prog_name="regdial", standalone_mode=False)
        if isinstance(code, int) and code:  # click returns a command's typer.Exit code here
            sys.exit(code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("regdial: interrupted", file=sys.stderr)
        sys.exit(130)
    except (typer.exceptions.TyperException, InputError) as error:
        if debug:
            raise
        format_message = getattr(error, "format_message", None)
        message = format_message() if callable(format_message) else str(error)
        lines = str(message).splitlines() or [type(error).__name__]
        print(f"regdial: error: {shorten(lines[0], 400)}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except OSError as error:  # a file regdial had to read or write (disk full, permissions...)
        if debug:
            raise
        if isinstance(error, DiskFullError):  # which file, the space it needed, what survived
            print(
                f"regdial: error: writing {shorten(str(error.filename), 160)}: {error.strerror}",
                file=sys.stderr,
            )
            sys.exit(1)
        where = f" ({shorten(str(error.filename), 120)})" if error.filename else ""
        print(f"regdial: error: {(error.strerror or str(error)).lower()}{where}", file=sys.stderr)
        sys.exit(1)
    except (RecursionError, MemoryError) as error:
        if debug:
            raise
        print(
            f"regdial: error: {type(error).__name__}: the input is too large or too deeply nested",
            file=sys.stderr,
        )
        sys.exit(EXIT_INPUT)
    except Exception as error:  # raised inside the training: the model, torch, the user's code
        if debug:
            raise
        lines = str(error).splitlines() or [""]
        print(
            f"regdial: error: the training raised {type(error).__name__}: {shorten(lines[0], 300)} "
            "(inside the model or training code, not bad input to regdial; REGDIAL_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        sys.exit(EXIT_CRASH)
