"""A throwaway PostgreSQL server for tests: its own cluster, a loopback port, stopped after.

The server runs as the ``postgres`` user (PostgreSQL refuses root) from a temporary
directory, listens on 127.0.0.1 only, and is stopped with ``pg_ctl stop -m immediate``
when the fixture ends, so no server outlives the test run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(os.environ.get("REGDIAL_PG_BIN", "/usr/lib/postgresql/15/bin"))


def available() -> str | None:
    """None if a server can be started here, else why not."""
    if not (BIN / "initdb").is_file():
        return f"no PostgreSQL server binaries in {BIN}"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to switch to the postgres user"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (3) is not installed"
    return None


def _as_postgres(command: list[str], directory: Path) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield the URL of an empty database on it; stop it."""
    root = Path(tempfile.mkdtemp(prefix="regdial-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_as_postgres(command, root), check=True, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    try:
        run([str(BIN / "initdb"), "-D", str(data), "--auth=trust", "--username=postgres", "--encoding=UTF8"])
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run([str(BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"])
        try:
            run([str(BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "regdial"])
            yield f"postgresql://postgres@127.0.0.1:{port}/regdial"
        finally:
            run([str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
