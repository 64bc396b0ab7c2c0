"""Files: atomic writes, and reads whose every failure is one line naming the file.

A crash never leaves a half-written file: ``atomic_write`` writes a temporary file beside
the target, syncs it and renames it over the target. A crash between the two leaves only
the temporary ``.NAME.*.tmp`` file (or a library's own ``.tmpXXXX``), which
``remove_orphans`` deletes on the next start. Every file regdial writes (PNGs and
checkpoints included) goes through ``atomic_write``; the rename replaces a symbolic link
at the target itself, so a write never follows a link out of the run directory. A full
disk is a ``DiskFullError`` (an ``OSError``): one line naming the file and the space it
needed, the target untouched.

Reading a file regdial wrote (or a config a person wrote) fails with one line that names
the file and what is wrong with it, never a traceback: a missing file, a directory where
a file should be, bytes that are not UTF-8, broken JSON or TOML, nesting too deep.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from regdial._checks import Described, InputError, fail, shorten

__all__ = [
    "DamagedFileError",
    "DiskFullError",
    "atomic_write",
    "damaged",
    "read_json",
    "read_text",
    "read_toml",
    "remove_orphans",
    "write_json",
    "write_text",
]

MAX_TEXT_BYTES = 256 * 2**20
"""Configs, histories and state files are far smaller; a larger one is refused unread."""


class DamagedFileError(InputError):
    """A file regdial reads is missing, unreadable or not what regdial wrote (one line)."""


def damaged(path: Path | str, what: str, why: str, hint: str = "") -> NoReturn:
    """Raise the one-line error for a file that cannot be used."""
    message = f"{path} must be {what}, got {shorten(why, 120)}"
    raise DamagedFileError(message + (f"; {hint}" if hint else ""))


class DiskFullError(OSError):
    """The disk filled while regdial wrote ``filename``; the file it would replace is intact.

    ``strerror`` is the one line the command prints: the space needed and the space free
    (a caller may append what survived, like the last checkpoint's epoch)."""

    def __init__(self, path: Path, needed: int | None, written: int) -> None:
        free = _free_bytes(path.parent)
        need = f"about {_size(needed)}" if needed else f"more than {_size(written)}"
        super().__init__(
            errno.ENOSPC, f"no space left on device: it needed {need}, {_size(free)} free", str(path)
        )

    def add_context(self, said: str) -> None:
        """Append ``said`` to the one line (``strerror``) the command prints."""
        self.strerror = f"{self.strerror}; {said}"


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def _size(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error`` says the disk is full (an ``OSError``, or a library's own error
    type, like safetensors', that only says so in its message)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return not isinstance(error, OSError) and "No space left on device" in str(error)


def atomic_write(path: Path, write: Callable[[Path], object], *, size: int | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, sync it, rename it over ``path``.

    The rename replaces ``path`` itself, even where it is a symbolic link (the link is
    replaced, its target untouched). ``size`` is what the file is expected to need, named
    if the disk fills (a ``DiskFullError``, the temporary file removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():  # a rename cannot replace it: say so before writing
        damaged(path, "a file regdial can replace", "a directory", "move it away")
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as file:
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a run's files are as readable as any other
        os.replace(tmp, path)
    except BaseException as error:
        written = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        if _out_of_space(error) and not isinstance(error, DiskFullError):
            raise DiskFullError(path, size, written) from None
        raise


def remove_orphans(directory: Path) -> int:
    """Delete the temporary files a killed ``atomic_write`` left in ``directory``; return how many."""
    removed = 0
    if not directory.is_dir():
        return 0
    # ``.NAME.*.tmp`` are ours; ``.tmpXXXX`` is what a library's own atomic write leaves
    # (safetensors' ``save_file`` writes one beside the file it was given).
    for orphan in {*directory.glob(".*.tmp"), *directory.glob(".tmp*")}:
        if orphan.is_file() and not orphan.is_symlink():
            orphan.unlink(missing_ok=True)
            removed += 1
    return removed


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def read_text(path: Path | str, what: str) -> str:
    """The UTF-8 text of ``path``, or a one-line error saying why it cannot be read."""
    path = Path(path)
    if path.is_dir():
        damaged(path, what, "a directory")
    try:
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            damaged(path, what, f"a file of {size:,} bytes (the limit is {MAX_TEXT_BYTES:,})")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        damaged(path, what, "no such file")
    except UnicodeDecodeError:
        damaged(path, what, "bytes that are not UTF-8 text (a binary file?)")
    except OSError as error:
        damaged(path, what, (error.strerror or "an unreadable file").lower())


def read_json(path: Path | str, what: str, hint: str = "") -> Any:
    """Parse a JSON file regdial wrote; a damaged one is a one-line error naming it."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        damaged(path, what, f"broken JSON ({error.msg} at line {error.lineno})", hint)
    except RecursionError:
        damaged(path, what, "JSON nested too deeply", hint)


def read_toml(source: str | Path) -> dict[str, Any]:
    """Parse TOML text or a ``.toml`` file; every failure becomes a one-line ValueError."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    text = source
    where = "config"
    if isinstance(source, Path) or (
        isinstance(source, str) and source.endswith(".toml") and "\n" not in source
    ):
        where = str(source)
        text = read_text(Path(source), "a readable TOML file")
    if not isinstance(text, str):
        fail(where, "TOML text", text)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        reason = str(error).splitlines()[0]
        raise InputError(f"{where} must be valid TOML, got a syntax error: {shorten(reason, 120)}") from None
    except RecursionError:
        fail(where, "valid TOML", Described("tables or arrays nested too deeply"))
